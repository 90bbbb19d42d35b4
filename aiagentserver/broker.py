"""The Celery broker's Redis transport: kombu's own, with one Redis client per channel for its publishes.

kombu's Redis channel makes a new ``redis.Redis`` for every message it publishes (``conn_or_acquire``);
with redis-py 8 that builds the client's table of some 340 response callbacks each time, which cost
1.4 M instructions of a submission's 7.7 M (two messages: the job and its ``task-sent`` event), and as
much again for every event a worker sends about a job. The client made for a channel's connection pool
is kept for the channel's later publishes (a ``redis.Redis`` is safe to share between threads; its
connections come from the pool), and made anew when kombu replaces the pool (after a fork, or a lost
connection).

``install()`` makes the ``redis://`` and ``rediss://`` schemes name this transport, so that every
connection of the Celery app (web processes, workers, Flower) uses it and reads the broker URL as
before (``rediss://`` keeps its TLS).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

SCHEMES = ("redis", "rediss")


class Channel(kombu_redis.Channel):
    _publish_client: tuple[Any, Any] | None = None  # (the pool it was made for, the client)

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        kept = self._publish_client
        if kept is None or kept[0] is not pool:
            kept = self._publish_client = (pool, self._create_client())
        yield kept[1]


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make the Redis schemes of broker URLs name ``Transport``, for the connections made from now on."""
    path = f"{__name__}:Transport"
    resolved = getattr(kombu_transport, "_transport_cache", {})  # kombu's memo of the classes it looked up
    for scheme in SCHEMES:
        kombu_transport.TRANSPORT_ALIASES[scheme] = path
        resolved.pop(scheme, None)  # a scheme looked up before (an import that made a connection) too
