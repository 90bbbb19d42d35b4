"""`python -m aiagentserver.worker`: Celery's worker command, without what a worker process does not need.

Every worker the other tests start is started this way (tests/conftest.py); these tests check what it
leaves out, since each child process of a worker carries whatever the main process imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

from django.db import connection

BASE_DIR = Path(__file__).resolve().parent.parent.parent

# What a worker's main process loads before it forks its children: the module, Django (Celery's fix-up
# sets it up), the task modules (autodiscovered) and what the worker_ready handlers import.
WORKER_IMPORTS = """
import json, sys
import aiagentserver.worker
import django
django.setup()
from aiagentserver.celery import app
app.loader.import_default_modules()
import balancer.health, orchestration.metrics, orchestration.recovery
print(json.dumps(sorted(sys.modules)))
"""


def test_the_worker_takes_celery_workers_options():
    result = subprocess.run(
        [sys.executable, "-m", "aiagentserver.worker", "--help"], cwd=BASE_DIR, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--queues" in result.stdout and "--concurrency" in result.stdout


def test_a_worker_process_loads_neither_the_web_side_nor_celerys_command_plugins():
    result = subprocess.run(
        [sys.executable, "-c", WORKER_IMPORTS], cwd=BASE_DIR, capture_output=True, text=True, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    # DRF's serializers bring django.contrib.postgres, psycopg, requests and pygments (18 MB); the
    # celery program's plugins bring Flower, Tornado and prompt_toolkit; httpx brings rich
    # (4 MB more in every worker process, found later): the engines over HTTP import it when they are used.
    unwanted = {
        "rest_framework.serializers", "rest_framework.views", "drf_spectacular.openapi", "psycopg",
        "requests", "prometheus_client", "flower", "tornado", "prompt_toolkit", "orchestration.api_handler",
        "orchestration.admin", "httpx", "rich",
    }  # fmt: skip
    if connection.vendor == "postgresql":
        unwanted.discard("psycopg")  # Django's PostgreSQL backend itself: a worker needs it to reach its database
    assert not unwanted & loaded
    assert "orchestration.tasks" in loaded


def test_detach_is_refused_with_the_reason():
    result = subprocess.run(
        [sys.executable, "-m", "aiagentserver.worker", "--detach", "-Q", "x"], cwd=BASE_DIR, capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--detach is not supported" in result.stderr
