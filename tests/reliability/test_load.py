"""Load: 200 tasks posted at once by 16 clients to a real gunicorn server all complete, each with one
result, through the suite's real Celery worker (the scripted engine answers at once)."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from rest_framework.authtoken.models import Token

from orchestration.models import Task
from tests.conftest import _serve, _stop, free_port, server_env, wait_for
from tests.orchestration.scripted import use_script

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

TASKS = 200
CLIENTS = 16
SUMMARY = {"match": r'Reply with JSON: \{"summary"', "reply": {"summary": "Short.", "key_points": ["short"]}}


@pytest.fixture
def web(tmp_path):
    """gunicorn as `make run` starts it (threads), against the test database, Redis and state."""
    port = free_port()
    command = [
        sys.executable, "-m", "gunicorn", "aiagentserver.wsgi", "--bind", f"127.0.0.1:{port}",
        "--no-control-socket", "--workers", "2", "--worker-class", "gthread", "--threads", "8",
    ]  # fmt: skip
    process = _serve(command, f"http://127.0.0.1:{port}/healthz", tmp_path / "gunicorn.log", env=server_env())
    yield f"http://127.0.0.1:{port}"
    _stop(process)


def test_200_tasks_from_16_clients_all_complete(web, django_user_model, celery_worker, edit_config, tmp_path):
    use_script(edit_config, tmp_path / "script.json", [SUMMARY])
    # Each client with its own token, as `manage.py create_token` makes them (throttling is per client).
    tokens = [
        Token.objects.create(user=django_user_model.objects.create_user(username=f"load-{n}")).key
        for n in range(CLIENTS)
    ]
    lock = threading.Lock()
    statuses: list[int] = []

    def post(n: int) -> str:
        body = json.dumps({"payload": {"input": f"Text number {n} to summarize."}}).encode()
        request = urllib.request.Request(
            f"{web}/api/v1/productivity/summarizer",
            data=body,
            headers={"Authorization": f"Token {tokens[n % CLIENTS]}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            with lock:
                statuses.append(response.status)
            return json.loads(response.read())["task_id"]

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENTS) as clients:
        task_ids = list(clients.map(post, range(TASKS)))
    accepted_in = time.monotonic() - started
    assert statuses == [202] * TASKS
    assert len(set(task_ids)) == TASKS
    done = [wait_for(task_id, timeout=300) for task_id in task_ids]
    assert [packet["status"] for packet in done] == ["succeeded"] * TASKS
    assert all(sum(e["event"] == "step" for e in packet["history"]) == 1 for packet in done)
    assert Task.objects.filter(task_id__in=task_ids, status="succeeded").count() == TASKS
    print(f"\n{TASKS} tasks accepted in {accepted_in:.1f}s, all done in {time.monotonic() - started:.1f}s")
