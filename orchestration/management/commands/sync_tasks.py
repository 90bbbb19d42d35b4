"""Rebuild the database mirror from the task state files (the truth)."""

import uuid

from django.core.management.base import BaseCommand
from django.db import transaction

from orchestration.models import Task
from orchestration.runtime import task_store
from orchestration.state_store import mirror_fields


class Command(BaseCommand):
    help = "Rebuild the Task table from the JSON state files: add missing rows, update stale ones, drop orphans."

    def add_arguments(self, parser):
        parser.add_argument("--batch", type=int, default=500, help="rows written per transaction")

    def handle(self, *args, batch: int, **options):
        seen: set[str] = set()
        written = 0
        pending: list = []
        current = dict(Task.objects.values_list("task_id", "version"))
        for packet in task_store().iter_packets():
            seen.add(packet["task_id"])
            if current.get(uuid.UUID(packet["task_id"])) == packet["version"]:
                continue
            pending.append(packet)
            if len(pending) >= batch:
                written += _write(pending)
                pending = []
        written += _write(pending)
        orphans = [task_id for task_id in current if str(task_id) not in seen]
        for start in range(0, len(orphans), batch):
            Task.objects.filter(task_id__in=orphans[start : start + batch]).delete()
        self.stdout.write(f"{len(seen)} state files; {written} rows written; {len(orphans)} orphan rows removed")


def _write(packets: list) -> int:
    with transaction.atomic():
        for packet in packets:
            Task.objects.update_or_create(task_id=packet["task_id"], defaults=mirror_fields(packet))
    return len(packets)
