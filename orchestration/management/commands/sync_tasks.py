"""Rebuild the database mirror from the task state files (the truth)."""

import itertools
import uuid

from django.core.management.base import BaseCommand, CommandError
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

    def add_arguments(self, parser):
        parser.add_argument(
            "--remove-orphans", action="store_true",
            help="remove the rows whose state file is gone even when they are most of the rows, or all of them "
            "(refused otherwise: a state directory whose volume is not mounted looks so)",
        )  # fmt: skip
        parser.add_argument(
            "--restore-unreadable", action="store_true",
            help="write the state file of each task whose file cannot be read (not JSON, not a task packet) from "
            "its row's copy of the packet, keeping the unreadable file beside it as <task_id>.json.unreadable",
        )  # fmt: skip

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
        # Most rows without a file is what a state directory whose volume did not mount (or a wrong
        # TASKS_STATE_DIR) looks like: removing them would lose the rows' copies of every packet.
        refused = bool(orphans) and (not seen or len(orphans) > len(current) / 2) and not options["remove_orphans"]
        if not refused:
            for start in range(0, len(orphans), 500):
                Task.objects.filter(task_id__in=orphans[start : start + 500]).delete()
        files_restored = 0
        for task_id in sorted(kept):
            path = store.path(str(task_id))
            if not options["restore_unreadable"]:
                self.stderr.write(
                    f"kept the row of task {task_id}: its file {path} cannot be read (--restore-unreadable writes "
                    "it from the row)"
                )
                continue
            try:
                aside = store.restore_file(str(task_id), Task.objects.get(task_id=task_id).packet)
            except (Task.DoesNotExist, TaskNotFound, CorruptState, ValueError, OSError) as exc:
                self.stderr.write(f"not restored from its row: task {task_id}: {exc}")
            else:
                files_restored += 1
                self.stderr.write(f"restored {path} from its row; the unreadable file is now {aside}")
        self.stdout.write(
            f"{len(seen)} state files; {written + restored} rows written ({restored} of them were ahead of "
            f"their file, or held another write of its version); "
            f"{0 if refused else len(orphans)} orphan rows removed; {len(kept)} rows kept whose file cannot be "
            f"read ({files_restored} files restored from them)"
        )
        if refused:
            raise CommandError(
                f"{len(orphans)} of the {len(current)} rows have no state file in {store.root}: not removed. Is "
                "that the server's state directory (TASKS_STATE_DIR), and is its volume mounted? If the tasks are "
                "gone for good, run again with --remove-orphans"
            )
