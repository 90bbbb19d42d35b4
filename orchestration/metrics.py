"""The metrics: the aggregator of engine-call samples, and what GET /api/v1/metrics, GET /metrics
(orchestration/prometheus.py) and the admin's metrics page show.

The aggregator (``aggregate``) runs in ``manage.py mcp_consume``: it adds each sample read from
the ``ai-agent-server.metrics`` channel to hashes in Redis, in the transaction that acknowledges
the message, so that every call is counted exactly once whichever process made it. Per LLM and per
role there is one hash since the first sample (``since``) and one per 10-second bucket, kept for
the last 5 minutes. Latencies and times to first token are counted in histogram buckets (each
bound √2 times the one before, from 1 ms); percentiles are interpolated within a bucket, as
Prometheus' ``histogram_quantile`` does, so they are estimates within that bucket's width.

Task counts and loop iterations come from the database mirror; queue depths, workers and the
channels' lag from Redis; each LLM's health and breaker from the balancer. Every label is a
configured LLM, profile, role or queue, or one of a fixed set of values, so the label set stays
bounded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from django.db import DatabaseError, connection
from django.db.models import Count, Sum
from django.utils import timezone

from balancer.load_balancer import OUTCOMES
from orchestration import mcp_handler
from orchestration.models import Task
from orchestration.packets import FINISHED, STATUSES
from orchestration.runtime import configuration, load_balancer
from orchestration.selectors import llm_list

PREFIX = "aiagent:metrics:"
WORKERS = "aiagent:workers:"
WINDOW_S = 300
BUCKET_S = 10
# The histogram's upper bounds in seconds: 1 ms, then √2 times the one before, to about 50 minutes;
# a last bucket takes what is above.
BOUNDS = tuple(0.001 * math.sqrt(2) ** i for i in range(44))
_MAX_TOKENS = 10**9
# Upper bounds of a sample's numbers: far above any real call, low enough that the totals, which never
# expire, stay finite (two costs of 1e308 would add up to infinity, which JSON cannot carry).
_MAX_SECONDS = 7 * 86400.0
_MAX_COST = 1e6
_MAX_TIME = 1e10  # a Unix time, in the year 2286


# --- the aggregator -----------------------------------------------------------------------------


def _bucket(value: float) -> int:
    for index, bound in enumerate(BOUNDS):
        if value <= bound:
            return index
    return len(BOUNDS)


def _number(
    data: Mapping[str, Any], field: str, maximum: float, *, optional: bool = False, integer: bool = False
) -> float | None:
    value = data.get(field)
    if value is None and optional:
        return None
    # Compared, not passed to math.isfinite, which raises on an integer too large for a float; NaN and
    # the infinities fail the comparison.
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value <= maximum
        or (integer and value != int(value))
    ):
        kind = "a whole number" if integer else "a number"
        raise SampleError(f"{field}: must be {kind} from 0 to {maximum:,.0f}")
    return value if integer else float(value)


class SampleError(ValueError):
    """A sample that cannot be counted; the message names the field."""


def check_sample(data: Mapping[str, Any]) -> dict[str, Any]:
    """The sample with its fields checked, or ``SampleError`` naming the first bad one. The LLM and
    the role must be configured ones: they become metric labels, which must stay bounded."""
    config = configuration()
    for field in ("llm", "profile", "role", "outcome"):
        if not isinstance(data.get(field), str):
            raise SampleError(f"{field}: must be a string")
    if data["llm"] not in config.llms:
        raise SampleError(f"llm: {data['llm']!r} is not a configured LLM")
    direct = data["profile"] == data["role"] == ""  # a call that named its LLM (/v1/chat/completions)
    if not direct and (
        data["profile"] not in config.profiles or data["role"] not in config.profiles[data["profile"]].roles
    ):
        raise SampleError(f"role: {data['profile']}/{data['role']} is not a configured role")
    if data["outcome"] not in OUTCOMES:
        raise SampleError(f"outcome: must be one of {', '.join(OUTCOMES)}")
    return {
        "llm": data["llm"],
        "profile": data["profile"],
        "role": data["role"],
        "outcome": data["outcome"],
        "latency_s": _number(data, "latency_s", _MAX_SECONDS),
        "time_to_first_token_s": _number(data, "time_to_first_token_s", _MAX_SECONDS, optional=True),
        "prompt_tokens": int(_number(data, "prompt_tokens", _MAX_TOKENS, integer=True)),
        "completion_tokens": int(_number(data, "completion_tokens", _MAX_TOKENS, integer=True)),
        "cost": _number(data, "cost", _MAX_COST),
        "at": _number(data, "at", _MAX_TIME),
    }


def _scopes(sample: Mapping[str, Any]) -> tuple[str, ...]:
    """The aggregates a sample counts in: its LLM's, and its role's when it has one."""
    if not sample["role"]:
        return (f"llm:{sample['llm']}",)
    return f"llm:{sample['llm']}", f"role:{sample['profile']}/{sample['role']}"


def aggregate(pipe: Any, data: Mapping[str, Any], *, now: float | None = None) -> None:
    """Add one engine call's sample to the aggregates, as commands on ``pipe`` (a transaction)."""
    sample = check_sample(data)
    now = time.time() if now is None else now
    ok = sample["outcome"] == "ok"
    keys = [f"{PREFIX}total:{scope}" for scope in _scopes(sample)]
    # A sample older than the window (the aggregator was behind) counts only since the start.
    if sample["at"] > now - WINDOW_S - BUCKET_S:
        bucket = int(sample["at"] // BUCKET_S)
        keys += [f"{PREFIX}w:{bucket}:{scope}" for scope in _scopes(sample)]
    pipe.setnx(f"{PREFIX}since", now)
    pipe.sadd(f"{PREFIX}scopes", *_scopes(sample))
    for key in keys:
        pipe.hincrby(key, "n", 1)
        pipe.hincrby(key, f"o:{sample['outcome']}", 1)
        pipe.hincrby(key, "pt", sample["prompt_tokens"])
        pipe.hincrby(key, "ct", sample["completion_tokens"])
        if sample["cost"]:
            pipe.hincrbyfloat(key, "cost", sample["cost"])
        if ok:
            pipe.hincrby(key, "okn", 1)
            pipe.hincrbyfloat(key, "oklat", sample["latency_s"])
            # The speed is the successful calls' tokens over their time: the tokens of a cancelled or
            # failed call (counted in "ct") came in a time that "oklat" does not hold.
            pipe.hincrby(key, "okct", sample["completion_tokens"])
            _observe(pipe, key, "L", sample["latency_s"])
            if sample["time_to_first_token_s"] is not None:
                pipe.hincrby(key, "ttftn", 1)
                pipe.hincrbyfloat(key, "ttft", sample["time_to_first_token_s"])
                _observe(pipe, key, "T", sample["time_to_first_token_s"])
        if key.startswith(f"{PREFIX}w:"):
            pipe.expire(key, WINDOW_S + 6 * BUCKET_S)


def _observe(pipe: Any, key: str, prefix: str, value: float) -> None:
    """Count ``value`` in its histogram bucket, and add it to the bucket's sum (so that a bucket
    holding one value gives it exactly)."""
    bucket = _bucket(value)
    pipe.hincrby(key, f"{prefix}{bucket}", 1)
    pipe.hincrbyfloat(key, f"{prefix}s{bucket}", value)


# --- reading the aggregates ---------------------------------------------------------------------


def _decode(raw: Mapping[bytes, bytes]) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in raw.items()}


def _add(into: dict[str, float], more: Mapping[str, float]) -> None:
    for field, value in more.items():
        into[field] = into.get(field, 0.0) + value


def quantile(counts: Mapping[str, float], prefix: str, q: float) -> float | None:
    """The q-quantile of a histogram's buckets, interpolated within its bucket (exact when the
    bucket holds one value); None when empty."""
    per_bucket = [counts.get(f"{prefix}{i}", 0.0) for i in range(len(BOUNDS) + 1)]
    total = sum(per_bucket)
    if not total:
        return None
    target = q * total
    seen = 0.0
    for index, count in enumerate(per_bucket):
        if count and seen + count >= target:
            if count == 1 and f"{prefix}s{index}" in counts:
                return counts[f"{prefix}s{index}"]
            if index == len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[index - 1] if index else 0.0
            return lower + (BOUNDS[index] - lower) * (target - seen) / count
        seen += count
    return BOUNDS[-1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def summary(counts: Mapping[str, float]) -> dict[str, Any]:
    """What a set of counted calls shows: requests, errors, latency, time to first token, speed."""
    requests = int(counts.get("n", 0))
    succeeded = int(counts.get("okn", 0))
    errors = requests - succeeded - int(counts.get("o:cancelled", 0))  # a call its caller stopped did not fail
    ttft_count = counts.get("ttftn", 0)
    return {
        "requests": requests,
        "errors": errors,
        "error_rate": round(errors / requests, 4) if requests else None,
        "outcomes": {o: int(counts[f"o:{o}"]) for o in OUTCOMES if counts.get(f"o:{o}")},
        "latency_ms": {
            "p50": _ms(quantile(counts, "L", 0.50)),
            "p95": _ms(quantile(counts, "L", 0.95)),
            "mean": _ms(counts["oklat"] / succeeded) if succeeded else None,
        },
        "time_to_first_token_ms": {
            "p50": _ms(quantile(counts, "T", 0.50)),
            "p95": _ms(quantile(counts, "T", 0.95)),
            "mean": _ms(counts["ttft"] / ttft_count) if ttft_count else None,
        },
        # None for totals counted before "okct" was: their speed is not known.
        "tokens_per_second": round(counts["okct"] / counts["oklat"], 2)
        if counts.get("oklat") and "okct" in counts
        else None,
        "prompt_tokens": int(counts.get("pt", 0)),
        "completion_tokens": int(counts.get("ct", 0)),
        "estimated_cost": round(counts.get("cost", 0.0), 6),
    }


def aggregates(
    client: redis.Redis, *, now: float | None = None
) -> tuple[float | None, dict[str, dict], dict[str, dict]]:
    """When counting started, and per scope the counts since then and over the last 5 minutes."""
    now = time.time() if now is None else now
    scopes = sorted(s.decode() for s in client.smembers(f"{PREFIX}scopes"))
    buckets = range(int((now - WINDOW_S) // BUCKET_S) + 1, int(now // BUCKET_S) + 1)
    pipe = client.pipeline(transaction=False)
    pipe.get(f"{PREFIX}since")
    for scope in scopes:
        pipe.hgetall(f"{PREFIX}total:{scope}")
        for bucket in buckets:
            pipe.hgetall(f"{PREFIX}w:{bucket}:{scope}")
    replies = iter(pipe.execute())
    since = next(replies)
    total: dict[str, dict] = {}
    window: dict[str, dict] = {}
    for scope in scopes:
        total[scope] = _decode(next(replies))
        window[scope] = {}
        for _ in buckets:
            _add(window[scope], _decode(next(replies)))
    return (float(since) if since else None), total, window


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- workers, queues, channels ------------------------------------------------------------------


def worker_seen(
    client: redis.Redis,
    *,
    name: str,
    queues: Iterable[str],
    concurrency: int | None,
    ttl_s: int,
    sandbox: dict[str, Any] | None = None,
) -> None:
    """A worker's heartbeat: it is alive and consumes ``queues``, for ``ttl_s`` seconds; ``sandbox``, whether
    generated code runs on its host (None when it consumes no queue of a role that runs any)."""
    info = {"name": name, "queues": sorted(queues), "concurrency": concurrency, "pid": os.getpid(), "sandbox": sandbox}
    client.set(f"{WORKERS}{name}", json.dumps({**info, "seen_at": _iso(time.time())}), ex=ttl_s)


def worker_gone(client: redis.Redis, *, name: str) -> None:
    client.delete(f"{WORKERS}{name}")


def workers(client: redis.Redis) -> list[dict[str, Any]]:
    keys = sorted(client.scan_iter(f"{WORKERS}*", count=1000))
    values = client.mget(keys) if keys else []
    return [json.loads(value) for value in values if value]


# Kombu's Redis transport keeps a queue's jobs of priority 0 in a list named after it, and those of
# its other priority steps in lists with these suffixes.
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    queues = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for suffix in PRIORITY_SUFFIXES:
            pipe.llen(queue + suffix)
    lengths = iter(pipe.execute())
    return {queue: sum(next(lengths) for _ in PRIORITY_SUFFIXES) for queue in queues}


def channels(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Each channel's length, and how far behind the server's consumer group is."""
    states = {}
    for channel in mcp_handler.CHANNELS:
        state: dict[str, Any] = {"length": client.xlen(channel), "consumers": 0, "pending": 0, "lag": None}
        with contextlib.suppress(redis.ResponseError):  # no group yet: nothing consumes it
            for group in client.xinfo_groups(channel):
                if mcp_handler.text(group["name"]) == mcp_handler.GROUP:
                    state.update(consumers=group["consumers"], pending=group["pending"], lag=group.get("lag"))
        states[channel] = state
    return states


# --- the three parts ----------------------------------------------------------------------------


def _timed(check) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        check()
    except Exception as exc:  # any driver error means "not reachable" here
        return _unavailable(exc)
    return {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def _unavailable(exc: Exception) -> dict[str, str]:
    """A component's status when it did not answer, with why."""
    return {"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"[:300]}


def _database_check() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def status_part(client: redis.Redis, llms: list[dict[str, Any]]) -> dict[str, Any]:
    config = configuration()
    redis_state = _timed(client.ping)
    database = {**_timed(_database_check), "vendor": connection.vendor}
    part: dict[str, Any] = {
        "web": {"status": "ok", "host": socket.gethostname(), "pid": os.getpid()},
        "redis": redis_state,
        "database": database,
        "workers": [],
        "queues": {},
        "llms": {
            llm["id"]: {
                "toggle": llm["toggle"],
                "healthy": llm["health"]["ok"],
                "health_detail": llm["health"]["detail"],
                "breaker": llm["state"]["breaker"],
                "cooling_until": llm["state"]["cooling_until"],
                "in_flight": llm["state"]["in_flight"],
                "max_concurrency": llm["state"]["max_concurrency"],
            }
            for llm in llms
        },
        "channels": {},
    }
    if redis_state["status"] != "ok":
        return part
    try:
        found = workers(client)
        consumers: dict[str, list[str]] = {}
        for worker in found:
            for queue in worker["queues"]:
                consumers.setdefault(queue, []).append(worker["name"])
        depths = queue_depths(client, config.queues())
        found_channels = channels(client)
    except redis.RedisError as exc:  # gone since the ping: the page still comes, saying so
        part["redis"] = _unavailable(exc)
        return part
    part["workers"] = found
    part["queues"] = {queue: {"depth": depth, "workers": consumers.get(queue, [])} for queue, depth in depths.items()}
    part["channels"] = found_channels
    return part


def performance_part(since: float | None, total: dict[str, dict], window: dict[str, dict]) -> dict[str, Any]:
    part: dict[str, Any] = {"window_seconds": WINDOW_S, "since": _iso(since), "llms": {}, "roles": {}}
    for scope in sorted(total):
        kind, name = scope.split(":", 1)
        part["llms" if kind == "llm" else "roles"][name] = {
            "last_5_minutes": summary(window.get(scope, {})),
            "since_start": summary(total[scope]),
        }
    return part


def task_counts() -> dict[str, Any]:
    rows = Task.objects.values("profile", "role", "status").annotate(count=Count("task_id"))
    by_status = dict.fromkeys(STATUSES, 0)
    by_profile: dict[str, int] = {}
    by_role: dict[str, dict[str, int]] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + row["count"]
        by_profile[row["profile"]] = by_profile.get(row["profile"], 0) + row["count"]
        role = by_role.setdefault(f"{row['profile']}/{row['role']}", {})
        role[row["status"]] = role.get(row["status"], 0) + row["count"]
    since = timezone.now() - timedelta(seconds=WINDOW_S)
    # COUNT(*), not of a column: task_status_updated_idx then answers it alone.
    recent = Task.objects.filter(status__in=FINISHED, updated_at__gte=since).values("status").annotate(n=Count("*"))
    finished = dict.fromkeys(sorted(FINISHED), 0) | {row["status"]: row["n"] for row in recent}
    return {
        "total": sum(by_status.values()),
        "by_status": by_status,
        "by_profile": by_profile,
        "by_role": by_role,
        "finished_last_5_minutes": finished,
    }


def loop_iterations() -> dict[str, Any]:
    """Rounds of the feedback loop (and of feedback) over the tasks that ran any, per role."""
    rows = (
        Task.objects.filter(iteration__gt=0)
        .values("profile", "role")
        .annotate(tasks=Count("*"), iterations=Sum("iteration"))  # answered from task_loop_idx alone
    )
    by_role = {
        f"{row['profile']}/{row['role']}": {"tasks": row["tasks"], "iterations": row["iterations"]} for row in rows
    }
    total = sum(row["iterations"] for row in by_role.values())
    tasks = sum(row["tasks"] for row in by_role.values())
    return {
        "total": total,
        "tasks": tasks,
        "mean_per_task": round(total / tasks, 2) if tasks else None,
        "by_role": by_role,
    }


def _from_database(query):
    """A usage figure read from the database mirror; None when the database is away (the status part
    says so), so that the metrics still answer."""
    try:
        return query()
    except DatabaseError:
        return None


def budgets() -> dict[str, Any]:
    """Each profile with a ``daily_budget``: its spending today against it (rule 7), as the balancer
    reads it; ``spent`` is null when neither Redis nor the database answers."""
    part = {}
    for profile in configuration().profiles.values():
        if profile.daily_budget is None:
            continue
        try:
            part[profile.name] = load_balancer().budget(profile.name, profile.daily_budget)
        except (redis.RedisError, DatabaseError):
            part[profile.name] = {
                "day": None,
                "daily_budget": profile.daily_budget,
                "spent": None,
                "held": None,
                "left": None,
            }
    return part


def usage_part(total: dict[str, dict]) -> dict[str, Any]:
    config = configuration()
    llms = {}
    for llm_id in config.llms:
        counts = total.get(f"llm:{llm_id}", {})
        llms[llm_id] = {
            "requests": int(counts.get("n", 0)),
            "prompt_tokens": int(counts.get("pt", 0)),
            "completion_tokens": int(counts.get("ct", 0)),
        }
    api_costs = {
        llm.id: round(total.get(f"llm:{llm.id}", {}).get("cost", 0.0), 6)
        for llm in config.llms.values()
        if llm.source == "api"
    }
    return {
        "tasks": _from_database(task_counts),
        "llms": llms,
        "loop_iterations": _from_database(loop_iterations),
        "estimated_cost": {"total": round(sum(api_costs.values()), 6), "by_llm": api_costs},
        "budgets": budgets(),
    }


def llms_or_empty() -> list[dict[str, Any]]:
    """The LLM list with health and breakers; empty when Redis (which holds the breakers) is away."""
    try:
        return llm_list()
    except redis.RedisError:
        return []


def metrics_get() -> dict[str, Any]:
    """Everything GET /api/v1/metrics shows."""
    client = mcp_handler.client()
    status = status_part(client, llms_or_empty())
    since, total, window = None, {}, {}
    if status["redis"]["status"] == "ok":
        try:
            since, total, window = aggregates(client)
        except redis.RedisError as exc:  # gone since the status's ping
            status["redis"] = _unavailable(exc)
    return {
        "generated_at": _iso(time.time()),
        "status": status,
        "performance": performance_part(since, total, window),
        "usage": usage_part(total),
    }
