"""An Ollama-API server for the tests, on top of the real SmolLM2 model.

No Ollama binary can be installed on the machines that run these tests, so
the suite provides this server instead. It implements the documented parts of
the Ollama API that the engine uses, with the real model behind them:

- GET /api/version
- GET /api/tags: one model, ``smollm2:135m``
- POST /api/chat: ``stream`` true (the default: NDJSON lines, then a line with
  ``done`` and the counts) or false; ``format`` as a JSON schema; ``options``
  ``num_predict``, ``temperature``, ``stop``; ``images`` in messages are refused
  (the model has no vision). A prompt over the context is a 400, as Ollama does
  when it is not allowed to truncate. ``tools``: where Ollama lets the model's
  own template decide whether to call one, this server always calls one of them,
  its name and arguments generated under a grammar from the tools' schemas, and
  answers it in ``message.tool_calls`` (streamed: one line with the calls, then
  the final line). A tool's answer comes back as a ``tool`` message with
  ``tool_name``.

Run: python -m tests.llm_engines.ollama_api_server --port PORT --model-path FILE
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_NAME = "smollm2:135m"


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Handler(BaseHTTPRequestHandler):
    llama = None
    lock = threading.Lock()
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/api/version":
            self._json(200, {"version": "0.6.3-test"})
        elif self.path == "/api/tags":
            details = {"format": "gguf", "family": "llama", "parameter_size": "135M", "quantization_level": "Q4_1"}
            model = {"name": MODEL_NAME, "model": MODEL_NAME, "modified_at": now(), "size": 98362432,
                     "digest": "0" * 64, "details": details}  # fmt: skip
            self._json(200, {"models": [model]})
        else:
            self._json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/api/chat":
            self._json(404, {"error": f"no route {self.path}"})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if body.get("model") not in (MODEL_NAME, MODEL_NAME.split(":")[0]):
            self._json(404, {"error": f'model "{body.get("model")}" not found, try pulling it first'})
            return
        messages = body.get("messages") or []
        if any(message.get("images") for message in messages):
            self._json(400, {"error": f"{MODEL_NAME} does not support images"})
            return
        options = body.get("options") or {}
        request = {
            "messages": [
                {"role": m["role"], "content": m.get("content") or json.dumps(m.get("tool_calls") or "")}
                for m in messages
            ],
            "max_tokens": options.get("num_predict", 128),
            "temperature": options.get("temperature", 0.8),
            "stop": options.get("stop") or None,
        }
        if isinstance(body.get("format"), dict):
            request["response_format"] = {"type": "json_object", "schema": body["format"]}
        elif body.get("format") == "json":
            request["response_format"] = {"type": "json_object"}
        stream = body.get("stream", True)
        started = time.perf_counter_ns()
        tools = body.get("tools") or []
        if tools:
            choices = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": tool["function"]["name"]},
                        "arguments": tool["function"].get("parameters") or {"type": "object"},
                    },
                    "required": ["name", "arguments"],
                }
                for tool in tools
            ]
            request["response_format"] = {"type": "json_object", "schema": {"anyOf": choices}}
        with self.lock:
            try:
                if tools:
                    self._tool_call(request, started, stream)
                elif stream:
                    self._stream(request, started)
                else:
                    self._whole(request, started)
            except ValueError as exc:  # llama.cpp: the prompt does not fit the context
                self._json(400, {"error": f"input length exceeds the context length: {exc}"})

    def _final(self, started: int, prompt_tokens: int, completion_tokens: int, reason: str) -> dict:
        return {
            "model": MODEL_NAME, "created_at": now(), "done": True, "done_reason": reason,
            "total_duration": time.perf_counter_ns() - started, "load_duration": 0,
            "prompt_eval_count": prompt_tokens, "prompt_eval_duration": 0,
            "eval_count": completion_tokens, "eval_duration": 0,
        }  # fmt: skip

    def _whole(self, request: dict, started: int) -> None:
        response = self.llama.create_chat_completion(**request)
        usage = response["usage"]
        final = self._final(started, usage["prompt_tokens"], usage["completion_tokens"],
                            response["choices"][0]["finish_reason"])  # fmt: skip
        final["message"] = {"role": "assistant", "content": response["choices"][0]["message"]["content"] or ""}
        self._json(200, final)

    def _tool_call(self, request: dict, started: int, stream: bool) -> None:
        response = self.llama.create_chat_completion(**request)
        usage = response["usage"]
        call = json.loads(response["choices"][0]["message"]["content"])
        message = {"role": "assistant", "content": "",
                   "tool_calls": [{"function": {"name": call["name"], "arguments": call["arguments"]}}]}  # fmt: skip
        final = self._final(started, usage["prompt_tokens"], usage["completion_tokens"], "stop")
        if not stream:
            self._json(200, {**final, "message": message})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._line({"model": MODEL_NAME, "created_at": now(), "message": message, "done": False})
        self._line({**final, "message": {"role": "assistant", "content": ""}})
        self.wfile.write(b"0\r\n\r\n")

    def _stream(self, request: dict, started: int) -> None:
        chunks = self.llama.create_chat_completion(**request, stream=True)
        first = next(chunks)  # a prompt that does not fit fails here, before any header is sent
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        count, reason = 0, "stop"
        for chunk in [first, *chunks]:
            choice = chunk["choices"][0]
            reason = choice.get("finish_reason") or reason
            text = choice["delta"].get("content") or ""
            if text:
                count += 1
                self._line({"model": MODEL_NAME, "created_at": now(),
                            "message": {"role": "assistant", "content": text}, "done": False})  # fmt: skip
        prompt_tokens = self.llama.n_tokens - count
        final = self._final(started, prompt_tokens, count, reason)
        final["message"] = {"role": "assistant", "content": ""}
        self._line(final)
        self.wfile.write(b"0\r\n\r\n")

    def _line(self, body: dict) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--n-ctx", type=int, default=512)
    args = parser.parse_args()
    from llama_cpp import Llama

    Handler.llama = Llama(model_path=args.model_path, n_ctx=args.n_ctx, n_threads=2, verbose=False)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
