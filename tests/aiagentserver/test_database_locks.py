"""A statement waits for a database lock at most DB_LOCK_TIMEOUT_SECONDS, on SQLite (its busy timeout) and on
PostgreSQL (its lock_timeout): a task's store write holds the task's file lock while it writes the row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import BASE_DIR, server_env

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def database_options(tmp_path: Path, **env: str) -> dict:
    """The default database's OPTIONS as the settings make them from ``env``."""
    result = subprocess.run(
        [sys.executable, "-c", "import json, aiagentserver.settings as s; print(json.dumps(s.DATABASES['default']))"],
        env={"PATH": os.environ["PATH"], "DEBUG": "1", "VAR_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)["OPTIONS"]


def test_the_lock_timeout_is_set_on_either_database(tmp_path):
    assert database_options(tmp_path)["timeout"] == 20  # SQLite's busy timeout
    assert database_options(tmp_path, DB_LOCK_TIMEOUT_SECONDS="5")["timeout"] == 5
    postgres = database_options(tmp_path, DATABASE_URL="postgres://u@db.internal/aiagent", DB_LOCK_TIMEOUT_SECONDS="5")
    assert postgres["options"] == "-c lock_timeout=5000"
    # The URL's own options are kept.
    own = "postgres://u@db.internal/aiagent?options=-c%20statement_timeout%3D9000"
    assert database_options(tmp_path, DATABASE_URL=own)["options"] == "-c statement_timeout=9000 -c lock_timeout=20000"


def test_a_lock_timeout_that_is_not_a_whole_number_of_seconds_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import aiagentserver.settings"],
        env={"PATH": os.environ["PATH"], "DEBUG": "1", "VAR_DIR": str(tmp_path), "DB_LOCK_TIMEOUT_SECONDS": "0"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "DB_LOCK_TIMEOUT_SECONDS" in result.stderr


@pytest.fixture
def postgres_database():
    """The URL of a new PostgreSQL database, dropped afterwards. Skipped where no PostgreSQL answers at
    TEST_POSTGRES_URL (the suite itself runs on SQLite)."""
    import psycopg

    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} (set TEST_POSTGRES_URL to one): {exc}")
    name = f"aiagent_locks_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


CREATE = """
import sys, uuid, django
django.setup()
from orchestration.packets import new_packet
from orchestration.runtime import task_store
packet = task_store().create(new_packet(task_id=str(uuid.uuid4()), profile="developer", role="planner", payload={}))
print(packet["task_id"])
"""
UPDATE = """
import json, sys, time, django
django.setup()
from orchestration.packets import history_event
from orchestration.runtime import task_store

def note(packet):
    packet["history"].append(history_event("note", status=packet["status"]))
    return True

started = time.monotonic()
packet, _ = task_store().update(sys.argv[1], note)
print(json.dumps({"seconds": time.monotonic() - started, "version": packet["version"]}))
"""


def test_a_store_write_whose_row_is_locked_elsewhere_ends_at_the_lock_timeout(postgres_database, tmp_path):
    """Noticed in an earlier session: with PostgreSQL a row lock held by another session (a migration, a session left
    open) held the task's write, and its file lock, for as long. Now the row's write gives up at the
    lock timeout: the file is written, and the task stays marked for the sweep to write its row."""
    import psycopg

    state = tmp_path / "state"
    env = server_env(
        DATABASE_URL=postgres_database,
        TASKS_STATE_DIR=str(state),
        DB_LOCK_TIMEOUT_SECONDS="1",
        DJANGO_SETTINGS_MODULE="aiagentserver.settings",
    )

    def run(*argv: str) -> str:
        return subprocess.run(
            [sys.executable, *argv], cwd=BASE_DIR, env=env, capture_output=True, text=True, check=True, timeout=30
        ).stdout

    run("manage.py", "migrate", "-v", "0")
    task_id = run("-c", CREATE).strip()
    with psycopg.connect(postgres_database) as holder:  # a transaction, open until the block ends
        holder.execute("SELECT 1 FROM orchestration_task WHERE task_id = %s FOR UPDATE", [task_id])
        written = json.loads(run("-c", UPDATE, task_id))
    assert written["version"] == 2
    assert written["seconds"] < 10, written
    assert json.loads((state / f"{task_id}.json").read_text())["version"] == 2
    assert (state / ".unmirrored" / task_id).exists()
