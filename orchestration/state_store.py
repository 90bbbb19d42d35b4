"""The task state store: one JSON file per task, the truth, mirrored into the ``Task`` table.

Every write happens under the task's file lock (so that concurrent workers
never lose a history event), goes to a temporary file in the same directory
that is fsynced and then renamed over the old one (so that a crash never leaves
half a file), and raises ``version`` by one. The mirror row is written in the
same call, after the file. An observer, when given, is told of every write (the server publishes
each new history event on the MCP feedback channel); it runs under the lock, so that the changes
of one task reach it in order, and its failure never fails the write. ``remove`` deletes a task's
files under its lock (retention, orchestration/retention.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils.dateparse import parse_datetime

from balancer.files import atomic_write, close_lock, fsync_directory, open_for_lock
from orchestration.models import Task
from orchestration.packets import STATUSES, now_iso, parse_task_id

logger = logging.getLogger(__name__)

# The file that says a directory is a server's state directory. Without it, a directory that holds no task
# while the database lists some is taken for the mount point of a volume that did not mount (or a wrong
# TASKS_STATE_DIR): tasks written there would be hidden once the volume is mounted, and those on it are
# not found meanwhile.
MARKER = ".aiagentserver"


class TaskNotFound(LookupError):
    pass


class CorruptState(Exception):
    """A state file that is not a task packet; the message names the file and the problem."""


# A task id in the canonical form that ``parse_task_id`` gives: matched, not parsed, as a planner's packet
# names each of its children (7 us a parse, against 0.3 us a match, at every read of the packet).
_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _is_task_id(value: Any) -> bool:
    return isinstance(value, str) and _TASK_ID.fullmatch(value) is not None


def _is_time(value: Any) -> bool:
    try:
        return isinstance(value, str) and parse_datetime(value) is not None
    except ValueError:  # the form of one, but no such time (a 13th month)
        return False


def _is_history(value: Any) -> bool:
    return isinstance(value, list) and all(
        type(event) is dict and type(event.get("event")) is str and type(event.get("detail")) is dict for event in value
    )


# Each field of a packet, with what its value must be: a file that has a field of another type (a
# "history": null, say) would otherwise be read as a packet and break the code that uses the field
# (an HTML 500 where the API promises its corrupt_state error).
FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task_id": (lambda value: isinstance(value, str), "a string"),
    "profile": (lambda value: isinstance(value, str), "a string"),
    "role": (lambda value: isinstance(value, str), "a string"),
    "status": (lambda value: value in STATUSES, f"one of {', '.join(STATUSES)}"),
    "payload": (lambda value: isinstance(value, dict), "an object"),
    "result": (lambda value: value is None or isinstance(value, dict), "an object or null"),
    "history": (_is_history, "a list of events, each an object with an `event` text and a `detail` object"),
    "iteration": (lambda value: type(value) is int and value >= 0, "a whole number from 0"),
    "parent_id": (lambda value: value is None or _is_task_id(value), "a task id or null"),
    "children": (lambda value: isinstance(value, list) and all(map(_is_task_id, value)), "a list of task ids"),
    "version": (lambda value: type(value) is int and value >= 1, "a whole number from 1"),
    "created_at": (_is_time, "an ISO 8601 time"),
    "updated_at": (_is_time, "an ISO 8601 time"),
}


def check_packet(packet: Any, task_id: str) -> dict[str, Any]:
    """The packet if it has the shape of one, its fields' types included, else ``CorruptState``."""
    if not isinstance(packet, dict):
        raise CorruptState(f"the state file of task {task_id} does not hold a JSON object")
    missing = [name for name in FIELD_CHECKS if name not in packet]
    if missing:
        raise CorruptState(f"the state file of task {task_id} lacks {', '.join(missing)}")
    for name, (valid, what) in FIELD_CHECKS.items():
        if not valid(packet[name]):
            raise CorruptState(f"the state file of task {task_id} has a wrong {name}: it must be {what}")
    if packet["task_id"] != task_id:
        raise CorruptState(f"the state file of task {task_id} names another task, {packet['task_id']}")
    return packet


class StorageUnavailable(OSError):
    """A task could not be stored or updated: the state directory refused a write or a read of it (full,
    read-only, an I/O error), or is not the server's (``MARKER``). An outage, not the task's fault. Its
    ``errno``, ``strerror`` and file names are the system's."""


def _unavailable(exc: OSError) -> StorageUnavailable:
    if isinstance(exc, StorageUnavailable):
        return exc
    if exc.errno is None:
        return StorageUnavailable(*exc.args)
    return StorageUnavailable(exc.errno, exc.strerror, exc.filename, None, exc.filename2)


def _encoded(packet: dict[str, Any]) -> bytes:
    """A state file's bytes. Compact: the C encoder (an indented dump is encoded in Python, four times slower,
    at every write)."""
    return json.dumps(packet, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class TaskExists(Exception):
    def __init__(self, packet: dict[str, Any]) -> None:
        super().__init__(f"task {packet['task_id']} exists")
        self.packet = packet


Observer = Callable[[dict[str, Any] | None, dict[str, Any]], None]


class TaskStore:
    def __init__(self, root: Path, *, on_write: Observer | None = None) -> None:
        self.root = Path(root)
        self._locks = self.root / ".locks"
        self.on_write = on_write
        self._home = False  # whether the directory is known to be the server's (``_check_home``)

    def _check_home(self) -> None:
        """Before the first task this process stores: the directory is the server's (it has its ``MARKER``),
        or it is made so when nothing says it is not: it holds tasks (a directory from before the marker),
        or the database lists none (a new server). Else ``StorageUnavailable``, and nothing is written."""
        marker = self.root / MARKER
        if marker.exists():
            self._home = True
            return
        if not any(self.root.glob("*.json")):
            try:
                listed = Task.objects.exists()
            except DatabaseError:  # cannot tell now: asked again at the next task
                return
            if listed:
                raise StorageUnavailable(
                    errno.ENOENT,
                    f"{self.root} holds no task, and no {MARKER} file, while the database lists tasks: is it "
                    f"the server's state directory (TASKS_STATE_DIR), and is its volume mounted? (If it is, and "
                    f"its tasks are gone, create the file {marker})",
                    str(self.root),
                )
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, b"the task state directory of an ai-agent-server\n", sync_directory=True)
        self._home = True

    def path(self, task_id: str) -> Path:
        return self.root / f"{parse_task_id(task_id)}.json"

    @contextlib.contextmanager
    def _locked(self, task_id: str) -> Iterator[None]:
        lock = self._locks / f"{parse_task_id(task_id)}.lock"
        while True:
            fd = open_for_lock(lambda: _open_creating(lock, os.O_RDWR))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _names(lock, fd):
                    break
            except BaseException:
                close_lock(fd)
                raise
            # The task was removed while this waited (``remove`` unlinks the lock file it holds): the lock
            # taken is on a file nobody else will open; the path's new one is what the next writer locks.
            close_lock(fd)
        try:
            yield
        finally:
            close_lock(fd)  # closing the descriptor releases the lock

    def read(self, task_id: str) -> dict[str, Any]:
        return self._parse(task_id, self._read_bytes(task_id))

    def _read_bytes(self, task_id: str) -> bytes:
        try:
            return self.path(task_id).read_bytes()
        except FileNotFoundError:
            raise TaskNotFound(f"no task {task_id}") from None

    def _parse(self, task_id: str, data: bytes) -> dict[str, Any]:
        try:
            packet = json.loads(data)
        except ValueError as exc:
            raise CorruptState(f"the state file of task {task_id} is not valid JSON: {exc}") from None
        return check_packet(packet, self.path(task_id).stem)

    def exists(self, task_id: str) -> bool:
        return self.path(task_id).exists()

    def create(self, packet: dict[str, Any], *, then: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Store a new packet (version 1), or raise ``TaskExists`` with the stored one.

        ``then``, when given, is called with the stored packet once its file is durable, under the task's lock
        and before its row and its message are written: its job can be queued there (``services.task_submit``),
        so that the worker's first steps overlap those writes, and its claim, which takes the lock, still comes
        after them. It must not raise: an exception from it leaves the row to the recovery sweep."""
        task_id = packet["task_id"]
        try:
            if not self._home:
                self._check_home()
            with self._locked(task_id):
                if self.exists(task_id):
                    raise TaskExists(self.read(task_id))
                stored = {**packet, "version": 1}
                try:
                    self._write(stored, new=True, then=then)
                except BaseException:
                    if not self.exists(task_id):  # nothing stored: nor is its lock file left (a full disk's inodes)
                        self._unlink_lock(task_id)
                    raise
                self._observe(None, stored)
        except OSError as exc:
            raise _unavailable(exc) from exc
        return stored

    def update(self, task_id: str, change: Callable[[dict[str, Any]], bool]) -> tuple[dict[str, Any], bool]:
        """Apply ``change`` to the stored packet under the task's lock.

        ``change`` gets a copy to modify and returns whether to store it; a
        False leaves the task as it was. Returns the packet as stored
        afterwards and whether it was written.
        """
        if not self.exists(task_id):
            # Checked before locking too, so that requests for unknown tasks leave no lock files.
            raise TaskNotFound(f"no task {task_id}")
        try:
            return self._update(task_id, change)
        except OSError as exc:
            raise _unavailable(exc) from exc

    def _update(self, task_id: str, change: Callable[[dict[str, Any]], bool]) -> tuple[dict[str, Any], bool]:
        with self._locked(task_id):
            try:
                data = self._read_bytes(task_id)
            except TaskNotFound:  # removed since it was checked: the lock file made for it goes too
                self._unlink_lock(task_id)
                raise
            current = self._parse(task_id, data)
            updated = json.loads(data)  # the copy to change: parsing again is faster than a deep copy
            if not change(updated):
                return current, False
            updated["version"] = current["version"] + 1
            updated["updated_at"] = now_iso()
            self._write(updated)
            self._observe(current, updated)
        return updated, True

    def _write(
        self, packet: dict[str, Any], *, new: bool = False, then: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        # A new task's file is made durable before the client is told it is accepted. An update's
        # rename is not waited for: a power loss may bring back the version before it (whole), and
        # the recovery sweep runs the lost step again.
        data = _encoded(packet)
        # The task is marked unmirrored before its file is written and unmarked once its row is: a
        # process that dies in between (killed while the database kept it waiting, say) leaves the
        # mark, and the sweep writes the row. Without it the sweep, which finds its candidates by
        # their rows, would never see a task whose row was not written (a new one, or one retried).
        marker = self._mark(packet["task_id"])
        try:
            atomic_write(self.path(packet["task_id"]), data, sync_directory=new)
        except BaseException:
            try:
                replaced = self.path(packet["task_id"]).read_bytes() == data  # it failed after the rename
            except OSError:
                replaced = False
            if not replaced:
                self._unmark(marker)  # the file is as it was, and so is its row
            raise
        if then is not None:
            then(packet)
        # A row that the guarded write left alone, at the packet's version or ahead of it, keeps the mark
        # too: the sweep makes it what the file says. It may be the row of an earlier task of this id
        # whose file was removed by hand before the id was submitted again,
        # a cancelled version 2 over a queued version 1, or a row ahead of a file restored from a backup.
        if mirror_packet(packet):
            self._unmark(marker)

    @property
    def _unmirrored(self) -> Path:
        return self.root / ".unmirrored"

    def _mark(self, task_id: str) -> Path:
        marker = self._unmirrored / task_id
        os.close(_open_creating(marker, os.O_WRONLY))
        return marker

    def restore_row(self, task_id: str) -> None:
        """Make the task's row what its file says, whatever version the row holds: after a power loss
        a row may be ahead of its file (the database's commit was durable, the file's rename was not),
        or hold another write of the same version. Under the task's lock, so that no write of the task
        is between the two; raises what the read or the database raise."""
        with self._locked(task_id):
            mirror_row(self.read(task_id), force=True)

    @staticmethod
    def _unmark(marker: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)

    def catch_up_mirror(self) -> int:
        """Write the rows of the tasks still marked unmirrored (their mirroring failed, the database
        locked or down, their writer died before it, or their row was ahead of the file), each from its
        file as it is now, whatever version its row holds, under the task's lock: a write in progress
        holds it and unmarks its task itself. Returns how many were written; stops at the database's first
        failure; a file that cannot be read keeps its mark, and the others are caught up."""
        if not self._unmirrored.is_dir():
            return 0
        written = 0
        for marker in sorted(self._unmirrored.iterdir()):
            try:
                with self._locked(marker.name):
                    if not marker.exists():
                        continue  # its writer finished meanwhile
                    packet = self.read(marker.name)
                    # Forced: under the lock the file is the truth, and the row may be ahead of it.
                    if not mirror_packet(packet, force=True):
                        break
                    marker.unlink(missing_ok=True)
            except TaskNotFound:  # its file was never written: the write failed, or its writer died first
                marker.unlink(missing_ok=True)
                continue
            except (CorruptState, ValueError) as exc:
                logger.error("not mirrored: %s", exc)
                marker.unlink(missing_ok=True)
                continue
            except OSError as exc:
                # Its file cannot be read now (a permission, an I/O error): the rest are caught up, and it keeps
                # its mark for the next sweep.
                logger.error("task %s not mirrored, its file cannot be read: %s", marker.name, exc)
                continue
            written += 1
        return written

    def remove(self, task_id: str, removable: Callable[[dict[str, Any]], bool]) -> bool:
        """Delete the task's state file, its unmirrored mark and its lock file, under the task's lock, if
        ``removable`` says so of the packet as stored (a file that is gone already counts as removed; one that
        does not parse is kept, ``CorruptState``). Its row is the caller's to delete, once the directory is
        synced (``sync``): a row deleted while a power loss could still bring its file back would leave a
        file that nothing lists. True when the task is gone."""
        with self._locked(task_id):
            try:
                packet = self.read(task_id)
            except TaskNotFound:
                removed = True
            else:
                removed = removable(packet)
                if removed:
                    os.unlink(self.path(task_id))
            if removed:
                self._unmark(self._unmirrored / parse_task_id(task_id))
                self._unlink_lock(task_id)
        return removed

    def restore_file(self, task_id: str, packet: Any) -> Path:
        """Write the file of a task whose file cannot be read (not JSON, not a task packet) from ``packet``, its
        mirror row's copy, and keep the unreadable file beside it as ``<task_id>.json.unreadable``, which the
        store does not read. Returns that path. ``CorruptState`` if ``packet`` is not a task packet of this
        id; ``ValueError`` if the file can be read now (someone mended it meanwhile)."""
        packet = check_packet(packet, parse_task_id(task_id))
        with self._locked(task_id):
            path = self.path(task_id)
            try:
                self._parse(task_id, self._read_bytes(task_id))
            except (CorruptState, OSError):
                pass
            else:
                raise ValueError(f"the file of task {task_id} can be read now: it was not restored")
            kept = path.with_name(f"{path.name}.unreadable")
            os.replace(path, kept)
            atomic_write(path, _encoded(packet), sync_directory=True)
        return kept

    def _unlink_lock(self, task_id: str) -> None:
        """Unlink the task's lock file, which the caller holds: last, so that a writer waiting for it finds it
        unlinked once it has it, and locks the path's new one (``_locked``)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._locks / f"{parse_task_id(task_id)}.lock")

    def sync(self) -> None:
        """Make the removals and renames in the state directory so far survive a power loss."""
        fsync_directory(self.root)

    def _observe(self, before: dict[str, Any] | None, after: dict[str, Any]) -> None:
        if self.on_write is None:
            return
        try:
            self.on_write(before, after)
        except Exception:
            logger.exception("task %s: the store's observer failed", after["task_id"])

    def iter_packets(self) -> Iterator[dict[str, Any]]:
        """Every stored packet; a file that does not parse is logged and skipped."""
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*.json")):
            try:
                yield self.read(parse_task_id(path.stem))
            except (OSError, ValueError, CorruptState, TaskNotFound) as exc:
                logger.error("skipping state file %s: %s", path, exc)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_ino, named.st_dev) == (held.st_ino, held.st_dev)


def _open_creating(path: Path, flags: int) -> int:
    """A descriptor of ``path``, created if missing, and its directory too: made only when the open finds
    it missing (the store's first write, or after it was removed), not checked at every write."""
    try:
        return os.open(path, flags | os.O_CREAT, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags | os.O_CREAT, 0o644)


# The row's fields but its key, in the order of the mirror's INSERT.
MIRRORED = ("profile", "role", "status", "version", "iteration", "parent_id", "packet", "created_at", "updated_at")
# The fields a task's writes change, in the order of the mirror's UPDATE. The others are set once, at the
# INSERT (a task's profile, role, parent and creation never change): an UPDATE that named them would
# have the database rewrite each index holding them (SQLite decides by the columns an UPDATE names, not
# by their values), four of the table's seven.
UPDATED = ("status", "version", "iteration", "packet", "updated_at")


def mirror_fields(packet: dict[str, Any]) -> dict[str, Any]:
    """The row's fields but its key, in the order of ``MIRRORED``."""
    return {
        "profile": packet["profile"],
        "role": packet["role"],
        "status": packet["status"],
        "version": packet["version"],
        "iteration": packet.get("iteration", 0),
        "parent_id": packet.get("parent_id"),
        "packet": packet,
        "created_at": parse_datetime(packet["created_at"]),
        "updated_at": parse_datetime(packet["updated_at"]),
    }


def mirror_row(packet: dict[str, Any], *, absent: bool = False, force: bool = False) -> bool:
    """Make the packet's row match it unless the row already holds a newer version; True if written.
    ``absent``: the caller found no row for the task (``sync_tasks``), so the INSERT is tried first.
    ``force``: whatever version the row holds (``TaskStore.restore_row`` and the sweep's
    ``catch_up_mirror``, under the task's lock); a version 1 sets every field, as the row may be an
    earlier task's of the same id (its file removed, and the id submitted again)."""
    row = mirror_fields(packet)
    fields = [(name, row[name]) for name in MIRRORED]
    key = ("task_id", packet["task_id"])
    if packet["version"] == 1 or absent:
        # A new task (the accept path), or a missing row: one INSERT, rather than an UPDATE, a SELECT and an INSERT.
        try:
            with _mirror_transaction():
                _execute(_INSERT, [key, *fields])
            return True
        except IntegrityError:
            pass  # its row exists (the mirror was rebuilt meanwhile, or it is an earlier task's): made to match below
    if force:
        kind, names = (_REPLACE, MIRRORED) if packet["version"] == 1 else (_RESTORE, UPDATED)
        with _mirror_transaction():
            if _execute(kind, [*((name, row[name]) for name in names), key]):
                return True
            _execute(_INSERT, [key, *fields])
        return True
    update = [*((name, row[name]) for name in UPDATED), key, ("version", packet["version"])]
    with _mirror_transaction():
        if _execute(_UPDATE, update):
            return True
        _, created = Task.objects.get_or_create(task_id=packet["task_id"], defaults=row)
        # Not created: the row is there, though the UPDATE found none (or found it newer). It may have
        # been inserted meanwhile with an older version (the recovery sweep or sync_tasks, which
        # write without the task's lock, from the file as they read it): the guarded UPDATE again.
        return created or bool(_execute(_UPDATE, update))


@contextlib.contextmanager
def _mirror_transaction() -> Iterator[None]:
    """Where a mirror statement runs: on its own, in autocommit, or in a savepoint when the caller is in
    a transaction (a duplicate INSERT must not break the caller's transaction).

    Not in a transaction of its own: with SQLite, a transaction holds the database's one write lock
    from BEGIN to COMMIT, and in a threaded web process the Python code between them waits for the
    GIL, so the lock was held for milliseconds and the other writers slept in SQLite's busy handler
    (1, 2, 5, 10... up to 100 ms at a time): one POST in ten waited over 10 ms for it under 16
    clients. A statement on its own takes the lock inside one call of the driver, which holds it
    for a fraction of a millisecond; with PostgreSQL it is one round trip instead of three."""
    if connection.in_atomic_block:
        with transaction.atomic():
            yield
    else:
        yield


_INSERT = "insert"
_UPDATE = "update"
_RESTORE = "restore"  # the UPDATE without its guard on the version
_REPLACE = "replace"  # the same, of every field but the key


@functools.cache
def _statement(kind: str, vendor: str) -> str:
    """The mirror's INSERT, or its UPDATE of a row holding an older version (or any version: ``_RESTORE``,
    ``_REPLACE``), for the database ``vendor``:
    written once, where the ORM built the same statement at every write (half of a write's cost). The
    values are still converted by the model's fields (``_execute``)."""
    quote = connection.ops.quote_name
    table = quote(Task._meta.db_table)
    fields = MIRRORED if kind in (_INSERT, _REPLACE) else UPDATED
    columns = [quote(Task._meta.get_field(name).column) for name in fields]
    if kind == _INSERT:
        names = ", ".join([quote("task_id"), *columns])
        return f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * (len(columns) + 1))})"
    assignments = ", ".join(f"{column} = %s" for column in columns)
    if kind in (_RESTORE, _REPLACE):
        return f"UPDATE {table} SET {assignments} WHERE {quote('task_id')} = %s"
    return f"UPDATE {table} SET {assignments} WHERE {quote('task_id')} = %s AND {quote('version')} < %s"


def _execute(kind: str, values: list[tuple[str, Any]]) -> int:
    """Run the ``kind`` statement with the (field, value) pairs in its parameters' order; the rows changed."""
    meta = Task._meta
    params = [meta.get_field(name).get_db_prep_save(value, connection) for name, value in values]
    with connection.cursor() as cursor:
        cursor.execute(_statement(kind, connection.vendor), params)
        return cursor.rowcount


def mirror_packet(packet: dict[str, Any], *, force: bool = False) -> bool:
    """Write the packet's row (``mirror_row``); False when the database failed, or when the row was left
    alone (it holds the packet's version or a newer one). A failure is logged, not raised: the file is
    already the truth, and the recovery sweeper brings the row up to date."""
    try:
        return mirror_row(packet, force=force)
    except DatabaseError as exc:
        logger.warning("task %s: database mirror not updated (%s); the recovery sweep will", packet["task_id"], exc)
        return False
