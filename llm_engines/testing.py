"""Engines for tests and benchmarks that measure everything but the model.

``instant`` answers at once: it echoes the last user message, and with a JSON
schema the smallest JSON that follows it. ``scripted`` answers from a script of rules. Neither
is part of the default configuration.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from llm_engines.base import ChatChunk, ChatOptions, ChatResult, Engine, Health, Message
from llm_engines.errors import EngineBadRequest, EngineTimeout, EngineUnavailable


def smallest_instance(schema: Mapping[str, Any]) -> Any:
    """The smallest value that follows a schema of the kinds the agents use (objects, arrays, strings
    with a length, enums, booleans, integers)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: smallest_instance(properties[name]) for name in schema.get("required", [])}
    if kind == "array":
        return [smallest_instance(schema["items"]) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        return "x" * max(1, schema.get("minLength", 0)) if "pattern" not in schema else "x"
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    return None


def _reply_chunks(text: str, messages: Sequence[Message], model: str, started: float) -> Iterator[ChatChunk]:
    """The reply as one chunk, then its result (tokens counted as words)."""
    first_token_s = time.perf_counter() - started
    yield ChatChunk(text=text)
    yield ChatChunk(
        text="",
        result=ChatResult(
            text=text,
            model=model,
            prompt_tokens=sum(len(str(m.get("content", "")).split()) for m in messages),
            completion_tokens=len(text.split()),
            latency_s=time.perf_counter() - started,
            time_to_first_token_s=first_token_s,
            finish_reason="stop",
        ),
    )


class InstantEngine(Engine):
    name = "instant"

    def __init__(self, *, model: str = "instant", context_length: int = 2048) -> None:
        self.model = model
        self.context_length = context_length

    def stream(self, messages: Sequence[Message], options: ChatOptions | None = None) -> Iterator[ChatChunk]:
        options = options or ChatOptions()
        self.refuse_tools(options)
        started = time.perf_counter()
        if options.json_schema is not None:
            text = json.dumps(smallest_instance(options.json_schema))
        else:
            last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
            text = f"echo: {last if isinstance(last, str) else json.dumps(last)}"
        yield from _reply_chunks(text, messages, self.model, started)

    def health(self) -> Health:
        return Health(True, "always ready", 0.0)


class ScriptedEngine(Engine):
    """Replies from a script, for tests of the flows around the model (the feedback loop, delegation).

    ``script`` names a JSON file ``{"rules": [{"match": "<regex>", "reply": <text or JSON value>}]}``.
    The first rule whose regex matches the conversation (every message's text, joined) gives the
    reply; a JSON value is sent as JSON text, and a text reply may use the match's groups as
    ``\\1``; ``"delay_s"`` makes the reply wait (a slow model; past the call's timeout it is an
    engine timeout), ``"error": "unavailable"`` makes the call fail as an engine that is down, and
    ``"error": "crash"`` kills the process that called it (an engine that crashes its process).
    The file is read on every call, so a test can change the script between tasks. No rule
    matching is a bad request: the step fails and says so.
    """

    name = "scripted"

    def __init__(self, *, script: str, model: str = "scripted", context_length: int = 8192) -> None:
        self.script = script
        self.model = model
        self.context_length = context_length

    def _reply(self, messages: Sequence[Message]) -> tuple[str, float, str | None]:
        conversation = "\n".join(
            part if isinstance(part, str) else json.dumps(part) for part in (m.get("content", "") for m in messages)
        )
        with open(self.script, encoding="utf-8") as file:
            rules = json.load(file)["rules"]
        for rule in rules:
            found = re.search(rule["match"], conversation, flags=re.DOTALL)
            if found:
                reply = rule["reply"]
                text = found.expand(reply) if isinstance(reply, str) else json.dumps(reply)
                return text, float(rule.get("delay_s", 0)), rule.get("error")
        raise EngineBadRequest(f"no rule of the script {self.script} matches the conversation")

    def stream(self, messages: Sequence[Message], options: ChatOptions | None = None) -> Iterator[ChatChunk]:
        started = time.perf_counter()
        self.refuse_tools(options or ChatOptions())
        text, delay, error = self._reply(messages)
        timeout = None if options is None else options.timeout
        if delay:
            time.sleep(delay if timeout is None else min(delay, timeout))
            if timeout is not None and delay > timeout:
                raise EngineTimeout(f"no reply within {timeout:g}s", engine=self.name)
        if error == "unavailable":
            raise EngineUnavailable("the scripted engine is down", engine=self.name)
        if error == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        yield from _reply_chunks(text, messages, self.model, started)

    def health(self) -> Health:
        return Health(True, "scripted", 0.0)
