"""The baseline jobs of the benchmarks: Celery tasks that do nothing but pass the flow on.

- ``bench.bare_echo`` (bench/overhead.py): says it ran.
- ``bench.bare_round_*`` (bench/loop_round.py): one feedback-loop round's shape with no work in it:
  a debug job, then a coder job, then a chord of three checks whose callback says it ran.
"""

import redis
from celery import chord, shared_task
from django.conf import settings

_client: redis.Redis | None = None


@shared_task(name="bench.bare_echo")
def bare_echo(key: str) -> None:
    _push(key)


def _push(key: str) -> None:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.REDIS_URL)
    _client.rpush(key, "1")


@shared_task(name="bench.bare_round_debug")
def bare_round_debug(key: str, queue: str) -> None:
    bare_round_coder.apply_async(args=[key, queue], queue=queue)


@shared_task(name="bench.bare_round_coder")
def bare_round_coder(key: str, queue: str) -> None:
    checks = [bare_round_check.signature(args=[name], queue=queue) for name in ("tests", "static", "review")]
    chord(checks)(bare_round_verdict.signature(args=[key], queue=queue))


@shared_task(name="bench.bare_round_check")
def bare_round_check(name: str) -> dict:
    return {"check": name, "passed": True}


@shared_task(name="bench.bare_round_verdict")
def bare_round_verdict(results: list, key: str) -> None:
    _push(key)
