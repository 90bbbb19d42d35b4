"""Request rates per API client (a user with a token), counted in Redis through Django's cache.

Every gunicorn process shares the counts, because the cache is Redis (settings.CACHES). A request
over a rate is refused by DRF with 429, ``Retry-After`` and the error body ``{"code": "throttled",
...}``. When Redis cannot be reached the requests are let through (fail open) and the outage is
logged once: a throttle must not turn an API that could still answer into one that answers 500.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import redis
from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

if TYPE_CHECKING:  # rest_framework.views imports this module (DEFAULT_THROTTLE_CLASSES)
    from rest_framework.request import Request
    from rest_framework.views import APIView

logger = logging.getLogger(__name__)

# The views whose requests start model work (a task, or a round of the feedback loop), by URL name.
WORK_URL_NAMES = frozenset({"task-submit", "task-feedback"})

# Whether this process last found the cache's Redis away, so that an outage is logged once, not per request.
_redis_away = False


class ClientRateThrottle(SimpleRateThrottle):
    """``API_THROTTLE_RATE`` requests per client over every authenticated endpoint.

    A client is counted by its user name (``manage.py create_token NAME``): a rotated token keeps its
    client's count. Requests without a user (/healthz) are not counted. DRF's count is a read and a
    write of the request times, not atomic: concurrent requests of one client may be under-counted
    by a few, which a safety limit can afford."""

    scope = "api"
    rate_setting = "API_THROTTLE_RATE"

    def get_rate(self) -> str | None:
        # Read per request (DRF builds the throttles per request), so that a changed setting applies at once.
        return getattr(settings, self.rate_setting)

    def applies(self, request: Request, view: APIView) -> bool:
        return True

    def get_cache_key(self, request: Request, view: APIView) -> str | None:
        user = request.user
        if user is None or not user.is_authenticated or not self.applies(request, view):
            return None
        return self.cache_format % {"scope": self.scope, "ident": user.get_username()}

    def allow_request(self, request: Request, view: APIView) -> bool:
        global _redis_away
        try:
            allowed = super().allow_request(request, view)
        except redis.RedisError as exc:
            if not _redis_away:
                logger.warning("throttling is off until Redis answers again (%s: %s)", type(exc).__name__, exc)
                _redis_away = True
            return True
        if _redis_away and getattr(self, "key", None) is not None:  # this request did reach Redis
            logger.warning("throttling is on again: Redis answers")
            _redis_away = False
        return allowed

    def wait(self) -> float:
        """Seconds until the oldest request that keeps the client at its rate leaves the window. (DRF's
        own answer is None when a lowered rate leaves more requests in the window than the new rate.)"""
        return max(1.0, self.history[self.num_requests - 1] + self.duration - self.now)


class WorkRateThrottle(ClientRateThrottle):
    """``API_SUBMIT_THROTTLE_RATE`` task submissions and feedback per client: each starts model work,
    which costs far more than a read."""

    scope = "work"
    rate_setting = "API_SUBMIT_THROTTLE_RATE"

    def applies(self, request: Request, view: APIView) -> bool:
        match = request.resolver_match
        return request.method == "POST" and match is not None and match.url_name in WORK_URL_NAMES


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
