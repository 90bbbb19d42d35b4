"""The baseline job for bench/overhead.py: a Celery task that does nothing but say it ran."""

import redis
from celery import shared_task
from django.conf import settings

_client: redis.Redis | None = None


@shared_task(name="bench.bare_echo")
def bare_echo(key: str) -> None:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.REDIS_URL)
    _client.rpush(key, "1")
