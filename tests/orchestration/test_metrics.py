"""The metrics: GET /api/v1/metrics and GET /metrics after a run of known tasks, through a real Celery
worker, a real ``mcp_consume`` aggregating the metrics channel, and the scripted engine."""

from __future__ import annotations

import json
import math
import time
import uuid

import pytest
import redis
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from orchestration import mcp_handler, metrics
from orchestration.models import Task
from orchestration.packets import STATUSES
from orchestration.runtime import configuration
from tests.conftest import wait_for
from tests.orchestration.scripted import use_script

SUMMARY = {
    "match": r'Reply with JSON: \{"summary"',
    "reply": {"summary": "A cat sat on a mat.", "key_points": ["a cat", "a mat"]},
    "delay_s": 0.05,
}


def submit(api, text: str) -> str:
    response = api.post(
        "/api/v1/productivity/summarizer",
        data=json.dumps({"payload": {"input": text}}),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    return response.json()["task_id"]


def drained(api, timeout: float = 30) -> dict:
    """The metrics once the aggregator has read and acknowledged everything on the metrics channel."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = api.get("/api/v1/metrics").json()
        channel = snapshot["status"]["channels"][mcp_handler.METRICS]
        if (channel["lag"] == 0 and channel["pending"] == 0) or time.monotonic() > deadline:
            return snapshot
        time.sleep(0.2)


def role_requests(snapshot: dict, role: str) -> int:
    return snapshot["performance"]["roles"].get(role, {}).get("since_start", {}).get("requests", 0)


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_metrics_after_a_run_of_known_tasks(api, celery_worker, mcp_consumer, edit_config, tmp_path, redis_url):
    llm = f"scripted-{uuid.uuid4().hex[:8]}"
    failing = {"match": "FAIL-ME", "reply": "", "error": "unavailable"}
    use_script(edit_config, tmp_path / "script.json", [failing, SUMMARY], llm_id=llm)
    before = drained(api)

    ok_ids = [submit(api, f"The cat number {n} sat on the mat.") for n in range(4)]
    failed_id = submit(api, "FAIL-ME please.")
    done = [wait_for(task_id, timeout=60) for task_id in ok_ids]
    failed = wait_for(failed_id, timeout=60)
    assert {packet["status"] for packet in done} == {"succeeded"}
    assert failed["status"] == "failed"
    steps = [event for packet in done for event in packet["history"] if event["event"] == "step"]
    # One call per successful task; the failing one is tried once and retried STEP_RETRIES (2) times.
    assert len(steps) == 4
    assert sum(event["event"] == "step_retry" for event in failed["history"]) == 2

    # A bad sample on the channel is acknowledged and not counted.
    client = redis.Redis.from_url(redis_url)
    bad = {"llm": "no-such-llm", "profile": "productivity", "role": "summarizer", "outcome": "ok", "latency_s": 1}
    client.xadd(mcp_handler.METRICS, mcp_handler.encode(mcp_handler.LLM_CALL, bad))

    drained(api)
    time.sleep(1)  # nothing is counted twice afterwards
    snapshot = drained(api)

    usage = snapshot["usage"]["llms"][llm]
    assert usage == {
        "requests": 7,
        "prompt_tokens": sum(event["detail"]["tokens"]["prompt"] for event in steps),
        "completion_tokens": sum(event["detail"]["tokens"]["completion"] for event in steps),
    }
    for window in ("since_start", "last_5_minutes"):
        figures = snapshot["performance"]["llms"][llm][window]
        assert figures["requests"] == 7 and figures["errors"] == 3, figures
        assert figures["outcomes"] == {"ok": 4, "unavailable": 3}
        assert figures["error_rate"] == round(3 / 7, 4)
        # Latencies are plausible: each call waited 50 ms; histogram estimates are within a bucket.
        assert 35 <= figures["latency_ms"]["p50"] <= figures["latency_ms"]["p95"] <= 2000, figures
        assert 50 <= figures["latency_ms"]["mean"] <= 2000
        assert 35 <= figures["time_to_first_token_ms"]["p50"] <= 2000
        assert figures["tokens_per_second"] > 0
    role = "productivity/summarizer"
    assert role_requests(snapshot, role) - role_requests(before, role) == 7
    assert snapshot["usage"]["tasks"]["by_role"][role] == {"succeeded": 4, "failed": 1}
    assert snapshot["usage"]["tasks"]["by_status"]["succeeded"] == 4
    assert snapshot["usage"]["tasks"]["total"] == 5
    assert snapshot["usage"]["estimated_cost"]["by_llm"] == {}  # no api LLM is enabled in the suite

    status = snapshot["status"]
    assert status["redis"]["status"] == "ok" and status["database"]["status"] == "ok"
    worker = next(w for w in status["workers"] if w["name"] == celery_worker.name)
    assert "productivity.summarizer" in worker["queues"]
    # It consumes QA's queue: its heartbeat says whether the tests run sandboxed (once its probe is done).
    deadline = time.monotonic() + 30
    while worker["sandbox"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
        worker = next(w for w in metrics.workers(mcp_handler.client()) if w["name"] == celery_worker.name)
    assert worker["sandbox"]["state"] == "sandboxed"
    assert status["queues"]["productivity.summarizer"] == {"depth": 0, "workers": [celery_worker.name]}
    assert status["llms"][llm]["breaker"] == "closed" and status["llms"][llm]["healthy"] is True
    assert status["channels"][mcp_handler.METRICS]["pending"] == 0

    # The same counters in Prometheus' format, read with prometheus-client's own parser.
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }
    assert samples[("aiagent_llm_requests_total", (("llm", llm), ("outcome", "ok")))] == 4
    sandbox = {state: samples[("aiagent_worker_sandbox", (("state", state), ("worker", celery_worker.name)))]
               for state in ("sandboxed", "unsandboxed", "unavailable")}  # fmt: skip
    assert sandbox == {"sandboxed": 1, "unsandboxed": 0, "unavailable": 0}
    assert samples[("aiagent_llm_requests_total", (("llm", llm), ("outcome", "unavailable")))] == 3
    assert samples[("aiagent_llm_tokens_total", (("kind", "prompt"), ("llm", llm)))] == usage["prompt_tokens"]
    assert samples[("aiagent_llm_latency_seconds_count", (("llm", llm),))] == 4
    assert samples[("aiagent_llm_latency_seconds_bucket", (("le", "+Inf"), ("llm", llm)))] == 4
    assert samples[("aiagent_tasks", (("profile", "productivity"), ("role", "summarizer"), ("status", "failed")))] == 1
    assert samples[("aiagent_queue_depth", (("queue", "productivity.summarizer"),))] == 0
    assert samples[("aiagent_up", (("component", "redis"),))] == 1
    assert samples[("aiagent_llm_breaker_state", (("llm", llm), ("state", "closed")))] == 1


@pytest.mark.django_db
def test_metrics_need_a_token(client):
    assert client.get("/api/v1/metrics").status_code == 401
    assert client.get("/metrics").status_code == 401


def test_percentiles_are_estimated_within_a_bucket():
    values = [0.1 + 0.9 * i / 999 for i in range(1000)]  # 100 ms to 1 s, evenly
    counts: dict[str, float] = {}
    for value in values:
        key = f"L{metrics._bucket(value)}"
        counts[key] = counts.get(key, 0) + 1
    for q in (0.5, 0.95):
        exact = sorted(values)[math.ceil(q * len(values)) - 1]
        assert abs(metrics.quantile(counts, "L", q) - exact) / exact < 0.42
    assert metrics.quantile({}, "L", 0.5) is None
    # A bucket that holds one value gives it exactly.
    single = metrics._bucket(2.934)
    assert metrics.quantile({f"L{single}": 1, f"Ls{single}": 2.934}, "L", 0.5) == 2.934


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"llm": "nope"}, "llm"),
        ({"role": "nope"}, "role"),
        ({"outcome": "great"}, "outcome"),
        ({"latency_s": -1}, "latency_s"),
        ({"latency_s": float("nan")}, "latency_s"),
        ({"prompt_tokens": True}, "prompt_tokens"),
        ({"completion_tokens": 1.5}, "completion_tokens"),
        ({"at": "now"}, "at"),
        # Beyond any real call: totals that never expire would add up to infinity, which JSON cannot carry.
        ({"cost": 1.5e308}, "cost"),
        ({"latency_s": 10**401}, "latency_s"),  # too large for a float: refused, not an OverflowError
        ({"time_to_first_token_s": float("inf")}, "time_to_first_token_s"),
        ({"prompt_tokens": 10**400}, "prompt_tokens"),
        ({"at": 1e300}, "at"),
    ],
)
def test_a_bad_sample_is_refused_naming_its_field(change, field):
    sample = {
        "llm": "smollm2-135m", "profile": "productivity", "role": "summarizer", "outcome": "ok",
        "latency_s": 0.5, "time_to_first_token_s": None, "prompt_tokens": 10, "completion_tokens": 5,
        "cost": 0.0, "at": time.time(),
    }  # fmt: skip
    metrics.check_sample(sample)
    with pytest.raises(ValueError, match=f"^{field}: "):
        metrics.check_sample({**sample, **change})


@pytest.mark.django_db
def test_redis_going_away_between_the_ping_and_the_counters_still_serves_the_metrics_page(api, monkeypatch):
    """It answered a 500; the page says instead that Redis is down."""
    import redis as redis_py

    from orchestration import prometheus

    def gone(_client):
        raise redis_py.ConnectionError("Connection refused")

    monkeypatch.setattr(prometheus, "aggregates", gone)
    response = api.get("/metrics")
    assert response.status_code == 200
    assert 'aiagent_up{component="redis"} 0.0' in response.content.decode()


@pytest.mark.parametrize("failing", ["workers", "queue_depths", "channels", "aggregates"])
def test_redis_going_away_after_the_ping_still_answers_every_metrics_view(api, admin_client, monkeypatch, failing):
    """Only a failed ping was taken for Redis being down: a read after it that failed made /metrics and
    /api/v1/metrics a 503 and the admin's page a 500, though the docs promise an answer saying so."""
    import redis as redis_py

    from orchestration import metrics, prometheus

    def gone(*args, **kwargs):
        raise redis_py.ConnectionError("Connection refused")

    monkeypatch.setattr(metrics, failing, gone)
    monkeypatch.setattr(prometheus, "aggregates", metrics.aggregates)
    answer = api.get("/api/v1/metrics")
    assert answer.status_code == 200 and answer.json()["status"]["redis"]["status"] == "unavailable"
    page = api.get("/metrics")
    assert page.status_code == 200 and 'aiagent_up{component="redis"} 0.0' in page.content.decode()
    assert admin_client.get("/admin/metrics/").status_code == 200


def test_tokens_per_second_is_the_successful_calls_tokens_over_their_time(redis_url):
    """A cancelled call's tokens were divided by the successful calls' time only: one call at 50 tokens/s
    and one cancelled after 300 tokens in 6 s made 200 tokens/s."""
    client = redis.Redis.from_url(redis_url)
    now = 1_000_000_000.0  # a window of its own: no other test counts calls then
    sample = {
        "llm": "smollm2-135m", "profile": "productivity", "role": "summarizer", "prompt_tokens": 10,
        "cost": 0.0, "time_to_first_token_s": None, "at": now,
    }  # fmt: skip
    pipe = client.pipeline()
    metrics.aggregate(pipe, {**sample, "outcome": "ok", "latency_s": 2.0, "completion_tokens": 100}, now=now)
    metrics.aggregate(pipe, {**sample, "outcome": "cancelled", "latency_s": 6.0, "completion_tokens": 300}, now=now)
    metrics.aggregate(pipe, {**sample, "outcome": "timeout", "latency_s": 9.0, "completion_tokens": 40}, now=now)
    pipe.execute()
    figures = metrics.summary(metrics.aggregates(client, now=now)[2]["llm:smollm2-135m"])
    assert figures["tokens_per_second"] == 50.0
    assert figures["completion_tokens"] == 440  # every call's tokens are still counted
    # Totals counted before the successful calls' tokens were kept apart: their speed is not known.
    assert metrics.summary({"n": 1, "okn": 1, "oklat": 2.0, "ct": 100})["tokens_per_second"] is None


@pytest.mark.django_db
def test_prometheus_task_series_read_0_for_a_status_no_task_has(api):
    """A role's series of a status was exposed only while some task had it, so it vanished (stale in
    Prometheus, "no data" to an alert) instead of reading 0 when its last task moved on."""
    moment = timezone.now()
    Task.objects.create(
        task_id=uuid.uuid4(), profile="productivity", role="summarizer", status="succeeded", version=1,
        packet={}, created_at=moment, updated_at=moment,
    )  # fmt: skip
    response = api.get("/metrics")
    assert response.status_code == 200
    tasks = {
        (sample.labels["profile"], sample.labels["role"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        if family.name == "aiagent_tasks"
        for sample in family.samples
    }
    assert tasks[("productivity", "summarizer", "succeeded")] == 1
    assert tasks[("productivity", "summarizer", "running")] == 0
    configured = {(p.name, role) for p in configuration().profiles.values() for role in p.roles}
    assert set(tasks) == {(profile, role, status) for profile, role in configured for status in STATUSES}
    assert sum(tasks.values()) == 1


def test_prometheus_says_how_qas_tests_run_on_each_worker_that_takes_them(api, sandbox_reports):
    """An alert on a worker where QA's tests cannot run (no bubblewrap) needs a series that says so."""
    response = api.get("/metrics")
    states = {
        sample.labels["worker"]: sample.labels["state"]
        for family in text_string_to_metric_families(response.content.decode())
        if family.name == "aiagent_worker_sandbox"
        for sample in family.samples
        if sample.value == 1 and sample.labels["worker"] in sandbox_reports
    }
    assert states == {"sandboxed@test": "sandboxed", "unsandboxed@test": "unsandboxed", "nobwrap@test": "unavailable"}


@pytest.mark.django_db
@pytest.mark.skipif(connection.vendor != "sqlite", reason="reads SQLite's query plans")
def test_the_metrics_count_recent_and_looped_tasks_from_their_indexes_alone():
    """The count of the tasks finished in the last 5 minutes walked every finished task's row (no index
    had updated_at) and the loop rounds read every row: each scrape grew with the history kept."""
    plans = {}
    for read in (metrics.task_counts, metrics.loop_iterations):
        with CaptureQueriesContext(connection) as queries:
            read()
        for query in queries.captured_queries:
            with connection.cursor() as cursor:
                cursor.execute("EXPLAIN QUERY PLAN " + query["sql"])
                plans[query["sql"]] = " | ".join(row[-1] for row in cursor.fetchall())
    recent = next(plan for sql, plan in plans.items() if "updated_at" in sql)
    assert "USING COVERING INDEX task_status_updated_idx (status=? AND updated_at>?)" in recent, recent
    rounds = next(plan for sql, plan in plans.items() if "iteration" in sql)
    assert "USING COVERING INDEX task_loop_idx" in rounds, rounds
    # No metrics query reads the table's rows (and with them, on SQLite, the packets' pages).
    assert all("COVERING INDEX" in plan for plan in plans.values()), plans


@pytest.mark.django_db
def test_the_metrics_show_each_budgets_spending_today(api, admin_client, edit_config):
    """An operator paying for API LLMs saw the estimated cost since the aggregator started, not what a
    profile had spent today against its daily budget, which decides when its roles go local (rule 7)."""
    from balancer.spending import DatabaseLedger
    from orchestration.runtime import load_balancer

    edit_config(lambda raw: raw["profiles"]["productivity"].update(daily_budget=2.0))
    balancer = load_balancer()
    day = balancer.budget("productivity", 2.0)["day"]
    DatabaseLedger().add("productivity", day, 0.5)  # spent today, and Redis has lost its count
    for key in balancer.redis.scan_iter("aiagent:lb:spend*:productivity:*"):
        balancer.redis.delete(key)
    try:
        snapshot = api.get("/api/v1/metrics").json()
        assert snapshot["usage"]["budgets"] == {
            "productivity": {"day": day, "daily_budget": 2.0, "spent": 0.5, "held": 0.0, "left": 1.5}
        }
        families = {
            family.name: {sample.labels["profile"]: sample.value for sample in family.samples}
            for family in text_string_to_metric_families(api.get("/metrics").content.decode())
            if family.name.startswith("aiagent_budget_")
        }
        assert families == {
            "aiagent_budget_daily": {"productivity": 2.0},
            "aiagent_budget_spent": {"productivity": 0.5},
            "aiagent_budget_held": {"productivity": 0.0},
        }
        page = admin_client.get("/admin/metrics/").content.decode()
        assert "<tr><td>productivity</td><td>2.0</td><td>0.5</td><td>0.0</td><td>1.5</td></tr>" in page
    finally:
        for key in balancer.redis.scan_iter("aiagent:lb:spend*:productivity:*"):
            balancer.redis.delete(key)
