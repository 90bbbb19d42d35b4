"""GET /metrics: the metrics of orchestration/metrics.py in Prometheus' text format, with prometheus-client.

A module of its own so that only the web processes load prometheus-client.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import redis
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest

from agents.sandbox import STATES as SANDBOX_STATES
from balancer.load_balancer import OUTCOMES
from orchestration import mcp_handler
from orchestration.metrics import BOUNDS, aggregates, llms_or_empty, status_part, usage_part
from orchestration.packets import STATUSES
from orchestration.runtime import configuration


def _buckets(counts: Mapping[str, float], prefix: str) -> list[tuple[str, float]]:
    """Cumulative buckets at every second bound (a factor of 2), and +Inf."""
    cumulative = 0.0
    buckets = []
    for index, bound in enumerate(BOUNDS):
        cumulative += counts.get(f"{prefix}{index}", 0.0)
        if index % 2 == 0:
            buckets.append((f"{bound:.6g}", cumulative))
    cumulative += counts.get(f"{prefix}{len(BOUNDS)}", 0.0)
    buckets.append(("+Inf", cumulative))
    return buckets


def prometheus_families(snapshot: Mapping[str, Any]) -> Iterator[Any]:
    """The metric families of a GET /api/v1/metrics snapshot plus the aggregates' histograms; ``roles``
    names the configured roles ("profile/role")."""
    status, totals = snapshot["status"], snapshot["totals"]
    up = GaugeMetricFamily("aiagent_up", "Whether a part of the server answers (1) or not (0).", labels=["component"])
    up.add_metric(["web"], 1)
    up.add_metric(["redis"], 1 if status["redis"]["status"] == "ok" else 0)
    up.add_metric(["database"], 1 if status["database"]["status"] == "ok" else 0)
    yield up
    yield GaugeMetricFamily(
        "aiagent_workers", "Celery workers alive (heartbeat in Redis).", value=len(status["workers"])
    )
    sandbox = GaugeMetricFamily(
        "aiagent_worker_sandbox",
        "How QA's tests run on a worker that takes them: 1 for sandboxed, unsandboxed or unavailable.",
        labels=["worker", "state"],
    )
    for worker in status["workers"]:
        if report := worker.get("sandbox"):
            for state in SANDBOX_STATES:
                sandbox.add_metric([worker["name"], state], 1 if report["state"] == state else 0)
    yield sandbox
    depth = GaugeMetricFamily("aiagent_queue_depth", "Jobs waiting on a role's queue.", labels=["queue"])
    for queue, state in status["queues"].items():
        depth.add_metric([queue], state["depth"])
    yield depth
    pending = GaugeMetricFamily(
        "aiagent_channel_pending", "Messages of an MCP channel read and not yet acknowledged.", labels=["channel"]
    )
    for channel, state in status["channels"].items():
        pending.add_metric([channel], state["pending"])
    yield pending
    breaker = GaugeMetricFamily(
        "aiagent_llm_breaker_state", "An LLM's breaker: 1 for its current state.", labels=["llm", "state"]
    )
    healthy = GaugeMetricFamily("aiagent_llm_healthy", "An LLM's last health check passed (1) or not.", labels=["llm"])
    in_flight = GaugeMetricFamily("aiagent_llm_in_flight", "Calls an LLM is serving now.", labels=["llm"])
    for llm_id, state in status["llms"].items():
        for name in ("closed", "open", "half_open"):
            breaker.add_metric([llm_id, name], 1 if state["breaker"] == name else 0)
        healthy.add_metric([llm_id], 1 if state["healthy"] else 0)
        in_flight.add_metric([llm_id], state["in_flight"])
    yield from (breaker, healthy, in_flight)

    requests = CounterMetricFamily(
        "aiagent_llm_requests", "Engine calls per LLM, by outcome.", labels=["llm", "outcome"]
    )
    tokens = CounterMetricFamily("aiagent_llm_tokens", "Tokens per LLM, prompt or completion.", labels=["llm", "kind"])
    cost = CounterMetricFamily("aiagent_llm_estimated_cost", "Estimated cost of an api LLM's calls.", labels=["llm"])
    latency = HistogramMetricFamily(
        "aiagent_llm_latency_seconds", "Latency of an LLM's successful calls.", labels=["llm"]
    )
    ttft = HistogramMetricFamily(
        "aiagent_llm_time_to_first_token_seconds", "Time to an LLM's first token.", labels=["llm"]
    )
    role_requests = CounterMetricFamily(
        "aiagent_role_requests", "Engine calls per role, by outcome.", labels=["profile", "role", "outcome"]
    )
    role_latency = HistogramMetricFamily(
        "aiagent_role_latency_seconds", "Latency of a role's successful engine calls.", labels=["profile", "role"]
    )
    for scope, counts in sorted(totals.items()):
        kind, name = scope.split(":", 1)
        if kind == "llm":
            for outcome in OUTCOMES:
                requests.add_metric([name, outcome], counts.get(f"o:{outcome}", 0.0))
            tokens.add_metric([name, "prompt"], counts.get("pt", 0.0))
            tokens.add_metric([name, "completion"], counts.get("ct", 0.0))
            cost.add_metric([name], counts.get("cost", 0.0))
            latency.add_metric([name], _buckets(counts, "L"), counts.get("oklat", 0.0))
            ttft.add_metric([name], _buckets(counts, "T"), counts.get("ttft", 0.0))
        else:
            profile, role = name.split("/", 1)
            for outcome in OUTCOMES:
                role_requests.add_metric([profile, role, outcome], counts.get(f"o:{outcome}", 0.0))
            role_latency.add_metric([profile, role], _buckets(counts, "L"), counts.get("oklat", 0.0))
    yield from (requests, tokens, cost, latency, ttft, role_requests, role_latency)

    usage = snapshot["usage"]
    budget = GaugeMetricFamily("aiagent_budget_daily", "A profile's daily budget (rule 7).", labels=["profile"])
    spent = GaugeMetricFamily(
        "aiagent_budget_spent", "What a profile has spent today (UTC) against its daily budget.", labels=["profile"]
    )
    held = GaugeMetricFamily(
        "aiagent_budget_held", "The worst cost of a profile's calls in flight, held on its budget.", labels=["profile"]
    )
    for profile, state in usage["budgets"].items():
        budget.add_metric([profile], state["daily_budget"])
        if state["spent"] is not None:
            spent.add_metric([profile], state["spent"])
        if state["held"] is not None:
            held.add_metric([profile], state["held"])
    yield from (budget, spent, held)
    if usage["tasks"] is None or usage["loop_iterations"] is None:  # the database is away (aiagent_up says so)
        return
    tasks = GaugeMetricFamily("aiagent_tasks", "Stored tasks by role and status.", labels=["profile", "role", "status"])
    by_role = usage["tasks"]["by_role"]
    # Every status of every configured role (and of a role that is no longer configured but has tasks),
    # 0 where no task has it: a series that vanished when its last task moved on would read as "no data",
    # a gap in graphs that an alert such as aiagent_tasks{status="queued"} > 100 cannot tell from 0.
    for role_name in sorted({*snapshot["roles"], *by_role}):
        profile, role = role_name.split("/", 1)
        for status_name in STATUSES:
            tasks.add_metric([profile, role, status_name], by_role.get(role_name, {}).get(status_name, 0))
    yield tasks
    rounds = GaugeMetricFamily(
        "aiagent_loop_iterations", "Feedback-loop rounds over the stored tasks, by role.", labels=["profile", "role"]
    )
    for role_name, row in usage["loop_iterations"]["by_role"].items():
        rounds.add_metric(role_name.split("/", 1), row["iterations"])
    yield rounds


class _Snapshot:
    """A one-off collector: prometheus-client's registry asks it for its families once."""

    def __init__(self, snapshot: Mapping[str, Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        return prometheus_families(self.snapshot)


def prometheus_text() -> bytes:
    """The metrics in Prometheus' text format. Everything is read from Redis and the database, so
    every web process serves the same numbers whichever processes made the calls."""
    client = mcp_handler.client()
    status = status_part(client, llms_or_empty())
    try:
        totals = aggregates(client)[1] if status["redis"]["status"] == "ok" else {}
    except redis.RedisError:  # gone since the status's ping: the page still comes, saying so
        status["redis"] = {**status["redis"], "status": "unavailable"}
        totals = {}
    registry = CollectorRegistry(auto_describe=False)
    roles = [f"{profile.name}/{role}" for profile in configuration().profiles.values() for role in profile.roles]
    registry.register(_Snapshot({"status": status, "totals": totals, "usage": usage_part(totals), "roles": roles}))
    return generate_latest(registry)
