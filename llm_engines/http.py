"""Helpers for engines that talk HTTP: Retry-After, a call's timeout, and base URL checks."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

# What reading a reply that is not the shape it should be raises (the clients hand over what the server sent):
# a body that is not JSON (ValueError), a list or a number where an object is expected (TypeError), a part
# missing (AttributeError, KeyError), no choices (IndexError), JSON nested past what the parser follows
# (RecursionError). The server is at fault.
MALFORMED_REPLY = (AttributeError, TypeError, IndexError, KeyError, ValueError, RecursionError)

# The longest wait a server's Retry-After is taken for: the balancer cools the LLM down that long, and a
# value beyond any real one (1e12 s, inf) would disable it for ever and put its cooldown past the
# dates Python can write.
MAX_RETRY_AFTER_S = 3600.0


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), from 0 to
    ``MAX_RETRY_AFTER_S``; None when there is none or it does not parse (NaN included)."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return _bounded(float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return _bounded(float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError):
            return None
        return _bounded(when.timestamp() - time.time())


def _bounded(seconds: float) -> float:
    if seconds != seconds:  # NaN
        raise ValueError("not a number")
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def call_timeout(timeout: float | None, request_timeout: float) -> float:
    """A call's timeout: the caller's (the time left before its deadline), capped by the operator's
    ``request_timeout``; the latter alone when the caller gave none."""
    return request_timeout if timeout is None or timeout <= 0 else min(timeout, request_timeout)


def timeout_problems(settings: Mapping[str, Any]) -> dict[str, str]:
    """``request_timeout``: seconds, more than 0 (its type is checked with the engine's other settings)."""
    value = settings.get("request_timeout")
    if isinstance(value, int | float) and not isinstance(value, bool) and not 0 < value <= 86400:
        return {"request_timeout": "must be more than 0 seconds, and at most a day"}
    return {}


def base_url_problems(settings: Mapping[str, Any]) -> dict[str, str]:
    base_url = settings.get("base_url")
    if base_url is None:
        return {}
    parts = urlsplit(str(base_url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return {"base_url": "must be an http:// or https:// URL with a host"}
    if parts.username or parts.password or parts.query:
        # Credentials belong in the environment (api_key_env), never in the configuration.
        return {"base_url": "must not carry credentials or a query string: name the key in api_key_env"}
    return {}
