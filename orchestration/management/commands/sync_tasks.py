"""Rebuild the database mirror from the task state files (the truth)."""

import itertools
import uuid

from django.core.management.base import BaseCommand
from django.db import transaction

from orchestration.models import Task
from orchestration.runtime import task_store
from orchestration.state_store import mirror_row

# Rows written in one transaction: one commit (one flush of the database's log) for this many, rather
# than one per statement. With SQLite a transaction holds the database's write lock, which the server's
# own writes wait for meanwhile: a batch keeps it for some tens of milliseconds.
BATCH = 100


class Command(BaseCommand):
    help = "Rebuild the Task table from the JSON state files: add missing rows, update stale ones, drop orphans."

    def handle(self, *args, **options):
        seen: set[uuid.UUID] = set()
        written = 0
        current = dict(Task.objects.values_list("task_id", "version"))
        packets = task_store().iter_packets()
        while batch := list(itertools.islice(packets, BATCH)):
            with transaction.atomic():
                for packet in batch:
                    task_id = uuid.UUID(packet["task_id"])
                    seen.add(task_id)
                    # A row never goes back to an older version: a worker may write the
                    # task between this read of the file and the row's update.
                    if current.get(task_id) != packet["version"] and mirror_row(packet, absent=task_id not in current):
                        written += 1
        orphans = [task_id for task_id in current if task_id not in seen]
        for start in range(0, len(orphans), 500):
            Task.objects.filter(task_id__in=orphans[start : start + 500]).delete()
        self.stdout.write(f"{len(seen)} state files; {written} rows written; {len(orphans)} orphan rows removed")
