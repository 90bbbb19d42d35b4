"""Atomic file replacement, for the configuration file and the task state files alike, and the
descriptors their flocks are taken on."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

# The descriptors open for a flock in this process. A flock belongs to the open file, which a fork shares:
# a child forked while one is held (Celery's prefork pool replacing a process, while the main process's
# recovery sweep holds a task's lock) would hold it until the child closed it, which it never does, and
# every later write of that task would wait for ever. Each child closes them first thing.
_lock_fds: set[int] = set()
_fork_guard = threading.Lock()  # no fork between a descriptor's open (or close) and its (un)registering


def open_for_lock(opener: Callable[[], int]) -> int:
    """The descriptor ``opener`` opens, to take a flock on; give it back with ``close_lock``."""
    with _fork_guard:
        fd = opener()
        _lock_fds.add(fd)
    return fd


def close_lock(fd: int) -> None:
    """Close a descriptor from ``open_for_lock``, which releases its lock. In a child forked while it was open
    it is closed already, and its number may be another file's by now: left alone."""
    with _fork_guard:
        if fd in _lock_fds:
            _lock_fds.remove(fd)
            os.close(fd)


def _before_fork() -> None:
    _fork_guard.acquire()


def _after_fork_in_parent() -> None:
    _fork_guard.release()


def _after_fork_in_child() -> None:
    global _fork_guard
    for fd in _lock_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _lock_fds.clear()
    _fork_guard = threading.Lock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def atomic_write(path: Path, data: bytes, *, sync_directory: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one, never half.

    A temporary file in the same directory is written and fsynced, renamed over
    the target, and the directory is fsynced so that the rename itself survives
    a power loss. Without ``sync_directory`` a power loss may undo the rename: the
    old file is then there, whole (a caller that can redo its change says so).
    """
    try:
        mode = path.stat().st_mode & 0o777  # the new file keeps the old one's permissions
    except FileNotFoundError:
        mode = 0o644
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    if sync_directory:
        fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make the renames and removals in the directory ``path`` so far survive a power loss."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
