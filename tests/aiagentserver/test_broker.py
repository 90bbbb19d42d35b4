"""The broker's Redis transport (aiagentserver/broker.py): kombu's, publishing through one Redis client
per channel, used by every connection of the Celery app, with the URL read as before."""

from __future__ import annotations

import base64
import json
import uuid

import redis
from kombu import Connection

from aiagentserver import broker


def test_the_apps_connections_and_both_redis_schemes_use_the_transport(redis_url):
    from aiagentserver.celery import app

    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, broker.Transport)
    secure = Connection("rediss://127.0.0.1:6380/0")
    assert isinstance(secure.transport, broker.Transport)
    assert secure.ssl  # kombu's reading of rediss:// is kept: TLS (with its own default when none is set)


def test_install_takes_effect_though_kombu_looked_the_scheme_up_before(monkeypatch):
    from kombu import transport
    from kombu.transport import redis as stock

    monkeypatch.setitem(transport.TRANSPORT_ALIASES, "redis", "kombu.transport.redis:Transport")
    monkeypatch.delitem(transport._transport_cache, "redis", raising=False)
    assert transport.get_transport_cls("redis") is stock.Transport  # looked up, and kept, before the install
    broker.install()
    assert transport.get_transport_cls("redis") is broker.Transport


def test_publishing_makes_one_redis_client_per_channel_not_one_per_message(redis_url, monkeypatch):
    """kombu made a redis.Redis for every message: 1.4 M instructions of a submission's 7.7 M."""
    from aiagentserver.celery import app

    made = []
    real_init = redis.Redis.__init__

    def counted(self, *args, **kwargs):
        made.append(kwargs.get("connection_pool"))
        real_init(self, *args, **kwargs)

    queue = f"test-broker-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)

    def publish(n: int) -> None:
        producer.publish({"n": n}, routing_key=queue, exchange="", serializer="json", retry=False)

    with app.producer_or_acquire() as producer:
        publish(0)  # the channel is opened, with its own clients, and the publishes' one is made
        monkeypatch.setattr(redis.Redis, "__init__", counted)
        for n in range(1, 21):
            publish(n)
        assert made == [], f"{len(made)} Redis clients made for 20 messages"
        producer.channel._disconnect_pools()  # as after a fork or a lost connection: a new pool, a new client
        publish(21)
        publish(22)
        assert made == [producer.channel.pool]
    messages = [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]
    bodies = [json.loads(base64.b64decode(message["body"])) for message in messages]  # kombu's Redis body encoding
    assert bodies == [{"n": n} for n in range(23)]  # each message delivered, in order
    client.delete(queue)
