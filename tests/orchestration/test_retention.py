"""Task retention (orchestration/retention.py): finished tasks past an age are removed with their plans,
state file, lock file and row; everything else stays. Real state files, database and Redis."""

from __future__ import annotations

import fcntl
import io
import json
import os
import threading
import uuid
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from orchestration import recovery, retention
from orchestration.models import Task
from orchestration.packets import history_event, new_packet
from orchestration.runtime import task_store
from orchestration.state_store import TaskNotFound, TaskStore

pytestmark = pytest.mark.django_db

DAY = timedelta(days=1)


def iso(moment) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def stored(
    status: str, *, age: timedelta = 2 * DAY, parent: str | None = None, children=(), task_id=None, planned=()
) -> str:
    """A task stored with ``status``, last changed ``age`` ago, listing ``children`` and with a plan that named
    ``planned`` (a `delegated` event); its id."""
    packet = new_packet(task_id=task_id or str(uuid.uuid4()), profile="developer", role="planner", payload={})
    packet.update(status=status, parent_id=parent, children=list(children), updated_at=iso(timezone.now() - age))
    if planned:
        named = {f"s{n}": child for n, child in enumerate(planned, 1)}
        packet["history"].append(history_event("delegated", status="running", detail={"children": named}))
    task_store().create(packet)
    return packet["task_id"]


def present(task_id: str) -> dict[str, bool]:
    store = task_store()
    return {
        "file": store.path(task_id).exists(),
        "lock": (store.root / ".locks" / f"{task_id}.lock").exists(),
        "row": Task.objects.filter(task_id=task_id).exists(),
    }


GONE = {"file": False, "lock": False, "row": False}
THERE = {"file": True, "lock": True, "row": True}


def test_finished_tasks_past_the_age_go_with_their_files_and_rows_and_the_others_stay():
    old = [stored(status) for status in ("succeeded", "failed", "cancelled")]
    recent = stored("succeeded", age=timedelta(hours=23))
    unfinished = [stored(status) for status in ("queued", "running", "awaiting_feedback")]

    report = retention.purge(older_than=DAY)

    assert sorted(report.removed) == sorted(old)
    assert report.kept == {} and report.next is None
    for task_id in old:
        assert present(task_id) == GONE
        with pytest.raises(TaskNotFound):
            task_store().read(task_id)
    for task_id in [recent, *unfinished]:
        assert present(task_id) == THERE


def test_a_plan_goes_whole_once_every_task_of_it_has_finished():
    never_created = str(uuid.uuid4())  # listed by its plan, which ended before it created it
    parent, child, grandchild = (str(uuid.uuid4()) for _ in range(3))
    stored("succeeded", task_id=parent, children=[child, never_created])
    stored("succeeded", task_id=child, parent=parent, children=[grandchild])
    stored("failed", task_id=grandchild, parent=child)

    report = retention.purge(older_than=DAY)

    assert sorted(report.removed) == sorted([parent, child, grandchild, never_created])
    # Each task after its children: a purge cut short leaves the parent, which the next one finds.
    assert report.removed.index(grandchild) < report.removed.index(child) < report.removed.index(parent)
    for task_id in (parent, child, grandchild):
        assert present(task_id) == GONE


def test_a_plan_with_a_task_still_running_stays_whole():
    parent, done, running = (str(uuid.uuid4()) for _ in range(3))
    stored("cancelled", task_id=parent, children=[done, running])
    stored("succeeded", task_id=done, parent=parent)
    stored("running", task_id=running, parent=parent)

    report = retention.purge(older_than=DAY)

    assert report.removed == []
    assert report.kept == {parent: f"task {running} of its plan is running or changed since the cutoff"}
    for task_id in (parent, done, running):
        assert present(task_id) == THERE


def test_a_child_its_plan_named_but_did_not_list_counts_as_the_plans():
    """A plan lists a child once created: one whose parent's process died in between is named only by the
    plan's `delegated` event."""
    parent, listed, unlisted = (str(uuid.uuid4()) for _ in range(3))
    stored("cancelled", task_id=parent, children=[listed], planned=[listed, unlisted])
    stored("succeeded", task_id=listed, parent=parent)
    stored("awaiting_feedback", task_id=unlisted, parent=parent)

    report = retention.purge(older_than=DAY)
    assert report.removed == [] and list(report.kept) == [parent]

    task_store().update(unlisted, lambda packet: packet.update(status="succeeded") or True)
    Task.objects.filter(task_id=unlisted).update(updated_at=timezone.now() - 2 * DAY)
    path = task_store().path(unlisted)
    packet = json.loads(path.read_bytes())
    path.write_text(json.dumps({**packet, "updated_at": iso(timezone.now() - 2 * DAY)}))

    report = retention.purge(older_than=DAY)
    assert sorted(report.removed) == sorted([parent, listed, unlisted])
    assert present(unlisted) == GONE


def test_a_child_goes_only_with_its_parent_unless_its_parent_is_gone():
    parent, child = str(uuid.uuid4()), str(uuid.uuid4())
    stored("running", task_id=parent, children=[child])
    stored("succeeded", task_id=child, parent=parent)
    orphan = stored("succeeded", parent=str(uuid.uuid4()))  # its parent's file and row were removed by hand

    report = retention.purge(older_than=DAY)

    assert report.removed == [orphan]
    assert present(child) == THERE and present(orphan) == GONE


def test_a_child_whose_parents_row_is_missing_but_not_its_file_stays():
    parent = stored("running")
    child = stored("succeeded", parent=parent)
    Task.objects.filter(task_id=parent).delete()  # its row not written yet (the database was locked)

    report = retention.purge(older_than=DAY)

    assert report.removed == [] and report.kept == {child: f"its parent {parent} is there: it goes with it"}
    assert present(child) == THERE


def test_a_task_changed_since_its_row_said_it_had_finished_stays():
    task_id = stored("failed")
    task_store().update(task_id, lambda packet: packet.update(status="queued") or True)  # retried
    # Its row as it was when a purge read it, before the retry's write reached the database.
    Task.objects.filter(task_id=task_id).update(status="failed", updated_at=timezone.now() - 2 * DAY)

    report = retention.purge(older_than=DAY)

    assert report.removed == []
    assert report.kept == {task_id: f"task {task_id} of its plan is queued or changed since the cutoff"}
    assert task_store().read(task_id)["status"] == "queued"


def test_a_plan_changed_while_it_is_being_removed_keeps_what_was_not_removed_yet(monkeypatch):
    parent, child = str(uuid.uuid4()), str(uuid.uuid4())
    stored("failed", task_id=parent, children=[child])
    stored("succeeded", task_id=child, parent=parent)
    remove = TaskStore.remove

    def retried_first(store, task_id, removable):
        if task_id == parent:  # retried after the purge read the plan, before it came to the parent
            store.update(parent, lambda packet: packet.update(status="queued") or True)
        return remove(store, task_id, removable)

    monkeypatch.setattr(TaskStore, "remove", retried_first)
    report = retention.purge(older_than=DAY)

    assert report.removed == [child] and present(child) == GONE
    assert report.kept == {parent: f"task {parent} of its plan changed while the plan was being removed"}
    assert present(parent) == THERE and task_store().read(parent)["status"] == "queued"


def test_a_row_of_an_id_submitted_again_during_the_purge_stays(monkeypatch):
    task_id = stored("succeeded")
    task_store().path(task_id).unlink()  # a purge cut short, or another one, removed the file
    sync = TaskStore.sync

    def submitted_again(store):
        sync(store)
        packet = new_packet(task_id=task_id, profile="developer", role="planner", payload={})
        store.create(packet)
        Task.objects.filter(task_id=task_id).update(status="queued", updated_at=timezone.now())

    monkeypatch.setattr(TaskStore, "sync", submitted_again)
    assert retention.purge(older_than=DAY).removed == [task_id]
    assert Task.objects.get(task_id=task_id).status == "queued" and task_store().read(task_id)["status"] == "queued"


def test_a_write_that_finds_its_task_removed_leaves_no_lock_file(monkeypatch):
    task_id = stored("succeeded")
    store = task_store()
    assert store.remove(task_id, lambda packet: True)
    monkeypatch.setattr(TaskStore, "exists", lambda self, task_id: True)  # it looked before the removal
    with pytest.raises(TaskNotFound):
        store.update(task_id, lambda packet: True)
    assert not (store.root / ".locks" / f"{task_id}.lock").exists()


def test_the_store_removes_nothing_that_its_check_under_the_lock_refuses():
    task_id = stored("succeeded")
    assert task_store().remove(task_id, lambda packet: False) is False
    assert present(task_id) == THERE
    assert task_store().remove(task_id, lambda packet: packet["status"] == "succeeded") is True
    assert present(task_id) == {"file": False, "lock": False, "row": True}  # the row is the caller's


def test_a_row_left_by_a_purge_cut_short_after_its_file_went_is_deleted():
    task_id = stored("succeeded")
    task_store().path(task_id).unlink()

    assert retention.purge(older_than=DAY).removed == [task_id]
    assert present(task_id) == GONE


def test_a_dry_run_removes_nothing():
    task_id = stored("succeeded")
    assert retention.purge(older_than=DAY, dry_run=True).removed == [task_id]
    assert present(task_id) == THERE


def plan_not_finished(age: timedelta) -> str:
    """A failed plan with a child awaiting feedback (not queued or running, which the sweep would recover)."""
    parent, child = str(uuid.uuid4()), str(uuid.uuid4())
    stored("failed", task_id=parent, children=[child], age=age)
    stored("awaiting_feedback", task_id=child, parent=parent, age=age)
    return parent


def test_batches_go_on_past_the_candidates_that_stay():
    kept = [plan_not_finished(4 * DAY), plan_not_finished(3 * DAY)]
    newest = stored("succeeded", age=2 * DAY)

    first = retention.purge(older_than=DAY, limit=2)
    assert first.removed == [] and list(first.kept) == kept and first.next is not None
    second = retention.purge(older_than=DAY, limit=2, after=first.next)
    assert second.removed == [newest] and second.next is None


def test_a_writer_waiting_for_the_lock_of_a_removed_task_locks_the_new_lock_file():
    """``remove`` unlinks the lock file it holds. A writer that opened it before and waits for its lock must
    not take that lock, which nobody else will open again, but the path's new one: else it and the next
    writer (a submission of the same task id) would both hold "the" lock."""
    store = task_store()
    task_id = stored("succeeded")
    lock_path = store.root / ".locks" / f"{task_id}.lock"
    inside, leave = threading.Event(), threading.Event()

    def writer() -> None:
        with store._locked(task_id):
            inside.set()
            leave.wait(10)

    waiting = threading.Thread(target=writer)

    def removable(packet: dict) -> bool:  # called under the task's lock
        waiting.start()
        assert not inside.wait(0.3)  # the writer waits for the lock file that remove holds
        return True

    assert store.remove(task_id, removable)
    try:
        assert inside.wait(5)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        leave.set()
        waiting.join(10)


def test_the_sweep_removes_them_when_retention_is_set(settings, redis_url):
    recovery._redis().delete(recovery.RETENTION_CURSOR_KEY)
    task_id = stored("succeeded")
    settings.TASK_RETENTION_DAYS = 0
    assert recovery.sweep().removed == 0 and present(task_id) == THERE
    settings.TASK_RETENTION_DAYS = 1
    assert recovery.sweep().removed == 1 and present(task_id) == GONE


def test_each_sweep_goes_on_from_where_the_last_one_stopped(settings, redis_url, monkeypatch):
    monkeypatch.setattr(retention, "BATCH", 2)
    settings.TASK_RETENTION_DAYS = 1
    recovery._redis().delete(recovery.RETENTION_CURSOR_KEY)
    kept = [plan_not_finished(4 * DAY), plan_not_finished(3 * DAY)]
    newest = stored("succeeded", age=2 * DAY)

    assert recovery.sweep().removed == 0  # the two plans not finished fill the batch
    assert recovery._redis().get(recovery.RETENTION_CURSOR_KEY) is not None
    assert recovery.sweep().removed == 1 and present(newest) == GONE
    assert recovery._redis().get(recovery.RETENTION_CURSOR_KEY) is None  # the end: from the oldest again
    assert all(present(parent) == THERE for parent in kept)


def test_the_command_removes_them_or_says_which_it_would():
    task_id = stored("succeeded")
    out = io.StringIO()
    call_command("purge_tasks", "--days", "1", "--dry-run", stdout=out)
    assert out.getvalue().splitlines() == [f"would remove {task_id}", "1 tasks would be removed"]
    assert present(task_id) == THERE
    out = io.StringIO()
    call_command("purge_tasks", "--days", "1.5", stdout=out)
    assert out.getvalue().splitlines() == [f"removed {task_id}", "1 tasks removed"]
    assert present(task_id) == GONE
    for days in ("0", "-1", "nan", "1e9"):
        with pytest.raises(CommandError, match="--days must be a number of days over 0 and at most 36500"):
            call_command("purge_tasks", "--days", days)
