"""The task packet: one JSON document per task, the same in the API, the state file and the channels."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

QUEUED = "queued"
RUNNING = "running"
AWAITING_FEEDBACK = "awaiting_feedback"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (QUEUED, RUNNING, AWAITING_FEEDBACK, SUCCEEDED, FAILED, CANCELLED)
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})

# Fields the server owns, with the value a new packet has. A client may send
# them only with exactly this value.
SERVER_OWNED_INITIAL: dict[str, Any] = {
    "status": QUEUED,
    "result": None,
    "history": [],
    "version": 0,
    "iteration": 0,
    "parent_id": None,
    "children": [],
}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_task_id(value: Any) -> str:
    """The canonical string form of a task id, or ``ValueError``: a task id names a file, so only a UUID will do."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str) or len(value) > 36:
        raise ValueError("task_id must be a UUID")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ValueError("task_id must be a UUID") from None
    if str(parsed) != value.lower():
        # Only the canonical 8-4-4-4-12 form: braces, URNs and bare hex would
        # give one task several names.
        raise ValueError("task_id must be a UUID in the form 8-4-4-4-12")
    return str(parsed)


def history_event(
    event: str,
    *,
    status: str,
    agent: str | None = None,
    llm: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"at": now_iso(), "event": event, "agent": agent, "status": status, "llm": llm, "detail": detail or {}}


def new_packet(*, task_id: str, profile: str, role: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A packet as it is before its first write (version 0, empty history)."""
    created = now_iso()
    return {
        "task_id": task_id,
        "profile": profile,
        "role": role,
        **{key: (value.copy() if isinstance(value, list) else value) for key, value in SERVER_OWNED_INITIAL.items()},
        "payload": payload,
        "created_at": created,
        "updated_at": created,
    }
