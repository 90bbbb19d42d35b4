"""Rebuild the database mirror from the task state files (the truth)."""

import itertools
import uuid

from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils.dateparse import parse_datetime

from orchestration.models import Task
from orchestration.runtime import task_store
from orchestration.state_store import CorruptState, TaskNotFound, mirror_row

# Rows written in one transaction: one commit (one flush of the database's log) for this many, rather
# than one per statement. With SQLite a transaction holds the database's write lock, which the server's
# own writes wait for meanwhile: a batch keeps it for some tens of milliseconds.
BATCH = 100


class Command(BaseCommand):
    help = "Rebuild the Task table from the JSON state files: add missing rows, update stale ones, drop orphans."

    def handle(self, *args, **options):
        seen: set[uuid.UUID] = set()
        written = 0
        ahead: list[str] = []
        current = {task_id: (version, updated) for task_id, version, updated in
                   Task.objects.values_list("task_id", "version", "updated_at")}  # fmt: skip
        store = task_store()
        packets = store.iter_packets()
        while batch := list(itertools.islice(packets, BATCH)):
            with transaction.atomic():
                for packet in batch:
                    task_id = uuid.UUID(packet["task_id"])
                    seen.add(task_id)
                    row = current.get(task_id)
                    if row is None or row[0] < packet["version"]:
                        # The guarded write: a row never goes back to an older version here, as a
                        # worker may write the task between this read of the file and the row's update.
                        written += mirror_row(packet, absent=row is None)
                    elif row != (packet["version"], parse_datetime(packet["updated_at"])):
                        ahead.append(packet["task_id"])
        # A row ahead of its file, or holding another write of the same version (after a power loss): made
        # what the file says under the task's lock, which no write of it holds meanwhile.
        restored = 0
        for task_id in ahead:
            try:
                store.restore_row(task_id)
                restored += 1
            except (TaskNotFound, CorruptState) as exc:  # removed or broken since it was read
                self.stderr.write(f"not restored: {exc}")
        # A row whose file was not read is an orphan only if the file is gone: one that cannot be read
        # (corrupt, unreadable) keeps its row, which may hold the task's last good copy.
        unseen = [task_id for task_id in current if task_id not in seen]
        kept = {task_id for task_id in unseen if store.path(str(task_id)).exists()}
        orphans = [task_id for task_id in unseen if task_id not in kept]
        for start in range(0, len(orphans), 500):
            Task.objects.filter(task_id__in=orphans[start : start + 500]).delete()
        for task_id in sorted(kept):
            self.stderr.write(f"kept the row of task {task_id}: its file {store.path(str(task_id))} cannot be read")
        self.stdout.write(
            f"{len(seen)} state files; {written + restored} rows written ({restored} of them were ahead of "
            f"their file, or held another write of its version); {len(orphans)} orphan rows removed; "
            f"{len(kept)} rows kept whose file cannot be read"
        )
