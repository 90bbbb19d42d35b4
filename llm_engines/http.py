"""Helpers for engines that talk HTTP: Retry-After and base URL checks."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


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
