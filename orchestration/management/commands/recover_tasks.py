"""Run the recovery sweeper once (workers run it by themselves every RECOVERY_SWEEP_SECONDS)."""

from django.core.management.base import BaseCommand

from orchestration import recovery


class Command(BaseCommand):
    help = (
        "Catch the database mirror up with the state files, and queue again (or fail) the queued and running "
        "tasks that nothing moves on any more: their jobs were lost with Redis or with a dead worker."
    )

    def add_arguments(self, parser):
        parser.add_argument("--grace", type=float, help="only tasks unchanged for this many seconds (default: setting)")

    def handle(self, *args, grace: float | None, **options):
        report = recovery.sweep(grace_s=grace)
        self.stdout.write(str(report))
        for task_id in report.recovered:
            self.stdout.write(f"recovered {task_id}")
        for task_id in report.failed:
            self.stdout.write(f"failed {task_id}")
