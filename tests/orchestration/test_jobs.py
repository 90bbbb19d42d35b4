"""The Celery jobs' hooks (orchestration/tasks.py) that run in the worker around every job."""

import types

import pytest
from django.db import connection, transaction

from orchestration.models import Task
from orchestration.tasks import close_stale_connections


@pytest.mark.django_db(transaction=True)
def test_connections_are_kept_between_jobs_until_they_are_older_than_the_max_age():
    job = types.SimpleNamespace(request=types.SimpleNamespace(is_eager=False))
    Task.objects.count()
    kept = connection.connection
    close_stale_connections(sender=job)
    assert connection.connection is kept  # younger than DB_CONN_MAX_AGE: kept for the next job
    connection.close_at = 0  # as if it were older than DB_CONN_MAX_AGE
    close_stale_connections(sender=job)
    assert connection.connection is None


@pytest.mark.django_db(transaction=True)
def test_a_job_run_eagerly_inside_a_transaction_leaves_its_connection_open():
    job = types.SimpleNamespace(request=types.SimpleNamespace(is_eager=True))
    with transaction.atomic():
        Task.objects.count()
        close_stale_connections(sender=job)
        assert Task.objects.count() == 0


def test_a_worker_counts_failed_health_checks_only_of_the_llms_of_its_roles(edit_config, monkeypatch):
    """Every worker counted every LLM's failed checks: one consuming only other roles' queues, on a host
    without that LLM's model file or key, tripped its breaker for every host."""
    from orchestration import runtime, tasks

    def add_coders_llm(raw):
        coder = raw["profiles"]["developer"]["roles"]["fast_coder"]
        capabilities = sorted({"chat", *coder.get("capabilities", [])})
        raw["llms"].append({"id": "coders-only", "engine": "instant", "source": "local", "model": "m", "locked": True,
                            "capabilities": capabilities})  # fmt: skip
        coder["preferred_llms"] = ["coders-only"]

    edit_config(add_coders_llm)
    counted = []
    monkeypatch.setattr(runtime, "load_balancer", lambda: types.SimpleNamespace(
        health_failed=lambda llm, interval_s: counted.append(llm.id)))  # fmt: skip
    llm = runtime.configuration().llms["coders-only"]
    tasks.health_failure_counter({"productivity.summarizer"})(llm)
    assert counted == []
    tasks.health_failure_counter({"productivity.summarizer", "developer.fast_coder"})(llm)
    assert counted == ["coders-only"]


def test_a_jobs_run_counts_the_runs_before_it_that_died_not_those_alive(redis_url, settings):
    """A single running flag per job counted a death for a delivery that came while the first run was alive
    (and the second's end cleared the first's mark, so that its real death went uncounted). A mark an
    earlier server left as ended ('0') is no death."""
    import time
    import uuid

    from orchestration.leases import JobRun, JobRunAlive

    settings.TASK_LEASE_SECONDS = 2
    job_id = f"test-{uuid.uuid4()}"
    first = JobRun(job_id)
    assert first.start() == 0
    with pytest.raises(JobRunAlive) as alive:  # delivered again while the first runs: it waits for it
        JobRun(job_id).start()
    assert 0 < alive.value.remaining_s <= 2
    from balancer.renewal import renewer

    renewer.remove(first.lease._renewal)  # the first's process dies: no renewal, no end
    time.sleep(2.2)  # its lease runs out
    third = JobRun(job_id)
    assert third.start() == 1
    third.end()
    import redis

    client = redis.Redis.from_url(redis_url)
    assert not client.exists(third.lease.key)  # its end gave the job's lease up and cleared its mark
    assert client.hget(third.key, "running") is None
    fourth = JobRun(job_id)
    assert fourth.start() == 1  # ended cleanly: no death more
    fourth.end()
    client.hset(fourth.key, "running", "0")
    fifth = JobRun(job_id)
    assert fifth.start() == 1
    fifth.end()


def test_a_worker_says_at_its_start_whether_the_test_runs_of_its_roles_can_run(settings, caplog, tmp_path):
    """A host without bubblewrap was found out only when QA's checks failed task after task; a worker
    consuming QA's queue now says it at its start (and in its heartbeat, GET /api/v1/metrics)."""
    import logging

    from orchestration.tasks import sandbox_report

    caplog.set_level(logging.INFO, logger="orchestration.tasks")
    assert sandbox_report({"productivity.summarizer"}) is None  # no role of its queues runs code
    report = sandbox_report({"productivity.summarizer", "developer.qa"})
    assert report["state"] == "sandboxed", report  # make install installs bubblewrap
    assert "bubblewrap" in report["detail"]

    settings.SANDBOX_BWRAP = str(tmp_path / "no-such-bwrap")
    caplog.clear()
    report = sandbox_report({"developer.qa"})
    assert report["state"] == "unavailable"
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "developer.qa" in record.getMessage() and "bubblewrap is not installed" in record.getMessage()

    settings.SANDBOX_ALLOW_UNSANDBOXED = True
    caplog.clear()
    report = sandbox_report({"developer.qa"})
    assert report["state"] == "unsandboxed"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_a_jobs_run_whose_start_lost_its_reply_clears_what_it_wrote(redis_url, monkeypatch):
    """The start's script ran but its reply was lost (a timeout): the job ran on, uncounted, and its end
    cleared nothing, so the lease kept the job's next delivery waiting and the mark counted as a death."""
    import uuid

    import redis

    from orchestration import leases
    from orchestration.leases import JobRun

    started, ended = leases._job_scripts(redis_url)

    def reply_lost(**kwargs):
        started(**kwargs)
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(leases, "_job_scripts", lambda _url: (reply_lost, ended))
    run = JobRun(f"test-{uuid.uuid4()}")
    with pytest.raises(redis.TimeoutError):
        run.start()
    run.end()  # as StepJob does after a start that raised a RedisError
    client = redis.Redis.from_url(redis_url)
    assert not client.exists(run.lease.key)
    assert client.hget(run.key, "running") is None
    monkeypatch.undo()
    again = JobRun(run.key.removeprefix(leases.JOB_PREFIX))
    assert again.start() == 0  # no wait, and no death counted
    again.end()
