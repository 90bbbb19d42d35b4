"""What the benchmarks share: an isolated server environment, free ports, percentiles, the Redis option."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"


def redis_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="the Redis to use (nothing in it is flushed; this run's queues have names of their own)",
    )


def server_environment(work: Path, config: dict, redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of a server run in ``work`` as in production (``DEBUG`` off, so Django keeps no
    query log) with ``config`` as its configuration.json: its own database, state directory and
    Redis names, throttling counted at a rate no benchmark reaches. ``extra`` adds or overrides."""
    (work / "configuration.json").write_text(json.dumps(config))
    return {
        **os.environ,
        "DEBUG": "0",
        "SECRET_KEY": uuid.uuid4().hex * 2,
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_COOKIES": "0",
        "VAR_DIR": str(work),
        "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
        "TASKS_STATE_DIR": str(work / "state"),
        "AIAGENT_CONFIG": str(work / "configuration.json"),
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        "API_THROTTLE_RATE": "1000000/min",
        "API_SUBMIT_THROTTLE_RATE": "1000000/min",
        "DJANGO_SETTINGS_MODULE": "aiagentserver.settings",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def wait_for_worker(app, name: str, deadline: float) -> None:
    """Until the Celery worker ``name`` answers a ping; exits the benchmark past ``deadline`` (monotonic)."""
    while not app.control.ping(destination=[name], timeout=0.5):
        if time.monotonic() > deadline:
            sys.exit(f"the worker {name} did not start")


def wait_for_web(port: int, deadline: float) -> http.client.HTTPConnection:
    """A keep-alive connection to the web server on ``port`` once /healthz answers; exits past ``deadline``."""
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            return connection
        except OSError:
            connection.close()
            if time.monotonic() > deadline:
                sys.exit(f"the web server on port {port} did not start")
            time.sleep(0.2)
