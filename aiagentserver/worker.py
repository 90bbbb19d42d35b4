"""The Celery worker, started without Celery's umbrella command: ``python -m aiagentserver.worker [options]``.

It is Celery's own ``worker`` command given this project's app, so it takes the options of
``celery -A aiagentserver worker`` (``-Q``, ``-c``, ``-n``, ``-P``, ``-l``...), and runs the same worker;
not the ``celery`` program's global options (``-A``, ``--broker``: the app and its settings are this
project's) nor ``--detach`` (run it under a supervisor, as ``make run`` does). What it leaves out is
the rest of the ``celery`` program: that program loads every installed command plugin before it
parses its arguments (Flower with Tornado, the ``amqp`` shell with prompt_toolkit...), 8 MB of
modules that a worker never uses and that each of its child processes, forked from it, would
carry too (doc/performance.md, "Worker memory"). ``make run``, the tests and the benchmarks start
workers this way; ``celery -A aiagentserver worker`` works as well, only heavier.
"""

from __future__ import annotations

import os
import sys

from celery.bin.base import CLIContext
from celery.bin.worker import worker

from aiagentserver.celery import app

# Celery's Django fix-up runs Django's system checks when a worker starts, and discards what they
# find; their URL checks import the URL configuration, and with it the whole web side (DRF, the
# admin, the schema generator) into every worker process. The checks are reported where they are
# read: `manage.py check` and `manage.py check_config`, which `make run` runs first.
os.environ.setdefault("CELERY_SKIP_CHECKS", "true")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(arg in ("-D", "--detach") for arg in args):
        # Celery detaches by starting `python -m celery` with these arguments, which lack the app.
        sys.exit(
            "python -m aiagentserver.worker: --detach is not supported; run the worker under a supervisor "
            "(systemd, supervisord...), or use `celery -A aiagentserver worker --detach`"
        )
    worker.main(
        args=args,
        prog_name="python -m aiagentserver.worker",
        obj=CLIContext(app=app, no_color=None, workdir=None),
        auto_envvar_prefix="CELERY",
    )


if __name__ == "__main__":
    main()
