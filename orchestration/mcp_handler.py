"""The MCP channels: three Redis Streams that carry tasks in, every task's changes out, and the
samples of every engine call.

- ``ai-agent-server.tasks.inbound``: producers that are not HTTP clients add task packets here;
  ``manage.py mcp_consume`` submits them through the REST API's validation and service.
- ``ai-agent-server.tasks.feedback``: the server publishes every state change of every task here
  (one message per history event), and answers each inbound or feedback message (accepted or
  rejected); outside agents may publish feedback for a task here too.
- ``ai-agent-server.metrics``: one sample per engine call; the metrics aggregator consumes them.

Every entry has two fields: ``type`` and ``data`` (a JSON object); doc/api_endpoints.md describes
each type. Streams are trimmed to about ``MCP_STREAM_MAXLEN`` entries. The server reads them in
the consumer group ``ai-agent-server``: a message is acknowledged only once it is handled (its
answer or its aggregation is written in the same Redis transaction as the acknowledgement), a
message whose consumer died is claimed by another after ``MCP_CLAIM_IDLE_SECONDS``, and one that
cannot be handled after ``MCP_MAX_DELIVERIES`` deliveries is answered as rejected and dropped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

from balancer.load_balancer import CallSample
from balancer.safe_json import check_json

logger = logging.getLogger(__name__)

INBOUND = "ai-agent-server.tasks.inbound"
FEEDBACK = "ai-agent-server.tasks.feedback"
METRICS = "ai-agent-server.metrics"
CHANNELS = (INBOUND, FEEDBACK, METRICS)
GROUP = "ai-agent-server"

# Message types, by channel.
TASK = "task"  # inbound: a task packet to submit
STATE = "state"  # feedback: a task's state changed (one history event)
FEEDBACK_MESSAGE = "feedback"  # feedback: an outside agent's feedback on a task
ACCEPTED = "accepted"  # feedback: the answer to a handled inbound or feedback message
REJECTED = "rejected"  # feedback: the answer to a message that was refused, with the reason
LLM_CALL = "llm_call"  # metrics: one engine call

# Task ids of inbound packets that bring none are derived from the message id, so that a message
# handled twice (its consumer died before acknowledging it) submits the same task twice, which
# the service answers with the existing task.
INBOUND_TASK_NAMESPACE = uuid.UUID("6f1d3b52-8f7e-4c59-9a57-0c7d1f0e3a21")


@cache
def _client(url: str) -> redis.Redis:
    # No retries: a Redis that does not answer costs one 2 s timeout, not one per retry (a hung
    # Redis must not hold a task's lock, or a request, for long), and a publish is never repeated.
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))


def client() -> redis.Redis:
    """This process's connection to the channels' Redis."""
    return _client(settings.REDIS_URL)


def encode(message_type: str, data: Mapping[str, Any]) -> dict[str, str]:
    return {"type": message_type, "data": json.dumps(data, ensure_ascii=False, separators=(",", ":"))}


def publish(channel: str, message_type: str, data: Mapping[str, Any], *, pipe: Any = None) -> Any:
    """Add a message to ``channel``; returns its id (or the pipeline's pending result)."""
    return (pipe or client()).xadd(
        channel, encode(message_type, data), maxlen=settings.MCP_STREAM_MAXLEN, approximate=True
    )


# --- what the server publishes ------------------------------------------------------------------


def state_messages(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``state`` messages of one store write: one per history event it added."""
    known = len(before["history"]) if before else 0
    base = {
        "task_id": after["task_id"],
        "profile": after["profile"],
        "role": after["role"],
        "status": after["status"],
        "version": after["version"],
        "iteration": after.get("iteration", 0),
        "parent_id": after.get("parent_id"),
    }
    return [
        {**base, "event_id": known + offset + 1, "event": event}
        for offset, event in enumerate(after["history"][known:])
    ]


def publish_task_change(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> None:
    """The state store's observer: publish a write's new history events on the feedback channel.

    The state file is the truth and is already written: when Redis is away this logs and returns,
    and the events can still be read from the task (GET /api/v1/tasks/{task_id}/events replays them).
    """
    messages = state_messages(before, after)
    if not messages:
        return
    try:
        if len(messages) == 1:  # most writes add one event: a command costs less than a pipeline of one
            publish(FEEDBACK, STATE, messages[0])
        else:
            pipe = client().pipeline(transaction=False)
            for message in messages:
                publish(FEEDBACK, STATE, message, pipe=pipe)
            pipe.execute()
    except redis.RedisError as exc:
        logger.warning("task %s: state change not published on %s: %s", after["task_id"], FEEDBACK, exc)


def publish_llm_call(sample: CallSample, pipe: Any) -> None:
    """The load balancer's observer: publish an engine call's sample on the metrics channel, in the
    pipeline that records the call (the balancer sends it, and logs a failure without failing the call).
    Unlike the other publications it goes with the balancer's client, which sends a pipeline that timed
    out again: the sample may then be counted twice, as the call's outcome may."""
    publish(METRICS, LLM_CALL, asdict(sample), pipe=pipe)


def feedback_cursor() -> str:
    """The id of the feedback channel's latest message: waiting from it sees only what comes after."""
    latest = client().xrevrange(FEEDBACK, count=1)
    return text(latest[0][0]) if latest else "0-0"


def wait_for_task(task_id: str, cursor: str, timeout_s: float) -> tuple[str, bool]:
    """Wait until a state change of ``task_id`` is published after ``cursor``, for ``timeout_s`` at
    most. Returns the cursor to wait from next and whether a change came. When Redis is away it
    says a change may have come after a second, so that the caller reads the task itself."""
    deadline = time.monotonic() + timeout_s
    marker = task_id.encode()
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            # Short blocks: the connection's socket timeout is 2 s.
            replies = client().xread({FEEDBACK: cursor}, count=500, block=max(int(min(remaining, 1.0) * 1000), 1))
            changed = False
            for _, entries in replies or []:
                for entry_id, fields in entries:
                    cursor = text(entry_id)
                    data = fields.get(b"data", b"")
                    # The id's bytes first (cheap), then the message's own task (not a child's parent_id).
                    if fields.get(b"type") == STATE.encode() and marker in data:
                        changed |= _state_task_id(data) == task_id
            if changed:
                return cursor, True
    except redis.RedisError:
        time.sleep(1)
        return cursor, True
    return cursor, False


def _state_task_id(data: bytes) -> str | None:
    try:
        return json.loads(data).get("task_id")
    except (ValueError, AttributeError):
        return None


# --- reading the channels -----------------------------------------------------------------------


class Reject(Exception):
    """The message is refused for good: it is answered with ``body`` and acknowledged."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        super().__init__(body.get("detail", "rejected"))
        self.body = dict(body)


@dataclass
class Entry:
    channel: str
    id: str
    type: str | None
    data: dict[str, Any] | None
    deliveries: int = 1
    # Why ``data`` is None: the message's ``data`` is missing, too large, not UTF-8, not JSON...
    problem: str | None = None


class Writes:
    """The Redis writes of a handler (an answer, an aggregation), kept to be run in the script that
    acknowledges its message, and only if that acknowledgement takes: a message that another consumer
    took over and acknowledged first has its writes made once. The methods are redis-py's."""

    def __init__(self) -> None:
        self.commands: list[list[str | bytes | int | float]] = []

    def xadd(self, name: str, fields: Mapping[str, str], maxlen: int | None = None, approximate: bool = True) -> None:
        command: list = ["XADD", name]
        if maxlen is not None:
            command += ["MAXLEN", "~" if approximate else "=", maxlen]
        command.append("*")
        for key, value in fields.items():
            command += [key, value]
        self.commands.append(command)

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        self.commands.append(["HINCRBY", name, key, int(amount)])

    def hincrbyfloat(self, name: str, key: str, amount: float) -> None:
        self.commands.append(["HINCRBYFLOAT", name, key, repr(float(amount))])

    def sadd(self, name: str, *values: str) -> None:
        self.commands.append(["SADD", name, *values])

    def setnx(self, name: str, value: float | str) -> None:
        self.commands.append(["SET", name, value, "NX"])

    def expire(self, name: str, seconds: int) -> None:
        self.commands.append(["EXPIRE", name, int(seconds)])

    def arguments(self) -> list:
        """The commands for ``_ACK_THEN``: each as its length, then its words."""
        flat: list = []
        for command in self.commands:
            flat += [len(command), *command]
        return flat


# KEYS[1] the channel; ARGV[1] the group, ARGV[2] the message id, then the writes (``Writes.arguments``).
# The writes run only if this acknowledgement is the one that removes the message from the pending list.
_ACK_THEN = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""

# Forget a consumer only if nothing is pending for it at this moment: KEYS[1] the stream; ARGV the group, the
# consumer. Checked and deleted in one script, so that a message delivered to a live consumer in between (whose
# idle time Redis 7.0 counts from its last delivery, not its last read) is not dropped from the pending list
# with it (its acknowledgement, and so its answer, would be lost).
_FORGET_IF_IDLE = """
if redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])[1] then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# A handler does the message's work and adds its Redis writes (an answer, an aggregation) to
# ``Writes``, run with the acknowledgement; it raises Reject to refuse the message, anything else to
# have it delivered again later.
Handler = Callable[[Entry, Writes], None]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode(channel: str, entry_id: bytes | str, fields: Mapping[bytes, bytes] | None) -> Entry:
    """An entry as read. Never raises: when ``data`` cannot be used (missing, larger than
    ``API_MAX_BODY_BYTES``, not UTF-8, not a JSON object, NaN or Infinity, nested too deep, text that
    is not Unicode), ``data`` is None and ``problem`` says why, and the handler rejects it."""
    entry_id = text(entry_id)
    fields = dict(fields or {})
    kind = fields.get(b"type")
    entry = Entry(channel=channel, id=entry_id, type=kind.decode("utf-8", "replace") if kind else None, data=None)
    raw = fields.get(b"data")
    limit = settings.API_MAX_BODY_BYTES
    if raw is None:
        entry.problem = "data: is required (a JSON object)"
    elif len(raw) > limit:
        entry.problem = f"data: is {len(raw)} bytes; the limit is {limit} bytes"
    else:
        try:
            parsed = check_json(json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant))
        except UnicodeDecodeError:
            entry.problem = "data: is not UTF-8 text"
        except RecursionError:
            entry.problem = "data: JSON nested too deep"
        except ValueError as exc:
            entry.problem = f"data: is not valid JSON ({str(exc)[:200]})"
        else:
            if isinstance(parsed, dict):
                entry.data = parsed
            else:
                entry.problem = "data: must be a JSON object"
    return entry


class Consumer:
    """One member of the server's consumer group on some channels."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        connection: redis.Redis | None = None,
        name: str | None = None,
        claim_idle_s: float | None = None,
        max_deliveries: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        undeliverable: Mapping[str, Callable[[Entry, Writes], bool]] | None = None,
    ) -> None:
        self.handlers = dict(handlers)
        self.redis = connection or client()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = int((claim_idle_s or settings.MCP_CLAIM_IDLE_SECONDS) * 1000)
        self.max_deliveries = max_deliveries or settings.MCP_MAX_DELIVERIES
        self.clock = clock
        self._next_claim = 0.0
        self._ack_then = self.redis.register_script(_ACK_THEN)
        self._forget_if_idle = self.redis.register_script(_FORGET_IF_IDLE)
        # Per channel, what answers a message that could not be handled in ``max_deliveries`` before it is
        # rejected: True when it answered.
        self.undeliverable = dict(undeliverable or {})

    def ensure_groups(self) -> None:
        """Create the group on every channel (from its first entry, so that nothing sent before the
        first consumer started is missed)."""
        for channel in self.handlers:
            try:
                self.redis.xgroup_create(channel, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def forget_dead_consumers(self, idle_s: float = 3600) -> list[str]:
        """Remove from the group the consumers (of dead processes) idle this long with nothing pending,
        so that the group's consumer count stays true."""
        forgotten = []
        for channel in self.handlers:
            for consumer in self.redis.xinfo_consumers(channel, GROUP):
                name = text(consumer["name"])
                # A live consumer may look idle (Redis 7.0 counts from its last delivery): one that is reads
                # again within a poll and is made anew; what was delivered to it meanwhile is kept.
                if (
                    name != self.name
                    and not consumer["pending"]
                    and consumer["idle"] >= idle_s * 1000
                    and self._forget_if_idle(keys=[channel], args=[GROUP, name])
                ):
                    forgotten.append(name)
        return forgotten

    def leave(self) -> None:
        """Leave the group on every channel (a consumer that stops), unless messages are pending for it: those
        stay, for another consumer to take over."""
        for channel in self.handlers:
            self._forget_if_idle(keys=[channel], args=[GROUP, self.name])

    def poll(self, *, block_ms: int = 1000, count: int = 10) -> int:
        """Take over the messages of dead consumers when due, then read and handle new ones (at most ``count``
        a channel: every message read waits, pending, while those before it are handled, and one that waits
        past ``MCP_CLAIM_IDLE_SECONDS`` is taken over by another consumer and handled twice). Returns how many
        messages were handled (acknowledged). A channel or group that vanished (Redis lost its data, or was
        flushed) is made again."""
        try:
            return self._poll(block_ms, count)
        except redis.ResponseError as exc:
            # NOGROUP; or, from a read that was blocked when its stream was deleted, UNBLOCKED (Redis 7.0).
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            logger.warning("the consumer group is gone (%s); making it again", exc)
            self.ensure_groups()
            return 0

    def _poll(self, block_ms: int, count: int) -> int:
        handled = 0
        if self.clock() >= self._next_claim:
            # Set first: a reclaim that fails must not run again at every poll.
            self._next_claim = self.clock() + max(self.claim_idle_ms / 2000, 0.5)
            handled += self.reclaim()
        streams = dict.fromkeys(self.handlers, ">")
        replies = self.redis.xreadgroup(GROUP, self.name, streams, count=count, block=block_ms) or []
        for channel, entries in replies:
            for entry_id, fields in entries:
                handled += self.handle(decode(text(channel), entry_id, fields))
        return handled

    def reclaim(self) -> int:
        """Claim the messages that other consumers read and left unacknowledged for too long."""
        handled = 0
        for channel in self.handlers:
            pending = self.redis.xpending_range(channel, GROUP, min="-", max="+", count=100, idle=self.claim_idle_ms)
            if not pending:
                continue
            # One at a time, each just before it is handled: a claim counts a delivery, and a process that
            # dies in the middle of a batch must not have counted one for the messages after it (a message
            # that kills its consumer would take the others with it to their last delivery).
            # Only what is still idle is claimed (another consumer may have taken it meanwhile); a pending
            # message that was trimmed away comes back empty (Redis 6) or not at all (7+), and Redis drops
            # it from the pending list itself.
            for item in pending:
                claimed = self.redis.xclaim(channel, GROUP, self.name, self.claim_idle_ms, [item["message_id"]])
                for entry_id, fields in claimed:
                    if entry_id is None:
                        continue
                    entry = decode(channel, entry_id, fields)
                    entry.deliveries = item["times_delivered"] + 1
                    logger.info("%s: took over message %s (delivery %d)", channel, entry.id, entry.deliveries)
                    handled += self.handle(entry)
        return handled

    def handle(self, entry: Entry) -> int:
        """Handle one entry and acknowledge it; 0 when it is left for a later delivery."""
        writes = Writes()
        try:
            if entry.deliveries > self.max_deliveries:
                answered = self.undeliverable.get(entry.channel)
                if answered is None or not answered(entry, writes):
                    raise Reject(
                        {
                            "code": "undeliverable",
                            "detail": f"the message could not be handled in {self.max_deliveries} deliveries",
                        }
                    )
            else:
                self.handlers[entry.channel](entry, writes)
        except Reject as rejected:
            writes = Writes()
            logger.info("%s: message %s rejected: %s", entry.channel, entry.id, rejected.body.get("detail"))
            if entry.channel != METRICS:
                reply = {"channel": entry.channel, "message_id": entry.id, **rejected.body}
                task_id = (entry.data or {}).get("task_id")
                if isinstance(task_id, str) and len(task_id) <= 64 and "task_id" not in reply:
                    reply["task_id"] = task_id
                publish(FEEDBACK, REJECTED, reply, pipe=writes)
        except Exception:
            logger.exception("%s: message %s not handled; it will be delivered again", entry.channel, entry.id)
            return 0
        self._ack_then(keys=[entry.channel], args=[GROUP, entry.id, *writes.arguments()])
        return 1


def text(value: bytes | str) -> str:
    """A Redis reply's bytes as text."""
    return value.decode() if isinstance(value, bytes) else value


# --- the server's handlers ----------------------------------------------------------------------


def _expect(entry: Entry, message_type: str) -> dict[str, Any]:
    if entry.data is None:
        code = "too_large" if "the limit is" in (entry.problem or "") else "invalid"
        raise Reject({"code": code, "detail": entry.problem or "data: must be a JSON object"})
    if entry.type != message_type:
        raise Reject({"code": "invalid", "detail": f"type: must be {message_type!r} on {entry.channel}"})
    return entry.data


def _refused(exc: Exception) -> Reject:
    """A Reject for an error the REST API would answer with a 4xx; any other error is raised again
    (a 5xx means Redis, the disk or the database is away: the message is delivered again later)."""
    from orchestration.exceptions import error_response

    answer = error_response(exc)
    if answer is None or answer[0] >= 500:
        raise exc
    return Reject(answer[1])


def handle_inbound(entry: Entry, pipe: Writes) -> None:
    """A task packet: submitted like POST /api/v1/{profile}/{role}, then answered ``accepted``."""
    # Imported here: the API imports the store, whose observer is in this module.
    from orchestration.api_handler import TaskSubmitApi

    data = dict(_expect(entry, TASK))
    profile, role = data.pop("profile", None), data.pop("role", None)
    for field, value in (("profile", profile), ("role", role)):
        if not isinstance(value, str) or not value:
            raise Reject({"code": "invalid", "detail": f"{field}: is required on {INBOUND}", "field": field})
    data["task_id"] = inbound_task_id(entry)
    try:
        packet, created = TaskSubmitApi.accept(data, profile=profile, role=role)
    except Exception as exc:
        raise _refused(exc) from None
    answer = {"channel": entry.channel, "message_id": entry.id, "task_id": packet["task_id"]}
    publish(FEEDBACK, ACCEPTED, {**answer, "status": packet["status"], "created": created}, pipe=pipe)


def inbound_task_id(entry: Entry) -> Any:
    """The task an inbound message submits: the ``task_id`` it names, else one derived from its id (so that a
    second delivery finds the task of the first)."""
    named = (entry.data or {}).get("task_id")
    return named if named is not None else str(uuid.uuid5(INBOUND_TASK_NAMESPACE, f"{entry.channel}:{entry.id}"))


def inbound_stored(entry: Entry, pipe: Writes) -> bool:
    """An inbound message that could not be handled in its deliveries, answered ``accepted`` if an earlier
    delivery stored its task: the broker did not take the job (Redis away), and the recovery sweep queues it.
    Answered ``rejected``, its producer would send it again, and a new message makes a new task. Only a
    message without a ``task_id`` of its own: its task's id is derived from the message's, so no other
    submission has it; a task_id the producer named may be another's, and the rejection names it."""
    from orchestration.runtime import task_store
    from orchestration.state_store import CorruptState, TaskNotFound

    if entry.data is None or entry.data.get("task_id") is not None:
        return False
    try:
        packet = task_store().read(inbound_task_id(entry))
    except (TaskNotFound, CorruptState, OSError):  # not stored, or not readable: rejected as undeliverable
        return False
    answer = {"channel": entry.channel, "message_id": entry.id, "task_id": packet["task_id"]}
    detail = "stored, but its job could not be queued: the recovery sweep queues it"
    publish(FEEDBACK, ACCEPTED, {**answer, "status": packet["status"], "created": True, "detail": detail}, pipe=pipe)
    return True


def handle_feedback(entry: Entry, pipe: Writes) -> None:
    """An outside agent's feedback (type ``feedback``), handled like POST /api/v1/tasks/{id}/feedback;
    the server's own messages on this channel are acknowledged and left alone."""
    from orchestration.api_handler import TaskFeedbackApi

    if entry.type in (STATE, ACCEPTED, REJECTED):
        return
    data = dict(_expect(entry, FEEDBACK_MESSAGE))
    task_id = data.pop("task_id", None)
    if not isinstance(task_id, str):
        problem = "is required" if task_id is None else "must be a string, the task's id"
        raise Reject({"code": "invalid", "detail": f"task_id: {problem}", "field": "task_id"})
    try:
        packet = TaskFeedbackApi.accept(data, task_id=task_id, message_id=entry.id)
    except Exception as exc:
        raise _refused(exc) from None
    answer = {"channel": entry.channel, "message_id": entry.id, "task_id": packet["task_id"]}
    publish(FEEDBACK, ACCEPTED, {**answer, "status": packet["status"]}, pipe=pipe)


def handle_metrics(entry: Entry, pipe: Writes) -> None:
    """An engine call's sample, added to the aggregates in the acknowledging transaction."""
    from orchestration import metrics

    data = _expect(entry, LLM_CALL)
    try:
        metrics.aggregate(pipe, data)
    except metrics.SampleError as exc:
        raise Reject({"code": "invalid", "detail": str(exc)}) from None


def server_consumer(**options: Any) -> Consumer:
    """The consumer ``manage.py mcp_consume`` runs: all three channels."""
    return Consumer(
        {INBOUND: handle_inbound, FEEDBACK: handle_feedback, METRICS: handle_metrics},
        undeliverable={INBOUND: inbound_stored},
        **options,
    )
