"""Step leases: a Redis key that says a worker is alive and running a task's step.

The worker that claims a task takes the lease ``aiagent:lease:<task_id>`` with
a short expiry and renews it while the step runs (the process's renewer thread,
balancer/renewal.py). A
job that comes back from the broker (after a worker was killed, a lost
connection or a visibility timeout) may run the step again only once the lease
has expired, so a live step is never run twice, and a dead one is taken over
within ``TASK_LEASE_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from functools import cache

import redis
from django.conf import settings

from balancer.renewal import renewer

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


# A job's runs: KEYS[1] the job's hash; ARGV[1] its expiry in seconds. A run that finds the previous run
# still marked running counts it as a death (its process was killed before the run ended).
_JOB_STARTED = """
local deaths
if redis.call('HGET', KEYS[1], 'running') == '1' then
  deaths = redis.call('HINCRBY', KEYS[1], 'deaths', 1)
else
  deaths = tonumber(redis.call('HGET', KEYS[1], 'deaths') or '0')
end
redis.call('HSET', KEYS[1], 'running', '1')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return deaths
"""
JOB_PREFIX = "aiagent:job:"
JOB_MEMORY_S = 2 * 86400  # longer than a message stays unacknowledged before the broker delivers it again


def job_started(job_id: str) -> int:
    """Mark a run of the job as started; returns how many of its runs so far died before they ended
    (their process was killed: out of memory, a crash in an engine), as ``job_ended`` tells."""
    return int(_scripts(settings.REDIS_URL)[2](keys=[f"{JOB_PREFIX}{job_id}"], args=[JOB_MEMORY_S]))


def job_ended(job_id: str) -> None:
    """Mark the job's run as ended, whatever its outcome (a retry's next run starts afresh)."""
    _client(settings.REDIS_URL).hset(f"{JOB_PREFIX}{job_id}", "running", "0")


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


@cache
def _scripts(url: str) -> tuple:
    client = _client(url)
    return client.register_script(_TAKE), client.register_script(_RELEASE), client.register_script(_JOB_STARTED)


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
        self._take, self._release, _ = _scripts(settings.REDIS_URL)
        self._renewal: int | None = None

    def acquire(self) -> bool:
        """Take the lease if no live worker holds it."""
        return bool(self._take(keys=[self.key], args=[self.holder, self.ttl_ms]))

    def remaining_s(self) -> float:
        """Seconds until the current holder's lease expires (0 when free)."""
        return max(0, self._redis.pttl(self.key)) / 1000

    def __enter__(self) -> StepLease:
        self._renewal = renewer.add(self._renew, self.ttl_ms / 3000)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._renewal is not None:
            renewer.remove(self._renewal)
        self.release()

    def release(self) -> None:
        """Give the lease up if it is still ours (one that expired and was taken by another stays theirs)."""
        try:
            self._release(keys=[self.key], args=[self.holder])
        except redis.RedisError as exc:
            logger.warning("%s: could not release (%s); it expires by itself", self.key, exc)

    def _renew(self) -> None:
        try:
            if not self.acquire():
                logger.error("%s: lost to another holder while the step runs", self.key)
        except redis.RedisError as exc:
            logger.warning("%s: could not renew (%s)", self.key, exc)
