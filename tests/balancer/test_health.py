"""The LLMs' health checks (balancer/health.py), with real engines against real servers that misbehave."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from balancer.configuration import parse_configuration
from balancer.health import HealthChecker
from llm_engines.base import Engine, Health
from llm_engines.registry import ENGINES


class BrokenCheckEngine(Engine):
    """An engine whose check fails in a way it did not foresee (a bug of its own)."""

    name = "t-broken"

    def __init__(self, *, model: str, context_length: int = 2048) -> None:
        self.model = model

    def stream(self, messages, options=None):
        raise NotImplementedError("only its health is checked")

    def health(self) -> Health:
        raise RuntimeError("the check has a bug")


class _Html(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = b"<html><body>Welcome to nginx!</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def html_url() -> Iterator[str]:
    """A web server that answers every GET with an HTML page (a base_url that points at the wrong server)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Html)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_check_that_raises_is_an_unhealthy_llm_not_a_failed_check_of_every_llm(monkeypatch, html_url):
    """One check that raised (an Ollama base_url that answers HTML gave a JSONDecodeError) made check()
    raise for every LLM: GET /api/v1/llms answered 500, and a worker's health loop counted no failure,
    not even the broken LLM's."""
    monkeypatch.setitem(ENGINES.entries, "t-broken", f"{__name__}.BrokenCheckEngine")
    config = parse_configuration(
        {
            "llms": [
                {"id": "t-fine", "engine": "instant", "source": "local", "model": "m"},
                {"id": "t-html", "engine": "ollama", "source": "local", "model": "m", "base_url": html_url},
                {"id": "t-broken", "engine": "t-broken", "source": "local", "model": "m"},
            ],
            "profiles": {"tp": {"roles": {"r": {"agent": "generic", "system_prompt": "s"}}}},
        }
    )
    failed = []
    results = HealthChecker(ttl_s=0).check(config, on_failure=lambda llm: failed.append(llm.id))
    assert results["t-fine"][0].ok
    assert not results["t-html"][0].ok
    assert "not a model list" in results["t-html"][0].detail
    assert not results["t-broken"][0].ok
    assert "RuntimeError: the check has a bug" in results["t-broken"][0].detail
    assert sorted(failed) == ["t-broken", "t-html"]
