"""A step whose lease goes to another worker stops its LLM call (orchestration/leases.py)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from orchestration import orchestration_engine
from orchestration.leases import StepLease
from orchestration.runtime import task_store
from orchestration.services import task_submit

pytestmark = pytest.mark.django_db(transaction=True)


class _Stuck(BaseHTTPRequestHandler):
    """An OpenAI-compatible API that never finishes its reply: a stream sends one piece, then only SSE comments
    for 30 s; a whole reply sends its body's first bytes, whitespace, one every 0.1 s."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        if request.get("stream"):
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": "Once"}, "finish_reason": None}]}  # fmt: skip
            self.send_header("Content-Type", "text/event-stream")
            first, keep_alive = f"data: {json.dumps(chunk)}\n\n".encode(), b": ping\n\n"
        else:  # a whole reply, its body sent a byte at a time (whitespace, which JSON allows before it)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100000")
            first, keep_alive = b" ", b" "
        self.end_headers()
        try:
            self.wfile.write(first)
            for _ in range(300):
                self.wfile.write(keep_alive)
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the client went


@pytest.fixture
def stuck() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stuck)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_a_step_whose_lease_goes_to_another_worker_stops_its_llm_call(edit_config, redis_url, settings, stuck):
    """Found by review: a worker that lost its step's lease (cut off from Redis for the lease's time, or
    stalled) went on with the step while another worker ran it too, to the end of its LLM call. Now its next
    renewal sees the lease taken and stops the call; the task is left to the other worker, not failed."""
    profile = f"lease_{uuid.uuid4().hex[:8]}"  # no worker consumes its queues: the test runs the step itself

    def add(raw):
        raw["llms"].append({"id": f"{profile}_llm", "engine": "openai", "source": "api", "model": "m",
                            "base_url": stuck, "locked": True, "capabilities": ["chat"]})  # fmt: skip
        raw["profiles"][profile] = {"roles": {"writer": {
            "agent": "writer", "system_prompt": "Write.", "capabilities": ["chat"], "time_limit_s": 60,
            "preferred_llms": [f"{profile}_llm"]}}}  # fmt: skip

    edit_config(add)
    settings.TASK_LEASE_SECONDS = 1.5  # renewed every 0.5 s
    packet, _ = task_submit(profile=profile, role="writer", payload={"brief": "a long story"})
    task_id, job_id = packet["task_id"], packet["history"][-1]["detail"]["job_id"]
    client = redis.Redis.from_url(redis_url)

    def take_over() -> None:  # another worker takes the lease, as after it expired
        time.sleep(1.0)
        client.set(StepLease(task_id, job_id).key, f"{job_id}:other:1", px=60_000)

    threading.Thread(target=take_over, daemon=True).start()
    started = time.monotonic()
    try:
        outcome = orchestration_engine.task_step(task_id=task_id, job_id=job_id, worker="test:1")
    finally:
        client.delete(f"{profile}.writer", StepLease(task_id, job_id).key)
    assert time.monotonic() - started < 5, "the call ran on"
    assert "lease went to another worker" in outcome["skipped"]
    stored = task_store().read(task_id)
    assert stored["status"] == "running"  # the other worker's now: not failed, no step recorded
    assert [event["event"] for event in stored["history"]][-1] == "claimed"


def test_a_lost_job_lease_stops_its_steps_work_and_a_lost_step_lease_only_the_step(redis_url, settings):
    """A job's lease and its step's are held at once; the calls take the innermost's Cancel."""
    from llm_engines.base import work_cancel

    client = redis.Redis.from_url(redis_url)
    name = str(uuid.uuid4())
    job, step = StepLease(f"job:{name}", "j", ttl_s=1.5), StepLease(name, "j", ttl_s=1.5)
    assert job.acquire() and step.acquire()
    try:
        with job:
            with step:
                assert work_cancel() is step.lost
                client.set(step.key, "another", px=60_000)
                _wait_until(lambda: step.lost.cancelled)
                assert not job.lost.cancelled  # the job goes on: its next step is not stopped
            assert work_cancel() is job.lost
            client.delete(step.key)
            assert step.acquire()
            with step:  # entered again: a new Cancel, and the job's loss reaches it
                client.set(job.key, "another", px=60_000)
                _wait_until(lambda: step.lost.cancelled)
                assert client.get(step.key) == step.holder.encode()  # the step's own lease is still its
        assert work_cancel() is None
    finally:
        client.delete(job.key, step.key)


def _wait_until(condition, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)
