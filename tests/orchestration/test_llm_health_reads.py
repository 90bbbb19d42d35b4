"""Reading the LLMs' health (GET /api/v1/llms, the metrics, their Prometheus view) counts nothing against
their breakers: the reading host may lack what the workers serving an LLM have (its model file, its key, the
Ollama on their own 127.0.0.1). Found by review: a dashboard polling from a web host without Ollama opened
the breaker of an LLM that served fine on its workers."""

from __future__ import annotations

import uuid

import redis

from balancer.health import checker
from balancer.load_balancer import PREFIX
from orchestration.runtime import configuration, load_balancer


def test_reading_the_llms_health_does_not_count_a_failed_check(api, edit_config, redis_url, monkeypatch):
    llm_id = f"away-{uuid.uuid4().hex[:8]}"
    unreachable = {
        "id": llm_id,
        "engine": "ollama",
        "source": "local",
        "model": "m",
        "base_url": "http://127.0.0.1:9",  # nothing listens: the check fails here
    }
    edit_config(lambda raw: raw["llms"].append(unreachable))
    monkeypatch.setattr(checker, "ttl_s", 0)  # every read checks again
    for url in ("/api/v1/llms", "/api/v1/metrics", "/metrics"):
        for _ in range(6):
            response = api.get(url)
            assert response.status_code == 200, (url, response.content[:300])
    listed = {llm["id"]: llm for llm in api.get("/api/v1/llms").json()["results"]}
    assert listed[llm_id]["health"]["ok"] is False  # shown as it is
    assert load_balancer().states(configuration())[llm_id]["breaker"] == "closed"
    client = redis.Redis.from_url(redis_url)
    assert not list(client.scan_iter(f"{PREFIX}*{llm_id}*"))  # no failure, no window, no health mark
