"""Typed readers for settings that come from the environment.

Each helper fails loudly with the variable's name and the offending value, so a
typo in a deployment is an error at start-up, not a surprise at run time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None else value


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean: use one of 1/0, true/false, yes/no, on/off")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum of {minimum}")
    return number


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (upper case), given in any case."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().upper() not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value.strip().upper()


def env_redis_url(name: str, default: str) -> str:
    """A Redis URL, ``redis://`` or ``rediss://`` (TLS): Celery would take an empty or other value for its
    default broker, AMQP, and wait for it for ever; and its broker has no ``unix://``."""
    value = os.environ.get(name)
    if value is None:
        return default
    url = value.strip()
    if "://" not in url or url.split("://", 1)[0].lower() not in ("redis", "rediss"):
        raise ImproperlyConfigured(f"{name}={value!r} is not a Redis URL (redis://host:port/db, or rediss:// for TLS)")
    return url


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_path(name: str, default: Path, *, base: Path) -> Path:
    """A path from the environment; a relative one is taken relative to ``base``."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    path = Path(value.strip()).expanduser()
    return path if path.is_absolute() else base / path


_RATE = re.compile(r"(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)")
_OFF = {"off", "none"}


def env_rate(name: str, default: str | None) -> str | None:
    """A request rate such as ``1200/min`` (per s, min, hour or day), in the form DRF's throttles read;
    None (no limit) for ``off``."""
    value = os.environ.get(name)
    if value is None:
        return default
    text = value.strip().lower()
    if text in _OFF:
        return None
    match = _RATE.fullmatch(text)
    if match is None or int(match[1]) < 1:
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a rate: use requests per period, such as 1200/min or 20/s (or off)"
        )
    return f"{int(match[1])}/{match[2]}"
