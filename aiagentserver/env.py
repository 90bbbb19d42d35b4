"""Typed readers for settings that come from the environment.

Each helper fails loudly with the variable's name and the offending value, so a
typo in a deployment is an error at start-up, not a surprise at run time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

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


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum of {minimum}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}={number} is above the maximum of {maximum}")
    return number


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (upper case), given in any case."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().upper() not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value.strip().upper()


class RedisURL(NamedTuple):
    url: str
    host: str
    port: int
    db: int | None  # None: the URL names none, and every client takes database 0


_REDIS_SCHEMES = ("redis", "rediss")
_REDIS_PATH = re.compile(r"/?|/([0-9]+)")  # kombu's rule; redis-py reads "/9x" as no database (0), kombu refuses it


def parse_redis_url(name: str, value: str, *, database_required: bool = False) -> RedisURL:
    """``value`` (from the variable ``name``) as a Redis URL that redis-py and kombu (Celery's broker) read
    alike: ``redis://`` or ``rediss://`` (TLS), a host, a port that is a number, a path that is empty or
    ``/<database number>``, and no query but TLS options. Celery takes any other scheme for its default
    broker, AMQP, and waits for it for ever (and its broker has no ``unix://``); a database that redis-py
    cannot read, such as ``/9x``, it replaces by 0 where kombu refuses it. ``database_required``: the URL
    must name its database (one that is flushed)."""
    url = value.strip()

    def refuse(reason: str) -> ImproperlyConfigured:
        return ImproperlyConfigured(
            f"{name}={redact_url(value)!r} is not a Redis URL (redis://host:port/db, or rediss:// for TLS): {reason}"
        )

    scheme, separator, _ = url.partition("://")
    if not separator or scheme not in _REDIS_SCHEMES:  # in lower case: redis-py refuses REDIS://
        raise refuse("it does not start with redis:// or rediss://")
    try:
        parts = urlsplit(url)
    except ValueError as error:  # a broken [IPv6] host
        raise refuse(f"its host is not valid ({error})") from None
    if not parts.hostname:
        raise refuse("it names no host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise refuse(f"its port {parts.netloc.rpartition(':')[2]!r} is not a number from 1 to 65535")
    path = _REDIS_PATH.fullmatch(parts.path)
    if path is None:
        raise refuse(f"its database {parts.path.lstrip('/')!r} is not a number")
    # Each client fails on an option the other takes (kombu on socket_timeout, redis-py on connect_timeout),
    # and redis-py would take a db= over the path; the TLS options (ssl_cert_reqs, ...) both pass to TLS.
    options = sorted(key for key in parse_qs(parts.query) if not (scheme == "rediss" and key.startswith("ssl_")))
    if options:
        raise refuse(f"its query has {', '.join(options)}: only rediss:// takes options, its ssl_* ones")
    db = None if path[1] is None else int(path[1])
    if database_required and db is None:
        raise refuse("it names no database (/<number>), and this one is flushed")
    return RedisURL(url=url, host=parts.hostname, port=port or 6379, db=db)


def redact_url(url: str) -> str:
    """``url`` with its password, if it has one, replaced by ``***``: for messages and logs. A password with
    a raw ``/`` or ``@`` in it (not percent-encoded) is hidden too."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    before_query = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    userinfo, at, after = rest[:before_query].rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{separator}{userinfo.split(':', 1)[0]}:***@{after}{rest[before_query:]}"


def env_redis_url(name: str, default: str) -> str:
    """A Redis URL (see ``parse_redis_url``)."""
    value = os.environ.get(name)
    if value is None:
        return default
    return parse_redis_url(name, value).url


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
