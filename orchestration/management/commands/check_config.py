"""Validate configuration.json and print every problem with the exact field."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from balancer.configuration import ConfigurationError, load_configuration
from orchestration.runtime import validation


class Command(BaseCommand):
    help = "Validate the configuration file (AIAGENT_CONFIG, or the path given)."

    def add_arguments(self, parser):
        parser.add_argument("path", nargs="?", help="the file to check (default: AIAGENT_CONFIG)")

    def handle(self, *args, path: str | None, **options):
        target = Path(path) if path else Path(settings.AIAGENT_CONFIG)
        try:
            config = load_configuration(target, **validation())
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from None
        roles = sum(len(profile.roles) for profile in config.profiles.values())
        self.stdout.write(f"{target}: valid ({len(config.llms)} LLMs, {len(config.profiles)} profiles, {roles} roles)")
