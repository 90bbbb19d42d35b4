"""The orchestration engine: claims a queued task, runs its step through the role's agent, records the outcome.

This first version runs single-step tasks: the step's outcome finishes the task.
Delegation to child tasks and the QA → Debug → Coder feedback loop come with
issue 5; nothing here pretends to do them.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from agents.base import AgentOutcome, PayloadError
from agents.registry import agent_class
from llm_engines.errors import EngineError
from orchestration.leases import StepLease
from orchestration.packets import FAILED, QUEUED, RUNNING, SUCCEEDED, history_event
from orchestration.runtime import configuration, load_balancer, task_store

logger = logging.getLogger(__name__)


class StepBusy(Exception):
    """A live worker still holds the task's lease; the job should come back after ``countdown`` seconds."""

    def __init__(self, countdown: float) -> None:
        super().__init__(f"the task's lease is held for {countdown:.1f}s more")
        self.countdown = countdown


def task_step(*, task_id: str, job_id: str, worker: str) -> str:
    """Run the task's step if this job may; returns the task's status afterwards.

    A job runs the step when it takes the task's lease and then claims the
    task under its file lock: a queued task, or a running one claimed by this
    same job whose worker died (its lease expired). A job that finds the lease
    held by a live worker either waits (``StepBusy``: its own job came back
    early, or the task was queued again while an old step still runs) or has
    nothing to do.
    """
    lease = StepLease(task_id, job_id)
    if not lease.acquire():
        packet = task_store().read(task_id)
        own = packet["status"] == RUNNING and _claimed_by(packet) == job_id
        if packet["status"] == QUEUED or own:
            raise StepBusy(lease.remaining_s() + 0.5)
        return packet["status"]

    def claim(packet: dict[str, Any]) -> bool:
        if packet["status"] == QUEUED:
            event = "claimed"
        elif packet["status"] == RUNNING and _claimed_by(packet) == job_id:
            event = "reclaimed"  # the worker that ran it died: its lease expired
        else:
            return False
        packet["status"] = RUNNING
        packet["history"].append(history_event(event, status=RUNNING, detail={"worker": worker, "job_id": job_id}))
        return True

    with lease:
        packet, claimed = task_store().update(task_id, claim)
        if not claimed:
            logger.info("task %s: job %s not run, the task is %s", task_id, job_id, packet["status"])
            return packet["status"]
        return _run(task_id, job_id, packet)


def _run(task_id: str, job_id: str, packet: dict[str, Any]) -> str:
    agent_name = None
    time_limit = None
    try:
        config = configuration()
        role = config.role(packet["profile"], packet["role"])
        agent_name, time_limit = role.agent, role.time_limit_s
        agent = agent_class(role.agent)()
        balancer = load_balancer()
        outcome = agent.run(
            payload=agent.validate_payload(packet["payload"]),
            role=role,
            config=config,
            balancer=balancer,
            deadline=balancer.clock() + role.time_limit_s,
        )
        return _record(task_id, job_id, agent_name, outcome)
    except SoftTimeLimitExceeded:
        return _fail(task_id, job_id, agent_name, f"the step exceeded its time limit of {time_limit:g}s")
    except (LookupError, PayloadError, EngineError) as exc:
        # LookupError: the role or its agent left the configuration, or no LLM
        # can serve the role any more (the balancer's NoCandidate).
        return _fail(task_id, job_id, agent_name, str(exc), balancer=getattr(exc, "balancer", None))
    except Exception as exc:
        _fail(task_id, job_id, agent_name, f"internal error: {type(exc).__name__}: {exc}")
        raise


def _record(task_id: str, job_id: str, agent_name: str, outcome: AgentOutcome) -> str:
    def finish(packet: dict[str, Any]) -> bool:
        if packet["status"] != RUNNING or _claimed_by(packet) != job_id:
            # Cancelled (or taken over) while the model was answering: the answer is not used.
            packet["history"].append(
                history_event(
                    "step_discarded",
                    status=packet["status"],
                    agent=agent_name,
                    llm=outcome.llm,
                    detail={"reason": f"the task was {packet['status']} during the step", **outcome.step_detail()},
                )
            )
            return True
        packet["status"] = SUCCEEDED
        packet["result"] = outcome.result
        packet["history"].append(
            history_event("step", status=SUCCEEDED, agent=agent_name, llm=outcome.llm, detail=outcome.step_detail())
        )
        packet["history"].append(history_event("finished", status=SUCCEEDED))
        return True

    packet, _ = task_store().update(task_id, finish)
    return packet["status"]


def _fail(task_id: str, job_id: str, agent_name: str | None, reason: str, *, balancer: dict | None = None) -> str:
    """Fail the task if this job's run is still the one in force; ``balancer`` is the last LLM
    decision (its failovers and exclusions), when the step got that far."""

    def fail(packet: dict[str, Any]) -> bool:
        if packet["status"] != RUNNING or _claimed_by(packet) != job_id:
            return False
        packet["status"] = FAILED
        detail: dict[str, Any] = {"reason": reason}
        if balancer:
            detail["balancer"] = balancer
        packet["history"].append(history_event("failed", status=FAILED, agent=agent_name, detail=detail))
        return True

    packet, failed = task_store().update(task_id, fail)
    if failed:
        logger.warning("task %s failed: %s", task_id, reason)
    return packet["status"]


def task_abandoned(*, task_id: str, job_id: str, reason: str) -> str:
    """The job ended without recording its step (Celery's hard time limit killed it): fail the task."""
    return _fail(task_id, job_id, None, reason)


def _claimed_by(packet: dict[str, Any]) -> str | None:
    """The job id of the task's latest claim."""
    for event in reversed(packet["history"]):
        if event["event"] in ("claimed", "reclaimed"):
            return event["detail"].get("job_id")
    return None
