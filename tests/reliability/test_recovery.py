"""Recovery from lost jobs, dead workers, a Redis that was down and a database that refused writes:
the recovery sweeper (orchestration/recovery.py) with real Celery workers, a real Redis, and the
scripted engine in place of the model (tests/orchestration/scripted.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.db import OperationalError, connection

from aiagentserver.celery import app
from orchestration import recovery
from orchestration.models import Task
from orchestration.packets import history_event, new_packet
from orchestration.runtime import task_store
from tests.conftest import BASE_DIR, server_env, submit_with_redis_down, wait_for
from tests.orchestration.scripted import CODER, QA_REVIEW, code_reply, use_script

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

SUMMARY = {"match": r'Reply with JSON: \{"summary"', "reply": {"summary": "Short.", "key_points": ["short"]}}
QUEUE = "productivity.summarizer"


@pytest.fixture
def script(edit_config, tmp_path):
    return lambda rules: use_script(edit_config, tmp_path / "script.json", rules)


@pytest.fixture
def broker(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def submit(api, text: str = "Some text to summarize.") -> dict:
    response = api.post(
        f"/api/v1/{QUEUE.replace('.', '/')}",
        data=json.dumps({"payload": {"input": text}}),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    return response.json()


def events(packet: dict) -> list[str]:
    return [event["event"] for event in packet["history"]]


class paused_queue:
    """The session worker stops taking jobs from a queue for a while."""

    def __init__(self, worker: str, queue: str = QUEUE) -> None:
        self.worker, self.queue = worker, queue

    def __enter__(self) -> None:
        # Waited for: a worker still busy with an earlier test's job answers late, and until it has
        # answered it may take the job the test is about to submit.
        assert app.control.cancel_consumer(self.queue, destination=[self.worker], reply=True, timeout=30)
        # A BRPOP the worker sent before still names the queue until it returns (kombu's brpop_timeout,
        # 1 s); a job it pops then is put back on the queue, so for a moment it is missing from it, and
        # a test that deletes the queue meanwhile sees it come back. Waited out.
        time.sleep(1.5)

    def __exit__(self, *exc_info) -> None:
        assert app.control.add_consumer(self.queue, destination=[self.worker], reply=True, timeout=30)


def on_queue(broker: redis.Redis, job_id: str, timeout: float = 10) -> bool:
    """Whether the job is (or comes back within ``timeout``) on the paused queue. A worker's BRPOP sent
    before the pause still names the queue for up to a second, and a job it pops then is put back
    (kombu: "Requeuing undeliverable message ... No consumers"): missing from the list meanwhile."""
    deadline = time.monotonic() + timeout
    while job_id not in recovery.queued_jobs(broker, [QUEUE]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_queued_task_whose_job_redis_lost_is_queued_again_and_completes(api, celery_worker, script, broker):
    script([SUMMARY])
    with paused_queue(celery_worker.name):
        packet = submit(api)
        job_id = packet["history"][0]["detail"]["job_id"]
        assert on_queue(broker, job_id)
        assert recovery.sweep(grace_s=0).recovered == []  # on its queue: waiting, not lost
        broker.delete(QUEUE)  # Redis lost it (restarted without persistence, say)
        report = recovery.sweep(grace_s=0)
        assert report.recovered == [packet["task_id"]]
    done = wait_for(packet["task_id"])
    assert done["status"] == "succeeded"
    assert events(done) == ["submitted", "recovered", "claimed", "step", "finished"]
    assert done["history"][1]["detail"]["jobs"] == [job_id]
    assert done["history"][2]["detail"]["job_id"] == job_id  # queued again under the same id
    assert recovery.sweep(grace_s=0).recovered == []


def test_a_step_that_meets_a_redis_outage_is_left_to_the_sweep_not_failed(
    api, celery_worker, script, broker, monkeypatch
):
    """Redis stops answering in the middle of a step (here the balancer's call): the task is not failed
    for it ("internal error", as before); the job ends, and once Redis answers the sweep queues the task
    again under the same job id, which takes the step over and finishes it."""
    from balancer.load_balancer import LoadBalancer
    from orchestration import orchestration_engine

    script([SUMMARY])
    with paused_queue(celery_worker.name):
        packet = submit(api)
        job_id = packet["history"][0]["detail"]["job_id"]
        assert on_queue(broker, job_id)
        broker.delete(QUEUE)  # as if this test's process were the worker that took the job

        def outage(*_args, **_kwargs):
            raise redis.ConnectionError("Connection refused")

        with monkeypatch.context() as patched:
            patched.setattr(LoadBalancer, "run", outage)
            with pytest.raises(redis.ConnectionError):
                orchestration_engine.task_step(task_id=packet["task_id"], job_id=job_id, worker="here:1")
        stopped = task_store().read(packet["task_id"])
        assert stopped["status"] == "running" and events(stopped)[-1] == "claimed"
        assert recovery.sweep(grace_s=0, inspect_timeout_s=0.5).recovered == [packet["task_id"]]
    done = wait_for(packet["task_id"])
    assert done["status"] == "succeeded"
    assert events(done) == ["submitted", "claimed", "recovered", "reclaimed", "step", "finished"]
    assert done["history"][3]["detail"]["job_id"] == job_id


class Killed(BaseException):
    """A process's death, as far as the code after it is concerned: nothing below runs."""


def _submit_killed_at(monkeypatch, module, name: str) -> str:
    """Submit a summarizer task from this process, killed (``Killed``) where ``module.name`` is called."""
    from orchestration import services

    def die(*_args, **_kwargs):
        raise Killed

    task_id = str(uuid.uuid4())
    with monkeypatch.context() as patched:
        patched.setattr(module, name, die)
        with pytest.raises(Killed):
            services.task_submit(profile="productivity", role="summarizer", payload={"input": "Hi."}, task_id=task_id)
    return task_id


def test_a_task_whose_process_died_between_its_file_and_its_row_is_found_by_the_sweep(
    api, celery_worker, script, monkeypatch
):
    """The web process is killed after writing the new task's file, before its job and its row (the job is
    queued once the file is durable, then the row is written): no row, no job. The task was marked unmirrored
    before its file was written, so the sweep writes its row, then finds nothing moving it on and queues it."""
    from orchestration import services

    script([SUMMARY])
    task_id = _submit_killed_at(monkeypatch, services, "_publish")
    assert task_store().read(task_id)["status"] == "queued"
    assert not Task.objects.filter(task_id=task_id).exists()
    report = recovery.sweep(grace_s=0)
    assert report.mirrored == 1 and report.recovered == [task_id]
    done = wait_for(task_id)
    assert done["status"] == "succeeded"
    assert events(done) == ["submitted", "recovered", "claimed", "step", "finished"]


def test_a_task_whose_process_died_after_its_job_was_queued_before_its_row_runs_and_gets_its_row(
    api, celery_worker, script, monkeypatch
):
    """The web process is killed after queueing the new task's job, before its row: the worker's claim, which
    waits for the task's lock (released by the death), writes the row, and the task runs as any other."""
    from orchestration import state_store

    script([SUMMARY])
    task_id = _submit_killed_at(monkeypatch, state_store, "mirror_packet")
    done = wait_for(task_id)
    assert done["status"] == "succeeded"
    assert events(done) == ["submitted", "claimed", "step", "finished"]
    assert Task.objects.get(task_id=task_id).version == done["version"]


def test_a_task_accepted_while_redis_was_down_is_queued_by_the_sweep(api, celery_worker, script):
    """A web process whose Redis does not answer (a real process, pointed at a closed port)."""
    script([SUMMARY])
    task_id = str(uuid.uuid4())
    answer = submit_with_redis_down(
        task_id=task_id, profile="productivity", role="summarizer", payload={"input": "Hi."}
    )
    assert answer == {"status": 503, "code": "queue_unavailable"}
    assert task_store().read(task_id)["status"] == "queued"
    # Redis is back (it always was, for everyone else): the sweep queues the task.
    assert recovery.sweep(grace_s=0).recovered == [task_id]
    done = wait_for(task_id)
    assert done["status"] == "succeeded"
    assert events(done) == ["submitted", "enqueue_failed", "recovered", "claimed", "step", "finished"]


def test_a_worker_killed_whole_mid_step_leaves_a_task_the_sweep_hands_to_another(api, celery_worker, script, tmp_path):
    """SIGKILL of a whole worker (the host died): its job stays unacknowledged in Redis for the
    visibility timeout (an hour); the sweep finds no live worker holding it and queues it again."""
    script([{**SUMMARY, "delay_s": 4}])
    name = f"doomed-{uuid.uuid4().hex[:6]}@localhost"
    log = tmp_path / "doomed.log"
    command = [
        sys.executable, "-m", "aiagentserver.worker", "-n", name, "-Q", QUEUE,
        "--concurrency", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    env = server_env(TASK_LEASE_SECONDS="2", RECOVERY_SWEEP_SECONDS="3600")
    with paused_queue(celery_worker.name):
        with open(log, "wb") as output:
            doomed = subprocess.Popen(
                command, cwd=BASE_DIR, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 60
            while not app.control.ping(destination=[name], timeout=0.5):
                assert doomed.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            packet = submit(api)
            running = wait_for(packet["task_id"], {"running"}, timeout=30)
            assert running["history"][-1]["detail"]["worker"].startswith(name)
        finally:
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait()
    time.sleep(2.5)  # its lease expires
    assert recovery.sweep(grace_s=0).recovered == [packet["task_id"]]
    done = wait_for(packet["task_id"], timeout=60)
    assert done["status"] == "succeeded"
    assert events(done) == ["submitted", "claimed", "recovered", "reclaimed", "step", "finished"]
    assert done["history"][3]["detail"]["worker"].startswith(celery_worker.name)
    assert sum(event["event"] == "step" for event in done["history"]) == 1


def test_a_job_whose_worker_process_dies_each_time_fails_its_task_after_the_retries(api, celery_worker, script):
    """An engine that kills its process (llama.cpp crashing on an input, the kernel's OOM killer): the job
    came back after each death (reject_on_worker_lost) and was reclaimed for ever, its task "running"."""
    script([{**SUMMARY, "error": "crash"}])
    packet = submit(api)
    done = wait_for(packet["task_id"], timeout=120)
    assert done["status"] == "failed", events(done)
    assert events(done) == ["submitted", "claimed", "reclaimed", "reclaimed", "reclaimed", "failed"]
    assert done["history"][-1]["detail"]["reason"] == (
        "step main: the worker process running its job died 4 times (killed, out of memory, or a crash in the engine)"
    )


def test_a_round_whose_verdict_never_came_is_recovered(api, celery_worker, script):
    """A chord whose callback is lost (django-celery-results counts a check job delivered twice as two):
    the round's checks are all recorded, no verdict follows. The state is built from a real run."""
    tests = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    script(
        [
            {"match": QA_REVIEW, "reply": {"passed": True, "findings": []}},
            {"match": CODER, "reply": code_reply("def add(a, b):\n    return a + b\n")},
        ]
    )
    response = api.post(
        "/api/v1/developer/fast_coder",
        data=json.dumps({"payload": {"instruction": "add(a, b) returns a + b", "tests": tests}}),
        content_type="application/json",
    )
    reference = wait_for(response.json()["task_id"], timeout=60)
    assert reference["status"] == "succeeded"
    verdict = next(i for i, e in enumerate(reference["history"]) if e["event"] == "verdict")
    history = json.loads(json.dumps(reference["history"][:verdict]))
    assert sorted(e["detail"]["step"] for e in history if e["event"] == "check") == ["1.review", "1.static", "1.tests"]
    for event in history:  # jobs of its own, as a real task would have
        if event["event"] == "scheduled":
            event["detail"]["job_ids"] = [str(uuid.uuid4()) for _ in event["detail"]["job_ids"]]
    stuck = {**reference, "task_id": str(uuid.uuid4()), "status": "running", "result": None, "history": history}
    del stuck["version"]
    task_store().create(stuck)

    assert recovery.sweep(grace_s=0).recovered == [stuck["task_id"]]
    done = wait_for(stuck["task_id"], timeout=60)
    assert done["status"] == "succeeded", done["history"][-3:]
    assert events(done)[len(history) :] == ["recovered", "verdict", "finished"]
    # The checks were not run again: they were recorded.
    assert sum(event["event"] == "check" for event in done["history"]) == 3


@pytest.mark.django_db
def test_a_task_that_cannot_be_looked_at_does_not_stop_the_sweep_for_the_others(redis_url, caplog):
    """A plan's parent whose child's state file is corrupt is the oldest candidate: it is logged, and the
    sweep goes on to the task after it (before, every sweep stopped at it and no later task was recovered)."""
    store = task_store()
    child = str(uuid.uuid4())
    parent = new_packet(task_id=str(uuid.uuid4()), profile="developer", role="planner", payload={"input": "Plan."})
    parent["status"] = "running"
    parent["children"] = [child]
    parent["history"].append(history_event("delegated", status="running", detail={"children": [child]}))
    store.create(parent)
    (store.root / f"{child}.json").write_text("{not json")
    lost = new_packet(task_id=str(uuid.uuid4()), profile="productivity", role="summarizer", payload={"input": "Hi."})
    lost["history"].append(history_event("submitted", status="queued", detail={"job_id": str(uuid.uuid4())}))
    store.create(lost)  # its job was never queued
    try:
        report = recovery.sweep(grace_s=0, inspect_timeout_s=0.2)
        assert report.recovered == [lost["task_id"]]
        assert f"recovery: task {parent['task_id']} not looked at" in caplog.text
        assert store.read(parent["task_id"])["status"] == "running"  # left as it was, for a person to repair
    finally:  # the state directory is the session's: no corrupt file or stuck plan is left for other tests
        for task_id in (child, parent["task_id"]):
            store.path(task_id).unlink(missing_ok=True)


def test_a_sweep_that_outlived_its_lease_leaves_the_next_sweeps_lease_alone(redis_url, monkeypatch):
    """One sweep at a time among the workers: a sweep that took longer than its lease deleted the lease of
    the sweep that had taken it over since, letting a third one in."""
    from orchestration.leases import PREFIX

    client = redis.Redis.from_url(redis_url)
    key = f"{PREFIX}{recovery.SWEEP_LEASE}"
    client.delete(key)

    def slow_sweep(**options):
        assert client.get(key) is not None  # this sweep's
        client.set(key, "the next sweep", px=60_000)  # this one's expired, and another took the lease
        return recovery.SweepReport()

    monkeypatch.setattr(recovery, "sweep", slow_sweep)
    try:
        assert recovery.sweep_once_among_workers() == recovery.SweepReport()
        assert client.get(key) == b"the next sweep"
        assert recovery.sweep_once_among_workers() is None  # the next sweep's lease holds
    finally:
        client.delete(key)


@pytest.mark.django_db
def test_a_row_behind_its_finished_task_is_brought_up_to_date_by_the_sweep(redis_url):
    """A row that says running while the file says succeeded (its write's row was lost, with no mark left)
    would come back among the sweep's oldest candidates at every sweep, crowding out the lost tasks."""
    store = task_store()
    packet = new_packet(task_id=str(uuid.uuid4()), profile="productivity", role="summarizer", payload={"input": "Hi."})
    packet["status"] = "succeeded"
    store.create(packet)
    Task.objects.filter(task_id=packet["task_id"]).update(status="running", version=0)
    assert recovery.sweep(grace_s=0, inspect_timeout_s=0.2).recovered == []
    row = Task.objects.get(task_id=packet["task_id"])
    assert (row.status, row.version) == ("succeeded", 1)


def test_a_task_recovered_too_often_fails(api, celery_worker, script, broker, settings):
    script([SUMMARY])
    with paused_queue(celery_worker.name):
        packet = submit(api)
        broker.delete(QUEUE)
        assert recovery.sweep(grace_s=0, retries=1).recovered == [packet["task_id"]]
        broker.delete(QUEUE)  # lost again
        report = recovery.sweep(grace_s=0, retries=1)
    assert report.failed == [packet["task_id"]]
    failed = task_store().read(packet["task_id"])
    assert failed["status"] == "failed"
    assert events(failed) == ["submitted", "recovered", "failed"]
    assert "after it was recovered 1 times" in failed["history"][-1]["detail"]["reason"]


def test_the_mirror_catches_up_after_the_database_refused_a_write():
    """The database is locked (SQLite's busy timeout ran out) for the task's writes: the file is the
    truth, and the sweep writes the row. The refusal is injected with Django's execute_wrapper, at the
    driver boundary."""
    from orchestration.packets import history_event, new_packet

    store = task_store()
    packet = store.create(new_packet(task_id=str(uuid.uuid4()), profile="developer", role="planner", payload={}))

    def locked(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith(("UPDATE", "INSERT")) and "orchestration_task" in sql:
            raise OperationalError("database is locked")
        return execute(sql, params, many, context)

    def note(current: dict) -> bool:
        current["history"].append(history_event("note", status=current["status"]))
        return True

    with connection.execute_wrapper(locked):
        updated, _ = store.update(packet["task_id"], note)
    assert updated["version"] == 2
    assert Task.objects.get(task_id=packet["task_id"]).version == 1
    assert (Path(settings.TASKS_STATE_DIR) / ".unmirrored" / packet["task_id"]).exists()
    assert recovery.sweep(grace_s=3600).mirrored == 1
    assert Task.objects.get(task_id=packet["task_id"]).version == 2
    assert not (Path(settings.TASKS_STATE_DIR) / ".unmirrored" / packet["task_id"]).exists()


def test_a_hung_llm_call_is_bounded_by_the_roles_time_limit_and_the_task_fails_after_its_retries(
    api, celery_worker, edit_config, tmp_path
):
    """The model never answers (30 s): each try is stopped at the role's time limit (2 s) as an engine
    timeout, retried STEP_RETRIES (2) times with backoff (1 s in the suite's worker), then the task fails."""
    llm = f"hung-{uuid.uuid4().hex[:6]}"
    use_script(edit_config, tmp_path / "script.json", [{**SUMMARY, "delay_s": 30}], llm_id=llm)
    edit_config(lambda raw: raw["profiles"]["productivity"]["roles"]["summarizer"].update(time_limit_s=2))
    started = time.monotonic()
    done = wait_for(submit(api)["task_id"], timeout=60)
    took = time.monotonic() - started
    assert done["status"] == "failed"
    assert sum(event["event"] == "step_retry" for event in done["history"]) == 2
    reason = done["history"][-1]["detail"]["reason"]
    assert "no reply within" in reason and "after 2 retries" in reason, reason
    assert took < 25, took  # three tries of about 2 s and two backoffs, not one 30 s call


def test_a_backlog_of_waiting_tasks_does_not_hide_a_lost_one_from_the_sweep(edit_config, redis_url, monkeypatch):
    """Each sweep took the BATCH oldest idle tasks: while that many waited on their queues (behind a slow
    LLM), the same ones came back at every sweep, and a newer task whose job was lost was never looked at."""
    from orchestration.services import task_submit

    profile = f"backlog_{uuid.uuid4().hex[:8]}"  # no worker consumes its queues: its jobs wait there
    edit_config(lambda raw: raw["profiles"].__setitem__(profile, raw["profiles"]["productivity"]))
    monkeypatch.setattr(recovery, "BATCH", 3)
    redis.Redis.from_url(redis_url).delete(recovery.CURSOR_KEY)
    try:
        for _ in range(4):
            task_submit(profile=profile, role="summarizer", payload={"text": "x"})
        lost = new_packet(task_id=str(uuid.uuid4()), profile=profile, role="summarizer", payload={"text": "x"})
        lost["history"].append(history_event("submitted", status="queued", detail={"job_id": str(uuid.uuid4())}))
        task_store().create(lost)
        Task.objects.exclude(profile=profile).filter(status__in=("queued", "running")).delete()  # other tests'
        recovered = []
        for _ in range(3):
            recovered += recovery.sweep(grace_s=0, inspect_timeout_s=0.2).recovered
        assert recovered == [lost["task_id"]]
    finally:
        redis.Redis.from_url(redis_url).delete(*(f"{profile}.{role}" for role in ("summarizer",)))


def test_a_sweep_that_redis_ends_looks_at_its_batch_again(edit_config, redis_url, monkeypatch):
    """Found by review: the cursor moved past a batch before the batch was looked at, so the tasks of a sweep
    that Redis or the database ended were not looked at again until the cursor came round."""
    profile = f"cursor_{uuid.uuid4().hex[:8]}"
    edit_config(lambda raw: raw["profiles"].__setitem__(profile, raw["profiles"]["productivity"]))
    monkeypatch.setattr(recovery, "BATCH", 2)
    client = redis.Redis.from_url(redis_url)
    client.delete(recovery.CURSOR_KEY)
    Task.objects.filter(status__in=("queued", "running")).delete()  # other tests'
    for _ in range(2):
        task_store().create(new_packet(task_id=str(uuid.uuid4()), profile=profile, role="summarizer",
                                       payload={"text": "x"}))  # fmt: skip

    def away(self, task_id):
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(recovery._Sweep, "look_at", away)
    with pytest.raises(redis.ConnectionError):
        recovery.sweep(grace_s=0)
    assert client.get(recovery.CURSOR_KEY) is None
