"""Step leases: a Redis key that says a worker is alive and running a task's step.

The worker that claims a task takes the lease ``aiagent:lease:<task_id>`` with
a short expiry and renews it while the step runs (the process's renewer thread,
balancer/renewal.py). A
job that comes back from the broker (after a worker was killed, a lost
connection or a visibility timeout) may run the step again only once the lease
has expired, so a live step is not run twice while its worker renews the lease, and a dead one is taken
over within ``TASK_LEASE_SECONDS``. A worker that cannot renew it for that long (Redis out of its reach, the
process stalled) loses it, and another may run the step: the first finds out at its next renewal and stops
its LLM call (an engine over HTTP at once, llama.cpp at its next token) or its test run in the sandbox, and of
two answers the second to be recorded is discarded.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterable
from functools import cache

import redis
from django.conf import settings

from balancer.renewal import renewer
from llm_engines.base import Cancel, set_work_cancel, work_cancel

logger = logging.getLogger(__name__)

# Take or renew the lease when it is free or already ours: KEYS[1] key, ARGV[1] holder, ARGV[2] ttl ms.
_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# Give the lease up only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# A job's run starts: it takes the job's lease (as ``_TAKE``) and marks the job's hash, in one round trip.
# KEYS[1] the lease, KEYS[2] the job's hash (the running run's token, the deaths counted); ARGV[1] the run's
# token (the lease's holder), ARGV[2] the lease's ttl in ms, ARGV[3] how long the hash is kept in s. Returns
# how many runs before it died (a run that finds the mark of a run before it, whose lease ran out, counts
# that run as dead), or, when another run holds the lease, -1 minus the ms its lease has left.
_JOB_STARTED = """
local holder = redis.call('GET', KEYS[1])
if holder ~= false and holder ~= ARGV[1] then
  return -1 - math.max(redis.call('PTTL', KEYS[1]), 0)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local deaths = tonumber(redis.call('HGET', KEYS[2], 'deaths') or '0')
local running = redis.call('HGET', KEYS[2], 'running')
if running and running ~= '0' then  -- '0': an ended run, as servers before this one marked it
  deaths = redis.call('HINCRBY', KEYS[2], 'deaths', 1)
end
redis.call('HSET', KEYS[2], 'running', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return deaths
"""
# The run ended, whatever its outcome: its mark goes and its lease is given up, each if still its own.
_JOB_ENDED = """
if redis.call('HGET', KEYS[2], 'running') == ARGV[1] then
  redis.call('HDEL', KEYS[2], 'running')
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 0
"""
JOB_PREFIX = "aiagent:job:"
JOB_MEMORY_S = 2 * 86400  # longer than a message stays unacknowledged before the broker delivers it again


class JobRunAlive(Exception):
    """Another run of the job is alive; its lease has ``remaining_s`` left."""

    def __init__(self, remaining_s: float) -> None:
        super().__init__(f"another run of the job is alive for {remaining_s:.1f}s more")
        self.remaining_s = remaining_s


class JobRun:
    """One run of a job (a Celery message, delivered again after its worker process died), marked in Redis
    while it lives, so that a later run knows whether the runs before it died (their process was killed:
    out of memory, a crash in an engine) rather than ended. A run holds the job's lease (a ``StepLease``,
    renewed while it runs), so that a delivery of the job while a run of it is alive waits for it."""

    def __init__(self, job_id: str) -> None:
        self.key = f"{JOB_PREFIX}{job_id}"
        self.lease = StepLease(f"job:{job_id}", job_id)
        self._tried = False  # its start's script was sent: it may have taken the lease and marked the run
        self._held = False  # the lease is renewed

    def start(self) -> int:
        """Take the job's lease and mark the run; returns how many runs of the job died before it.
        ``JobRunAlive`` when another run of the job is alive: this one must not run now."""
        started, _ = _job_scripts(settings.REDIS_URL)
        lease = self.lease
        # Sent, the script may run though its reply is lost (a timeout): ``end`` then clears what is this run's.
        self._tried = True
        deaths = int(started(keys=[lease.key, self.key], args=[lease.holder, lease.ttl_ms, JOB_MEMORY_S]))
        if deaths < 0:
            self._tried = False  # it wrote nothing
            raise JobRunAlive((-1 - deaths) / 1000)
        lease.__enter__()  # renewed from now on
        self._held = True
        return deaths

    def end(self) -> None:
        """Clear the run's mark and give its lease up, each if it is still this run's (nothing when its
        start wrote nothing)."""
        if self._held:
            self._held = False
            self.lease.let_go()
        if self._tried:
            self._tried = False
            _job_scripts(settings.REDIS_URL)[1](keys=[self.lease.key, self.key], args=[self.lease.holder])


@cache
def _job_scripts(url: str) -> tuple:
    client = _client(url)
    return client.register_script(_JOB_STARTED), client.register_script(_JOB_ENDED)


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


@cache
def _scripts(url: str) -> tuple:
    client = _client(url)
    return client.register_script(_TAKE), client.register_script(_RELEASE)


PREFIX = "aiagent:lease:"


def leases_held(names: Iterable[str]) -> bool:
    """Whether a live worker holds any of the leases ``names`` (a task id, or ``<task id>:<step>``)."""
    keys = [f"{PREFIX}{name}" for name in names]
    return bool(keys) and _client(settings.REDIS_URL).exists(*keys) > 0


class StepLease:
    def __init__(self, task_id: str, job_id: str, *, ttl_s: float | None = None) -> None:
        self.key = f"{PREFIX}{task_id}"
        self.holder = f"{job_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_ms = int((ttl_s or settings.TASK_LEASE_SECONDS) * 1000)
        self._redis = _client(settings.REDIS_URL)
        self._take, self._release = _scripts(settings.REDIS_URL)
        self._renewal: int | None = None
        self._outer: Cancel | None = None
        self._unchain: Callable[[], None] | None = None
        self._gone = False
        self.lost = Cancel()  # a new one each time it is entered

    def acquire(self) -> bool:
        """Take the lease if no live worker holds it."""
        return bool(self._take(keys=[self.key], args=[self.holder, self.ttl_ms]))

    def remaining_s(self) -> float:
        """Seconds until the current holder's lease expires (0 when free)."""
        return max(0, self._redis.pttl(self.key)) / 1000

    def __enter__(self) -> StepLease:
        """Hold the lease (taken with ``acquire``) while the thread's work runs: renewed, and when it goes to
        another holder, its ``Cancel`` (the thread's ``work_cancel`` meanwhile) stops the LLM call the work
        makes."""
        self._outer = work_cancel()
        self.lost, self._gone = Cancel(), False
        # The work under a lease held inside another (a job's step) stops when either is lost.
        self._unchain = self._outer.register(self.lost.cancel) if self._outer is not None else None
        set_work_cancel(self.lost)
        self._renewal = renewer.add(self._renew, self.ttl_ms / 3000)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.let_go()
        self.release()

    def let_go(self) -> None:
        """Stop holding the lease (its renewal, its ``Cancel`` as the thread's) without giving it up yet."""
        if self._renewal is not None:
            renewer.remove(self._renewal)
            self._renewal = None
        if self._unchain is not None:
            self._unchain()
            self._unchain = None
        set_work_cancel(self._outer)

    def release(self) -> None:
        """Give the lease up if it is still ours (one that expired and was taken by another stays theirs)."""
        try:
            self._release(keys=[self.key], args=[self.holder])
        except redis.RedisError as exc:
            logger.warning("%s: could not release (%s); it expires by itself", self.key, exc)

    def _renew(self) -> None:
        if self._gone:
            return  # another holder has it
        try:
            if not self.acquire():
                logger.error("%s: lost to another holder while the step runs; its LLM call is stopped", self.key)
                self._gone = True
                self.lost.cancel()
        except redis.RedisError as exc:
            logger.warning("%s: could not renew (%s)", self.key, exc)
