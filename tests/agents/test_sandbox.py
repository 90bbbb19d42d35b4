"""The sandbox for generated code: isolation, limits and output, with the real bubblewrap.

These tests need bubblewrap (``make install`` installs it as root); without it they fail and
say so rather than skip, since a QA run without it would fail the same way.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from agents import sandbox
from agents.sandbox import Limits, SandboxUnavailable
from llm_engines.base import Cancel

# Small limits keep the file fast; each test that is about one limit sets it lower still.
FAST = Limits(wall_s=5, cpu_s=2, memory_mb=256, processes=32, output_bytes=4096, file_size_mb=4)


@pytest.fixture
def bwrap() -> str:
    path = shutil.which(settings.SANDBOX_BWRAP)
    if path is None:
        pytest.fail(
            f"bubblewrap is not installed ({settings.SANDBOX_BWRAP} not found): run `make install` as root "
            "or `sudo apt-get install bubblewrap`; the sandbox tests need it"
        )
    return path


@pytest.fixture
def no_bwrap(settings, tmp_path: Path) -> None:
    settings.SANDBOX_BWRAP = str(tmp_path / "no-such-bwrap")


@pytest.fixture
def fake_bwrap(settings):
    """Makes a shell script the sandbox's bubblewrap. It lives where nobody (whom a root worker runs
    bubblewrap as) may execute it: not in pytest's temporary directory, which only root may enter."""
    directory = Path(tempfile.mkdtemp(prefix="fake-bwrap-"))
    directory.chmod(0o755)

    def install(script: str) -> None:
        fake = directory / "bwrap"
        fake.write_text(script)
        fake.chmod(0o755)
        settings.SANDBOX_BWRAP = str(fake)

    yield install
    shutil.rmtree(directory)


def run_python(code: str, limits: Limits = FAST, **files: str) -> sandbox.SandboxResult:
    return sandbox.run({"main.py": code, **files}, ["python", "main.py"], limits=limits)


def processes_running(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            continue
    return found


def test_script_output_and_exit_code_come_back(bwrap):
    result = run_python(
        "import sys, helper\nprint(helper.greet('QA'))\nprint('to stderr', file=sys.stderr)\nsys.exit(3)\n",
        **{"helper.py": "def greet(name):\n    return f'hello {name}, ünïcode'\n"},
    )

    assert result.stdout == "hello QA, ünïcode\n"
    assert result.stderr == "to stderr\n"
    assert result.exit_code == 3
    assert result.sandboxed is True
    assert (result.timed_out, result.truncated, result.limit) == (False, False, None)
    assert json.loads(json.dumps(result.as_detail()))["exit_code"] == 3


def test_files_in_subdirectories_and_other_commands_run_in_the_working_directory(bwrap):
    result = sandbox.run(
        {"pkg/__init__.py": "", "pkg/calc.py": "def add(a, b):\n    return a + b\n", "test_calc.py": UNITTEST},
        ["python", "-m", "unittest", "-q", "test_calc"],
        limits=FAST,
    )
    shell = sandbox.run({"data.txt": "x\n"}, ["sh", "-c", "pwd; cat data.txt"], limits=FAST)

    assert result.exit_code == 0, result.stderr
    assert "Ran 1 test" in result.stderr
    assert shell.stdout == "/work\nx\n"


UNITTEST = """\
import unittest
from pkg.calc import add

class AddTest(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)
"""


def test_unknown_command_exits_127(bwrap):
    result = sandbox.run({}, ["no-such-command"], limits=FAST)

    assert result.exit_code == 127
    assert "cannot run 'no-such-command'" in result.stderr


def test_infinite_loop_is_killed_at_the_cpu_limit(bwrap):
    result = run_python("while True:\n    pass\n", Limits(wall_s=10, cpu_s=1))

    assert result.limit == "CPU time limit of 1s"
    assert result.exit_code == 128 + 24  # SIGXCPU
    assert result.duration_s < 5


def test_sleeping_script_is_killed_at_the_wall_clock_timeout(bwrap):
    result = run_python("import time\nprint('started', flush=True)\ntime.sleep(60)\n", Limits(wall_s=1))

    assert result.timed_out is True
    assert result.exit_code is None
    assert result.limit == "wall-clock timeout of 1s"
    assert result.stdout == "started\n"
    assert result.duration_s < 4


# Forks children that stay alive until the limit refuses one (or a bound is reached) and
# prints how many it got. Bounded, so that it cannot hurt the machine if a limit failed.
HOLDING_FORKS = """
import os, time
children = 0
try:
    for _ in range(300):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as exc:
    print(children, type(exc).__name__)
else:
    print(children, "none")
"""


def test_process_limit_counts_only_the_sandboxs_own_processes(bwrap):
    # Counted in the sandbox's own user namespace: the limit less the sandbox's init and this
    # script, whatever else the uid runs on the host.
    result = run_python(HOLDING_FORKS, Limits(wall_s=10, processes=20))

    count, error = result.stdout.split()
    assert error == "BlockingIOError"
    assert 10 <= int(count) < 20
    assert result.exit_code == 0  # the sleeping children went with the sandbox


def test_fork_bomb_is_contained_and_ends_at_the_wall_clock_timeout(bwrap):
    marker = f"bomb_{uuid.uuid4().hex}"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    started = time.monotonic()

    result = sandbox.run({f"{marker}.py": bomb}, ["python", f"{marker}.py"], limits=Limits(wall_s=2, processes=32))

    assert result.timed_out is True
    assert result.limit == "wall-clock timeout of 2s"
    assert time.monotonic() - started < 6
    assert processes_running(marker) == [], "bomb processes outlived the run"


def test_fork_bomb_that_dies_on_refusal_reports_the_process_limit(bwrap):
    result = run_python("import os\nwhile True:\n    os.fork()\n", Limits(wall_s=5, processes=16))

    assert result.exit_code == 1
    assert result.limit == "process limit of 16"


def test_four_gigabyte_allocation_fails_with_memory_error(bwrap):
    result = run_python("data = bytearray(4 * 2**30)\nprint('allocated')\n")

    assert result.stdout == ""
    assert result.stderr.rstrip().endswith("MemoryError")
    assert result.limit == "memory limit of 256 MB"


def test_network_is_unreachable(bwrap):
    # A listener of this test process proves the host's loopback answers; the sandbox's does not.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    code = f"""
import socket
for address in [("127.0.0.1", {port}), ("127.0.0.1", 6379), ("1.1.1.1", 53)]:
    try:
        socket.create_connection(address, timeout=2).close()
        print(address, "connected")
    except OSError as exc:
        print(address, "failed:", type(exc).__name__)
try:
    socket.getaddrinfo("example.com", 80)
    print("resolved")
except OSError as exc:
    print("dns failed:", type(exc).__name__)
"""
    try:
        result = run_python(code)
    finally:
        listener.close()

    assert result.exit_code == 0, result.stderr
    assert "connected" not in result.stdout
    assert "resolved" not in result.stdout
    assert result.stdout.count("failed:") == 4


def test_nothing_outside_the_working_directory_is_writable_or_visible(bwrap, tmp_path):
    host_tmp_file = Path(tempfile.mkstemp(prefix="sandbox-host-visible-")[1])
    host_tmp_file.write_text("host")
    hidden = [str(settings.BASE_DIR), str(settings.TASKS_STATE_DIR), str(host_tmp_file), str(tmp_path)]
    marker = uuid.uuid4().hex
    code = f"""
import os
for path in ["/etc/x", "/usr/x", "/x", "/dev/x", "/proc/x", "/bin/x"]:
    try:
        open(path, "w").write("x")
        print("WROTE", path)
    except OSError as exc:
        print("refused", path, type(exc).__name__)
for path in {hidden!r}:
    print("VISIBLE" if os.path.exists(path) else "hidden", path)
open("/tmp/scratch", "w").write("private /tmp")
open("{marker}.txt", "w").write("kept")
print(os.getcwd(), sorted(os.listdir(".")))
"""
    try:
        result = run_python(code)
    finally:
        host_tmp_file.unlink()
    left = list(Path(tempfile.gettempdir()).glob(f"aiagent-sandbox-*/work/{marker}.txt"))

    assert result.exit_code == 0, result.stderr
    assert "WROTE" not in result.stdout
    assert "VISIBLE" not in result.stdout
    assert result.stdout.count("refused") == 6
    assert result.stdout.endswith(f"/work {sorted(['main.py', f'{marker}.txt'])}\n")
    assert left == [], "the working directory was not removed"


def test_the_working_directory_holds_the_files_and_a_bounded_amount_more(bwrap):
    """Each file was bounded in size, but not their number: a run could fill the worker's disk (where the
    task state files may live) with files under the size limit. The given files stay writable."""
    code = """
import os
open("main.py", "a").write("# changed by the run\\n")
os.makedirs("pkg/sub", exist_ok=True)
n = 0
while True:
    with open(f"pkg/sub/f{n}", "wb") as handle:
        handle.write(b"x" * 2**20)
    n += 1
"""
    result = run_python(code, Limits(wall_s=20, cpu_s=10, file_size_mb=4), **{"data/input.txt": "given"})
    assert result.exit_code == 1, result.stderr
    assert "No space left on device" in result.stderr
    assert result.limit == "space limit of 4 MB written to /work, /tmp or /dev/shm"
    listing = run_python(
        "import os\nprint(open('data/input.txt').read(), sorted(os.listdir('.')))", **{"data/input.txt": "given"}
    )
    assert listing.stdout == "given ['data', 'main.py']\n", listing.stderr


def test_output_is_truncated_at_the_limit_while_the_flood_is_drained(bwrap):
    flood = "import sys\nsys.stderr.write('e' * 10000)\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    result = run_python(flood, Limits(wall_s=10, cpu_s=1, output_bytes=1000))

    assert result.truncated is True
    assert result.stdout == "x" * 1000
    assert result.stderr == "e" * 1000
    assert result.limit == "CPU time limit of 1s"


def test_secrets_in_the_worker_environment_do_not_reach_the_code(bwrap, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-from-the-worker")
    code = "import os\nprint(sorted(os.environ))\nprint(open('/proc/1/environ').read())\n"

    result = run_python(code)

    assert result.exit_code == 0, result.stderr
    assert "OPENAI_API_KEY" not in result.stdout
    assert "sk-secret-from-the-worker" not in result.stdout
    assert "'PATH'" in result.stdout
    assert "'HOME'" in result.stdout


def test_bad_file_paths_are_refused_by_name():
    for bad in ["../escape.py", "/etc/passwd", "a/../../b.py", "", "a//b.py", "./a.py", "dir/"]:
        with pytest.raises(ValueError, match="file path"):
            sandbox.run({bad: "x"}, ["python", "-c", "pass"], limits=FAST)
    with pytest.raises(ValueError, match="at most"):
        sandbox.run({f"f{i}.py": "" for i in range(sandbox.MAX_FILES + 1)}, ["true"], limits=FAST)


def test_limits_default_to_the_settings(settings):
    settings.SANDBOX_WALL_SECONDS = 3
    settings.SANDBOX_PROCESSES = 7

    assert Limits().wall_s == 3.0
    assert Limits().processes == 7
    with pytest.raises(ValueError, match="memory_mb"):
        Limits(memory_mb=0)


def test_availability_says_runs_are_sandboxed(bwrap):
    report = sandbox.availability()

    assert report["state"] == "sandboxed", report
    assert "bubblewrap" in report["detail"]


def test_missing_bubblewrap_raises_with_how_to_install(no_bwrap):
    with pytest.raises(SandboxUnavailable) as raised:
        sandbox.run({"main.py": "print('never')"}, ["python", "main.py"], limits=FAST)

    message = str(raised.value)
    assert "bubblewrap is not installed" in message
    assert "apt-get install bubblewrap" in message
    assert "SANDBOX_ALLOW_UNSANDBOXED=1" in message
    assert sandbox.availability() == {"state": "unavailable", "detail": message}


def test_bubblewrap_without_the_options_needed_raises(settings):
    settings.SANDBOX_BWRAP = shutil.which("false")

    with pytest.raises(SandboxUnavailable, match="too old"):
        sandbox.run({}, ["python", "-c", "pass"], limits=FAST)


def test_bubblewrap_that_cannot_set_up_a_sandbox_raises_with_its_message(fake_bwrap):
    # What bubblewrap does where user namespaces are forbidden: it fails before the command starts.
    fake_bwrap(
        '#!/bin/sh\nif [ "$1" = --help ]; then echo "--size --disable-userns"; exit 0; fi\n'
        'echo "bwrap: setting up uid map: Permission denied" >&2\nexit 1\n'
    )
    with pytest.raises(SandboxUnavailable, match=r"could not be set up.*uid map: Permission denied"):
        sandbox.run({}, ["python", "-c", "pass"], limits=FAST)
    assert sandbox.availability()["state"] == "unavailable"


def test_unsandboxed_runs_when_allowed_with_the_same_limits(no_bwrap, settings, monkeypatch):
    settings.SANDBOX_ALLOW_UNSANDBOXED = True
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-from-the-worker")
    code = "import os, sys\nprint(os.getcwd(), sorted(os.environ))\nprint(open('data.txt').read())\nsys.exit(2)\n"

    result = run_python(code, **{"data.txt": "given"})
    looping = run_python("while True:\n    pass\n", Limits(wall_s=10, cpu_s=1))
    hungry = run_python("bytearray(4 * 2**30)\n")
    sleeping = run_python("import time\ntime.sleep(60)\n", Limits(wall_s=1))

    assert result.sandboxed is False
    assert result.exit_code == 2
    assert "aiagent-sandbox-" in result.stdout
    assert "given" in result.stdout
    assert "OPENAI_API_KEY" not in result.stdout
    assert looping.limit == "CPU time limit of 1s"
    assert hungry.limit == "memory limit of 256 MB"
    assert (sleeping.timed_out, sleeping.limit) == (True, "wall-clock timeout of 1s")
    report = sandbox.availability()
    assert report["state"] == "unsandboxed"
    assert "unsandboxed" in report["detail"]


def test_unsandboxed_runs_are_held_to_the_process_limit(no_bwrap, settings):
    settings.SANDBOX_ALLOW_UNSANDBOXED = True

    result = run_python(HOLDING_FORKS, Limits(wall_s=10, processes=20))

    count, error = result.stdout.split()
    assert error == "BlockingIOError"
    assert int(count) < 20


def test_a_project_file_named_like_a_standard_module_does_not_break_qas_runner(bwrap):
    """A project's json.py stood in for the runner's own json module: the run ended without a report,
    and Debug was sent after a bug that was not in the project's code."""
    from agents.developer import qa_agent

    files = [
        {"path": "json.py", "content": "def dumps(value):\n    return 'not json'\n"},
        {"path": "solution.py", "content": "def add(a, b):\n    return a + b\n"},
    ]
    tests = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    result = qa_agent.run_tests(files, tests, limits=FAST)
    assert result["passed"], result["output"]
    assert [test["name"] for test in result["tests"]] == ["test_add"]


BROKEN_ADD = [{"path": "solution.py", "content": "def add(a, b):\n    return a - b\n"}]


@pytest.mark.parametrize(
    ("tests", "names"),
    [
        (
            "import unittest\nfrom solution import add\n\nclass TestAdd(unittest.TestCase):\n"
            "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n",
            ["TestAdd.test_add"],
        ),
        (
            "from solution import add\n\nclass TestAdd:\n    def test_add(self):\n        assert add(2, 3) == 5\n",
            ["TestAdd.test_add"],
        ),
        (
            "import unittest\nfrom solution import add\n\nclass TestAdd(unittest.TestCase):\n"
            "    @unittest.skip('later')\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n",
            ["TestAdd.test_add"],
        ),
        ("from solution import add\n\nif __name__ == '__main__':\n    assert add(2, 3) == 5\n", ["collecting tests"]),
        ("", ["collecting tests"]),
    ],
)
def test_tests_qa_cannot_find_or_that_do_not_run_do_not_pass(bwrap, tests, names):
    """Only module-level test_* functions were run; with none, the check passed as "module-level asserts":
    unittest or pytest classes, asserts under ``if __name__ == '__main__'`` or no tests at all passed
    broken code."""
    from agents.developer import qa_agent

    result = qa_agent.run_tests(BROKEN_ADD, tests, limits=FAST)
    assert result["passed"] is False, result["output"]
    assert [test["name"] for test in result["tests"]] == names


def test_module_level_asserts_alone_are_still_tests(bwrap):
    from agents.developer import qa_agent

    files = [{"path": "solution.py", "content": "def add(a, b):\n    return a + b\n"}]
    result = qa_agent.run_tests(files, "from solution import add\nassert add(2, 3) == 5\n", limits=FAST)
    assert result["passed"] is True, result["output"]
    assert [test["name"] for test in result["tests"]] == ["module-level asserts"]


def test_code_that_floods_stdout_does_not_crowd_out_the_report(bwrap):
    """The report was the last line of the captured stdout, which keeps its first bytes only: correct code
    that wrote more than that to file descriptor 1 (os.write, a child process) failed its check with "the
    test run ended without a report"."""
    from agents.developer import qa_agent

    files = [
        {
            "path": "solution.py",
            "content": "import os\n\ndef add(a, b):\n    os.write(1, b'x' * 20000)\n    return a + b\n",
        }
    ]
    tests = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    result = qa_agent.run_tests(files, tests, limits=FAST)
    assert result["passed"] is True, result["output"]


def test_a_report_of_many_long_failures_fits_the_captured_output(bwrap):
    from agents.developer import qa_agent

    tests = "".join(f"def test_{n}():\n    print('y' * 900)\n    assert False, 'z' * 900\n\n" for n in range(30))
    result = qa_agent.run_tests(BROKEN_ADD, tests, limits=FAST)  # FAST captures 4,096 bytes
    assert result["passed"] is False
    assert len(result["tests"]) == 30 and "0 of 30 tests passed" in result["output"]


# Each asks for a little (1 MB of SysV shm, one memfd): refused, or it would not hurt the machine either.
ESCAPING_MEMORY = """
import ctypes, os, resource
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
segment = libc.shmget(0, 2**20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
print("shmget", segment, os.strerror(ctypes.get_errno()) if segment < 0 else "made")
if segment >= 0:
    libc.shmctl(segment, 0, None)  # IPC_RMID
try:
    os.close(os.memfd_create("held"))
    print("memfd made")
except OSError as exc:
    print("memfd", exc.strerror)
print("open files", resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_memory_outside_the_address_space_limit_is_refused(bwrap):
    """A detached SysV shm segment or a memfd file is not address space: a run with 256 MB a process pinned
    2 GB of host RAM with them (plan/review_sandbox_s12.md, finding 1). The seccomp filter refuses both, and
    the open files (each memfd or pipe holds kernel memory) are limited."""
    result = run_python(ESCAPING_MEMORY)

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "shmget -1 Operation not permitted",
        "memfd Operation not permitted",
        f"open files ({sandbox.MAX_OPEN_FILES}, {sandbox.MAX_OPEN_FILES})",
    ]


ORDINARY = """
import concurrent.futures, multiprocessing, subprocess, sys, threading
from multiprocessing import shared_memory

def square(x):
    return x * x

if __name__ == "__main__":
    seen = []
    threads = [threading.Thread(target=seen.append, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("threads", sorted(seen))
    child = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
    print("subprocess", child.stdout.strip())
    print("shell", subprocess.run("echo $((2 + 3))", shell=True, capture_output=True, text=True).stdout.strip())
    with multiprocessing.get_context("fork").Pool(3) as pool:
        print("fork pool", pool.map(square, range(5)))
    queue = multiprocessing.Queue()
    child = multiprocessing.Process(target=queue.put, args=("queued",))
    child.start()
    print("process", queue.get())
    child.join()
    with concurrent.futures.ProcessPoolExecutor(2) as executor:
        print("executor", list(executor.map(square, range(4))))
    memory = shared_memory.SharedMemory(create=True, size=4096)  # POSIX shm: a file in /dev/shm, limited
    memory.buf[0] = 7
    print("posix shm", memory.buf[0])
    memory.close()
    memory.unlink()
"""


def test_threads_subprocesses_and_multiprocessing_still_run_under_the_filter(bwrap):
    result = run_python(ORDINARY, Limits(wall_s=30, cpu_s=10, memory_mb=256, processes=32, output_bytes=4096))

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "threads [0, 1, 2, 3, 4, 5, 6, 7]",
        "subprocess 42",
        "shell 5",
        "fork pool [0, 1, 4, 9, 16]",
        "process queued",
        "executor [0, 1, 4, 9]",
        "posix shm 7",
    ]


NAMESPACES = """
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
CLONE = {"x86_64": 56, "aarch64": 220}[os.uname().machine]

def said(result):
    return "ok" if result >= 0 else os.strerror(ctypes.get_errno())

print("unshare", said(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)))
pid = libc.syscall(CLONE, CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0)
if pid == 0:
    os._exit(0)
if pid > 0:
    os.waitpid(pid, 0)
print("clone", said(pid))
print("clone3", said(libc.syscall(435, None, 0)))
print("mount", said(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
"""


def test_namespaces_and_mounts_are_refused_even_where_bubblewrap_cannot_refuse_them(fake_bwrap, bwrap):
    """bubblewrap before 0.8 has no --disable-userns: the code made a user and mount namespace of its own and
    mounted a tmpfs without a size limit (finding 4). The fake is the real bubblewrap with --disable-userns
    taken out of its --help, as bubblewrap 0.6 or 0.7 would show it."""
    fake_bwrap(
        f'#!/bin/sh\nif [ "$1" = --help ]; then {bwrap} --help 2>&1 | sed s/--disable-userns//; exit 0; fi\n'
        f'exec {bwrap} "$@"\n'
    )
    result = run_python(NAMESPACES)

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "unshare Operation not permitted",
        "clone Operation not permitted",
        "clone3 Function not implemented",  # so that glibc falls back to clone, whose flags the filter sees
        "mount Operation not permitted",
    ]


def run_filter(program: bytes, *, arch: int, nr: int, flags: int = 0) -> int:
    """What the kernel would do with one call: a classic BPF interpreter for the few operations the filter uses."""
    data = struct.pack("=IIQ6Q", nr, arch, 0, flags, 0, 0, 0, 0, 0)
    ops = [struct.unpack_from("=HBBI", program, at) for at in range(0, len(program), 8)]
    pc = acc = 0
    while True:
        code, jt, jf, k = ops[pc]
        if code == 0x06:  # ret
            return k
        if code == 0x20:  # ld word
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
            continue
        taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
        pc += 1 + (jt if taken else jf)


@pytest.mark.parametrize(("machine", "read"), [("x86_64", 0), ("aarch64", 63)])
def test_the_filter_of_each_architecture_refuses_what_it_should_and_nothing_else(machine, read):
    """aarch64 cannot run here, so both programs are run through an interpreter of their instructions."""
    program = sandbox._seccomp_program(machine)
    numbers, arch = sandbox._SYSCALL_NUMBERS[machine], sandbox.AUDIT_ARCH[machine]
    other_arch = sandbox.AUDIT_ARCH["aarch64" if machine == "x86_64" else "x86_64"]
    threads = 0x003D0F00  # what glibc's pthread_create passes: CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|…
    eperm, enosys = sandbox.SECCOMP_RET_ERRNO | errno.EPERM, sandbox.SECCOMP_RET_ERRNO | errno.ENOSYS

    def verdict(name_or_nr, flags=0, on=arch):
        nr = numbers[name_or_nr] if isinstance(name_or_nr, str) else name_or_nr
        return run_filter(program, arch=on, nr=nr, flags=flags)

    for name in ("shmget", "shmat", "semget", "msgget", "memfd_create", "mount", "umount2", "pivot_root", "fsopen"):
        assert verdict(name) == eperm, name
    assert verdict("clone", threads) == sandbox.SECCOMP_RET_ALLOW
    assert verdict("clone", int(signal.SIGCHLD)) == sandbox.SECCOMP_RET_ALLOW  # fork
    assert verdict("clone", 0x10000000 | int(signal.SIGCHLD)) == eperm  # CLONE_NEWUSER
    assert verdict("unshare", 0x400) == sandbox.SECCOMP_RET_ALLOW  # CLONE_FILES: no namespace
    assert verdict("unshare", 0x80) == eperm  # CLONE_NEWTIME
    assert verdict("unshare", 0x40000000) == eperm  # CLONE_NEWNET
    assert verdict("clone3") == enosys
    assert verdict(read) == sandbox.SECCOMP_RET_ALLOW
    assert verdict(read, on=other_arch) == sandbox.SECCOMP_RET_KILL_PROCESS
    assert verdict(read, on=0x40000003) == sandbox.SECCOMP_RET_KILL_PROCESS  # i386
    if machine == "x86_64":
        assert verdict(0x40000000 | read) == sandbox.SECCOMP_RET_KILL_PROCESS  # x32
    assert sandbox._seccomp_program("riscv64") is None


def test_an_architecture_without_a_syscall_table_runs_without_the_filter_and_says_so(bwrap, monkeypatch):
    # Simulates a host this module has no syscall numbers for (riscv64, say): the table is taken away.
    monkeypatch.setattr(sandbox, "_SYSCALL_NUMBERS", {})

    result = run_python(ESCAPING_MEMORY)
    report = sandbox.availability()

    assert result.exit_code == 0, result.stderr
    assert "memfd made" in result.stdout
    assert report["state"] == "sandboxed"
    assert f"no seccomp filter for this architecture ({os.uname().machine})" in report["detail"]


def test_a_sandbox_that_never_gets_ready_is_unavailable_not_a_failure_of_the_code(fake_bwrap):
    """A bubblewrap stuck in its setup ran into the wall-clock timeout, and the run came back as the code's
    timeout: the coder was asked to fix code that never ran (finding 7b). The fake stands for that
    bubblewrap."""
    fake_bwrap('#!/bin/sh\nif [ "$1" = --help ]; then echo "--size --disable-userns"; exit 0; fi\nexec sleep 30\n')
    with pytest.raises(SandboxUnavailable, match="not be set up within the wall-clock timeout of 1s"):
        sandbox.run({}, ["python", "-c", "pass"], limits=Limits(wall_s=1))


def test_a_cancelled_run_is_killed_at_once_and_raises(bwrap):
    """A check whose lease went to another worker ran its tests on to the end of the wall-clock timeout,
    beside the worker that took the check over. Its caller's Cancel now kills the run's processes."""
    marker = f"cancelled-{uuid.uuid4().hex}"
    cancel = Cancel()
    threading.Timer(0.5, cancel.cancel).start()
    started = time.monotonic()
    with pytest.raises(sandbox.RunCancelled):
        sandbox.run(
            {"main.py": f"import time\n# {marker}\ntime.sleep(30)\n"},
            ["python", "main.py", marker],
            limits=Limits(wall_s=30),
            cancel=cancel,
        )
    assert time.monotonic() - started < 5, "the run went on"
    assert processes_running(marker) == []


def test_a_run_cancelled_before_it_starts_does_not_start(bwrap, monkeypatch):
    cancel = Cancel()
    cancel.cancel()
    made = []
    monkeypatch.setattr(sandbox.tempfile, "TemporaryDirectory", lambda **kw: made.append(kw))
    with pytest.raises(sandbox.RunCancelled, match="before it started"):
        sandbox.run({"main.py": "print('ran')\n"}, ["python", "main.py"], limits=FAST, cancel=cancel)
    assert made == []  # no working directory written


def test_a_cancel_after_the_run_ended_leaves_its_result(bwrap):
    cancel = Cancel()
    result = sandbox.run({"main.py": "print('ran')\n"}, ["python", "main.py"], limits=FAST, cancel=cancel)
    cancel.cancel()  # its hook is gone with the run: nothing is killed, nothing raised
    assert result.stdout == "ran\n" and result.exit_code == 0


def test_the_directory_of_a_killed_worker_is_removed_by_the_next_run(bwrap):
    """A SIGKILLed worker (Celery's hard time limit, the OOM killer) left its run's directory, with the task's
    code, in the temporary directory for good (finding 6)."""
    temp = Path(tempfile.gettempdir())
    ours = Path(tempfile.mkdtemp(prefix=f"{sandbox.TEMP_PREFIX}{os.getpid()}-"))  # a live worker's: stays
    worker = os.fork()
    if worker == 0:
        try:
            sandbox.run({"main.py": "import time\ntime.sleep(30)\n"}, ["python", "main.py"], limits=Limits(wall_s=30))
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not list(temp.glob(f"{sandbox.TEMP_PREFIX}{worker}-*/work/main.py")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
    left = list(temp.glob(f"{sandbox.TEMP_PREFIX}{worker}-*"))
    assert len(left) == 1, "the killed worker's run did not start"

    try:
        result = run_python("print('next run')")
        assert result.stdout == "next run\n"
        assert not left[0].exists(), "the killed worker's directory is still there"
        assert ours.exists()
    finally:
        shutil.rmtree(ours)
        for path in left:
            shutil.rmtree(path, ignore_errors=True)


FORGED_FROM_ARGV = r"""
import json, os
arguments = open("/proc/self/cmdline", "rb").read().split(b"\0")
nonce = next((a.decode() for a in arguments if a.startswith(b"QA-REPORT-")), None)
for fd in map(int, os.listdir("/proc/self/fd")):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    if nonce and fd > 2 and target.startswith("pipe:") and target != os.readlink("/proc/self/fd/2"):
        os.write(fd, (nonce + json.dumps([{"name": "test_add", "passed": True, "output": ""}]) + "\n").encode())
        os._exit(0)

def add(a, b):
    return a - b
"""

FORGED_BY_PATCHING = r"""
import __main__

def forged(name, run):
    __main__.results.append({"name": name, "passed": True, "output": ""})

__main__.outcome = forged
__main__.method_test = lambda cls, name: lambda: None

def add(a, b):
    return a - b
"""


@pytest.mark.parametrize("solution", [FORGED_FROM_ARGV, FORGED_BY_PATCHING], ids=["nonce-in-argv", "runner-globals"])
def test_the_cheap_forgeries_of_qas_report_do_not_pass_broken_code(bwrap, solution):
    """The code under test read the report's nonce from /proc/self/cmdline and wrote a passing report, or
    replaced the runner's outcome() in __main__: broken code passed (finding 2). The nonce now comes on stdin
    and the runner keeps its state in a function's locals; a pass is still no proof (doc/agents.md)."""
    from agents.developer import qa_agent

    tests = (
        "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n\n"
        "class TestAdd:\n    def test_add(self):\n        assert add(2, 3) == 5\n"
    )
    result = qa_agent.run_tests([{"path": "solution.py", "content": solution}], tests, limits=FAST)

    assert result["passed"] is False, result["output"]
    assert [(test["name"], test["passed"]) for test in result["tests"]] in (
        [("test_add", False), ("TestAdd.test_add", False)],
        [("import test_qa", False)],
    )


def test_stdin_reaches_the_command_and_is_bounded(bwrap):
    result = sandbox.run({}, ["python", "-c", "import sys; print(sys.stdin.read()[::-1])"], limits=FAST, stdin=b"olleh")

    assert result.stdout == "hello\n", result.stderr
    with pytest.raises(ValueError, match="stdin"):
        sandbox.run({}, ["true"], limits=FAST, stdin=b"x" * (sandbox.MAX_STDIN_BYTES + 1))
