"""Ollama through the official ``ollama`` client: chat, streaming, images, structured output.

Messages arrive in the OpenAI shape; images must be ``data:`` URLs, which are
passed to Ollama as base64 in the message's ``images``.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import ollama
import pydantic

from llm_engines.base import (
    ChatChunk,
    ChatOptions,
    ChatResult,
    Engine,
    Health,
    Message,
    Watchdog,
    estimate_completion_tokens,
    estimate_tokens,
    text_parts,
)
from llm_engines.errors import (
    ContextTooLong,
    EngineAuthError,
    EngineBadRequest,
    EngineCancelled,
    EngineConfigurationError,
    EngineError,
    EngineRateLimited,
    EngineTimeout,
    EngineUnavailable,
)
from llm_engines.http import (
    MALFORMED_REPLY,
    base_url_problems,
    call_timeout,
    retry_after_seconds,
    timeout_problems,
)

DEFAULT_HOST = "http://127.0.0.1:11434"
# What a call to the ollama client raises that ``OllamaEngine._error`` turns into an engine error.
_FAILURES = (ollama.ResponseError, ConnectionError, httpx.HTTPError, pydantic.ValidationError, *MALFORMED_REPLY)
# The ollama client takes its timeout once, at creation: one client per timeout in whole seconds (rounded
# up), the most recently used ones kept. Its timeout bounds each read: a stream is also stopped at the first
# line past the call's timeout, so that a server that keeps sending cannot run past it.
MAX_CLIENTS = 32


def _arguments(text: str) -> dict[str, Any]:
    """A tool call's arguments, a JSON text in the OpenAI shape, as the object Ollama takes."""
    try:
        arguments = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise EngineBadRequest(f"a tool call's arguments are not JSON: {exc}", engine="ollama") from None
    if not isinstance(arguments, dict):
        raise EngineBadRequest("a tool call's arguments must be a JSON object", engine="ollama")
    return arguments


def to_ollama_message(message: Message, tool_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One message in Ollama's shape. ``tool_names`` maps the ids of earlier tool calls to their
    functions: Ollama knows a tool's answer by the function's name, OpenAI by the call's id."""
    content = message.get("content")
    if message.get("tool_calls"):
        calls = [
            {"function": {"name": call["function"]["name"], "arguments": _arguments(call["function"]["arguments"])}}
            for call in message["tool_calls"]
        ]
        text = text_parts(content)
        return {"role": message["role"], "content": text, "tool_calls": calls}
    if message["role"] == "tool":
        converted = {"role": "tool", "content": text_parts(content)}
        name = (tool_names or {}).get(message.get("tool_call_id", ""))
        if name:
            converted["tool_name"] = name
        return converted
    if not isinstance(content, list):
        return {"role": message["role"], "content": content or ""}
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        if part.get("type") == "text":
            texts.append(part.get("text", ""))
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if not url.startswith("data:") or ";base64," not in url:
                raise EngineBadRequest("Ollama takes images as data: URLs with base64 content", engine="ollama")
            images.append(url.split(";base64,", 1)[1])
        else:
            raise EngineBadRequest(f"unsupported content part {part.get('type')!r}", engine="ollama")
    converted: dict[str, Any] = {"role": message["role"], "content": "\n".join(texts)}
    if images:
        converted["images"] = images
    return converted


def thinking(message: Any) -> str:
    """A reply message's thinking, which Ollama gives apart from its content (``message.thinking``, whole or a
    piece of a stream) for a model that thinks; "" when there is none."""
    value = getattr(message, "thinking", None)
    return value if isinstance(value, str) else ""


def tool_calls(message: Any) -> tuple[dict[str, Any], ...]:
    """The tool calls of an Ollama reply message, in the OpenAI shape (Ollama gives them no id)."""
    return tuple(
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.function.name, "arguments": json.dumps(dict(call.function.arguments or {}))},
        }
        for call in (getattr(message, "tool_calls", None) or [])
    )


class OllamaEngine(Engine):
    """Tools: Ollama takes ``tools`` but not ``tool_choice``; the model decides whether to call one.

    Thinking: the request leaves ``think`` out. Ollama then has a model that can think do so, and gives its
    thinking in ``message.thinking`` (older versions leave it in the content, as <think>…</think>), which the
    engine passes on apart from the text; ``think: true`` would be a 400 ("does not support thinking") for
    every model that cannot."""

    name = "ollama"
    supports_tools = True

    def __init__(
        self,
        *,
        model: str,
        base_url: str = DEFAULT_HOST,
        context_length: int = 2048,
        request_timeout: float = 120.0,
        keep_alive: str | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.context_length = context_length
        self.request_timeout = request_timeout
        self.keep_alive = keep_alive
        self._clients: OrderedDict[float, ollama.Client] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any]) -> dict[str, str]:
        return {**super().validate_settings(settings), **base_url_problems(settings), **timeout_problems(settings)}

    def _client(self, timeout: float) -> ollama.Client:
        """The client for a timeout (``MAX_CLIENTS``). Rounded up to the second, not to a coarse step: a
        call with 61 s left before its deadline was given 120 s. A client dropped from the cache is not
        closed, as a call of another thread may still use it; its connections go with it."""
        key = float(max(1, math.ceil(timeout)))
        with self._lock:
            if key in self._clients:
                self._clients.move_to_end(key)
            else:
                self._clients[key] = ollama.Client(
                    host=self.base_url, timeout=key, event_hooks={"response": [Watchdog.on_response]}
                )
                if len(self._clients) > MAX_CLIENTS:
                    self._clients.popitem(last=False)
            return self._clients[key]

    def _error(self, exc: Exception) -> EngineError:
        if isinstance(exc, pydantic.ValidationError) and not exc.title.endswith("Response"):
            # The client refused to build the request (a tool's schema, a message it cannot take).
            reason = exc.errors()[0]["msg"]
            return EngineBadRequest(f"the ollama client refused the request: {reason}", engine=self.name)
        if isinstance(exc, MALFORMED_REPLY):
            # A reply that is not one (not JSON, a list, a field of the wrong type): the server is at fault,
            # and the balancer counts it and fails over, as for a 5xx.
            detail = f"{type(exc).__name__}: {exc}"[:300]
            return EngineUnavailable(f"the reply from {self.base_url} is not a chat reply ({detail})", engine=self.name)
        if isinstance(exc, httpx.TimeoutException):
            return EngineTimeout(f"no answer in time from {self.base_url}", engine=self.name)
        if isinstance(exc, (ConnectionError, httpx.TransportError)):
            return EngineUnavailable(f"cannot reach {self.base_url}: {exc}", engine=self.name)
        if isinstance(exc, ollama.ResponseError):
            status, message = exc.status_code, exc.error
            if not isinstance(message, str):  # a proxy's own error object, {"message": ...}, say
                message = json.dumps(message, default=str)
            # The client raises ResponseError "from None", but keeps the HTTP error as the context.
            headers = getattr(getattr(exc.__context__, "response", None), "headers", None)
            if status == 429:
                return EngineRateLimited(
                    f"rate limited: {message}", engine=self.name, retry_after=retry_after_seconds(headers)
                )
            if status >= 500 or status < 0:
                # Below 0: an error line in the middle of a streamed reply (the model's runner died, say).
                retry_after = retry_after_seconds(headers) if status == 503 else None
                return EngineUnavailable(f"server error {status}: {message}", engine=self.name, retry_after=retry_after)
            if status == 404:
                return EngineConfigurationError(
                    f"{self.base_url} does not have {self.model}: {message}", engine=self.name
                )
            if status in (401, 403):  # a proxy in front of Ollama that wants credentials
                return EngineAuthError(f"refused the credentials: {message}", engine=self.name)
            if "context" in message.lower():
                return ContextTooLong(message, engine=self.name)
            if "does not support" in message.lower():
                # "... does not support tools" (or images, thinking): the model, configured with a capability it
                # lacks, fails every such call; another LLM may serve it.
                return EngineConfigurationError(f"{self.model}: {message}", engine=self.name)
            return EngineBadRequest(f"{status}: {message}", engine=self.name)
        return EngineError(str(exc), engine=self.name)

    def _request(self, messages: Sequence[Message], options: ChatOptions) -> dict[str, Any]:
        tool_names = {
            call.get("id", ""): call["function"]["name"]
            for message in messages
            for call in message.get("tool_calls") or []
        }
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [to_ollama_message(message, tool_names) for message in messages],
            "options": {
                **({"num_predict": options.max_tokens} if options.max_tokens is not None else {}),
                **({"top_p": options.top_p} if options.top_p is not None else {}),
                "temperature": options.temperature,
                "num_ctx": self.context_length,
                **({"stop": list(options.stop)} if options.stop else {}),
            },
        }
        if options.json_schema is not None:
            request["format"] = dict(options.json_schema)
        if options.tools:
            request["tools"] = [dict(tool) for tool in options.tools]
        if self.keep_alive is not None:
            request["keep_alive"] = self.keep_alive
        return request

    def _result(
        self,
        response: Any,
        messages: Sequence[Message],
        options: ChatOptions,
        text: str,
        started: float,
        first_at: float | None,
        calls: tuple = (),
        reasoning: str = "",
    ) -> ChatResult:
        # A count Ollama leaves out is estimated: 0 tokens would make the call's tokens look slow (rule 5).
        prompt_tokens = response.prompt_eval_count
        if prompt_tokens is None:
            prompt_tokens = estimate_tokens(messages)
        completion_tokens = response.eval_count
        if completion_tokens is None:  # the thinking is tokens generated too
            completion_tokens = estimate_completion_tokens(reasoning + text, calls, max_tokens=options.max_tokens)
        return ChatResult(
            text=text,
            model=response.model or self.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=time.perf_counter() - started,
            time_to_first_token_s=None if first_at is None else first_at - started,
            finish_reason=response.done_reason,
            tool_calls=calls,
            reasoning=reasoning,
        )

    def chat(self, messages: Sequence[Message], options: ChatOptions | None = None) -> ChatResult:
        options = options or ChatOptions()
        request = self._request(messages, options)
        started = time.perf_counter()
        timeout = call_timeout(options.timeout, self.request_timeout)
        # As for a stream: the watchdog ends the call at its timeout, or when the caller cancels it, however
        # slowly the server sends its body.
        watchdog = Watchdog(timeout, options.cancel)
        try:
            with watchdog:
                response = self._client(timeout).chat(**request, stream=False)
            text = response.message.content or ""
            calls = tool_calls(response.message)
            return self._result(
                response, messages, options, text, started, None, calls, reasoning=thinking(response.message)
            )
        except _FAILURES as exc:
            if watchdog.fired:
                raise self._stopped(watchdog, timeout) from None
            raise self._error(exc) from exc

    def stream(self, messages: Sequence[Message], options: ChatOptions | None = None) -> Iterator[ChatChunk]:
        options = options or ChatOptions()
        request = self._request(messages, options)
        started = time.perf_counter()
        timeout = call_timeout(options.timeout, self.request_timeout)
        # The timeout is checked on every line, and a watchdog ends the call at its timeout (or when the caller
        # cancels it) if the server sends nothing that makes a line (whitespace, a line never ended).
        watchdog = Watchdog(timeout, options.cancel)
        first_at = None
        parts: list[str] = []
        thoughts: list[str] = []
        calls: tuple[dict[str, Any], ...] = ()
        last = None
        try:
            with watchdog:
                lines = self._client(timeout).chat(**request, stream=True)
                try:
                    for chunk in lines:
                        if time.perf_counter() - started > timeout:
                            raise EngineTimeout(
                                f"the stream from {self.base_url} ran past its timeout of {timeout:g}s",
                                engine=self.name,
                            )
                        last = chunk
                        calls += tool_calls(chunk.message)
                        # A thinking model's thinking comes first, apart from the text: timed as its first tokens.
                        thought = thinking(chunk.message)
                        if thought:
                            if first_at is None:
                                first_at = time.perf_counter()
                            thoughts.append(thought)
                            yield ChatChunk(text="", reasoning=thought)
                        text = chunk.message.content if chunk.message else ""
                        if text:
                            if first_at is None:
                                first_at = time.perf_counter()
                            parts.append(text)
                            yield ChatChunk(text=text)
                finally:
                    watchdog.disarm()
                    lines.close()  # the client's generator closes the response, whatever ends the loop
        except (*_FAILURES, EngineError) as exc:
            if watchdog.fired:
                raise self._stopped(watchdog, timeout) from None
            if isinstance(exc, EngineError):
                raise
            raise self._error(exc) from exc
        if last is None or not last.done:
            if watchdog.fired:  # the shut connection read as the end of the body: the reply is not whole
                raise self._stopped(watchdog, timeout)
            raise EngineUnavailable("the stream ended before the reply was done", engine=self.name)
        result = self._result(
            last, messages, options, "".join(parts), started, first_at, calls, reasoning="".join(thoughts)
        )
        yield ChatChunk(text="", result=result)

    def _stopped(self, watchdog: Watchdog, timeout: float) -> EngineError:
        """What a call that its watchdog ended raises, streamed or whole."""
        if watchdog.fired == "cancelled":
            return EngineCancelled(engine=self.name)
        return EngineTimeout(f"the reply from {self.base_url} ran past its timeout of {timeout:g}s", engine=self.name)

    def health(self) -> Health:
        started = time.perf_counter()
        try:
            listed = self._client(5.0).list()
            # A model without a name (a server's own shape) is none that it has.
            names = {model.model for model in listed.models if isinstance(model.model, str)}
        except MALFORMED_REPLY as exc:  # pydantic's ValidationError included: a reply that is not a model list
            detail = f"{type(exc).__name__}: {exc}"[:300]
            return Health(
                False, f"the reply from {self.base_url} is not a model list ({detail})", time.perf_counter() - started
            )
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as exc:
            return Health(False, str(self._error(exc)), time.perf_counter() - started)
        elapsed = time.perf_counter() - started
        wanted = {self.model, f"{self.model}:latest"}
        if not names & wanted:
            return Health(False, f"model {self.model} is not pulled (available: {', '.join(sorted(names))})", elapsed)
        return Health(True, f"{self.model} available", elapsed)
