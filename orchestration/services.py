"""Writes to tasks: submit, cancel, retry. The API, the admin and the commands all come through here."""

from __future__ import annotations

import contextlib
import errno
import logging
import uuid
from collections.abc import Callable
from typing import Any

from celery import current_app
from django.db import transaction
from kombu.exceptions import OperationalError as BrokerError

from agents.base import CHECKS, LOOP, Agent, PayloadError
from agents.registry import agent_class
from balancer import load_balancer
from balancer.configuration import RoleConfig
from orchestration import orchestration_engine
from orchestration.exceptions import ApplicationError
from orchestration.packets import (
    AWAITING_FEEDBACK,
    CANCELLED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    history_event,
    new_packet,
    parse_task_id,
)
from orchestration.runtime import configuration, task_store
from orchestration.selectors import (
    canonical_task_id,
    corrupt_state_error,
    role_get,
    task_get,
    task_pending_jobs,
)
from orchestration.state_store import CorruptState, TaskExists, TaskNotFound

logger = logging.getLogger(__name__)


def _storage_error(exc: OSError) -> ApplicationError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApplicationError("the task state directory is full", status_code=507, code="insufficient_storage")
    return ApplicationError(
        f"the task state directory cannot be written: {exc.strerror}", status_code=503, code="storage_unavailable"
    )


def _update(task_id: str, change: Callable[[dict[str, Any]], bool]) -> tuple[dict[str, Any], bool]:
    """``TaskStore.update`` with its failures turned into application errors."""
    canonical = canonical_task_id(task_id)
    try:
        return task_store().update(canonical, change)
    except TaskNotFound:
        raise ApplicationError(f"no task {canonical}", status_code=404, code="not_found") from None
    except CorruptState as exc:
        raise corrupt_state_error(exc) from None
    except OSError as exc:
        raise _storage_error(exc) from exc


def _publish(*, task_id: str, job_id: str, role: RoleConfig) -> None:
    """Put the task's first job on the role's queue."""
    from orchestration.tasks import run_task

    orchestration_engine.queue_job(run_task, [task_id], role, job_id)


def _enqueue(*, packet: dict[str, Any], job_id: str, role: RoleConfig) -> None:
    try:
        _publish(task_id=packet["task_id"], job_id=job_id, role=role)
    except (BrokerError, OSError) as exc:
        _enqueue_failed(packet=packet, job_id=job_id, exc=exc)


def _enqueue_failed(*, packet: dict[str, Any], job_id: str, exc: Exception) -> None:
    """Note in the task that its job could not be queued, and tell the client (a 503) to submit it again."""
    logger.error("task %s: could not be queued: %s", packet["task_id"], exc)
    error = str(exc)

    def failed(current: dict[str, Any]) -> bool:
        current["history"].append(
            history_event("enqueue_failed", status=current["status"], detail={"job_id": job_id, "error": error})
        )
        return True

    _update(packet["task_id"], failed)
    raise ApplicationError(
        "the task is stored as queued but the queue (Redis) is unavailable; submit it again with the same "
        "task_id to queue it",
        status_code=503,
        code="queue_unavailable",
        task_id=packet["task_id"],
    ) from exc


def _after_commit(enqueue: Callable[[], None]) -> None:
    """``enqueue`` once the request's transaction commits, or at once outside one. The task's file (the truth)
    is written by then: a database that stopped answering (the mirror's row was not written, and the sweep
    writes it) keeps neither its job from the queue nor the client from being told it was accepted (a client
    told 503 would submit it again, and the sweep would run both)."""
    if transaction.get_connection().in_atomic_block:  # known without asking the database
        transaction.on_commit(enqueue)
    else:
        enqueue()


def _first_prompt_tokens(agent: type[Agent], payload: dict[str, Any], role: RoleConfig) -> int:
    """The estimated tokens of a task's first prompt, as the balancer counts them; 0 for QA, whose checks
    each build a prompt of their own."""
    if agent.flow == CHECKS:
        return 0
    return load_balancer.estimate_tokens(agent().build_messages(payload, role))


def task_submit(*, profile: str, role: str, payload: Any, task_id: str | None = None) -> tuple[dict[str, Any], bool]:
    """Validate and store a new task as queued and enqueue it after the commit.

    Returns the packet and whether it was created: the same ``task_id`` with the
    same request gives back the stored task (an idempotent retry); with another
    one it is a conflict.
    """
    role_config = role_get(profile=profile, role=role)
    agent = agent_class(role_config.agent)
    config = configuration()
    try:
        payload = agent.validate_payload(payload)
    except PayloadError as exc:
        raise ApplicationError(str(exc), field=exc.field) from None
    if task_id is not None:
        # A retry of a stored task gets it back whatever the LLMs can do now (one was turned off since,
        # say): refused below, its client would think the task never taken, and submit it again.
        task_id = parse_task_id(task_id)
        existing = _stored(task_id)
        if existing is not None:
            return _resubmit(existing, profile=profile, role=role, payload=payload, role_config=role_config), False
    try:
        agent().check_reply_room(payload, role_config, config)
    except PayloadError as exc:
        raise ApplicationError(str(exc), field=exc.field) from None
    try:
        # Rule 1 with the task's first prompt: one that no LLM's context holds is refused now, not queued to fail.
        load_balancer.check_servable(
            config, role_config, prompt_tokens=_first_prompt_tokens(agent, payload, role_config)
        )
    except load_balancer.NoCandidate as exc:
        raise ApplicationError(str(exc), status_code=422, code="no_llm") from None

    task_id = task_id if task_id is not None else str(uuid.uuid4())
    job_id = str(uuid.uuid4())
    packet = new_packet(task_id=task_id, profile=profile, role=role, payload=payload)
    packet["history"].append(
        history_event("submitted", status=QUEUED, detail={"queue": role_config.queue, "job_id": job_id})
    )
    # Outside a transaction (the API's requests) the job is queued as soon as the task's file is durable, while
    # the store writes its row and its message (``TaskStore.create``'s ``then``): the worker's first steps, up
    # to its claim, which waits for the task's lock, overlap them. In a transaction, once it commits.
    in_transaction = transaction.get_connection().in_atomic_block  # known without asking the database
    not_queued: list[Exception] = []

    def publish(stored: dict[str, Any]) -> None:
        try:
            _publish(task_id=stored["task_id"], job_id=job_id, role=role_config)
        except (BrokerError, OSError) as exc:
            not_queued.append(exc)  # told once the task's lock is released (``_enqueue_failed`` takes it)

    try:
        stored = task_store().create(packet, then=None if in_transaction else publish)
    except TaskExists as exists:
        return _resubmit(exists.packet, profile=profile, role=role, payload=payload, role_config=role_config), False
    except CorruptState as exc:  # the task_id's file exists and is not a task packet
        raise corrupt_state_error(exc) from None
    except UnicodeEncodeError:
        # JSON admits unpaired surrogates; UTF-8 does not. The packet's encoding, before any file
        # is written, is where that shows.
        raise ApplicationError(
            "payload: contains text that is not valid Unicode (an unpaired surrogate)", field="payload"
        ) from None
    except OSError as exc:
        raise _storage_error(exc) from exc
    if in_transaction:
        transaction.on_commit(lambda: _enqueue(packet=stored, job_id=job_id, role=role_config))
    elif not_queued:
        _enqueue_failed(packet=stored, job_id=job_id, exc=not_queued[0])
    return stored, True


def _stored(task_id: str) -> dict[str, Any] | None:
    """The stored task ``task_id``, or None."""
    try:
        return task_store().read(task_id)
    except TaskNotFound:
        return None
    except CorruptState as exc:
        raise corrupt_state_error(exc) from None
    except OSError as exc:
        raise _storage_error(exc) from exc


def _resubmit(
    existing: dict[str, Any], *, profile: str, role: str, payload: dict[str, Any], role_config: RoleConfig
) -> dict[str, Any]:
    if (existing["profile"], existing["role"], existing["payload"]) != (profile, role, payload):
        raise ApplicationError(
            f"task {existing['task_id']} exists with a different profile, role or payload",
            status_code=409,
            code="conflict",
            task_id=existing["task_id"],
        )
    job_id = str(uuid.uuid4())

    def enqueued(current: dict[str, Any]) -> bool:
        # Only a task whose first enqueue failed is queued again, and only once
        # however many retries arrive together (the check is under the lock).
        if current["status"] != QUEUED or current["history"][-1]["event"] != "enqueue_failed":
            return False
        current["history"].append(history_event("enqueued", status=QUEUED, detail={"job_id": job_id}))
        return True

    existing, written = _update(existing["task_id"], enqueued)
    if written:
        _enqueue(packet=existing, job_id=job_id, role=role_config)
    return existing


def _check_version(packet: dict[str, Any], versions: frozenset[str] | None) -> None:
    """Under the task's lock: a 412 when the client acts on a version (``If-Match``'s tags, compared as text)
    the task is no longer at."""
    if versions is not None and str(packet["version"]) not in versions:
        raise ApplicationError(
            f"task {packet['task_id']} is at version {packet['version']}, not the one If-Match names: read it again",
            status_code=412,
            code="precondition_failed",
        )


def task_cancel(*, task_id: str, reason: str | None = None, versions: frozenset[str] | None = None) -> dict[str, Any]:
    """Cancel a task that has not finished, and its unfinished children. Its queued jobs are revoked;
    a running step finishes, and its outcome is discarded. ``versions``: only if the task is at one of them."""
    previous: list[str] = []

    def cancel(packet: dict[str, Any]) -> bool:
        _check_version(packet, versions)
        if packet["status"] in FINISHED:
            raise ApplicationError(
                f"task {packet['task_id']} has already finished as {packet['status']}",
                status_code=409,
                code="finished",
            )
        previous.append(packet["status"])
        packet["status"] = CANCELLED
        detail = {"was": previous[0], **({"reason": reason} if reason else {})}
        packet["history"].append(history_event("cancelled", status=CANCELLED, detail=detail))
        return True

    packet, _ = _update(task_id, cancel)
    jobs = task_pending_jobs(packet)
    if jobs:
        try:
            current_app.control.revoke(jobs)
        except (BrokerError, OSError) as exc:
            # The guards still keep the jobs from running: they find the task cancelled.
            logger.warning("task %s: could not revoke jobs %s: %s", task_id, jobs, exc)
    for child_id in packet["children"]:
        with contextlib.suppress(ApplicationError):  # it finished already
            task_cancel(task_id=child_id, reason="the parent task was cancelled")
    if packet["parent_id"]:
        orchestration_engine.plan_advance(parent_id=packet["parent_id"])
    return packet


def task_feedback(
    *,
    task_id: str,
    feedback: str,
    route: str = "debug",
    tests: str | None = None,
    message_id: str | None = None,
    versions: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Feedback from a person or an outside agent on a coder task that awaits it or has finished: the
    loop goes on from it, through Debug (``route="debug"``) or straight to the coder, with fresh rounds.

    ``message_id`` names the feedback channel's message it came in: a message handled twice (its
    consumer died before acknowledging it) is taken once, and the second time gives the task back."""
    stored = task_get(task_id=task_id)
    role_config = role_get(profile=stored["profile"], role=stored["role"])
    if agent_class(role_config.agent).flow != LOOP:
        raise ApplicationError(
            f"task {stored['task_id']} is a {stored['profile']}/{stored['role']} task; feedback goes to tasks of "
            "coder roles, which run the feedback loop",
            status_code=409,
            code="no_feedback_loop",
        )
    step: list[str] = []
    previous: list[Any] = []  # the task's status and iteration before the feedback

    def add(packet: dict[str, Any]) -> bool:
        if message_id and _feedback_taken(packet["history"], message_id):
            return False
        _check_version(packet, versions)
        if packet["status"] not in (AWAITING_FEEDBACK, SUCCEEDED, FAILED):
            raise ApplicationError(
                f"task {packet['task_id']} is {packet['status']}; feedback is taken when a task awaits it or has "
                "succeeded or failed",
                status_code=409,
                code="not_awaiting_feedback",
            )
        if packet["status"] != AWAITING_FEEDBACK and _in_running_plan(packet):
            # Its result went into the steps after it: run again, it could fail the plan they belong to.
            raise ApplicationError(
                f"task {packet['task_id']} is a step of the plan of task {packet['parent_id']}, which is still "
                "running; feedback is taken once the plan has finished",
                status_code=409,
                code="plan_running",
            )
        iteration = packet["iteration"] + 1
        step.append(f"{iteration}.feedback")
        previous.extend((packet["status"], packet["iteration"]))
        packet["status"] = RUNNING
        packet["iteration"] = iteration
        detail = {"step": step[0], "iteration": iteration, "route": route, "feedback": feedback}
        if tests is not None:
            detail["tests"] = tests
        if message_id:
            detail["message_id"] = message_id
        packet["history"].append(history_event("feedback", status=RUNNING, detail=detail))
        return True

    packet, written = _update(task_id, add)
    if not written:
        return packet
    try:
        orchestration_engine.loop_continue(packet=packet, step=step[0])
    except (BrokerError, OSError) as exc:
        error = str(exc)

        def undo(current: dict[str, Any]) -> bool:
            # The round was not queued: the task goes back to where it was, so that the same
            # feedback can be posted again once Redis is back. Not if it moved on meanwhile (cancelled
            # while the broker kept this request waiting, or a job of the round ran): that stands.
            history = current["history"]
            # Since this feedback, at most the note of the round's jobs (written before their send failed).
            since = next((i for i in range(len(history) - 1, -1, -1) if history[i]["event"] != "scheduled"), None)
            if (
                current["status"] != RUNNING
                or since is None
                or history[since]["event"] != "feedback"
                or history[since]["detail"].get("step") != step[0]
            ):
                return False
            current["status"], current["iteration"] = previous
            detail = {"error": error, **({"message_id": message_id} if message_id else {})}
            current["history"].append(history_event("enqueue_failed", status=previous[0], detail=detail))
            return True

        _update(task_id, undo)
        raise ApplicationError(
            "the queue (Redis) is unavailable, so the feedback's round could not be queued; the task is as it "
            "was: post the feedback again once Redis is back",
            status_code=503,
            code="queue_unavailable",
            task_id=packet["task_id"],
        ) from exc
    return task_get(task_id=task_id)


def _in_running_plan(packet: dict[str, Any]) -> bool:
    """Whether the task is a step of its parent's current plan, and the parent still runs (a child of a run
    before the parent was retried is not)."""
    if not packet["parent_id"]:
        return False
    try:
        parent = task_store().read(packet["parent_id"])
    except TaskNotFound:
        return False
    return parent["status"] == RUNNING and packet["task_id"] in orchestration_engine.plan_children(parent)


def _feedback_taken(history: list[dict[str, Any]], message_id: str) -> bool:
    """Whether the channel message's feedback is in the history and was not undone (its round could not
    be queued: an ``enqueue_failed`` naming the message came after it)."""
    taken = False
    for event in history:
        if (event.get("detail") or {}).get("message_id") == message_id:
            taken = event["event"] == "feedback"
    return taken


def task_retry(*, task_id: str) -> dict[str, Any]:
    """Queue a failed or cancelled task again from its payload."""
    stored = task_get(task_id=task_id)
    # profile and role never change, so they can be read before the lock.
    role_config = role_get(profile=stored["profile"], role=stored["role"])
    job_id = str(uuid.uuid4())

    def retry(current: dict[str, Any]) -> bool:
        if current["status"] not in (FAILED, CANCELLED):
            raise ApplicationError(
                f"only failed or cancelled tasks can be retried; task {current['task_id']} is {current['status']}",
                status_code=409,
                code="not_retryable",
            )
        current["status"] = QUEUED
        current["result"] = None
        current["iteration"] = 0  # a retried task starts its rounds afresh
        current["history"].append(
            history_event("retried", status=QUEUED, detail={"queue": role_config.queue, "job_id": job_id})
        )
        return True

    packet, _ = _update(task_id, retry)
    _after_commit(lambda: _enqueue(packet=packet, job_id=job_id, role=role_config))
    return packet
