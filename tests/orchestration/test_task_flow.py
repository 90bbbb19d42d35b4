"""A task through a real Celery worker process, a real Redis and the real SmolLM2 model."""

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from aiagentserver.celery import app
from orchestration.models import Task
from orchestration.orchestration_engine import StepBusy, task_step
from orchestration.packets import new_packet
from orchestration.state_store import TaskStore
from tests.conftest import submit_with_redis_down, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def submit(api, url, text, **fields):
    response = api.post(url, data=json.dumps({"payload": {"input": text}, **fields}), content_type="application/json")
    assert response.status_code == 202, response.content
    return response.json()


def test_posted_task_succeeds_with_a_real_model_answer_and_its_history(api, celery_worker):
    packet = submit(api, "/api/v1/productivity/summarizer", "Summarize: the cat sat on the mat all day long.")
    done = wait_for(packet["task_id"])
    assert done["status"] == "succeeded", done["history"]
    assert done["result"]["summary"].strip()
    assert isinstance(done["result"]["key_points"], list)
    events = [event["event"] for event in done["history"]]
    assert events == ["submitted", "claimed", "step", "finished"]
    step = done["history"][2]
    assert step["agent"] == "summarizer"
    assert step["llm"] == "smollm2-135m"
    assert step["detail"]["model"] == "SmolLM2-135M-Instruct"
    assert step["detail"]["tokens"]["prompt"] > 0 and step["detail"]["tokens"]["completion"] > 0
    assert step["detail"]["latency_ms"] > 0
    assert step["detail"]["balancer"]["chosen"] == "smollm2-135m"
    assert done["history"][1]["detail"]["worker"].startswith(f"{celery_worker.name}:")
    assert done["version"] == 3
    # The mirror follows the file (written just after it, in the same call), and the API serves the same packet.
    deadline = time.monotonic() + 10
    while (row := Task.objects.get(task_id=packet["task_id"])).version < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
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


def test_a_job_delivered_again_after_the_task_finished_does_nothing(api, celery_worker):
    from orchestration.tasks import run_task

    packet = submit(api, "/api/v1/productivity/writer", "Write one sentence about rain.")
    done = wait_for(packet["task_id"])
    job_id = packet["history"][0]["detail"]["job_id"]
    # The server's jobs store no result; this one does, so that the test can wait for it (a test may
    # wait on a result; the server never does).
    job = run_task.apply_async(
        args=[packet["task_id"]], queue="productivity.writer", task_id=job_id, ignore_result=False
    )
    assert job.get(timeout=60) == "succeeded"
    assert wait_for(packet["task_id"]) == done


def test_the_same_job_twice_at_once_runs_the_step_once(state_dir):
    """Two deliveries of one job at the same time (a connection loss or a visibility timeout while
    the first still runs): the second finds the lease held and is told to come back later."""
    store = TaskStore(state_dir)
    packet = new_packet(task_id=str(uuid.uuid4()), profile="productivity", role="writer", payload={"input": "Hi."})
    store.create(packet)
    job_id = str(uuid.uuid4())
    outcomes: list = []

    def deliver() -> None:
        try:
            outcomes.append(task_step(task_id=packet["task_id"], job_id=job_id, worker="test"))
        except StepBusy as busy:
            outcomes.append(busy)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["StepBusy", "str"]
    final = store.read(packet["task_id"])
    assert final["status"] == "succeeded"
    assert [event["event"] for event in final["history"]] == ["claimed", "step", "finished"]


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
        "/api/v1/productivity/writer",
        "Write a long essay on the history of binary search trees: insertion, deletion, search and traversal.",
    )
    running = wait_for(packet["task_id"], {"running"}, timeout=60)
    claim = running["history"][-1]
    os.kill(int(claim["detail"]["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    # The job comes back at once, waits for the dead worker's lease to expire, then takes over.
    done = wait_for(packet["task_id"], timeout=240)
    assert done["status"] == "succeeded", done["history"]
    assert [event["event"] for event in done["history"]] == ["submitted", "claimed", "reclaimed", "step", "finished"]
    reclaim = done["history"][2]
    assert reclaim["detail"]["job_id"] == claim["detail"]["job_id"]
    assert reclaim["detail"]["worker"] != claim["detail"]["worker"]
    assert done["result"]["text"]


def test_a_cancelled_steps_late_answer_does_not_finish_the_retried_task(api, celery_worker):
    """Cancel while the model answers, retry at once: the old answer is discarded, and the new
    job waits for the old step's lease before it runs its own step."""
    from orchestration.services import task_cancel, task_retry

    store = TaskStore(settings.TASKS_STATE_DIR)
    packet = new_packet(
        task_id=str(uuid.uuid4()),
        profile="productivity",
        role="writer",
        payload={"brief": "Write a long essay on priority queues: heaps, use cases and pitfalls."},
    )
    store.create(packet)
    first = threading.Thread(target=task_step, kwargs={"task_id": packet["task_id"], "job_id": "job-a", "worker": "t"})
    first.start()
    wait_for(packet["task_id"], {"running"}, timeout=30)
    task_cancel(task_id=packet["task_id"])
    task_retry(task_id=packet["task_id"])
    first.join()
    done = wait_for(packet["task_id"], {"succeeded", "failed"}, timeout=240)
    events = [event["event"] for event in done["history"]]
    assert events == ["claimed", "cancelled", "retried", "step_discarded", "claimed", "step", "finished"]
    assert done["history"][4]["detail"]["job_id"] == done["history"][2]["detail"]["job_id"]


def test_a_submit_while_redis_is_down_is_503_and_a_resubmit_queues_it(api, celery_worker, tmp_path):
    """A web process whose Redis does not answer (a real process, pointed at a closed port)."""
    task_id = str(uuid.uuid4())
    answer = submit_with_redis_down(
        task_id=task_id, profile="productivity", role="writer", payload={"input": "Say hi."}
    )
    assert answer == {"status": 503, "code": "queue_unavailable"}
    stored = json.loads((Path(settings.TASKS_STATE_DIR) / f"{task_id}.json").read_text())
    assert stored["status"] == "queued"
    assert [event["event"] for event in stored["history"]] == ["submitted", "enqueue_failed"]
    again = api.post(
        "/api/v1/productivity/writer",
        data=json.dumps({"task_id": task_id, "payload": {"input": "Say hi."}}),
        content_type="application/json",
    )
    assert again.status_code == 200
    done = wait_for(task_id)
    assert done["status"] == "succeeded"
    events = [event["event"] for event in done["history"]]
    assert events == ["submitted", "enqueue_failed", "enqueued", "claimed", "step", "finished"]


def test_a_step_killed_by_the_hard_time_limit_fails_its_task(state_dir):
    """Celery calls the task's on_failure from the worker's main process when the hard limit kills
    the step (celery/worker/request.py, on_timeout); that hook must fail the task."""
    from billiard.exceptions import TimeLimitExceeded

    from orchestration.tasks import run_task

    store = TaskStore(state_dir)
    packet = new_packet(task_id=str(uuid.uuid4()), profile="productivity", role="writer", payload={"input": "x"})
    store.create(packet)

    def claim(current):
        current["status"] = "running"
        current["history"].append({"at": "t", "event": "claimed", "agent": None, "status": "running", "llm": None,
                                   "detail": {"worker": "w", "job_id": "job-1"}})  # fmt: skip
        return True

    store.update(packet["task_id"], claim)
    run_task.on_failure(TimeLimitExceeded(35), "job-1", [packet["task_id"]], {}, None)
    failed = store.read(packet["task_id"])
    assert failed["status"] == "failed"
    assert failed["history"][-1]["detail"]["reason"].startswith("step main was stopped: TimeLimitExceeded")
    # Another job's failure does not touch a task it does not hold.
    run_task.on_failure(TimeLimitExceeded(35), "job-2", [packet["task_id"]], {}, None)
    assert store.read(packet["task_id"]) == failed
