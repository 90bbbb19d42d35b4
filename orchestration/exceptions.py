"""The one application error of the API, and the DRF handler that shapes every error body.

Every error answer has the same shape: ``{"code": ..., "detail": ...}``, plus
``field`` when one field is at fault and any other facts that help (the valid
profiles, the existing task...).

Worker processes import this module (through the services and selectors) but serve no HTTP: DRF is
imported only where an answer is made, so that a worker does not load it (18 MB in every process,
doc/performance.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import redis
from django.db import DatabaseError

if TYPE_CHECKING:
    from rest_framework.response import Response

logger = logging.getLogger(__name__)

FIELD_SHOWN = 200  # characters of a field's path an error names


class ApplicationError(Exception):
    """A request the service refuses, with the HTTP status that says why."""

    def __init__(self, detail: str, *, status_code: int = 400, code: str = "invalid", **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code
        self.code = code
        self.extra = extra


def _first_error(errors: Any, path: str = "") -> tuple[str, str]:
    """The path and message of the first error in a DRF ValidationError's nested detail."""
    if isinstance(errors, dict):
        key, value = next(iter(errors.items()))
        name = "" if key == "non_field_errors" else str(key)
        return _first_error(value, f"{path}.{name}" if path and name else (name or path))
    if isinstance(errors, list) and errors:
        return _first_error(errors[0], path)
    return path, str(errors)


def error_response(exc: Exception) -> tuple[int, dict[str, Any]] | None:
    """The status and body the API answers ``exc`` with, when it is one of the application's own
    errors (an ``ApplicationError`` or a validation error); None for anything else. The MCP channels
    answer their rejected messages with the same bodies."""
    from rest_framework.exceptions import ValidationError

    if isinstance(exc, ApplicationError):
        return exc.status_code, {"code": exc.code, "detail": exc.detail, **exc.extra}
    if isinstance(exc, ValidationError):
        field, message = _first_error(exc.detail)
        if field and len(field) > FIELD_SHOWN:  # a client's own key: not echoed back at any length
            field = field[:FIELD_SHOWN] + "…"
        body = {"code": "invalid", "detail": f"{field}: {message}" if field else message}
        if field:
            body["field"] = field
        return 400, body
    if isinstance(exc, redis.RedisError):
        logger.warning("Redis does not answer: %s: %s", type(exc).__name__, exc)
        return 503, {
            "code": "redis_unavailable",
            "detail": "Redis (the queues and the server's shared state) does not answer; try again shortly",
        }
    if isinstance(exc, DatabaseError):
        logger.warning("the database does not answer: %s: %s", type(exc).__name__, exc)
        return 503, {
            "code": "database_unavailable",
            "detail": "the database does not answer (or is locked); try again shortly",
        }
    return None


# An outage of Redis or the database: the client may try again after this many seconds.
RETRY_AFTER_OUTAGE_S = 5


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    from rest_framework.exceptions import APIException
    from rest_framework.response import Response
    from rest_framework.views import exception_handler

    answer = error_response(exc)
    if answer is not None:
        outage = answer[1]["code"] in ("redis_unavailable", "database_unavailable")
        return Response(
            answer[1], status=answer[0], headers={"Retry-After": str(RETRY_AFTER_OUTAGE_S)} if outage else None
        )
    response = exception_handler(exc, context)
    if response is not None and isinstance(exc, APIException):
        codes = exc.get_codes()
        response.data = {"code": codes if isinstance(codes, str) else "error", "detail": str(exc.detail)}
    return response
