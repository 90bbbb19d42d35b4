"""Print the Celery queue of every role, comma-separated, for a worker's -Q."""

from django.core.management.base import BaseCommand

from orchestration.runtime import configuration


class Command(BaseCommand):
    help = "Print the queue names (<profile>.<role>) of all configured roles, comma-separated."

    def handle(self, *args, **options):
        self.stdout.write(",".join(configuration().queues()))
