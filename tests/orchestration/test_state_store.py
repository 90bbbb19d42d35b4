"""The JSON state store: atomic writes, versions, per-task locking across processes, the mirror."""

import fcntl
import io
import json
import os
import select
import signal
import time
import traceback
import uuid

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from orchestration.models import Task
from orchestration.packets import history_event, new_packet
from orchestration.state_store import MARKER, StorageUnavailable, TaskExists, TaskNotFound, TaskStore


def make_packet(**overrides):
    packet = new_packet(task_id=str(uuid.uuid4()), profile="developer", role="planner", payload={"input": "x"})
    packet.update(overrides)
    return packet


@pytest.fixture
def store(tmp_path):
    return TaskStore(tmp_path / "state")


@pytest.mark.django_db
def test_create_writes_version_1_and_refuses_a_second_create(store):
    packet = make_packet()
    stored = store.create(packet)
    assert stored["version"] == 1
    assert store.read(packet["task_id"]) == stored
    with pytest.raises(TaskExists) as exists:
        store.create(make_packet(task_id=packet["task_id"]))
    assert exists.value.packet == stored


@pytest.mark.django_db
def test_the_lock_directory_is_made_again_when_it_was_removed(store):
    packet = store.create(make_packet())  # the store's directories do not exist before its first write
    lock_dir = store.root / ".locks"
    for lock in lock_dir.iterdir():
        lock.unlink()
    lock_dir.rmdir()
    updated, written = store.update(packet["task_id"], lambda p: p.update(iteration=1) or True)
    assert written and updated["version"] == 2
    assert store.read(packet["task_id"])["iteration"] == 1
    assert (lock_dir / f"{packet['task_id']}.lock").exists()


@pytest.mark.django_db
def test_update_raises_the_version_and_a_refused_change_writes_nothing(store):
    packet = store.create(make_packet())

    def append(current):
        current["history"].append(history_event("note", status=current["status"]))
        return True

    updated, written = store.update(packet["task_id"], append)
    assert written and updated["version"] == 2 and len(updated["history"]) == 1
    unchanged, written = store.update(packet["task_id"], lambda current: False)
    assert not written and unchanged == updated
    assert store.read(packet["task_id"]) == updated


@pytest.mark.django_db
def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(store, monkeypatch):
    packet = store.create(make_packet())

    def unserialisable(current):
        current["payload"] = {"input": object()}
        return True

    with pytest.raises(TypeError):
        store.update(packet["task_id"], unserialisable)
    assert store.read(packet["task_id"]) == packet
    files = sorted(path.name for path in store.root.iterdir() if path.is_file())
    assert files == sorted([f"{packet['task_id']}.json", MARKER])


def test_read_of_a_missing_task_and_a_bad_id(store):
    with pytest.raises(TaskNotFound):
        store.read(str(uuid.uuid4()))
    with pytest.raises(ValueError, match="UUID"):
        store.path("../../etc/passwd")


def _append_many(root: str, task_id: str, writer: str, count: int) -> None:
    connections.close_all()  # a forked child must not share the parent's database connection
    store = TaskStore(root)
    for index in range(count):

        def append(current, index=index):
            event = history_event("note", status=current["status"], detail={"writer": writer, "n": index})
            current["history"].append(event)
            return True

        store.update(task_id, append)


@pytest.mark.django_db(transaction=True)
def test_two_processes_appending_to_one_history_lose_nothing(store):
    """Forked with ``os.fork``, as the test below is (and for its reason: a ``multiprocessing`` child runs
    kombu's after-fork hooks first, which may wait 10 s on a pooled broker connection)."""
    packet = store.create(make_packet())
    connections.close_all()
    count = 60
    pids = []
    for name in "ab":
        pid = os.fork()
        if pid == 0:  # the child: exits with whether it appended all its events, never returns to pytest
            try:
                _append_many(str(store.root), packet["task_id"], name, count)
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    final = store.read(packet["task_id"])
    assert final["version"] == 1 + 2 * count
    for name in "ab":
        assert [e["detail"]["n"] for e in final["history"] if e["detail"]["writer"] == name] == list(range(count))
    assert Task.objects.get(task_id=packet["task_id"]).version == final["version"]


@pytest.mark.django_db(transaction=True)
def test_a_process_forked_while_a_task_is_locked_does_not_keep_the_lock(store):
    """Found by review: a flock belongs to the open file, which a fork shares. A Celery pool process forked
    while the worker's recovery sweep held a task's lock kept it for its whole life, and every later write of
    that task waited for ever.

    Forked with ``os.fork``: a ``multiprocessing`` child first runs the hooks registered with
    ``multiprocessing``, and kombu's closes each pooled broker connection, reading first the reply of a
    BRPOP that an earlier test's ``inspect`` left on it, for the broker's socket timeout (10 s): after
    tests/reliability/test_recovery.py the child was not running its own code yet when the test gave up."""
    task_id = store.create(make_packet())["task_id"]
    connections.close_all()
    ready_r, ready_w = os.pipe()
    forked = []

    def fork_while_locked(current):
        pid = os.fork()
        if pid == 0:  # the child: says it runs its own code, and stays; it never returns to pytest
            os.write(ready_w, b"1")
            time.sleep(60)
            os._exit(0)
        forked.append(pid)
        return False

    store.update(task_id, fork_while_locked)
    try:
        assert select.select([ready_r], [], [], 10)[0]  # whatever the child does at the fork is done
        fd = os.open(store.root / ".locks" / f"{task_id}.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the child holds it
        finally:
            os.close(fd)
        assert os.waitpid(forked[0], os.WNOHANG) == (0, 0)  # the child lives on, holding whatever it holds
    finally:
        os.kill(forked[0], signal.SIGKILL)
        os.waitpid(forked[0], 0)
        os.close(ready_r)
        os.close(ready_w)


def test_a_child_forked_inside_a_lock_that_leaves_it_closes_nothing_of_its_own(tmp_path):
    """The child's copy of the lock's descriptor is closed at the fork, and its number may be another file's
    by the time the child leaves the locked block: that file stays open."""
    from balancer.files import close_lock, open_for_lock

    fd = open_for_lock(lambda: os.open(tmp_path / "a.lock", os.O_RDWR | os.O_CREAT))
    pid = os.fork()
    if pid == 0:  # the child: exits with what it found, never returns to pytest
        other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
        close_lock(fd)
        try:
            os.fstat(other)
        except OSError:
            os._exit(1)
        os._exit(0 if other == fd else 2)  # 2: the number was not reused, the test proves nothing
    _, status = os.waitpid(pid, 0)
    close_lock(fd)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.django_db
def test_sync_tasks_rebuilds_the_mirror_from_the_files(settings, tmp_path):
    settings.TASKS_STATE_DIR = tmp_path / "state"
    store = TaskStore(settings.TASKS_STATE_DIR)
    first = store.create(make_packet())
    second = store.create(make_packet(status="succeeded", result={"output": "done"}))
    orphan = Task.objects.create(
        task_id=uuid.uuid4(), profile="p", role="r", status="queued", version=1, packet={},
        created_at="2026-01-01T00:00:00Z", updated_at="2026-01-01T00:00:00Z",
    )  # fmt: skip
    Task.objects.filter(task_id=first["task_id"]).delete()
    Task.objects.filter(task_id=second["task_id"]).update(status="queued", version=0)
    (store.root / "broken.json").write_text("{not json")
    (store.root / f"{uuid.uuid4()}.json").write_text("[1, 2]")
    call_command("sync_tasks", stdout=io.StringIO())
    rows = {str(row.task_id): row for row in Task.objects.all()}
    assert set(rows) == {first["task_id"], second["task_id"]}
    assert rows[second["task_id"]].status == "succeeded"
    assert rows[second["task_id"]].packet == second
    assert rows[first["task_id"]].packet == json.loads(store.path(first["task_id"]).read_text())
    assert not Task.objects.filter(task_id=orphan.task_id).exists()


@pytest.mark.django_db
def test_sync_tasks_keeps_the_row_of_a_task_whose_file_cannot_be_read(settings, tmp_path):
    """A corrupt file was skipped, so its task was not seen, and its row (maybe the last good copy of the
    task) was removed as an orphan."""
    settings.TASKS_STATE_DIR = tmp_path / "state"
    store = TaskStore(settings.TASKS_STATE_DIR)
    packet = store.create(make_packet())
    store.path(packet["task_id"]).write_text('{"task_id": "cut off')
    out, err = io.StringIO(), io.StringIO()
    call_command("sync_tasks", stdout=out, stderr=err)
    assert Task.objects.get(task_id=packet["task_id"]).packet == packet
    assert f"kept the row of task {packet['task_id']}" in err.getvalue()
    assert "0 orphan rows removed; 1 rows kept whose file cannot be read" in out.getvalue()


@pytest.mark.django_db
def test_sync_tasks_writes_an_unreadable_file_from_its_row_when_asked(settings, tmp_path):
    """The corrupt_state error advised removing the file and running sync_tasks, which then removed the row as
    an orphan: the only good copy of the task went with it."""
    settings.TASKS_STATE_DIR = tmp_path / "state"
    store = TaskStore(settings.TASKS_STATE_DIR)
    packet = store.create(make_packet())
    broken = store.path(packet["task_id"])
    broken.write_text('{"task_id": "cut off')
    out, err = io.StringIO(), io.StringIO()
    call_command("sync_tasks", "--restore-unreadable", stdout=out, stderr=err)
    assert store.read(packet["task_id"]) == packet
    assert broken.with_name(f"{broken.name}.unreadable").read_text() == '{"task_id": "cut off'
    assert "(1 files restored from them)" in out.getvalue() and "restored " in err.getvalue()
    call_command("sync_tasks", stdout=(again := io.StringIO()))  # the aside file is not read as a task
    assert "1 state files" in again.getvalue() and "0 rows kept" in again.getvalue()


@pytest.mark.django_db
def test_sync_tasks_keeps_the_rows_when_the_state_directory_looks_unmounted(settings, tmp_path):
    """Pointed at an empty directory (a volume that did not mount), it removed every row, and with them the
    rows' copies of the packets."""
    settings.TASKS_STATE_DIR = tmp_path / "state"
    store = TaskStore(settings.TASKS_STATE_DIR)
    for _ in range(3):
        store.create(make_packet())
    settings.TASKS_STATE_DIR = tmp_path / "empty"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match=r"3 of the 3 rows have no state file .* is its volume mounted"):
        call_command("sync_tasks", stdout=io.StringIO())
    assert Task.objects.count() == 3
    call_command("sync_tasks", "--remove-orphans", stdout=(out := io.StringIO()))
    assert Task.objects.count() == 0 and "3 orphan rows removed" in out.getvalue()


@pytest.mark.django_db
def test_sync_tasks_brings_back_a_row_ahead_of_its_file(settings, tmp_path):
    """After a power loss the database's commit may have lasted and the file's rename not: the row is
    ahead of its file, or, once the task was written again, holds another write of the same version. The
    guarded write never takes a row back; sync_tasks makes it what the file says."""
    settings.TASKS_STATE_DIR = tmp_path / "state"
    store = TaskStore(settings.TASKS_STATE_DIR)

    def note(text):
        return lambda packet: (
            packet["history"].append(history_event("note", status=packet["status"], detail={"text": text})) or True
        )

    behind = store.create(make_packet())
    lost_rename = store.update(behind["task_id"], note("lost"))[0]
    store.path(behind["task_id"]).write_text(json.dumps(behind))  # the file as the power loss left it
    assert Task.objects.get(task_id=behind["task_id"]).version == lost_rename["version"] == 2

    rewritten = store.create(make_packet())
    first = store.update(rewritten["task_id"], note("lost"))[0]
    store.path(rewritten["task_id"]).write_text(json.dumps(rewritten))
    second = store.update(rewritten["task_id"], note("written again"))[0]  # version 2 again, another write
    assert second["version"] == first["version"] == 2
    assert Task.objects.get(task_id=rewritten["task_id"]).packet == first

    out = io.StringIO()
    call_command("sync_tasks", stdout=out)
    assert Task.objects.get(task_id=behind["task_id"]).packet == behind
    assert Task.objects.get(task_id=behind["task_id"]).version == 1
    assert Task.objects.get(task_id=rewritten["task_id"]).packet == second
    assert "2 of them were ahead" in out.getvalue()
    call_command("sync_tasks", stdout=(again := io.StringIO()))
    assert "0 rows written" in again.getvalue()


@pytest.mark.django_db(transaction=True)
def test_a_row_inserted_older_while_a_newer_write_looked_for_it_is_brought_up_to_date():
    """The recovery sweep and sync_tasks write rows from the files without the task's lock: a write of
    version 3 finds no row, the sweep then inserts version 2, and the write must still leave version 3.
    The interleaving is forced at the driver boundary (Django's execute_wrapper). Autocommit, as the
    server writes (no test transaction around it)."""
    from django.db import connection

    from orchestration.state_store import mirror_row

    older = make_packet(version=2, status="running")
    newer = {**older, "version": 3, "status": "succeeded"}
    inserted = []

    def sweep_meanwhile(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if sql.lstrip().upper().startswith("UPDATE") and not inserted:
            inserted.append(True)
            with connection.execute_wrapper(lambda *call: call[0](*call[1:])):
                mirror_row(older)  # the sweep, between the write's UPDATE and its get_or_create
        return result

    with connection.execute_wrapper(sweep_meanwhile):
        assert mirror_row(newer)
    row = Task.objects.get(task_id=older["task_id"])
    assert (row.version, row.status) == (3, "succeeded")
    assert not mirror_row(older)  # an older version never overwrites a newer row


@pytest.mark.django_db
def test_the_row_matches_the_file_after_every_write(store):
    """An update names only the fields a write changes (the others are set by the INSERT): whatever a
    task's writes change must still reach its row."""
    from django.utils.dateparse import parse_datetime

    from orchestration.state_store import MIRRORED

    packet = store.create(make_packet(parent_id=str(uuid.uuid4())))

    def running(current):
        current["status"] = "running"
        current["history"].append(history_event("claimed", status="running"))
        return True

    def next_round(current):
        current["iteration"] = 2
        current["history"].append(history_event("verdict", status="running"))
        return True

    def finished(current):
        current["status"] = "succeeded"
        current["result"] = {"output": "done"}
        return True

    for change in (None, running, next_round, finished):
        written = packet if change is None else store.update(packet["task_id"], change)[0]
        row = Task.objects.get(task_id=packet["task_id"])
        assert {name: getattr(row, name) for name in MIRRORED} == {
            **{name: written.get(name, 0) for name in MIRRORED},
            "parent_id": uuid.UUID(written["parent_id"]),
            "packet": written,
            "created_at": parse_datetime(written["created_at"]),
            "updated_at": parse_datetime(written["updated_at"]),
        }


@pytest.mark.django_db(transaction=True)
def test_a_row_said_absent_that_is_there_is_updated_or_left_newer_inside_a_batch():
    """sync_tasks writes a batch in one transaction and inserts the rows it did not find; a worker may
    have written one meanwhile. The INSERT's conflict must neither break the batch nor go back a version."""
    from django.db import transaction

    from orchestration.state_store import mirror_row

    older = make_packet(version=2, status="running")
    newer = {**older, "version": 3, "status": "succeeded"}
    other = make_packet(version=2, status="running")
    assert mirror_row(older)
    with transaction.atomic():
        assert mirror_row(newer, absent=True)  # there after all, older: brought up to date
        assert not mirror_row(older, absent=True)  # there, newer: left as it is
        assert mirror_row(other, absent=True)  # really absent: inserted
    rows = {str(row.task_id): (row.version, row.status) for row in Task.objects.all()}
    assert rows == {older["task_id"]: (3, "succeeded"), other["task_id"]: (2, "running")}


@pytest.mark.django_db
def test_a_task_created_again_over_its_removed_file_keeps_its_mark_until_the_sweep_makes_its_row_new(store):
    """The file of a cancelled task (version 2) was removed, as the corrupt_state error advises, and its id
    submitted again: the guarded write left the row at the cancelled version 2 over the new file's queued
    version 1 and removed the unmirrored mark, so nothing repaired the row."""
    from django.utils.dateparse import parse_datetime

    first = store.create(make_packet())
    store.update(first["task_id"], lambda packet: packet.update(status="cancelled") or True)
    store.path(first["task_id"]).unlink()
    again = store.create(make_packet(task_id=first["task_id"], role="architect", parent_id=str(uuid.uuid4())))
    assert [marker.name for marker in (store.root / ".unmirrored").iterdir()] == [first["task_id"]]
    assert store.catch_up_mirror() == 1  # the sweep
    row = Task.objects.get(task_id=first["task_id"])
    assert (row.version, row.status, row.role, str(row.parent_id)) == (1, "queued", "architect", again["parent_id"])
    assert row.packet == again == store.read(first["task_id"])
    assert row.created_at == parse_datetime(again["created_at"])
    assert not any((store.root / ".unmirrored").iterdir())


@pytest.mark.django_db
def test_an_update_whose_row_is_ahead_of_its_file_keeps_its_mark_until_the_sweep_restores_the_row(store):
    """A file restored from a backup (version 2) under a row at version 3: the next write (version 3)
    left the row as it was, another write's, and removed the mark."""
    packet = store.create(make_packet())
    backup = store.update(packet["task_id"], lambda current: current.update(iteration=1) or True)[0]
    store.update(packet["task_id"], lambda current: current.update(status="cancelled") or True)
    store.path(packet["task_id"]).write_text(json.dumps(backup))
    written = store.update(packet["task_id"], lambda current: current.update(status="running") or True)[0]
    assert Task.objects.get(task_id=packet["task_id"]).status == "cancelled"
    assert store.catch_up_mirror() == 1
    row = Task.objects.get(task_id=packet["task_id"])
    assert (row.version, row.status, row.packet) == (3, "running", written)
    assert not any((store.root / ".unmirrored").iterdir())


@pytest.mark.django_db
def test_a_state_file_that_cannot_be_read_now_does_not_stop_the_mirror_catching_up(store):
    """Found by review: an OSError of one task's file (a permission, an I/O error) escaped, and ended every
    sweep at its first step: no row caught up, no task recovered. It keeps its mark, for the next sweep."""
    unreadable = store.create(make_packet(task_id="00000000-0000-4000-8000-000000000000"))["task_id"]
    behind = store.create(make_packet(task_id="ffffffff-ffff-4fff-bfff-ffffffffffff"))
    store.path(unreadable).unlink()
    store.path(unreadable).mkdir()  # read: IsADirectoryError
    Task.objects.filter(task_id=behind["task_id"]).update(status="running")
    for task_id in (unreadable, behind["task_id"]):
        store._mark(task_id)
    assert store.catch_up_mirror() == 1
    assert Task.objects.get(task_id=behind["task_id"]).status == "queued"
    assert [marker.name for marker in (store.root / ".unmirrored").iterdir()] == [unreadable]


def _valid_packet() -> dict:
    return {**make_packet(status="running", result={"output": "x"}, children=[str(uuid.uuid4())]), "version": 3}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("history", None),
        ("history", {}),
        ("history", ["an event"]),
        ("history", [{"event": "claimed", "detail": None}]),
        ("history", [{"detail": {}}]),
        ("status", "bogus"),
        ("status", ["queued"]),
        ("version", "3"),
        ("version", True),
        ("version", 0),
        ("version", 3.0),
        ("payload", ["input"]),
        ("payload", None),
        ("profile", 7),
        ("role", None),
        ("result", "done"),
        ("iteration", -1),
        ("iteration", None),
        ("parent_id", "../../etc/passwd"),
        ("parent_id", 7),
        ("children", None),
        ("children", ["not-a-uuid"]),
        ("created_at", 1767225600),
        ("updated_at", "yesterday"),
        ("updated_at", "2026-13-01T00:00:00Z"),
    ],
)
def test_a_state_file_whose_field_has_a_wrong_type_is_corrupt(store, field, value):
    """Only the fields' presence was checked: a file with `"history": null` was read as a packet, and the
    code that used the field failed (an HTML 500 where the API promises its corrupt_state error)."""
    from orchestration.state_store import CorruptState

    packet = _valid_packet()
    store.path(packet["task_id"]).parent.mkdir(parents=True, exist_ok=True)
    store.path(packet["task_id"]).write_text(json.dumps(packet))
    assert store.read(packet["task_id"]) == packet
    store.path(packet["task_id"]).write_text(json.dumps({**packet, field: value}))
    with pytest.raises(CorruptState, match=f"has a wrong {field}: it must be "):
        store.read(packet["task_id"])
    with pytest.raises(CorruptState):
        store.update(packet["task_id"], lambda current: True)


@pytest.mark.django_db
def test_no_task_is_stored_in_an_empty_directory_while_the_database_lists_tasks(tmp_path):
    """A state directory whose volume did not mount (or a wrong TASKS_STATE_DIR) is an empty directory: the
    server stored new tasks there, hidden once the volume was mounted, and found none of the others."""
    home = TaskStore(tmp_path / "state")
    stored = home.create(make_packet())  # a new server: the directory is made its own
    assert (tmp_path / "state" / MARKER).exists()
    unmounted = TaskStore(tmp_path / "mount-point")
    (tmp_path / "mount-point").mkdir()
    with pytest.raises(StorageUnavailable, match="is its volume mounted"):
        unmounted.create(make_packet())
    assert list((tmp_path / "mount-point").iterdir()) == []  # nothing written, not even a lock file
    (tmp_path / "mount-point" / MARKER).touch()  # the operator says it is the server's
    unmounted.create(make_packet())
    # A directory from before the marker, which holds tasks, is taken as the server's.
    (tmp_path / "state" / MARKER).unlink()
    TaskStore(tmp_path / "state").create(make_packet())
    assert (tmp_path / "state" / MARKER).exists()
    assert TaskStore(tmp_path / "state").read(stored["task_id"]) == stored
