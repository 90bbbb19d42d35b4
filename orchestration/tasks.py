"""Celery jobs. A job carries a task id, loads the state and calls one engine function."""

import logging
import os
import threading
import time
from functools import partial

from celery import Task, shared_task
from celery.signals import worker_ready
from django.conf import settings

from orchestration import orchestration_engine

logger = logging.getLogger(__name__)


@worker_ready.connect
def start_health_checks(**_kwargs) -> None:
    """Each worker checks every LLM's health now and then; a failed check counts against the LLM's
    breaker (balancer rule 3), so that an engine that went away cools down before calls find out."""
    from balancer.health import checker
    from orchestration.runtime import configuration, load_balancer

    def loop() -> None:
        while True:
            try:
                checker.check(
                    configuration(),
                    on_failure=partial(load_balancer().health_failed, interval_s=settings.LLM_HEALTH_CHECK_SECONDS),
                )
            except Exception:  # a check must never stop the loop; the next one may succeed
                logger.exception("LLM health check failed")
            time.sleep(settings.LLM_HEALTH_CHECK_SECONDS)

    threading.Thread(target=loop, name="llm-health", daemon=True).start()


class RunTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo):
        # Called in the worker's main process when the hard time limit kills
        # the step, so that the task does not stay "running" for ever.
        orchestration_engine.task_abandoned(
            task_id=args[0], job_id=task_id, reason=f"the step was stopped: {type(exc).__name__}: {exc}"
        )


@shared_task(
    name="orchestration.run_task", bind=True, base=RunTask, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def run_task(self, task_id: str) -> str:
    """Run the task's step; safe to deliver twice (the lease and the claim are guarded)."""
    try:
        return orchestration_engine.task_step(
            task_id=task_id, job_id=self.request.id, worker=f"{self.request.hostname}:{os.getpid()}"
        )
    except orchestration_engine.StepBusy as busy:
        raise self.retry(countdown=busy.countdown) from None
