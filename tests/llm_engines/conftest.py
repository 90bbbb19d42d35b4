"""Fixtures of the engine tests: a misbehaving HTTP server for the error classes, and a closed port.

The real servers (llama-cpp-python's OpenAI-compatible server and the suite's Ollama-API server)
are in tests/conftest.py, for the end-to-end tests too."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import free_port


class _FaultHandler(BaseHTTPRequestHandler):
    mode = "ratelimit"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        # Read the request first: a connection closed on unread data is reset, and the client may lose the reply.
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.received.append(body)
        if self.mode == "strict":
            # ``refusal``: (status, JSON body) for a request with stream_options, or a list of (what the request
            # holds, status, JSON body), the first that matches answered.
            refusals = self.refusal if isinstance(self.refusal, list) else [(b'"stream_options"', *self.refusal)]
            for marker, status, reply in refusals:
                if marker in body:
                    self._json(status, reply)
                    return
        if self.mode in ("pieces", "strict"):
            # The reply's pieces one by one, ``interval`` apart, then the connection closes (HTTP/1.0: no length).
            status, content_type, pieces = self.canned
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.end_headers()
            for piece in pieces:
                self.wfile.write(piece)
                self.wfile.flush()
                time.sleep(self.interval)
            return
        if self.mode == "canned":
            status, content_type, body = self.canned
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in self.headers_out:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            return
        if self.mode == "badstream":
            self._bad_stream()
            return
        if self.mode == "hang":
            time.sleep(3)
        if self.mode == "notfound":
            status, error = 404, {"message": "The model `m` does not exist", "type": "invalid_request_error"}
        else:
            status, error = 429, {"message": "slow down", "type": "rate_limit"}
        self._json(status, {"error": error}, (("Retry-After", "7"),))

    def _json(self, status: int, reply: dict, headers: tuple = ()) -> None:
        body = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _bad_stream(self) -> None:
        """Two chunks of a chat completion stream, then a line that is not JSON."""
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "tok"}}]}  # fmt: skip
        body = (f"data: {json.dumps(chunk)}\n\n" * 2 + "data: {not json\n\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client that gave up (the timeout tests) leaves a broken pipe: that is the point.
        pass


@pytest.fixture
def fault_server() -> Iterator[callable]:
    """A real HTTP server on loopback that answers 429 with Retry-After: 7 (or 404 for an unknown
    model, in mode "notfound"), in mode "hang" after 3 s; in mode "badstream" a chat stream that breaks
    after two chunks; in mode "canned" every request with ``canned`` (status, content type, body) and
    ``headers``; in mode "pieces" with ``canned`` (status, content type, a list of pieces of the body),
    sent ``interval`` seconds apart, the connection closed after the last; in mode "strict" as "pieces", but
    ``refusal`` (status, JSON body) for a request that has ``stream_options`` (or a list of refusals, each
    with what the request holds to get it). ``received`` (an argument)
    collects the requests' bodies."""
    servers = []

    def start(
        mode: str,
        canned: tuple | None = None,
        headers: tuple = (),
        interval: float = 0.0,
        received: list | None = None,
        refusal: tuple | None = None,
    ) -> str:
        attributes = {"mode": mode, "canned": canned, "headers_out": headers, "interval": interval,
                      "received": received if received is not None else [], "refusal": refusal}  # fmt: skip
        handler = type("Handler", (_FaultHandler,), attributes)
        server = _QuietServer(("127.0.0.1", 0), handler)
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
