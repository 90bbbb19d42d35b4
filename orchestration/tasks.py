"""Celery jobs. A job carries a task id, loads the state and calls one engine function."""

import os

from celery import Task, shared_task

from orchestration import orchestration_engine


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
