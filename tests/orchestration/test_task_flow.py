"""A task through a real Celery worker process, a real Redis and the real SmolLM2 model."""

import json
import os
import signal

import pytest

from aiagentserver.celery import app
from orchestration.models import Task
from tests.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def submit(api, url, text, **fields):
    response = api.post(url, data=json.dumps({"payload": {"input": text}, **fields}), content_type="application/json")
    assert response.status_code == 202, response.content
    return response.json()


def test_posted_task_succeeds_with_a_real_model_answer_and_its_history(api, celery_worker):
    packet = submit(api, "/api/v1/productivity/summarizer", "Summarize: the cat sat on the mat all day long.")
    done = wait_for(packet["task_id"])
    assert done["status"] == "succeeded", done["history"]
    assert done["result"]["output"].strip()
    events = [event["event"] for event in done["history"]]
    assert events == ["submitted", "claimed", "step", "finished"]
    step = done["history"][2]
    assert step["agent"] == "generic"
    assert step["llm"] == "smollm2-135m"
    assert step["detail"]["model"] == "SmolLM2-135M-Instruct"
    assert step["detail"]["tokens"]["prompt"] > 0 and step["detail"]["tokens"]["completion"] > 0
    assert step["detail"]["latency_ms"] > 0
    assert step["detail"]["balancer"]["chosen"] == "smollm2-135m"
    assert done["history"][1]["detail"]["worker"].startswith(f"{celery_worker.name}:")
    assert done["version"] == 3
    # The mirror follows the file, and the API serves the same packet.
    row = Task.objects.get(task_id=packet["task_id"])
    assert (row.status, row.version) == ("succeeded", 3)
    assert api.get(f"/api/v1/tasks/{packet['task_id']}").json() == done


def test_cancelling_a_queued_task_revokes_its_job(api, celery_worker):
    queue = "developer.architect"
    app.control.cancel_consumer(queue, destination=[celery_worker.name], reply=True)
    try:
        packet = submit(api, "/api/v1/developer/architect", "Design a URL shortener.")
        job_id = packet["history"][0]["detail"]["job_id"]
        cancelled = api.post(f"/api/v1/tasks/{packet['task_id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        revoked = app.control.inspect(destination=[celery_worker.name], timeout=2).revoked() or {}
        assert job_id in revoked.get(celery_worker.name, [])
    finally:
        app.control.add_consumer(queue, destination=[celery_worker.name], reply=True)
    # Whatever the worker does with the job now, the task stays cancelled and never runs.
    marker = submit(api, "/api/v1/developer/architect", "Design a queue.")
    wait_for(marker["task_id"])
    final = wait_for(packet["task_id"])
    assert final["status"] == "cancelled"
    assert [event["event"] for event in final["history"]] == ["submitted", "cancelled"]


def test_a_job_delivered_twice_runs_the_step_once(api, celery_worker):
    from orchestration.tasks import run_task

    packet = submit(api, "/api/v1/productivity/writer", "Write one sentence about rain.")
    done = wait_for(packet["task_id"])
    # A redelivery of the job (as after a lost acknowledgement) finds the task finished and does nothing.
    job = run_task.apply_async(args=[packet["task_id"]], queue="productivity.writer")
    assert job.get(timeout=60) == "succeeded"  # waiting on a result is fine in a test, never in the server
    assert wait_for(packet["task_id"]) == done


def test_retrying_a_cancelled_task_runs_it(api, celery_worker):
    from orchestration.services import task_cancel, task_retry

    app.control.cancel_consumer("productivity.translator", destination=[celery_worker.name], reply=True)
    try:
        packet = submit(api, "/api/v1/productivity/translator", "Translate to German: thank you")
        task_cancel(task_id=packet["task_id"])
    finally:
        app.control.add_consumer("productivity.translator", destination=[celery_worker.name], reply=True)
    retried = task_retry(task_id=packet["task_id"])
    assert retried["status"] == "queued"
    done = wait_for(packet["task_id"])
    assert done["status"] == "succeeded"
    events = [event["event"] for event in done["history"]]
    assert events == ["submitted", "cancelled", "retried", "claimed", "step", "finished"]


def test_a_worker_process_killed_mid_step_hands_the_job_back_and_the_task_completes(api, celery_worker):
    packet = submit(
        api,
        "/api/v1/developer/deep_coder",
        "Write a Python module with a binary search tree class: insert, delete, search and in-order traversal, "
        "with docstrings and examples.",
    )
    running = wait_for(packet["task_id"], {"running"}, timeout=60)
    claim = running["history"][-1]
    os.kill(int(claim["detail"]["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    done = wait_for(packet["task_id"], timeout=240)
    assert done["status"] == "succeeded", done["history"]
    assert [event["event"] for event in done["history"]] == ["submitted", "claimed", "reclaimed", "step", "finished"]
    reclaim = done["history"][2]
    assert reclaim["detail"]["job_id"] == claim["detail"]["job_id"]
    assert reclaim["detail"]["worker"] != claim["detail"]["worker"]
    assert done["result"]["output"]
