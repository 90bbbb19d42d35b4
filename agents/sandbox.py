"""The sandbox that runs generated code: the QA test runner's only way to execute it.

Generated code never runs in the worker process. ``run`` writes the given files into a fresh
temporary directory and runs a command there under bubblewrap (``bwrap``):

- no network (a fresh network namespace with only a down loopback) and a fresh user, PID, IPC and
  UTS namespace; the process sees a read-only ``/usr`` (with ``/bin``, ``/lib``… as on the host),
  the few ``/etc`` files the dynamic loader and Python read, and the Python installation it runs
  on; not the project directory, not ``/root`` or anyone's home, not the task state directory;
- an empty environment apart from ``PATH``, ``HOME`` and ``LANG``, so no API key of the worker
  reaches the code;
- the working directory ``/work``, a size-limited tmpfs into which the wrapper copies the files
  (from the temporary directory, mounted read-only and removed afterwards), and size-limited tmpfs
  mounts on ``/tmp`` and ``/dev/shm``; everything else is read-only;
- rlimits on CPU time, address space, file size, processes and open files, set by a small wrapper
  *inside* the new user namespace, and a wall-clock timeout that kills the whole namespace;
- a seccomp filter (x86_64 and aarch64) that refuses the memory no rlimit counts (SysV IPC,
  ``memfd_create``) and the making of namespaces and mounts (``unshare``, ``clone`` with namespace
  flags, ``mount``…), which bubblewrap older than 0.8 cannot refuse itself;
- stdout and stderr read as they come and kept up to a limit each, the rest discarded.

The process limit needs care: the kernel exempts root from ``RLIMIT_NPROC``, and for other users
it counts every process of the uid. Since Linux 5.14 the count is kept per user namespace and uid,
so the limit set inside a fresh user namespace counts only the sandbox's own processes. When the
worker runs as root, bubblewrap is started as ``nobody`` (65534) so the limit applies at all, and
"python" is then the system's ``/usr/bin/python3`` if the worker's own is out of nobody's reach.

Where bubblewrap is missing, ``run`` raises ``SandboxUnavailable`` unless the operator has set
``SANDBOX_ALLOW_UNSANDBOXED=1``; then the command runs as a plain subprocess in the temporary
directory with the same rlimits, environment and timeout (as ``nobody`` when the worker is root),
and the result says ``sandboxed=False``. Its process limit then counts every process of the uid,
and it has no seccomp filter; the code then shares a uid with other runs (and with the worker when
that is not root: the worker's environment is readable in /proc), and a child that leaves the
process group outlives the run (doc/operations.md).

A run's temporary directory is named after the worker's pid: a worker killed mid-run cannot remove
its own, so each run first removes those whose worker is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import resource
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

from llm_engines.base import Cancel

# Bounds on what a caller may write into the working directory, and pass on standard input (a pipe
# written in full before the command starts: one page always fits).
MAX_FILES = 256
MAX_FILES_BYTES = 8 * 2**20
MAX_STDIN_BYTES = 4096
# Open files per process: each memfd or pipe holds kernel memory outside the address space.
MAX_OPEN_FILES = 256
TEMP_PREFIX = "aiagent-sandbox-"  # then the worker's pid and "-"
# How generated code runs on a host (``availability``).
SANDBOXED, UNSANDBOXED, UNAVAILABLE = STATES = ("sandboxed", "unsandboxed", "unavailable")

# The unprivileged uid/gid the code runs as when the worker is root ("nobody" on Debian).
SANDBOX_UID = 65534
WORKDIR = "/work"
SOURCE_DIR = "/.source"  # the files to copy into /work, read-only
_PAGE = resource.getpagesize()  # what a tmpfs allocates by
# How long the output may stay open once the command has ended or been killed.
_GRACE_S = 2.0
INSTALL_HINT = "install it with: sudo apt-get install bubblewrap"
# Python's own traceback lines for the limits it turns into exceptions rather than signals.
_MEMORY_ERROR = "MemoryError"
_FORK_REFUSED = "[Errno 11] Resource temporarily unavailable"
_FILE_TOO_LARGE = "[Errno 27] File too large"
_DISK_FULL = "[Errno 28] No space left on device"

# Runs inside the sandbox under its Python (-I -S: no site, no environment), before the command:
# the rlimits must be set after bubblewrap has made the user namespace, so that the process limit
# counts the sandbox's processes only, and the "ready" byte tells a sandbox that could not be set
# up apart from a command that failed.
# In the sandbox the working directory is a size-limited tmpfs: the wrapper first copies the files
# into it from their read-only mount (SOURCE_DIR), their bytes only (copying extended attributes can be
# refused, by SELinux say).
_WRAPPER = """\
import os, resource, sys
ready, cpu, memory, nproc, fsize, nofile = (int(v) for v in sys.argv[1:7])
source = sys.argv[7]
argv = sys.argv[9:]
for top, dirs, names in os.walk(source) if source else ():
    here = os.path.relpath(top, source)
    for name in dirs:
        os.mkdir(os.path.join(here, name))
    for name in names:
        with open(os.path.join(top, name), "rb") as given, open(os.path.join(here, name), "wb") as copy:
            copy.write(given.read())
wanted = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
          (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_FSIZE, fsize, fsize),
          (resource.RLIMIT_NOFILE, nofile, nofile), (resource.RLIMIT_CORE, 0, 0)]
for res, soft, hard in wanted:
    ceiling = resource.getrlimit(res)[1]
    if ceiling != resource.RLIM_INFINITY:
        hard = min(hard, ceiling)
    resource.setrlimit(res, (min(soft, hard), hard))
if argv[0] == "python":
    argv = [sys.executable, "-E", "-s", *argv[1:]]
os.write(ready, b"1")
os.close(ready)
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    sys.stderr.write(f"sandbox: cannot run {argv[0]!r}: {exc.strerror}\\n")
    sys.exit(127)
"""

# Read-only pieces of /etc: the loader's cache, the time zone, and the targets of
# /usr/bin's alternatives symlinks.
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives")
# Top-level directories that merged-/usr systems make symlinks into /usr.
_ROOT_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

# The seccomp filter, a classic BPF program over struct seccomp_data (nr: int at 0, arch: u32 at 4,
# args: u64[6] from 16; both architectures are little-endian, so an argument's low half is at its
# offset). bubblewrap installs it (--seccomp FD) after its own setup, just before it runs the wrapper,
# so its own mounts and clones are not filtered. Refused with EPERM: memory that RLIMIT_AS does not
# count (a SysV shm segment once detached, a memfd file) with the rest of SysV IPC, which QA's tests
# need none of; and new namespaces and mounts, in which the code could mount a tmpfs without a size
# limit (bubblewrap 0.8's --disable-userns refuses user namespaces; older ones do not).
_REFUSED_SYSCALLS = (
    "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop",
    "msgget", "msgsnd", "msgrcv", "msgctl", "memfd_create", "memfd_secret",
    "mount", "umount2", "pivot_root", "setns", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
)  # fmt: skip
_SYSCALL_NUMBERS = {  # from the kernel's headers: asm/unistd_64.h (x86_64), asm-generic/unistd.h (aarch64)
    "x86_64": {
        "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65, "semctl": 66,
        "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "memfd_create": 319,
        "memfd_secret": 447, "mount": 165, "umount2": 166, "pivot_root": 155, "setns": 308,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442, "clone": 56, "clone3": 435, "unshare": 272,
    },
    "aarch64": {
        "shmget": 194, "shmat": 196, "shmctl": 195, "shmdt": 197, "semget": 190, "semop": 193,
        "semctl": 191, "semtimedop": 192, "msgget": 186, "msgsnd": 189, "msgrcv": 188, "msgctl": 187,
        "memfd_create": 279, "memfd_secret": 447, "mount": 40, "umount2": 39, "pivot_root": 41,
        "setns": 268, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "clone": 220, "clone3": 435, "unshare": 97,
    },
}  # fmt: skip
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000  # the x32 ABI's calls on x86_64: another table, refused whole
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET. CLONE_NEWTIME (0x80) is unshare's
# and clone3's only: in clone's flags the low byte is the exit signal.
NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
CLONE_NEWTIME = 0x80
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06


class SandboxUnavailable(RuntimeError):
    """Generated code cannot be run here: no bubblewrap, or it cannot set up a sandbox."""


class RunCancelled(RuntimeError):
    """The run was stopped by its caller's ``Cancel`` (a check whose lease went to another worker): its
    processes were killed, and it has no result."""


def _from_settings(name: str, kind: type) -> Any:
    # A factory, not a value: Limits() reads the settings when it is made, so an override (or a
    # test's ``settings`` fixture) takes effect without re-importing this module.
    return field(default_factory=lambda: kind(getattr(settings, name)))


@dataclass(frozen=True)
class Limits:
    """What one run may use; ``Limits()`` takes every value from the SANDBOX_* settings."""

    wall_s: float = _from_settings("SANDBOX_WALL_SECONDS", float)
    cpu_s: int = _from_settings("SANDBOX_CPU_SECONDS", int)
    memory_mb: int = _from_settings("SANDBOX_MEMORY_MB", int)
    processes: int = _from_settings("SANDBOX_PROCESSES", int)
    output_bytes: int = _from_settings("SANDBOX_OUTPUT_BYTES", int)
    file_size_mb: int = _from_settings("SANDBOX_FILE_SIZE_MB", int)

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            if not getattr(self, item.name) > 0:
                raise ValueError(f"sandbox limit {item.name} must be positive, not {getattr(self, item.name)!r}")


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int | None  # None when killed by the wall timeout; 128+N when killed by signal N
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool
    limit: str | None  # which limit ended the run, in plain words, where it can be told
    duration_s: float
    sandboxed: bool

    def as_detail(self) -> dict:
        """A JSON-able summary for the task's history."""
        return {**dataclasses.asdict(self), "duration_s": round(self.duration_s, 3)}


def run(
    files: Mapping[str, str],
    argv: Sequence[str],
    *,
    limits: Limits | None = None,
    stdin: bytes = b"",
    cancel: Cancel | None = None,
) -> SandboxResult:
    """Write ``files`` into a fresh working directory and run ``argv`` there, sandboxed.

    ``argv[0] == "python"`` means the sandbox's Python interpreter: the standard library (and
    what its installation has in its own site-packages), never the project's virtualenv; run with
    ``-E -s`` rather than ``-I``, which would keep a script from importing the modules beside it.
    ``stdin`` (at most ``MAX_STDIN_BYTES``) is what the command reads on its standard input, then
    end of file: unlike ``argv``, it is not in ``/proc/*/cmdline`` for the code or host users to read.

    ``cancel`` stops the run from another thread: its processes are killed at once and ``RunCancelled``
    is raised (also when it was cancelled before the run started, which then does not start).

    Raises ``ValueError`` for a bad file name, argv or stdin, and ``SandboxUnavailable`` when the
    code cannot be sandboxed and unsandboxed runs are not allowed.
    """
    if cancel is not None and cancel.cancelled:
        raise RunCancelled("the run was cancelled before it started")  # nothing written, nothing started
    limits = limits or Limits()
    argv = _checked_argv(argv)
    files = _checked_files(files)
    if len(stdin) > MAX_STDIN_BYTES:
        raise ValueError(f"stdin holds {len(stdin)} bytes; at most {MAX_STDIN_BYTES} may be given")
    bwrap = shutil.which(settings.SANDBOX_BWRAP)
    if bwrap is None and not settings.SANDBOX_ALLOW_UNSANDBOXED:
        raise SandboxUnavailable(_missing_message())
    drop_root = os.geteuid() == 0
    _remove_stale_directories()
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as temp:
        root = Path(temp)
        workdir = root / "work"
        workdir.mkdir()
        _write_files(workdir, files)
        if bwrap is None:
            (root / "tmp").mkdir()  # HOME and TMPDIR; inside the sandbox a tmpfs plays that part
        if drop_root:
            for path in [root, *root.rglob("*")]:
                os.chown(path, SANDBOX_UID, SANDBOX_UID, follow_symlinks=False)
        return _execute(root, argv, limits, bwrap=bwrap, drop_root=drop_root, stdin=bytes(stdin), cancel=cancel)


def availability() -> dict[str, str]:
    """Whether generated code runs here, as a worker reports it (at its start, and in its heartbeat for
    GET /api/v1/metrics): ``state``, one of ``STATES`` (sandboxed; unsandboxed, where
    SANDBOX_ALLOW_UNSANDBOXED allows it without bubblewrap; unavailable), and ``detail``, the sentence
    saying why."""
    bwrap = shutil.which(settings.SANDBOX_BWRAP)
    if bwrap is None:
        if settings.SANDBOX_ALLOW_UNSANDBOXED:
            root_note = f" as uid {SANDBOX_UID}" if os.geteuid() == 0 else ""
            return _report(UNSANDBOXED, (
                f"bubblewrap is not installed ({settings.SANDBOX_BWRAP} not found) and SANDBOX_ALLOW_UNSANDBOXED=1: "
                f"generated code runs unsandboxed, as a plain subprocess with rlimits and a timeout{root_note}"
            ))  # fmt: skip
        return _report(UNAVAILABLE, _missing_message())
    try:
        probe = ["python", "-c", "import sys; print(sys.executable)"]
        result = run({}, probe, limits=dataclasses.replace(Limits(), wall_s=30))
    except SandboxUnavailable as exc:
        return _report(UNAVAILABLE, str(exc))
    if result.exit_code != 0:
        return _report(UNAVAILABLE, f"the sandbox could not run Python ({result.limit or result.stderr.strip()})")
    machine = os.uname().machine
    if _seccomp_program(machine) is not None:
        filtered = "; a seccomp filter refuses SysV shared memory, memfd files, namespaces and mounts"
    else:
        filtered = (
            f"; there is no seccomp filter for this architecture ({machine}), so SysV shared memory and memfd "
            "files can hold memory beyond the limits"
        )
        if "--disable-userns" not in _bwrap_options(bwrap):
            filtered += ", and the code can make namespaces of its own (bubblewrap older than 0.8)"
    return _report(SANDBOXED, (
        f"generated code runs under bubblewrap ({bwrap}) with no network, a read-only system, "
        f"a throw-away working directory and limits on CPU, memory, processes, open files and time{filtered}; "
        f"its Python is {result.stdout.strip()}"
    ))  # fmt: skip


def _report(state: str, detail: str) -> dict[str, str]:
    return {"state": state, "detail": detail}


def _missing_message() -> str:
    return (
        f"bubblewrap is not installed ({settings.SANDBOX_BWRAP} not found), so generated code cannot run "
        f"in a sandbox; {INSTALL_HINT} (make install does it when run as root), or set "
        f"SANDBOX_ALLOW_UNSANDBOXED=1 to run it unsandboxed, with the network and the file system open to it"
    )


def _checked_argv(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, str) or not argv:
        raise ValueError("argv must be a non-empty sequence of strings")
    for arg in argv:
        if not isinstance(arg, str) or "\0" in arg:
            raise ValueError(f"argv item {arg!r} is not a string without NUL characters")
    return list(argv)


def _checked_files(files: Mapping[str, str]) -> dict[str, str]:
    if len(files) > MAX_FILES:
        raise ValueError(f"{len(files)} files given; at most {MAX_FILES} may be written")
    total = 0
    for name, content in files.items():
        parts = name.split("/") if isinstance(name, str) else []
        if not parts or "\0" in name or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"file path {name!r} must be relative, without '..', '.' or empty parts")
        if not isinstance(content, str):
            raise ValueError(f"file {name!r}: content must be text")
        total += len(content.encode("utf-8", "surrogatepass"))
    if total > MAX_FILES_BYTES:
        raise ValueError(f"the files hold {total} bytes; at most {MAX_FILES_BYTES} may be written")
    return dict(files)


def _write_files(workdir: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = workdir / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
        except (OSError, UnicodeEncodeError) as exc:
            raise ValueError(f"file {name!r} cannot be written: {exc}") from None


def _python(*, drop_root: bool) -> tuple[str, str]:
    """The interpreter "python" means in the sandbox, and the installation it needs bound."""
    prefix = os.path.realpath(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    exe = os.path.join(prefix, "bin", version)
    if not os.path.exists(exe):
        exe = os.path.realpath(sys.executable)
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    if not drop_root or (_nobody_may(exe, stat.S_IXOTH) and _nobody_may(stdlib, stat.S_IROTH | stat.S_IXOTH)):
        return exe, prefix
    # The worker's own Python is out of nobody's reach (pyenv under /root, say): the system's
    # Python under /usr runs the same standard-library code.
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate):
            return candidate, "/usr"
    raise SandboxUnavailable(
        f"the worker runs as root and its Python ({exe}) is not readable by uid {SANDBOX_UID}, "
        "and there is no /usr/bin/python3 to run in the sandbox instead"
    )


def _nobody_may(path: str, bits: int) -> bool:
    """Whether a uid with no ownership of ``path`` or its parents may use it (``bits``)."""
    target = Path(path)
    try:
        return all(p.stat().st_mode & stat.S_IXOTH for p in target.parents) and target.stat().st_mode & bits == bits
    except OSError:
        return False


def _seccomp_program(machine: str) -> bytes | None:
    """The seccomp filter for ``machine`` (``os.uname().machine``), or None where there is no syscall table."""
    numbers = _SYSCALL_NUMBERS.get(machine)
    if numbers is None:
        return None

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:  # struct sock_filter; jumps skip jt/jf ops
        return struct.pack("=HBBI", code, jt, jf, k)

    refuse = SECCOMP_RET_ERRNO | errno.EPERM
    program = [
        op(_BPF_LD_W_ABS, 4),  # arch: a call of another ABI (i386's int 0x80, say) has other numbers
        op(_BPF_JEQ_K, AUDIT_ARCH[machine], jt=1),
        op(_BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        op(_BPF_LD_W_ABS, 0),  # nr
    ]
    if machine == "x86_64":
        program += [op(_BPF_JGE_K, X32_SYSCALL_BIT, jf=1), op(_BPF_RET_K, SECCOMP_RET_KILL_PROCESS)]
    for name in _REFUSED_SYSCALLS:
        program += [op(_BPF_JEQ_K, numbers[name], jf=1), op(_BPF_RET_K, refuse)]
    # clone3's flags are in a struct, out of a filter's reach: ENOSYS makes glibc (threads, posix_spawn)
    # fall back to clone, whose flags are its first argument on both architectures.
    program += [op(_BPF_JEQ_K, numbers["clone3"], jf=1), op(_BPF_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    for name, flags in (("clone", NAMESPACE_FLAGS), ("unshare", NAMESPACE_FLAGS | CLONE_NEWTIME)):
        program += [
            op(_BPF_JEQ_K, numbers[name], jf=4),
            op(_BPF_LD_W_ABS, 16),  # args[0], its low half: the kernel reads no flag above it
            op(_BPF_JSET_K, flags, jf=1),
            op(_BPF_RET_K, refuse),
            op(_BPF_RET_K, SECCOMP_RET_ALLOW),
        ]
    program.append(op(_BPF_RET_K, SECCOMP_RET_ALLOW))
    return b"".join(program)


def _bwrap_argv(bwrap: str, root: Path, python: str, prefix: str, limits: Limits, seccomp_fd: int | None) -> list[str]:
    options = _bwrap_options(bwrap)
    if "--size" not in options:
        raise SandboxUnavailable(
            f"{bwrap} is too old to limit the size of a tmpfs (--size): bubblewrap 0.6 or later is needed"
        )
    tmpfs_bytes = str(limits.file_size_mb * 2**20)
    # /work: the files given (each takes whole pages, and each may need a directory of its own) and what
    # the run may write besides, as much as /tmp holds. A bind of the host's directory took writes
    # without bound (files each under the size limit, as many as the run had time for).
    given_pages = sum(-(-path.stat().st_size // _PAGE) + 1 for path in (root / "work").rglob("*"))
    work_bytes = str(given_pages * _PAGE + limits.file_size_mb * 2**20)
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",  # explicit: without a user namespace the process limit would not hold
        *(["--disable-userns"] if "--disable-userns" in options else []),  # bubblewrap 0.8+
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for path in _ROOT_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in _ETC_FILES:
        if os.path.exists(path):
            argv += ["--ro-bind", path, path]
    if prefix != "/usr" and not prefix.startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]
    argv += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", tmpfs_bytes, "--tmpfs", "/dev/shm",
        "--remount-ro", "/dev",
        "--size", tmpfs_bytes, "--tmpfs", "/tmp",
        "--ro-bind", str(root / "work"), SOURCE_DIR,
        "--size", work_bytes, "--tmpfs", WORKDIR,
        "--chdir", WORKDIR,
        # Last: bubblewrap's own root is a tmpfs that would otherwise take writes without bound.
        "--remount-ro", "/",
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        "--", python,
    ]  # fmt: skip
    return argv


@functools.cache
def _bwrap_options(bwrap: str) -> frozenset[str]:
    """The options this bubblewrap knows, from its --help (versions differ in a few we use)."""
    try:
        shown = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"{bwrap} --help failed: {exc}") from None
    return frozenset(word for word in (shown.stdout + shown.stderr).split() if word.startswith("--"))


def _execute(
    root: Path,
    argv: list[str],
    limits: Limits,
    *,
    bwrap: str | None,
    drop_root: bool,
    stdin: bytes,
    cancel: Cancel | None,
) -> SandboxResult:
    python, prefix = _python(drop_root=drop_root)
    nproc = limits.processes
    ready_r, ready_w = os.pipe()
    passed = [ready_w]  # the command's ends of its pipes: _supervise closes them once it has started
    stdin_fd = None
    try:
        if bwrap is None:
            # Unsandboxed, RLIMIT_NPROC counts every process the uid runs: leave room for those.
            nproc += _tasks_of(SANDBOX_UID if drop_root else os.getuid())
            command = [python]
            home = str(root / "tmp")
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        else:
            program = _seccomp_program(os.uname().machine)
            seccomp_fd = None if program is None else _pipe_holding(program)
            passed += [] if seccomp_fd is None else [seccomp_fd]
            command = _bwrap_argv(bwrap, root, python, prefix, limits, seccomp_fd)
            env = {"PATH": "/usr/bin:/bin"}  # bubblewrap itself needs none of the worker's variables either
        stdin_fd = _pipe_holding(stdin) if stdin else None
    except BaseException:
        for fd in [ready_r, *passed]:
            os.close(fd)
        raise
    numbers = [ready_w, limits.cpu_s, limits.memory_mb * 2**20, nproc, limits.file_size_mb * 2**20, MAX_OPEN_FILES]
    source = "" if bwrap is None else SOURCE_DIR
    command += ["-I", "-S", "-c", _WRAPPER, *map(str, numbers), source, "--", *argv]
    identity = {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []} if drop_root else {}
    try:
        started = time.monotonic()
        outcome = _supervise(
            command,
            cwd=root / "work",
            env=env,
            stdin=stdin_fd,
            pass_fds=passed,
            limits=limits,
            identity=identity,
            cancel=cancel,
        )
        duration = time.monotonic() - started
        os.set_blocking(ready_r, False)
        try:
            ready = os.read(ready_r, 1) == b"1"
        except BlockingIOError:
            ready = False
    finally:
        os.close(ready_r)
    status_code, cpu_used, stdout, stderr, truncated, timed_out = outcome
    if not ready:
        # The command never started, whether bubblewrap failed or hung: not the code's failure.
        if timed_out:
            raise SandboxUnavailable(
                f"the sandbox could not be set up within the wall-clock timeout of {limits.wall_s:g}s "
                f"({stderr.strip() or 'bubblewrap said nothing'}); the code never ran"
            )
        raise SandboxUnavailable(
            f"the sandbox could not be set up ({stderr.strip() or f'exit status {status_code}'}); "
            "bubblewrap needs unprivileged user namespaces"
        )
    return SandboxResult(
        exit_code=status_code,
        stdout=stdout,
        stderr=stderr,
        truncated=truncated,
        timed_out=timed_out,
        limit=_limit_reached(status_code, timed_out, cpu_used, stderr, limits),
        duration_s=duration,
        sandboxed=bwrap is not None,
    )


def _pipe_holding(data: bytes) -> int:
    """The read end of a pipe that holds ``data`` (a page at most, so the write cannot block) and then ends."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    finally:
        os.close(write_end)
    return read_end


def _remove_stale_directories() -> None:
    """Remove the temporary directories of runs whose worker is gone (killed mid-run: SIGKILL skips the cleanup).

    Cheap: one listing of the temporary directory per run. A directory whose pid now belongs to another
    process stays until that one ends too.
    """
    with contextlib.suppress(OSError), os.scandir(tempfile.gettempdir()) as entries:
        for entry in entries:
            pid = entry.name.removeprefix(TEMP_PREFIX).partition("-")[0]
            ours = entry.name.startswith(TEMP_PREFIX) and pid.isdigit() and entry.is_dir(follow_symlinks=False)
            if ours and not _alive(int(pid)):
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs, of whatever uid (or the number is no pid: not a directory to remove)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _supervise(
    command: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    stdin: int | None,
    pass_fds: list[int],
    limits: Limits,
    identity: dict,
    cancel: Cancel | None,
) -> tuple[int | None, float, str, str, bool, bool]:
    """Run ``command`` to its end or the wall timeout; (exit code, CPU seconds, out, err, truncated, timed out).
    ``RunCancelled`` when ``cancel`` stopped it.

    ``stdin`` (else /dev/null) and ``pass_fds`` are the command's and closed here once it has them.
    Returns once the command's processes are gone: their end shows as the end of their output,
    which every process of the sandbox holds unless it closed it, waited for a short grace.
    """
    deadline = time.monotonic() + limits.wall_s
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            pass_fds=tuple(pass_fds),
            start_new_session=True,  # its own process group, killed as one
            **identity,
        )
    except OSError as exc:
        raise SandboxUnavailable(f"cannot start {command[0]}: {exc}") from None
    finally:
        for fd in [*pass_fds, *([] if stdin is None else [stdin])]:
            os.close(fd)
    captures = {proc.stdout: _Capture(limits.output_bytes), proc.stderr: _Capture(limits.output_bytes)}
    pidfd = os.pidfd_open(proc.pid)
    selector = selectors.DefaultSelector()
    for stream in captures:
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ)
    selector.register(pidfd, selectors.EVENT_READ)
    ended: tuple[int, Any] | None = None  # (wait status, rusage)
    timed_out = False
    reaping = threading.Lock()

    def end() -> tuple[int, Any]:
        # Killing the group takes what the command left in it (in the sandbox, bubblewrap's death
        # takes the whole namespace with it, --die-with-parent); done before the reaping, while the
        # group's id cannot belong to anyone else.
        _kill_group(proc.pid)
        selector.unregister(pidfd)
        with reaping:
            _, wait_status, rusage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)  # reaped here: Popen must not wait again
        return wait_status, rusage

    def stop() -> None:
        # The caller's Cancel, run in its thread: the group is killed, and the loop below sees the command
        # end. Not once the command is reaped, when the group's id may be another's.
        with reaping:
            if proc.returncode is None:
                _kill_group(proc.pid)

    unregister = cancel.register(stop) if cancel is not None else None

    try:
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if ended is not None:
                    break  # something still holds the output open after the grace: leave it
                timed_out = True
                ended = end()
                deadline = time.monotonic() + _GRACE_S
                continue
            for key, _ in selector.select(remaining):
                if key.fileobj == pidfd:
                    ended = end()
                    deadline = min(deadline, time.monotonic() + _GRACE_S)
                    continue
                chunk = os.read(key.fd, 65536)
                if chunk:
                    captures[key.fileobj].add(chunk)
                else:
                    selector.unregister(key.fileobj)
    finally:
        if unregister is not None:
            unregister()
        if ended is None:
            ended = end()
        selector.close()
        os.close(pidfd)
        for stream in captures:
            stream.close()
    if cancel is not None and cancel.cancelled:
        raise RunCancelled("the run was cancelled by its caller; its processes were killed")
    wait_status, rusage = ended
    if timed_out:
        exit_code = None
    elif os.WIFSIGNALED(wait_status):
        exit_code = 128 + os.WTERMSIG(wait_status)  # bubblewrap reports a signal this way too
    else:
        exit_code = os.WEXITSTATUS(wait_status)
    out, err = captures[proc.stdout], captures[proc.stderr]
    return (
        exit_code,
        rusage.ru_utime + rusage.ru_stime,
        out.text(),
        err.text(),
        out.truncated or err.truncated,
        timed_out,
    )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _Capture:
    """Keeps the first ``limit`` bytes of a stream and counts the rest away."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            self.data += chunk[:room]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _limit_reached(exit_code: int | None, timed_out: bool, cpu_used: float, stderr: str, limits: Limits) -> str | None:
    if timed_out:
        return f"wall-clock timeout of {limits.wall_s:g}s"
    if exit_code == 128 + signal.SIGXCPU or (exit_code == 128 + signal.SIGKILL and cpu_used >= limits.cpu_s):
        return f"CPU time limit of {limits.cpu_s}s"
    if exit_code == 128 + signal.SIGXFSZ:
        return f"file size limit of {limits.file_size_mb} MB"
    if not exit_code:
        return None
    # Python raises these rather than die of a signal; its traceback says which limit it was.
    lines = stderr.splitlines()
    if any(line.startswith(_MEMORY_ERROR) for line in lines):
        return f"memory limit of {limits.memory_mb} MB"
    if _FORK_REFUSED in stderr:
        return f"process limit of {limits.processes}"
    if _FILE_TOO_LARGE in stderr:
        return f"file size limit of {limits.file_size_mb} MB"
    if _DISK_FULL in stderr:
        return f"space limit of {limits.file_size_mb} MB written to /work, /tmp or /dev/shm"
    return None


def _tasks_of(uid: int) -> int:
    """How many tasks (threads included) ``uid`` runs now: what RLIMIT_NPROC counts outside a namespace."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue  # the process ended while we looked
    return count
