"""Request rates per API client (a user with a token), counted in Redis.

Every gunicorn process shares the counts, because they are in Redis. A client has two rates:
``API_THROTTLE_RATE`` over every authenticated request, and ``API_SUBMIT_THROTTLE_RATE`` over the
requests that start model work (task submissions, feedback and chat completions). Each is a sliding window, the same
as DRF's ``SimpleRateThrottle`` (at most N requests in any window of its length), kept as a sorted
set of request times; both are checked, and a request counted, in one Redis script, so that the
accept path pays one round trip for them. A request over a rate is refused by DRF with 429,
``Retry-After`` and the error body ``{"code": "throttled", ...}``; a refused request is not counted.
When Redis cannot be reached the requests are let through (fail open) and the outage is logged
once: a throttle must not turn an API that could still answer into one that answers 500.
"""

from __future__ import annotations

import logging
import time
import uuid
from functools import cache
from typing import TYPE_CHECKING

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry
from rest_framework.throttling import BaseThrottle

if TYPE_CHECKING:  # rest_framework.views imports this module (DEFAULT_THROTTLE_CLASSES)
    from rest_framework.request import Request
    from rest_framework.views import APIView

logger = logging.getLogger(__name__)

# The views whose requests start model work (a task, a round of the feedback loop, a chat completion),
# by URL name.
WORK_URL_NAMES = frozenset({"task-submit", "task-feedback", "openai-chat-completions"})
PREFIX = "ai-agent-server:throttle:"
PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# Whether this process last found Redis away, so that an outage is logged once, not per request.
_redis_away = False

# KEYS: one sorted set per rate; ARGV[1] now, ARGV[2] this request's member, then per key its limit
# and window in seconds. Returns 0 when the request is let through (and counted under every key),
# else the seconds until it would be.
_CHECK = """
local now = tonumber(ARGV[1])
local wait = 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count >= limit then
    -- The limit-th newest request must leave the window first.
    local oldest = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now)
  end
end
if wait > 0 then
  return tostring(wait)
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[2 + 2 * i]) * 1000))
end
return '0'
"""


@cache
def _client(url: str) -> redis.Redis:
    # No retries and short timeouts: a Redis that is away costs a request little, then it goes through.
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


@cache
def _script(url: str):
    return _client(url).register_script(_CHECK)


def parse_rate(rate: str) -> tuple[int, int]:
    """``1200/min`` as (1200 requests, 60 seconds)."""
    count, period = rate.split("/")
    return int(count), PERIODS[period[0]]


class ClientRateThrottle(BaseThrottle):
    """The client's rates (``API_THROTTLE_RATE``, and ``API_SUBMIT_THROTTLE_RATE`` for submissions and
    feedback), counted by its user name (``manage.py create_token NAME``): a rotated token keeps its
    client's count. Requests without a user (/healthz) are not counted. The rates are read per
    request, so that a changed setting applies at once; ``timer`` is the clock (tests replace it)."""

    timer = time.time

    def __init__(self) -> None:
        self._wait = 0.0

    def rates(self, request: Request, view: APIView) -> list[tuple[str, str]]:
        """(scope, rate) of the rates that count this request."""
        rates = [("api", settings.API_THROTTLE_RATE)]
        match = request.resolver_match
        if request.method == "POST" and match is not None and match.url_name in WORK_URL_NAMES:
            rates.append(("work", settings.API_SUBMIT_THROTTLE_RATE))
        return [(scope, rate) for scope, rate in rates if rate]

    def allow_request(self, request: Request, view: APIView) -> bool:
        global _redis_away
        user = request.user
        rates = self.rates(request, view)
        if user is None or not user.is_authenticated or not rates:
            return True
        ident = user.get_username()
        keys, args = [], [self.timer(), uuid.uuid4().hex]
        for scope, rate in rates:
            limit, window = parse_rate(rate)
            keys.append(f"{PREFIX}{scope}:{ident}")
            args += [limit, window]
        try:
            wait = float(_script(settings.REDIS_URL)(keys=keys, args=args))
        except redis.RedisError as exc:
            if not _redis_away:
                logger.warning("throttling is off until Redis answers again (%s: %s)", type(exc).__name__, exc)
                _redis_away = True
            return True
        if _redis_away:
            logger.warning("throttling is on again: Redis answers")
            _redis_away = False
        self._wait = wait
        return wait == 0

    def wait(self) -> float:
        """Seconds until the request would be let through (at least 1)."""
        return max(1.0, self._wait)


def document_throttling(result: dict, generator, request, public: bool) -> dict:
    """drf-spectacular hook: every operation that needs a client's credentials (all but /healthz) may
    answer 429, with the same error body, in the same media type, as its 401."""
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or not any(operation.get("security", [])):
                continue
            unauthenticated = operation["responses"].get("401", {})
            operation["responses"].setdefault(
                "429",
                {
                    "description": "`throttled`: the client is over its rate (`API_THROTTLE_RATE`, and "
                    "`API_SUBMIT_THROTTLE_RATE` for submissions and feedback); `Retry-After` says in how many "
                    "seconds to try again.",
                    "headers": {
                        "Retry-After": {
                            "schema": {"type": "integer"},
                            "description": "Seconds to wait before the next request.",
                        }
                    },
                    **({"content": unauthenticated["content"]} if "content" in unauthenticated else {}),
                },
            )
    return result
