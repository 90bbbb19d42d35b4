"""Any OpenAI-compatible chat API (OpenAI, vLLM, llama.cpp's server, LM Studio...) through the official client.

The API key is read from the environment variable that the configuration
names (``api_key_env``); it is never stored, logged or returned, and an error
message of the server that quotes it back has it redacted.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import openai

from llm_engines.base import ChatChunk, ChatOptions, ChatResult, Engine, Health, Message
from llm_engines.errors import (
    ContextTooLong,
    EngineAuthError,
    EngineBadRequest,
    EngineConfigurationError,
    EngineError,
    EngineRateLimited,
    EngineTimeout,
    EngineUnavailable,
)
from llm_engines.http import MALFORMED_REPLY, base_url_problems, retry_after_seconds, timeout_problems

# Words with which OpenAI-compatible servers say a prompt does not fit.
_CONTEXT_MARKERS = ("context length", "context window", "maximum context", "too many tokens", "exceed")


# How a server takes a JSON schema: OpenAI's ``json_schema`` response format, or
# ``json_object`` with a ``schema`` (llama-cpp-python's server and others).
STRUCTURED_OUTPUT = ("json_schema", "json_object")


def tool_call(call_id: str | None, name: str, arguments: str | None) -> dict[str, Any]:
    """One tool call in the OpenAI shape; a server that gave no id gets one."""
    return {
        "id": call_id or f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments or "{}"},
    }


class OpenAIEngine(Engine):
    name = "openai"
    supports_tools = True

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = None,
        context_length: int = 8192,
        request_timeout: float = 120.0,
        structured_output: str = "json_schema",
    ) -> None:
        self.model = model
        self.structured_output = structured_output
        self.base_url = base_url
        self.context_length = context_length
        api_key = None
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise EngineAuthError(f"the environment variable {api_key_env} is not set", engine=self.name)
        self._api_key = api_key
        # A local server needs no key, but the client insists on one.
        self.client = openai.OpenAI(
            api_key=api_key or "no-key", base_url=base_url, max_retries=0, timeout=request_timeout
        )

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any]) -> dict[str, str]:
        problems = {**super().validate_settings(settings), **base_url_problems(settings), **timeout_problems(settings)}
        if settings.get("structured_output", "json_schema") not in STRUCTURED_OUTPUT:
            problems["structured_output"] = f"must be one of {', '.join(STRUCTURED_OUTPUT)}"
        return problems

    def _error(self, exc: openai.OpenAIError) -> EngineError:
        message = self._redact(getattr(exc, "message", None) or str(exc))
        if isinstance(exc, openai.APITimeoutError):
            return EngineTimeout(f"no answer in time from {self.base_url or 'the API'}", engine=self.name)
        if isinstance(exc, openai.APIConnectionError):
            return EngineUnavailable(f"cannot reach {self.base_url or 'the API'}: {message}", engine=self.name)
        if isinstance(exc, openai.RateLimitError):
            retry_after = retry_after_seconds(exc.response.headers)
            return EngineRateLimited(f"rate limited: {message}", engine=self.name, retry_after=retry_after)
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return EngineAuthError(f"refused the credentials: {message}", engine=self.name)
        if isinstance(exc, openai.NotFoundError):
            return EngineConfigurationError(
                f"{self.base_url or 'the API'} does not serve {self.model}: {message}", engine=self.name
            )
        if isinstance(exc, openai.APIStatusError):
            if exc.status_code >= 500:
                return EngineUnavailable(f"server error {exc.status_code}: {message}", engine=self.name)
            if any(marker in message.lower() for marker in _CONTEXT_MARKERS):
                return ContextTooLong(message, engine=self.name)
            return EngineBadRequest(f"{exc.status_code}: {message}", engine=self.name)
        return EngineError(message, engine=self.name)

    def _malformed(self, exc: Exception) -> EngineUnavailable:
        detail = self._redact(f"{type(exc).__name__}: {exc}")[:300]
        return EngineUnavailable(
            f"the reply from {self.base_url or 'the API'} is not a chat completion ({detail})", engine=self.name
        )

    def _redact(self, text: str) -> str:
        """``text`` without the key: some servers quote the Authorization header in their error messages, and
        this message goes into the task's history, the LLM's health and the logs."""
        return text.replace(self._api_key, "[redacted]") if self._api_key else text

    def _request(self, messages: Sequence[Message], options: ChatOptions) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(message) for message in messages],
            "temperature": options.temperature,
        }
        if options.max_tokens is not None:
            request["max_tokens"] = options.max_tokens
        if options.top_p is not None:
            request["top_p"] = options.top_p
        if options.tools:
            request["tools"] = [dict(tool) for tool in options.tools]
            if options.tool_choice is not None:
                request["tool_choice"] = options.tool_choice
        if options.stop:
            request["stop"] = list(options.stop)
        if options.timeout:
            request["timeout"] = options.timeout
        if options.json_schema is not None:
            schema = dict(options.json_schema)
            if self.structured_output == "json_schema":
                request["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
            else:
                request["response_format"] = {"type": "json_object", "schema": schema}
        return request

    def chat(self, messages: Sequence[Message], options: ChatOptions | None = None) -> ChatResult:
        options = options or ChatOptions()
        started = time.perf_counter()
        try:
            response = self.client.chat.completions.create(**self._request(messages, options))
            choice = response.choices[0]
            usage = response.usage
            calls = choice.message.tool_calls or []
            text = choice.message.content or ""
            if not isinstance(text, str):
                raise TypeError(f"content is a {type(text).__name__}")
            return ChatResult(
                text=text,
                model=response.model or self.model,
                prompt_tokens=_count(getattr(usage, "prompt_tokens", 0)),
                completion_tokens=_count(getattr(usage, "completion_tokens", 0)),
                latency_s=time.perf_counter() - started,
                finish_reason=choice.finish_reason,
                tool_calls=tuple(
                    tool_call(call.id, call.function.name, call.function.arguments)
                    for call in calls
                    if getattr(call, "function", None) is not None
                ),
            )
        except openai.OpenAIError as exc:
            # Not chained: the client's exception may quote the key, and a logged traceback would print it.
            raise self._error(exc) from None
        except MALFORMED_REPLY as exc:
            # A 200 that is not a chat completion (truncated JSON, an HTML page, an error object, no choices):
            # the LLM's server is at fault, and the balancer counts it and fails over, as for a 5xx.
            raise self._malformed(exc) from None

    def stream(self, messages: Sequence[Message], options: ChatOptions | None = None) -> Iterator[ChatChunk]:
        options = options or ChatOptions()
        started = time.perf_counter()
        first_at = None
        parts: list[str] = []
        finish_reason = None
        model = self.model
        usage = None
        calls: dict[int, dict[str, str]] = {}  # the tool calls' deltas, joined by index
        received = False
        try:
            chunks = self.client.chat.completions.create(
                **self._request(messages, options), stream=True, stream_options={"include_usage": True}
            )
            with chunks:
                for chunk in chunks:
                    received = True
                    model = chunk.model or model
                    usage = chunk.usage or usage
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    finish_reason = choice.finish_reason or finish_reason
                    text = choice.delta.content if choice.delta else None
                    for delta in (choice.delta.tool_calls if choice.delta else None) or []:
                        # The id and the name come whole (in the call's first delta), the arguments in pieces.
                        index = delta.index if isinstance(delta.index, int) else 0
                        call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
                        call["id"] = call["id"] or delta.id or ""
                        if delta.function is not None:
                            call["name"] = call["name"] or delta.function.name or ""
                            call["arguments"] += delta.function.arguments or ""
                    if text:
                        if not isinstance(text, str):
                            raise TypeError(f"content is a {type(text).__name__}")
                        if first_at is None:
                            first_at = time.perf_counter()
                        parts.append(text)
                        yield ChatChunk(text=text)
        except openai.OpenAIError as exc:
            # Not chained: the client's exception may quote the key, and a logged traceback would print it.
            raise self._error(exc) from None
        except httpx.TimeoutException:
            raise EngineTimeout(f"the stream from {self.base_url or 'the API'} stalled", engine=self.name) from None
        except (httpx.HTTPError, *MALFORMED_REPLY) as exc:
            # The connection broke mid-stream, or the server sent something that is not a chunk.
            message = self._redact(f"the stream from {self.base_url or 'the API'} broke: {type(exc).__name__}: {exc}")
            raise EngineUnavailable(message[:500], engine=self.name) from None
        if not received:  # a 200 with no event in it (an HTML page, say): not an empty answer
            raise EngineUnavailable(
                f"the stream from {self.base_url or 'the API'} held no chat completion chunk", engine=self.name
            )
        yield ChatChunk(
            text="",
            result=ChatResult(
                text="".join(parts),
                model=model,
                prompt_tokens=_count(getattr(usage, "prompt_tokens", 0)),
                completion_tokens=_count(getattr(usage, "completion_tokens", None), default=len(parts)),
                latency_s=time.perf_counter() - started,
                time_to_first_token_s=None if first_at is None else first_at - started,
                finish_reason=finish_reason,
                tool_calls=tuple(
                    tool_call(call["id"], call["name"], call["arguments"]) for _, call in sorted(calls.items())
                ),
            ),
        )

    def health(self) -> Health:
        started = time.perf_counter()
        try:
            served = [item.id for item in self.client.models.list(timeout=5)]
        except openai.NotFoundError:
            # Some OpenAI-compatible servers do not list models: reachable is all we can tell.
            return Health(True, "reachable (the server does not list its models)", time.perf_counter() - started)
        except openai.OpenAIError as exc:
            return Health(False, str(self._error(exc)), time.perf_counter() - started)
        elapsed = time.perf_counter() - started
        if self.model not in served:
            return Health(False, f"model {self.model} is not served (served: {', '.join(served[:10])})", elapsed)
        return Health(True, f"{self.model} served", elapsed)


def _count(value: Any, default: int = 0) -> int:
    """A token count from the reply: a whole number of at least 0, or ``default`` (a server that sends none,
    null or text)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
