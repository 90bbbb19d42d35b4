"""Celery jobs. A job carries a task id (and a step), loads the state and calls one engine function."""

import logging
import os
import threading
import time

import redis
from celery import Task, shared_task
from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections

from orchestration import orchestration_engine

logger = logging.getLogger(__name__)


@task_prerun.connect
@task_postrun.connect
def close_stale_connections(sender=None, **_kwargs) -> None:
    """Around each job, what Django does around each request: a database connection that broke, or
    that is older than DB_CONN_MAX_AGE, is closed; the others are kept for the next job (Celery's own
    fix-up would close them all, settings.CELERY_DB_REUSE_MAX). Not around a job run eagerly, in the
    caller's process: that may be inside the caller's transaction, whose connection must stay."""
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    close_old_connections()


@worker_ready.connect
def start_health_checks(sender, **_kwargs) -> None:
    """Each worker checks the LLMs' health now and then; a failed check of an LLM that may serve one of
    the roles whose queues the worker consumes counts against the LLM's breaker (balancer rule 3), so
    that an engine that went away cools down before calls find out. Only those: a worker of other roles,
    on a host without that LLM's model file, key or server, would trip it for every host."""
    from balancer.health import checker
    from orchestration.runtime import configuration

    def loop() -> None:
        while True:
            try:
                # Its queues as they are now: a role's queue may be added since (control add_consumer).
                counted = health_failure_counter({queue.name for queue in sender.task_consumer.queues})
                checker.check(configuration(), on_failure=counted)
            except Exception:  # a check must never stop the loop; the next one may succeed
                logger.exception("LLM health check failed")
            time.sleep(settings.LLM_HEALTH_CHECK_SECONDS)

    threading.Thread(target=loop, name="llm-health", daemon=True).start()


def health_failure_counter(queues: set[str]):
    """What a worker consuming ``queues`` does with an LLM that failed its health check: count it against
    the LLM's breaker if the LLM may serve one of the roles of those queues."""
    from balancer.load_balancer import candidates
    from orchestration.runtime import configuration, load_balancer

    def counted(llm) -> None:
        config = configuration()
        roles = [role for profile in config.profiles.values() for role in profile.roles.values()]
        if any(role.queue in queues and llm.id in {c.id for c in candidates(config, role)[0]} for role in roles):
            load_balancer().health_failed(llm, interval_s=settings.LLM_HEALTH_CHECK_SECONDS)

    return counted


def sandbox_report(queues: set[str]) -> dict | None:
    """Whether generated code can run on this host (``agents.sandbox.availability``), when the worker
    consumes the queue of a role whose agent runs it (QA's test runs), and logged once: an error when
    it cannot, so that an operator learns it at the worker's start rather than from failed tasks. None
    when the worker consumes no such queue."""
    from agents import sandbox
    from agents.registry import agent_class
    from orchestration.runtime import configuration

    config = configuration()
    served = sorted(
        role.queue
        for profile in config.profiles.values()
        for role in profile.roles.values()
        if role.queue in queues and agent_class(role.agent).runs_code
    )
    if not served:
        return None
    report = sandbox.availability()
    level, says = {
        sandbox.UNAVAILABLE: (logging.ERROR, "will fail on this worker"),
        sandbox.UNSANDBOXED: (logging.WARNING, "are not sandboxed on this worker"),
        sandbox.SANDBOXED: (logging.INFO, "are sandboxed"),
    }[report["state"]]
    logger.log(level, "the test runs of %s %s: %s", ", ".join(served), says, report["detail"])
    return report


HEARTBEAT_SECONDS = 10


@worker_ready.connect
def start_heartbeat(sender, **_kwargs) -> None:
    """Each worker says every few seconds in Redis that it is alive and which queues it consumes
    (GET /api/v1/metrics lists them); the entry expires when the heartbeats stop."""
    from orchestration import mcp_handler, metrics

    name = sender.hostname
    queues = [queue.name for queue in sender.task_consumer.queues]
    concurrency = getattr(sender.pool, "num_processes", None) if sender.pool else None

    def beat(sandbox: dict | None) -> None:
        try:
            metrics.worker_seen(
                mcp_handler.client(), name=name, queues=queues, concurrency=concurrency, sandbox=sandbox,
                ttl_s=3 * HEARTBEAT_SECONDS,
            )  # fmt: skip
        except Exception:  # Redis away: the next beat tries again
            logger.warning("worker heartbeat not written", exc_info=True)

    def loop() -> None:
        beat(None)  # listed at once; the sandbox's probe takes a moment
        try:
            sandbox = sandbox_report(set(queues))
        except Exception:  # the report is for the operator; the heartbeats go on without it
            logger.exception("the sandbox's availability could not be checked")
            sandbox = None
        while True:
            beat(sandbox)
            time.sleep(HEARTBEAT_SECONDS)

    threading.Thread(target=loop, name="heartbeat", daemon=True).start()


@worker_ready.connect
def start_recovery_sweeps(**_kwargs) -> None:
    """The recovery sweeper (orchestration/recovery.py) runs at start and then periodically, in one
    worker at a time; a sweep that fails (Redis or the database away) is tried again next time."""
    from django.db import close_old_connections

    from orchestration import recovery

    def loop() -> None:
        time.sleep(2)  # let the worker take its queues first
        while True:
            try:
                report = recovery.sweep_once_among_workers()
                if report is not None and (report.mirrored or report.recovered or report.failed):
                    logger.warning("recovery sweep: %s", report)
                elif report is not None and report.removed:  # retention at work, not something gone wrong
                    logger.info("recovery sweep: %s", report)
            except Exception:
                logger.warning("recovery sweep failed; trying again in %ss", settings.RECOVERY_SWEEP_SECONDS,
                               exc_info=True)  # fmt: skip
            finally:
                close_old_connections()
            time.sleep(settings.RECOVERY_SWEEP_SECONDS)

    threading.Thread(target=loop, name="recovery", daemon=True).start()


@worker_shutdown.connect
def stop_heartbeat(sender=None, **_kwargs) -> None:
    from orchestration import mcp_handler, metrics

    if sender is not None:
        try:
            metrics.worker_gone(mcp_handler.client(), name=sender.hostname)
        except Exception:
            logger.warning("worker entry not removed; it expires by itself", exc_info=True)


class StepJob(Task):
    """A job of a task's step, run so that the task cannot stay "running" for ever.

    Celery's hard time limit kills a step without letting it record anything: ``on_failure``, called
    in the worker's main process, fails the task. A job whose process dies (killed, out of memory, a
    crash in an engine) is delivered again (``reject_on_worker_lost``), and Celery calls no hook: each
    run marks the job running in Redis and ends the mark when it ends, so that a run finding the mark
    left knows the one before died; after ``RECOVERY_RETRIES`` such deaths the task fails, rather
    than the job going round for ever."""

    def _task_id(self, args) -> str:
        return args[1] if self.name == "orchestration.run_verdict" else args[0]

    def _step(self, args) -> str:
        """The step the job runs, as a failure's reason names it."""
        if self.name == "orchestration.run_task":
            return orchestration_engine.MAIN
        return args[2] if self.name == "orchestration.run_verdict" else args[1]

    def __call__(self, *args, **kwargs):
        from orchestration.leases import JobRun, JobRunAlive

        job_id = self.request.id
        if self.request.is_eager or job_id is None:
            return self.run(*args, **kwargs)
        run = JobRun(job_id)
        try:
            deaths = run.start()
        except JobRunAlive as alive:  # delivered again while a run of it lives: after that run
            raise self.retry(countdown=alive.remaining_s + 0.5) from None
        except redis.RedisError as exc:  # the step itself will meet the outage and end the job
            logger.warning("job %s: its runs cannot be counted: %s", job_id, exc)
            deaths = 0
        try:
            if deaths > settings.RECOVERY_RETRIES:
                reason = (
                    f"step {self._step(args)}: the worker process running its job died {deaths} times (killed, "
                    "out of memory, or a crash in the engine)"
                )
                orchestration_engine.task_abandoned(task_id=self._task_id(args), job_id=job_id, reason=reason)
                return {"skipped": reason}
            return self.run(*args, **kwargs)
        finally:
            try:
                run.end()
            except redis.RedisError:
                logger.warning("job %s: its run's end was not marked", job_id, exc_info=True)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        if isinstance(exc, orchestration_engine.StepRetry):
            return
        task = self._task_id(args)
        if isinstance(exc, orchestration_engine.OUTAGES):
            # Redis or the broker did not answer (the step's lease, a check's verdict queued), or the state
            # directory could not be written: the task is not failed for it; the recovery sweep moves it on
            # once they answer again.
            logger.warning("task %s: job %s stopped by an outage: %s", task, task_id, exc)
            return
        orchestration_engine.task_abandoned(
            task_id=task, job_id=task_id, reason=f"step {self._step(args)} was stopped: {type(exc).__name__}: {exc}"
        )


# No result is stored: the task's state file is where a step's outcome goes, and nothing waits on a
# job's result (QA's checks are joined by the task's state, not by a chord), so the result backend's
# write per job is saved.
_JOB = {
    "bind": True, "base": StepJob, "acks_late": True, "reject_on_worker_lost": True, "max_retries": None,
    "ignore_result": True,
}  # fmt: skip


@shared_task(name="orchestration.run_task", **_JOB)
def run_task(self, task_id: str) -> str:
    """Claim the task and run its first step; safe to deliver twice (the lease and the claim are guarded)."""
    try:
        return orchestration_engine.task_step(
            task_id=task_id,
            job_id=self.request.id,
            worker=f"{self.request.hostname}:{os.getpid()}",
        )
    except orchestration_engine.StepBusy as busy:
        raise self.retry(countdown=busy.countdown) from None
    except orchestration_engine.StepRetry as retry:
        raise self.retry(countdown=retry.countdown) from None


@shared_task(name="orchestration.run_step", **_JOB)
def run_step(self, task_id: str, step: str):
    """One later step of a running task: a coder or debug round, or one of QA's checks (queued as a group)."""
    return _later(self, task_id, step)


@shared_task(name="orchestration.run_verdict", **_JOB)
def run_verdict(self, _results: list, task_id: str, step: str):
    """A round's verdict as a chord's callback, as servers before this one queued it (the verdict is now
    run by the last check's job, or queued as an ``orchestration.run_step``); kept so that such jobs still run."""
    return _later(self, task_id, step)


def _later(job: Task, task_id: str, step: str):
    try:
        return orchestration_engine.later_step(task_id=task_id, step=step, job_id=job.request.id)
    except orchestration_engine.StepBusy as busy:
        raise job.retry(countdown=busy.countdown) from None
    except orchestration_engine.StepRetry as retry:
        raise job.retry(countdown=retry.countdown) from None
