"""Outages: with Redis down, every endpoint answers at once with a clear body (never a 500, never a
hang), and what was accepted is on disk. A real web process (Django's test client in a process of
its own) whose REDIS_URL is a closed port; the test database and state directory are the suite's."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from rest_framework.authtoken.models import Token

from orchestration.packets import history_event, new_packet
from orchestration.runtime import task_store
from tests.conftest import server_env

pytestmark = pytest.mark.django_db(transaction=True)

# Runs in the web process: each request's status, body (or its first bytes) and time.
CLIENT = """
import json, sys, time
import django
django.setup()
from django.test import Client

token, finished, queued = sys.argv[1:4]
client = Client(HTTP_AUTHORIZATION=f"Token {token}", raise_request_exception=False)
requests = [
    ("submit", "post", "/api/v1/productivity/summarizer", {"payload": {"input": "Hello."}}),
    ("task", "get", f"/api/v1/tasks/{finished}", None),
    ("list", "get", "/api/v1/tasks/", None),
    ("config", "get", "/api/v1/config", None),
    ("llms", "get", "/api/v1/llms", None),
    ("metrics", "get", "/api/v1/metrics", None),
    ("prometheus", "get", "/metrics", None),
    ("events", "get", f"/api/v1/tasks/{finished}/events", None),
    ("cancel", "post", f"/api/v1/tasks/{queued}/cancel", None),
    ("healthz", "get", "/healthz", None),
    ("v1_models", "get", "/v1/models", None),
    ("v1_completion", "post", "/v1/chat/completions",
     {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hello."}], "max_tokens": 4}),
]
results = {}
for name, method, url, body in requests:
    started = time.monotonic()
    if body is None:
        response = getattr(client, method)(url)
    else:
        response = getattr(client, method)(url, data=json.dumps(body), content_type="application/json")
    content = b"".join(response.streaming_content) if response.streaming else response.content
    results[name] = {"status": response.status_code, "seconds": time.monotonic() - started,
                     "body": content.decode(errors="replace")[:3000]}
print(json.dumps(results))
"""


def test_with_redis_down_every_endpoint_answers_quickly_and_clearly(api_user):
    token = Token.objects.create(user=api_user).key
    store = task_store()
    finished = new_packet(task_id=str(uuid.uuid4()), profile="productivity", role="summarizer", payload={"input": "x"})
    finished["status"] = "succeeded"
    finished["history"] = [history_event("submitted", status="queued"), history_event("finished", status="succeeded")]
    store.create(finished)
    queued = new_packet(task_id=str(uuid.uuid4()), profile="productivity", role="writer", payload={"input": "x"})
    queued["history"].append(history_event("submitted", status="queued"))
    store.create(queued)

    env = server_env(
        REDIS_URL="redis://127.0.0.1:1/0", DJANGO_SETTINGS_MODULE="aiagentserver.settings", ALLOWED_HOSTS="testserver"
    )
    run = subprocess.run(
        [sys.executable, "-c", CLIENT, token, finished["task_id"], queued["task_id"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["status"] < 500 or result["status"] == 503, (name, result)
        assert result["seconds"] < 10, (name, result["seconds"])

    submit = json.loads(results["submit"]["body"])
    assert (results["submit"]["status"], submit["code"]) == (503, "queue_unavailable")
    assert "Redis" in submit["detail"]
    accepted = store.read(submit["task_id"])  # accepted, on disk, queued: the recovery sweep will queue it
    assert accepted["status"] == "queued"
    assert [e["event"] for e in accepted["history"]] == ["submitted", "enqueue_failed"]

    assert results["task"]["status"] == 200 and json.loads(results["task"]["body"])["status"] == "succeeded"
    assert results["list"]["status"] == 200
    assert results["config"]["status"] == 200
    metrics = json.loads(results["metrics"]["body"])
    assert results["metrics"]["status"] == 200
    assert metrics["status"]["redis"]["status"] == "unavailable"
    assert metrics["status"]["database"]["status"] == "ok"
    assert 'aiagent_up{component="redis"} 0.0' in results["prometheus"]["body"]
    assert results["events"]["status"] == 200 and "event: end" in results["events"]["body"]
    assert results["cancel"]["status"] == 200 and json.loads(results["cancel"]["body"])["status"] == "cancelled"
    health = json.loads(results["healthz"]["body"])
    assert results["healthz"]["status"] == 503 and health["redis"].startswith("error")
    llms = json.loads(results["llms"]["body"])  # each LLM's breaker lives in Redis
    assert (results["llms"]["status"], llms["code"]) == (503, "redis_unavailable")
    assert results["v1_models"]["status"] == 200  # the configuration, not Redis
    completion = json.loads(results["v1_completion"]["body"])["error"]  # the balancer's slots live in Redis
    assert (results["v1_completion"]["status"], completion["code"]) == (503, "redis_unavailable")
    assert completion["type"] == "server_error" and "Redis" in completion["message"]
