"""The recovery sweeper: finds the accepted tasks that nothing moves on any more, and moves them on.

A task is queued or running because something will move it on: a job on its role's queue, a job a
live worker holds (running, prefetched, or waiting for its retry's countdown), a step running under
its lease, or, for a plan, its children. Redis that lost its data (it keeps nothing on disk, or was
replaced), a submit whose enqueue failed while Redis was down, a worker host that died with its
jobs prefetched (they come back only after the broker's visibility timeout, an hour), or a worker
that died between two steps can leave a task with none of these. The sweeper looks at the queued
and running tasks that have not changed for ``RECOVERY_GRACE_SECONDS``, and for each one with
nothing to move it on, queues its jobs again under the same ids (``task_recover``: a job delivered
twice finds its step done), or fails it after ``RECOVERY_RETRIES`` recoveries in its run.

It also writes the database rows that a locked or unreachable database did not take (the state
files are the truth), and, with ``TASK_RETENTION_DAYS``, removes the finished tasks past it
(orchestration/retention.py). Every worker runs it at start and then every ``RECOVERY_SWEEP_SECONDS``, one
worker at a time (a Redis lease); ``manage.py recover_tasks`` runs it once.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from celery import current_app
from django.conf import settings
from django.db import DatabaseError
from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from kombu.exceptions import OperationalError

from orchestration import mcp_handler, metrics, orchestration_engine, retention
from orchestration.leases import StepLease, leases_held
from orchestration.models import Task
from orchestration.packets import FINISHED, QUEUED, RUNNING
from orchestration.runtime import configuration, task_store
from orchestration.state_store import CorruptState, TaskNotFound, mirror_packet

logger = logging.getLogger(__name__)

SWEEP_LEASE = "recovery-sweep"  # the lease (aiagent:lease:recovery-sweep) of the process that sweeps
BATCH = 1000
CURSOR_KEY = "aiagent:recovery:cursor"  # where the last sweep's batch ended: (updated_at, task_id)
CURSOR_TTL_S = 24 * 3600
RETENTION_CURSOR_KEY = "aiagent:retention:cursor"  # where the last sweep's purge stopped


@dataclass
class SweepReport:
    mirrored: int = 0
    looked_at: int = 0
    recovered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    removed: int = 0  # finished tasks past TASK_RETENTION_DAYS

    def __str__(self) -> str:
        return (
            f"{self.mirrored} database rows caught up; {self.looked_at} idle tasks looked at; "
            f"{len(self.recovered)} recovered; {len(self.failed)} failed; {self.removed} finished tasks removed"
        )


def queued_jobs(client: redis.Redis, queues: Iterable[str]) -> set[str]:
    """The ids of the jobs waiting on ``queues`` (kombu's Redis lists, every priority)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for suffix in metrics.PRIORITY_SUFFIXES:
            pipe.lrange(queue + suffix, 0, -1)
    ids = set()
    for messages in pipe.execute():
        for raw in messages:
            try:
                ids.add(json.loads(raw)["headers"]["id"])
            except (ValueError, KeyError, TypeError):
                logger.warning("a message on a queue is not a Celery job; ignored")
    return ids


def held_jobs(timeout_s: float) -> set[str]:
    """The ids of the jobs the live workers hold: running, prefetched, or waiting for a countdown."""
    inspect = current_app.control.inspect(timeout=timeout_s)
    ids = set()
    for replies in (inspect.active(), inspect.reserved(), inspect.scheduled()):
        for jobs in (replies or {}).values():
            for job in jobs:
                ids.add(job.get("id") or job.get("request", {}).get("id"))
    return ids


def sweep(*, grace_s: float | None = None, retries: int | None = None, inspect_timeout_s: float = 2.0) -> SweepReport:
    """One pass: catch the mirror up, then recover the idle tasks that nothing moves on."""
    grace_s = settings.RECOVERY_GRACE_SECONDS if grace_s is None else grace_s
    retries = settings.RECOVERY_RETRIES if retries is None else retries
    report = SweepReport()
    report.mirrored = task_store().catch_up_mirror()
    cutoff = timezone.now() - timedelta(seconds=grace_s)
    idle = Task.objects.filter(status__in=(QUEUED, RUNNING), updated_at__lte=cutoff)
    # A batch at a time, from where the last sweep stopped: the oldest BATCH alone would be the same tasks
    # at every sweep while a backlog of that many waits (queued behind a slow LLM, plans' parents), and a
    # task whose jobs were lost behind them would never be looked at.
    client = _redis()
    cursor = _cursor(client.get(CURSOR_KEY))
    if cursor is not None:
        at, after = cursor
        idle = idle.filter(Q(updated_at__gt=at) | Q(updated_at=at, task_id__gt=after))
    candidates = list(idle.order_by("updated_at", "task_id").values_list("task_id", "updated_at")[:BATCH])
    sweeping = _Sweep(cutoff, retries, inspect_timeout_s, report)
    for candidate, _ in candidates:
        try:
            sweeping.look_at(str(candidate))
        except (redis.RedisError, DatabaseError, OperationalError):
            raise  # Redis, the broker or the database away: the whole sweep is tried again later
        except Exception:
            # One task that cannot be looked at (a corrupt child's file, a role that left the configuration)
            # must not stop the sweep for the tasks after it; it is logged every sweep until it is repaired.
            logger.exception("recovery: task %s not looked at", candidate)
    # Moved once the batch is done: a sweep that Redis or the database ended looks at the same batch again.
    last = (candidates[-1][1], candidates[-1][0]) if len(candidates) == BATCH else None  # (updated_at, task_id)
    _save_cursor(client, CURSOR_KEY, last)
    if settings.TASK_RETENTION_DAYS:
        report.removed = _purge(client)
    return report


def _purge(client: redis.Redis) -> int:
    """Remove a batch of the finished tasks past ``TASK_RETENTION_DAYS``, from where the last sweep's stopped."""
    purged = retention.purge(
        older_than=timedelta(days=settings.TASK_RETENTION_DAYS),
        limit=retention.BATCH,
        after=_cursor(client.get(RETENTION_CURSOR_KEY)),
    )
    _save_cursor(client, RETENTION_CURSOR_KEY, purged.next)
    return len(purged.removed)


@dataclass
class _Sweep:
    """One sweep's look at its candidates; the jobs on the queues and those the workers hold are asked
    for once a sweep, when a candidate first needs them."""

    cutoff: datetime
    retries: int
    inspect_timeout_s: float
    report: SweepReport

    @functools.cached_property
    def queued(self) -> set[str]:
        return queued_jobs(_redis(), [*configuration().queues(), settings.CELERY_TASK_DEFAULT_QUEUE])

    @functools.cached_property
    def held(self) -> set[str]:
        return held_jobs(self.inspect_timeout_s)

    def look_at(self, task_id: str) -> None:
        """Recover ``task_id`` if nothing moves it on."""
        try:
            packet = task_store().read(task_id)
        except (TaskNotFound, CorruptState) as exc:
            logger.error("recovery: %s", exc)
            return
        if packet["status"] not in (QUEUED, RUNNING):
            # Its row is behind its file, with no mark left to say so: made to match (the guarded write, which
            # never takes a row back), so that it does not come back among the oldest candidates at every sweep.
            mirror_packet(packet)
            return
        if parse_datetime(packet["updated_at"]) > self.cutoff:
            return  # it moved since the mirror was read
        self.report.looked_at += 1
        waiting = orchestration_engine.task_waiting(packet)
        if waiting.children:
            statuses = [orchestration_engine.status_of(child) for child in waiting.children]
            if any(status is not None and status not in FINISHED for status in statuses):
                return  # its children move it on
            # Each child has finished, or is missing (its file lost, or never written) or unreadable: the plan
            # goes on, creating the missing ones whose steps can start (and failing for an unreadable one).
            reason = "its plan's children have finished or are missing, but the plan did not go on"
        else:
            if (
                leases_held(waiting.leases)
                or any(job in self.queued for job in waiting.jobs)
                or any(job in self.held for job in waiting.jobs)  # asked of the workers only when needed
            ):
                return
            reason = "its jobs were lost: none is on a queue or held by a live worker, and no step runs"
        outcome = orchestration_engine.task_recover(packet=packet, reason=reason, retries=self.retries)
        if outcome == "recovered":
            self.report.recovered.append(packet["task_id"])
        elif outcome == "failed":
            self.report.failed.append(packet["task_id"])


def sweep_once_among_workers(**options) -> SweepReport | None:
    """``sweep`` if no other process is sweeping (a Redis lock); None when one is."""
    # Not renewed: a sweep that hangs lets the next one in once the lease expires (a task is recovered only
    # if it did not change since it was read, so two sweeps at once do no harm); ended, it gives the lease
    # up only if it is still its own.
    lease = StepLease(SWEEP_LEASE, "sweep", ttl_s=max(settings.RECOVERY_SWEEP_SECONDS, 10))
    if not lease.acquire():
        return None
    try:
        return sweep(**options)
    finally:
        lease.release()


def _save_cursor(client: redis.Redis, key: str, cursor: tuple[datetime, object] | None) -> None:
    """Keep where a batch ended, (updated_at, task_id), for the next sweep; None: the batch was the last, and
    the next sweep starts again from the oldest."""
    if cursor is None:
        client.delete(key)
    else:
        at, task_id = cursor
        client.set(key, json.dumps([at.isoformat(), str(task_id)]), ex=CURSOR_TTL_S)


def _cursor(raw: bytes | None) -> tuple[datetime, uuid.UUID] | None:
    """The cursor a sweep left, or None (none left, or not one: the sweep starts from the oldest)."""
    if raw is None:
        return None
    try:
        at, task_id = json.loads(raw)
        return datetime.fromisoformat(at), uuid.UUID(task_id)
    except (ValueError, TypeError):
        return None


def _redis() -> redis.Redis:
    return mcp_handler.client()
