"""Celery jobs. A job carries a task id, loads the state and calls one engine function."""

import os

from celery import shared_task

from orchestration import orchestration_engine


@shared_task(name="orchestration.run_task", bind=True, acks_late=True, reject_on_worker_lost=True)
def run_task(self, task_id: str) -> str:
    """Run the task's step; safe to deliver twice (the claim is guarded)."""
    return orchestration_engine.task_step(
        task_id=task_id, job_id=self.request.id, worker=f"{self.request.hostname}:{os.getpid()}"
    )
