"""Reads of tasks: one packet from its state file, lists from the database mirror."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from django.db.models import QuerySet

from balancer.configuration import RoleConfig, llm_as_dict
from balancer.health import checker
from orchestration import mcp_handler
from orchestration.exceptions import ApplicationError
from orchestration.models import Task
from orchestration.packets import FINISHED, STATUSES, parse_task_id
from orchestration.runtime import configuration, configuration_error, load_balancer, task_store
from orchestration.state_store import CorruptState, TaskNotFound

# History events that put a job on a queue; their detail carries its job_id.
_JOB_EVENTS = ("submitted", "enqueued", "retried")


def role_get(*, profile: str, role: str) -> RoleConfig:
    """The role's configuration, or a 404 listing the valid profiles (and roles)."""
    config = configuration()
    try:
        return config.role(profile, role)
    except LookupError as exc:
        extra: dict[str, Any] = {"valid_profiles": list(config.profiles)}
        if profile in config.profiles:
            extra["valid_roles"] = list(config.profiles[profile].roles)
        raise ApplicationError(str(exc), status_code=404, code="not_found", **extra) from None


def canonical_task_id(task_id: str) -> str:
    """The task id in canonical form, or a 400 application error: it names a file, so only a UUID will do."""
    try:
        return parse_task_id(task_id)
    except ValueError as exc:
        raise ApplicationError(str(exc), field="task_id") from None


def task_get(*, task_id: str) -> dict[str, Any]:
    """The packet, read from its state file (the truth), or a 400/404 application error."""
    canonical = canonical_task_id(task_id)
    try:
        return task_store().read(canonical)
    except TaskNotFound:
        raise ApplicationError(f"no task {canonical}", status_code=404, code="not_found") from None
    except CorruptState as exc:
        raise corrupt_state_error(exc) from None


# How to mend a task whose state file cannot be read: the API's error and the admin's warning say it.
RESTORE_ADVICE = (
    "restore the file from a backup, or write it from the database mirror's copy with manage.py sync_tasks "
    "--restore-unreadable"
)


def corrupt_state_error(exc: CorruptState) -> ApplicationError:
    return ApplicationError(
        f"{exc}; {RESTORE_ADVICE}",
        status_code=500,
        code="corrupt_state",
    )


def task_job_id(packet: dict[str, Any]) -> str | None:
    """The Celery job id of the task's latest queueing."""
    for event in reversed(packet["history"]):
        if event["event"] in _JOB_EVENTS:
            return event["detail"].get("job_id")
    return None


def task_pending_jobs(packet: dict[str, Any]) -> list[str]:
    """The jobs that may still wait on a queue for the task: its first job while it is queued, and the
    jobs scheduled after its latest step."""
    jobs = []
    if packet["history"] and packet["history"][-1]["event"] == "cancelled":
        was = packet["history"][-1]["detail"].get("was")
    else:
        was = packet["status"]
    if was == "queued" and (job := task_job_id(packet)):
        jobs.append(job)
    scheduled = next((e for e in reversed(packet["history"]) if e["event"] == "scheduled"), None)
    if scheduled is not None:
        jobs.extend(scheduled["detail"]["job_ids"])
    return jobs


def task_events(
    *, task_id: str, after: int = 0, max_seconds: float = 300.0, keepalive_s: float = 15.0
) -> Iterator[tuple[str, int, dict[str, Any]]] | None:
    """A task's history events after the ``after``-th, then each new one as it is recorded, as
    ``("event", n, event)`` (n counts from 1); ``("keepalive", 0, {})`` whenever nothing was sent for
    ``keepalive_s``; and ``("end", 0, packet)`` once the task has finished. It stops without an end
    after ``max_seconds``, so that no connection is held for ever: the client resumes from the last n.
    None when the task has finished and every event is seen: nothing more will come. The first read
    raises the 400/404 application errors of ``task_get``."""
    try:
        # Taken before the read: a change written after the read is published after it.
        cursor = mcp_handler.feedback_cursor()
    except Exception:  # Redis away: wait_for_task falls back to reading the file every second
        cursor = "$"
    packet = task_get(task_id=task_id)
    if after > len(packet["history"]):
        raise ApplicationError(
            f"Last-Event-ID: task {packet['task_id']} has {len(packet['history'])} events, not {after}",
            field="Last-Event-ID",
        )
    if packet["status"] in FINISHED and after == len(packet["history"]):
        return None
    return _task_events(packet, cursor, after, max_seconds, keepalive_s)


def _task_events(
    packet: dict[str, Any], cursor: str, after: int, max_seconds: float, keepalive_s: float
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    task_id = packet["task_id"]
    deadline = time.monotonic() + max_seconds
    sent_at = time.monotonic()
    while True:
        history = packet["history"]
        for index in range(after, len(history)):
            yield "event", index + 1, history[index]
            sent_at = time.monotonic()
        after = len(history)
        if packet["status"] in FINISHED:
            yield "end", 0, packet
            return
        now = time.monotonic()
        if now >= deadline:
            return
        if now - sent_at >= keepalive_s:
            yield "keepalive", 0, {}
            sent_at = now
        wait = max(min(keepalive_s - (now - sent_at), deadline - now), 0.05)
        cursor, _ = mcp_handler.wait_for_task(task_id, cursor, wait)
        packet = task_get(task_id=task_id)


def task_list(*, status: str | None = None, profile: str | None = None, role: str | None = None) -> QuerySet[Task]:
    """The tasks' summaries from the database mirror, newest first, filtered by exact matches. Each
    filter (and all three together) is served by an index in that order (see ``Task.Meta``); the packet
    is left in the database: a summary does not show it, and decoding it cost more than the query."""
    if status is not None and status not in STATUSES:
        raise ApplicationError(f"unknown status {status!r}; valid statuses: {', '.join(STATUSES)}", field="status")
    tasks = Task.objects.defer("packet")
    if status:
        tasks = tasks.filter(status=status)
    if profile:
        tasks = tasks.filter(profile=profile)
    if role:
        tasks = tasks.filter(role=role)
    return tasks


def config_get() -> dict[str, Any]:
    """The configuration in force in this process, and the file's current problem if it has one."""
    source_error = configuration_error()
    return {**configuration().as_dict(), "error": str(source_error) if source_error else None}


def llm_list() -> list[dict[str, Any]]:
    """Every configured LLM with its health and its balancer state (breaker, in-flight, latency). A failed
    check is shown, not counted against the LLM's breaker: this host (a web server, or the admin's) may lack
    the model file, the key or the local Ollama that the workers serving the LLM have; the workers count
    their own checks (``tasks.health_failure_counter``)."""
    config = configuration()
    health = checker.check(config)
    states = load_balancer().states(config)
    listed = []
    for llm in config.llms.values():
        state, checked_at = health[llm.id]
        listed.append(
            {
                **llm_as_dict(llm),
                "health": {
                    "ok": state.ok,
                    "detail": state.detail,
                    "latency_ms": round(state.latency_s * 1000, 1),
                    "checked_at": datetime.fromtimestamp(checked_at, UTC).isoformat().replace("+00:00", "Z"),
                },
                "state": states[llm.id],
            }
        )
    return listed
