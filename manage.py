#!/usr/bin/env python
"""The entry point of the AI agent server (Django's manage.py)."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiagentserver.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        settings.INSTALLED_APPS  # noqa: B018 - the settings are read here, to say what is wrong in one line
    except ImproperlyConfigured as exc:
        sys.exit(
            f"manage.py: {exc}. In development, set DEBUG=1 (make run does); the settings are listed in "
            "doc/operations.md."
        )
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
