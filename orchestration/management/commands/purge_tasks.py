"""Remove the finished tasks older than an age (the recovery sweep does it by itself with TASK_RETENTION_DAYS)."""

import math
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from orchestration import retention


class Command(BaseCommand):
    help = (
        "Remove the finished tasks (succeeded, failed or cancelled; a plan with all its children) that last "
        "changed more than --days ago: their state files, lock files and database rows. Prints how many."
    )

    def add_arguments(self, parser):
        parser.add_argument("--days", type=float, required=True, help="the age, in days (0.5 for 12 hours)")
        parser.add_argument("--dry-run", action="store_true", help="only print which tasks would be removed")

    def handle(self, *args, days: float, dry_run: bool, **options):
        if not (math.isfinite(days) and 0 < days <= retention.MAX_DAYS):
            raise CommandError(f"--days must be a number of days over 0 and at most {retention.MAX_DAYS}, not {days:g}")
        older_than = timedelta(days=days)
        total, after = 0, None
        while True:  # a batch at a time, to the last (a purge cut short by a crash leaves rows for the next)
            report = retention.purge(older_than=older_than, after=after, dry_run=dry_run)
            for task_id in report.removed:
                self.stdout.write(f"{'would remove' if dry_run else 'removed'} {task_id}")
            for task_id, why in report.kept.items():
                self.stdout.write(f"kept {task_id}: {why}")
            total += len(report.removed)
            if report.next is None:
                break
            after = report.next
        self.stdout.write(f"{total} tasks {'would be ' if dry_run else ''}removed")
