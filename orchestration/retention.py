"""Task retention: finished tasks older than ``TASK_RETENTION_DAYS`` are removed, file, lock file and row.

Without it every task stays for ever: its state file, its lock file in the state directory's
``.locks/`` and its database row. With it the recovery sweeper (one worker at a time, every
``RECOVERY_SWEEP_SECONDS``) removes up to ``BATCH`` of them a sweep; ``manage.py purge_tasks`` removes
them by hand, with an age of its own.

A task goes with its whole plan: only a task without a parent (or whose parent's file is gone) is a
candidate, and it is removed with all its descendants once every one of them has finished (succeeded,
failed or cancelled) and last changed before the cutoff. A plan's child on its own is never removed:
its parent may still run, and the recovery sweep would create a missing child again.

The rows only suggest the candidates; each file is read again under its task's lock before it is
removed, so a task retried or given feedback meanwhile stays. Children go before their parent, so a
purge cut short (a crash, the database away) leaves a parent that the next one finds again, and its
removed children count as removed. The files are removed first and the directory synced before their
rows are deleted: a row left by a crash is found again and deleted; a file without its row would
never be.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from orchestration.models import Task
from orchestration.packets import FINISHED
from orchestration.runtime import task_store
from orchestration.state_store import CorruptState, TaskNotFound, TaskStore

logger = logging.getLogger(__name__)

BATCH = 1000  # candidates (plans, with their children) looked at in one purge
MAX_DAYS = 36500  # the longest age: a hundred years, older than any task, a cutoff a date still holds
ROWS_AT_ONCE = 500  # ids in one DELETE (SQLite takes at most 32,766 parameters, older ones 999)


Cursor = tuple[datetime, str]  # (updated_at, task_id) of the last candidate a purge looked at


@dataclass
class PurgeReport:
    removed: list[str] = field(default_factory=list)  # every task removed, children included
    kept: dict[str, str] = field(default_factory=dict)  # a candidate kept -> why
    next: Cursor | None = None  # where the next batch starts; None when this one was the last

    def __str__(self) -> str:
        return f"{len(self.removed)} tasks removed; {len(self.kept)} candidates kept"


def purge(
    *, older_than: timedelta, limit: int = BATCH, after: Cursor | None = None, dry_run: bool = False
) -> PurgeReport:
    """Remove up to ``limit`` candidates, finished tasks (each with its plan's children) that last changed more
    than ``older_than`` ago, the oldest first, from ``after`` on (the report's ``next``: candidates that stay,
    a plan still running, are not looked at again and again). ``dry_run``: only say which would go. Raises
    what the database raises."""
    if older_than <= timedelta(0):
        raise ValueError(f"older_than must be positive, not {older_than}")
    cutoff = timezone.now() - older_than
    report = PurgeReport()
    # EXISTS rather than NOT IN: PostgreSQL hashes a NOT IN's subquery only while the ids fit in work_mem,
    # and otherwise reads them all again for every row (600,000 tasks: over 10 minutes, against 0.9 s).
    parent_row = Task.objects.filter(task_id=OuterRef("parent_id"))
    rows = Task.objects.filter(status__in=FINISHED, updated_at__lt=cutoff).filter(
        Q(parent_id__isnull=True) | ~Exists(parent_row)
    )
    if after is not None:
        at, last = after
        rows = rows.filter(Q(updated_at__gt=at) | Q(updated_at=at, task_id__gt=last))
    candidates = list(rows.order_by("updated_at", "task_id").values_list("task_id", "updated_at")[:limit])
    store = task_store()
    if len(candidates) == limit:
        report.next = (candidates[-1][1], str(candidates[-1][0]))
    for task_id, _ in candidates:
        task_id = str(task_id)
        try:
            tree, why = _tree(store, task_id, cutoff)
        except (CorruptState, OSError) as exc:  # a file of the plan cannot be read: kept, and said why
            tree, why = [], f"not removed: {exc}"
        except Exception as exc:  # a packet this code does not expect must not stop retention at it for good
            logger.exception("retention: task %s not looked at", task_id)
            tree, why = [], f"not removed: {type(exc).__name__}: {exc}"
        if why is not None:
            report.kept[task_id] = why
            continue
        if dry_run:
            report.removed.extend(tree)
            continue
        removed, why = _remove(store, tree, cutoff)
        report.removed.extend(removed)
        if why is not None:
            report.kept[task_id] = why
    if report.removed and not dry_run:
        store.sync()
        for start in range(0, len(report.removed), ROWS_AT_ONCE):
            # Only rows still finished before the cutoff: an id submitted again meanwhile (after this purge,
            # or another one, removed its file) has a new row, which stays with its new file.
            removed = report.removed[start : start + ROWS_AT_ONCE]
            Task.objects.filter(task_id__in=removed, status__in=FINISHED, updated_at__lt=cutoff).delete()
    if report.removed:  # the sweep logs its report, and the command prints it
        logger.debug("retention: %s%s", report, " (dry run)" if dry_run else "")
    return report


def _old_and_finished(packet: dict, cutoff: datetime) -> bool:
    return packet["status"] in FINISHED and parse_datetime(packet["updated_at"]) < cutoff


def _tree(store: TaskStore, task_id: str, cutoff: datetime) -> tuple[list[str], str | None]:
    """The task and its descendants, each after its children, or why they stay (None when they go)."""
    try:
        root = store.read(task_id)
    except TaskNotFound:
        return [task_id], None  # its file went before its row (a purge cut short): the row goes
    if root["parent_id"] is not None and store.exists(root["parent_id"]):
        return [], f"its parent {root['parent_id']} is there: it goes with it"
    order: list[str] = []
    pending = [root]
    while pending:
        packet = pending.pop()
        if not _old_and_finished(packet, cutoff):
            return [], f"task {packet['task_id']} of its plan is {packet['status']} or changed since the cutoff"
        order.append(packet["task_id"])
        for child in _child_ids(packet):
            try:
                found = store.read(child)
            except TaskNotFound:  # never created (the plan ended first), or removed by a purge cut short
                order.append(child)
                continue
            if found["parent_id"] == packet["task_id"]:  # else not its child: it is not removed with it
                pending.append(found)
    return order[::-1], None


def _child_ids(packet: dict) -> list[str]:
    """Every child the task had: those it lists, and those each of its plans named, in any of its runs. A
    child is listed only once created, and a plan advanced by a process that died in between names a
    child it does not list."""
    ids = list(packet["children"])
    for event in packet["history"]:
        if event["event"] == "delegated":
            named = event["detail"].get("children") or {}
            ids.extend(named.values() if isinstance(named, dict) else named)
    return list(dict.fromkeys(ids))


def _remove(store: TaskStore, tree: list[str], cutoff: datetime) -> tuple[list[str], str | None]:
    """Remove the tasks of ``tree`` in its order while each is still old and finished under its lock: those
    removed, and why the rest stay (None when none does)."""
    removed: list[str] = []
    for task_id in tree:
        try:
            if not store.remove(task_id, lambda packet: _old_and_finished(packet, cutoff)):
                return removed, f"task {task_id} of its plan changed while the plan was being removed"
        except (CorruptState, OSError) as exc:
            return removed, f"not removed: {exc}"
        removed.append(task_id)
    return removed, None
