"""Atomic file replacement, for the configuration file and the task state files alike."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


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
    if not sync_directory:
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
