"""Run the recovery sweeper once (workers run it by themselves every RECOVERY_SWEEP_SECONDS)."""

import math

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from orchestration import recovery


class Command(BaseCommand):
    help = (
        "Catch the database mirror up with the state files, and queue again (or fail) the queued and running "
        "tasks that nothing moves on any more: their jobs were lost with Redis or with a dead worker. With "
        "TASK_RETENTION_DAYS, remove a batch of the finished tasks past it too."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--grace",
            type=float,
            help=f"only tasks unchanged for this many seconds, at least {settings.RECOVERY_MIN_GRACE_SECONDS} "
            "(default: setting)",
        )

    def handle(self, *args, grace: float | None, **options):
        least = settings.RECOVERY_MIN_GRACE_SECONDS
        if grace is not None and not (math.isfinite(grace) and grace >= least):
            raise CommandError(
                f"--grace must be at least {least} seconds, not {grace:g}: a task that changed more recently may "
                "have its job on its way to a worker, and would be queued again needlessly"
            )
        report = recovery.sweep(grace_s=grace)
        self.stdout.write(str(report))
        for task_id in report.recovered:
            self.stdout.write(f"recovered {task_id}")
        for task_id in report.failed:
            self.stdout.write(f"failed {task_id}")
