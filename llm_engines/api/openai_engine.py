"""Any OpenAI-compatible chat API (OpenAI, vLLM, llama.cpp's server, LM Studio...) through the official client.

The API key is read from the environment variable that the configuration
names (``api_key_env``); it is never stored, logged or returned, and an error
message of the server that quotes it back has it redacted.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import openai

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
)
from llm_engines.errors import (
    ContextTooLong,
    EngineAuthError,
    EngineBadRequest,
    EngineCancelled,
    EngineConfigurationError,
    EngineError,
    EngineQuotaExceeded,
    EngineRateLimited,
    EngineTimeout,
    EngineUnavailable,
    RequestTooLarge,
)
from llm_engines.http import (
    MALFORMED_REPLY,
    base_url_problems,
    call_timeout,
    retry_after_seconds,
    timeout_problems,
)

logger = logging.getLogger(__name__)

# Words with which OpenAI-compatible servers say a prompt does not fit.
_CONTEXT_MARKERS = ("context length", "context window", "maximum context", "too many tokens", "exceed")
# Finish reasons with which OpenAI-compatible servers end a reply they gave up on (vLLM and SGLang abort a
# request, some servers report an error so): what came is part of a reply, not a whole one.
_FAILED = ("abort", "error")
# The codes with which OpenAI says a model does not take a parameter, or a value of it, that was sent.
_UNSUPPORTED = ("unsupported_parameter", "unsupported_value")
# Where OpenAI-compatible servers put a reasoning model's thinking, apart from the reply's text, streamed and
# whole: DeepSeek's API and vLLM before its rename, reasoning_content; OpenRouter, later vLLM and Ollama's /v1,
# reasoning. Servers in between send both, with the same thinking: one is read, the first that has text.
_REASONING_FIELDS = ("reasoning_content", "reasoning")
# The parameters a caller of the OpenAI-compatible API chooses (the others are the server's own settings).
_CALLERS = ("top_p", "stop", "tools", "tool_choice")


# How a server takes a JSON schema: OpenAI's ``json_schema`` response format, or
# ``json_object`` with a ``schema`` (llama-cpp-python's server and others).
STRUCTURED_OUTPUT = ("json_schema", "json_object")


def tool_call(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    """One tool call in the OpenAI shape; a server that gave no id gets one, and arguments given as an object
    (not as JSON text, as OpenAI gives them) are written as JSON."""
    if arguments is not None and not isinstance(arguments, str):
        arguments = json.dumps(arguments)
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
        self.request_timeout = request_timeout
        api_key = None
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise EngineAuthError(f"the environment variable {api_key_env} is not set", engine=self.name)
        self._api_key = api_key
        # Streams ask for the usage in their last chunk (``stream_options``); a server that refuses the field
        # (Azure OpenAI before its 2024-05 API versions, servers that forbid unknown fields) is streamed
        # without it from its first refusal on, and the reply's tokens are counted as the stream's pieces.
        self._stream_usage = True
        # OpenAI's reasoning models (o-series, gpt-5) refuse ``max_tokens`` (they take ``max_completion_tokens``,
        # which older OpenAI-compatible servers do not know) and any temperature but their own: a call they
        # refuse so is sent again adapted, and so are this engine's later calls.
        self._token_limit = "max_tokens"
        self._send_temperature = True
        # A local server needs no key, but the client insists on one.
        self.client = openai.OpenAI(
            api_key=api_key or "no-key",
            base_url=base_url,
            max_retries=0,
            timeout=request_timeout,
            http_client=openai.DefaultHttpxClient(event_hooks={"response": [Watchdog.on_response]}),
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
            if "insufficient_quota" in (exc.code, exc.type):
                # No quota left on the account: waiting does not bring it back, another LLM may serve the call.
                return EngineQuotaExceeded(f"out of quota: {message}", engine=self.name)
            if "request too large" in message.lower():
                # Over the account's tokens per minute by itself: waiting does not help it, nor hurt the others.
                return RequestTooLarge(message, engine=self.name)
            retry_after = retry_after_seconds(exc.response.headers)
            return EngineRateLimited(f"rate limited: {message}", engine=self.name, retry_after=retry_after)
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return EngineAuthError(f"refused the credentials: {message}", engine=self.name)
        if isinstance(exc, openai.NotFoundError):
            return EngineConfigurationError(
                f"{self.base_url or 'the API'} does not serve {self.model}: {message}", engine=self.name
            )
        if isinstance(exc, openai.APIStatusError):
            # 408: the server gave up waiting for the request (a proxy, a busy server); sending it again may work.
            if exc.status_code >= 500 or exc.status_code == 408:
                retry_after = retry_after_seconds(exc.response.headers) if exc.status_code == 503 else None
                return EngineUnavailable(
                    f"server error {exc.status_code}: {message}", engine=self.name, retry_after=retry_after
                )
            if exc.status_code == 402:  # OpenRouter and others: no credits left on the account
                return EngineQuotaExceeded(f"out of credits: {message}", engine=self.name)
            if any(marker in message.lower() for marker in _CONTEXT_MARKERS):
                return ContextTooLong(message, engine=self.name)
            if getattr(exc, "code", None) in _UNSUPPORTED:
                if getattr(exc, "param", None) in _CALLERS:
                    # What the caller chose (a /v1 client's top_p or tools): the request's fault, not the LLM's.
                    return EngineBadRequest(f"{self.model} does not take the request: {message}", engine=self.name)
                # A setting of the server's own that the model does not take (a response format, say): every
                # call sent there fails so; another LLM may serve it.
                return EngineConfigurationError(f"{self.model} does not take the request: {message}", engine=self.name)
            return EngineBadRequest(f"{exc.status_code}: {message}", engine=self.name)
        if isinstance(exc, openai.APIError):
            # No status: an error event in a stream (vLLM and llama.cpp's server report a failing engine so), or a
            # reply the client could not read. The server is at fault, not the request.
            return EngineUnavailable(f"the server reported an error: {message}", engine=self.name)
        return EngineError(message, engine=self.name)

    def _stream_error(self, exc: Exception | None, watchdog: Watchdog, timeout: float) -> Exception:
        """What a call that failed raises: the watchdog's reason first (its shutting the connection made the
        read fail; a whole reply's call too), then the error of the client, of the connection or of a chunk
        that is not one."""
        where = self.base_url or "the API"
        if watchdog.fired == "timeout":
            return EngineTimeout(f"the reply from {where} ran past its timeout of {timeout:g}s", engine=self.name)
        if watchdog.fired == "cancelled":
            return EngineCancelled(engine=self.name)
        if isinstance(exc, openai.OpenAIError):
            return self._error(exc)
        assert exc is not None
        if isinstance(exc, httpx.TimeoutException):
            return EngineTimeout(f"the stream from {where} stalled", engine=self.name)
        if isinstance(exc, (httpx.HTTPError, *MALFORMED_REPLY)):
            # The connection broke mid-stream, or the server sent something that is not a chunk.
            message = self._redact(f"the stream from {where} broke: {type(exc).__name__}: {exc}")
            return EngineUnavailable(message[:500], engine=self.name)
        return exc

    def _malformed(self, exc: Exception, what: str = "a chat completion") -> EngineUnavailable:
        detail = self._redact(f"{type(exc).__name__}: {exc}")[:300]
        return EngineUnavailable(
            f"the reply from {self.base_url or 'the API'} is not {what} ({detail})", engine=self.name
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
        request["timeout"] = call_timeout(options.timeout, self.request_timeout)
        if options.json_schema is not None:
            schema = dict(options.json_schema)
            if self.structured_output == "json_schema":
                # The client's name, description and strict (OpenAI enforces the schema only when strict).
                spec = {"name": "reply", **(options.json_schema_settings or {}), "schema": schema}
                request["response_format"] = {"type": "json_schema", "json_schema": spec}
            else:
                request["response_format"] = {"type": "json_object", "schema": schema}
        return request

    def chat(self, messages: Sequence[Message], options: ChatOptions | None = None) -> ChatResult:
        options = options or ChatOptions()
        started = time.perf_counter()
        # As for a stream: httpx's timeout bounds each read, and a server that sends the body a byte at a time
        # (or whitespace before it) would hold the call; the watchdog ends it at its timeout or when the caller
        # cancels it.
        timeout = call_timeout(options.timeout, self.request_timeout)
        watchdog = Watchdog(timeout, options.cancel)
        try:
            with watchdog:
                response = self._create(self._request(messages, options))
            choice = response.choices[0]
            self._check_finished(choice.finish_reason)
            text = choice.message.content or ""
            if not isinstance(text, str):
                raise TypeError(f"content is a {type(text).__name__}")
            calls = tuple(
                tool_call(call.id, call.function.name, call.function.arguments)
                for call in choice.message.tool_calls or []
                if getattr(call, "function", None) is not None
            )
            reasoning = _reasoning(choice.message)
            # The thinking is tokens generated too, when the server gives no count.
            prompt_tokens, completion_tokens = self._usage(response.usage, messages, options, reasoning + text, calls)
            return ChatResult(
                text=text,
                model=response.model or self.model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_s=time.perf_counter() - started,
                finish_reason=choice.finish_reason,
                tool_calls=calls,
                reasoning=reasoning,
            )
        except openai.OpenAIError as exc:
            if watchdog.fired:  # its shutting the connection made the read fail
                raise self._stream_error(None, watchdog, timeout) from None
            # Not chained: the client's exception may quote the key, and a logged traceback would print it.
            raise self._error(exc) from None
        except MALFORMED_REPLY as exc:
            if watchdog.fired:  # the shut connection read as the end of a body without a length
                raise self._stream_error(None, watchdog, timeout) from None
            # A 200 that is not a chat completion (truncated JSON, an HTML page, an error object, no choices):
            # the LLM's server is at fault, and the balancer counts it and fails over, as for a 5xx.
            raise self._malformed(exc) from None

    def _usage(
        self,
        usage: Any,
        messages: Sequence[Message],
        options: ChatOptions,
        text: str,
        calls: tuple[Mapping[str, Any], ...],
        pieces: int | None = None,
    ) -> tuple[int, int]:
        """The reply's prompt and completion tokens: the server's counts, or estimates where it gave none (a
        count of 0 would make the call free for the budget, rule 7, and its tokens look slow, rule 5). A
        streamed reply's ``pieces`` count a token each, as servers stream them, within its ``max_tokens``."""
        prompt = _count(getattr(usage, "prompt_tokens", None))
        completion = _count(getattr(usage, "completion_tokens", None))
        if completion is None:
            if pieces is None:
                completion = estimate_completion_tokens(text, calls, max_tokens=options.max_tokens)
            else:
                completion = pieces if options.max_tokens is None else min(pieces, options.max_tokens)
        return estimate_tokens(messages) if prompt is None else prompt, completion

    def _check_finished(self, finish_reason: Any) -> None:
        """``EngineUnavailable`` for a reply its server gave up on (``_FAILED``): what came is part of one."""
        if finish_reason in _FAILED:
            raise EngineUnavailable(
                f"the reply from {self.base_url or 'the API'} ended with finish_reason {finish_reason!r}: "
                "the server gave up on it",
                engine=self.name,
            )

    def _create(self, request: dict[str, Any], **stream: Any) -> Any:
        """``request`` sent, adapted to what the model refused before; a refusal of ``max_tokens`` or of the
        temperature (by its ``param``, as OpenAI names it) adapts it, and it is sent again."""
        while True:
            adapted = dict(request)
            if "max_tokens" in adapted and self._token_limit != "max_tokens":
                adapted[self._token_limit] = adapted.pop("max_tokens")
            if not self._send_temperature:
                adapted.pop("temperature", None)
            try:
                return self.client.chat.completions.create(**adapted, **stream)
            except openai.BadRequestError as exc:
                # Only a refusal of the parameter itself (not of its value being too large, say), and by what this
                # request sent: calls in flight together may each be refused before the first has adapted.
                param = getattr(exc, "param", None)
                if getattr(exc, "code", None) not in _UNSUPPORTED or param not in adapted:
                    raise
                if param == "max_tokens":
                    self._token_limit = "max_completion_tokens"
                elif param == "temperature":
                    self._send_temperature = False
                else:
                    raise
                logger.warning("%s refuses %s: sent as it takes it from now on", self.model, param)

    def _open_stream(self, request: dict[str, Any]) -> Any:
        """The stream of ``request``, asking for its usage unless the server refused to be asked."""
        if self._stream_usage:
            try:
                return self._create(request, stream=True, stream_options={"include_usage": True})
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                # Where a server names the field varies (OpenAI's error.message, a FastAPI 422's detail[].loc, a
                # plain string error), and the client's message quotes only the first: the body is searched.
                if "stream_options" not in f"{exc.message} {json.dumps(exc.body, default=str)}":
                    raise
                self._stream_usage = False
                logger.warning("%s refuses stream_options: its streams are counted without it", self.base_url)
        return self._create(request, stream=True)

    def stream(self, messages: Sequence[Message], options: ChatOptions | None = None) -> Iterator[ChatChunk]:
        options = options or ChatOptions()
        started = time.perf_counter()
        # httpx's timeout bounds each read, so a server that keeps sending would never time out: the call's
        # timeout is checked against the time since it started on every chunk, and a watchdog ends the call
        # at its timeout (or when the caller cancels it) if the server sends nothing the client yields (SSE
        # comments as keep-alives).
        timeout = call_timeout(options.timeout, self.request_timeout)
        watchdog = Watchdog(timeout, options.cancel)
        first_at = None
        parts: list[str] = []
        thoughts: list[str] = []
        finish_reason = None
        model = self.model
        usage = None
        calls: list[dict[str, str]] = []  # the tool calls' deltas, joined, in the order the calls began
        by_index: dict[int, dict[str, str]] = {}
        pieces = 0  # the chunks that carried part of the reply: a token each, when the server gives no count
        received = False
        try:
            with watchdog:
                chunks = self._open_stream(self._request(messages, options))
                try:
                    for chunk in chunks:
                        if time.perf_counter() - started > timeout:
                            raise EngineTimeout(
                                f"the stream from {self.base_url or 'the API'} ran past its timeout of {timeout:g}s",
                                engine=self.name,
                            )
                        received = True
                        model = chunk.model or model
                        usage = chunk.usage or usage
                        if not chunk.choices:
                            continue
                        choice = chunk.choices[0]
                        finish_reason = choice.finish_reason or finish_reason
                        text = choice.delta.content if choice.delta else None
                        deltas = (choice.delta.tool_calls if choice.delta else None) or []
                        # A reasoning model's thinking, streamed before its answer by the servers that take it
                        # out of the text: not part of the reply's text, but tokens generated, paid for and timed,
                        # and passed on apart.
                        thought = _reasoning(choice.delta)
                        if text or deltas or thought:
                            pieces += 1
                        if thought:
                            if first_at is None:
                                first_at = time.perf_counter()
                            thoughts.append(thought)
                            yield ChatChunk(text="", reasoning=thought)
                        for delta in deltas:
                            # The id and the name come whole (in the call's first delta), the arguments in pieces; a
                            # delta names its call by index. Some servers give none (or one index for every call):
                            # a delta with an id other than its call's then begins a new call.
                            index = getattr(delta, "index", None)
                            index = index if isinstance(index, int) else None
                            call = by_index.get(index) if index is not None else (calls[-1] if calls else None)
                            call_id = getattr(delta, "id", None)
                            if call is None or (call_id and call["id"] and call_id != call["id"]):
                                call = {"id": "", "name": "", "arguments": ""}
                                calls.append(call)
                                if index is not None:
                                    by_index[index] = call
                            call["id"] = call["id"] or call_id or ""
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
                finally:
                    watchdog.disarm()
                    chunks.close()  # whatever ends the loop
        except Exception as exc:
            # Not chained: the client's exception may quote the key, and a logged traceback would print it.
            raise self._stream_error(exc, watchdog, timeout) from None
        if watchdog.fired and (not received or finish_reason is None):
            # The shut connection read as the end of a body without a length: the reply is not whole.
            raise self._stream_error(None, watchdog, timeout)
        if not received:  # a 200 with no event in it (an HTML page, say): not an empty answer
            raise EngineUnavailable(
                f"the stream from {self.base_url or 'the API'} held no chat completion chunk", engine=self.name
            )
        if finish_reason is None:
            # Every complete reply ends with a finish reason: without one the stream was cut (a proxy, a server
            # that died), and what came is part of a reply.
            raise EngineUnavailable(
                f"the stream from {self.base_url or 'the API'} ended before the reply was done", engine=self.name
            )
        self._check_finished(finish_reason)
        text = "".join(parts)
        tool_calls = tuple(tool_call(call["id"], call["name"], call["arguments"]) for call in calls)
        prompt_tokens, completion_tokens = self._usage(usage, messages, options, text, tool_calls, pieces)
        yield ChatChunk(
            text="",
            result=ChatResult(
                text=text,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_s=time.perf_counter() - started,
                time_to_first_token_s=None if first_at is None else first_at - started,
                finish_reason=finish_reason,
                tool_calls=tool_calls,
                reasoning="".join(thoughts),
            ),
        )

    def _lists_models_under_v1(self) -> bool:
        try:
            self.client.with_options(base_url=self.base_url.rstrip("/") + "/v1").models.list(timeout=5)
        except Exception:  # whatever it is, it is not a model list there
            return False
        return True

    def health(self) -> Health:
        started = time.perf_counter()
        try:
            # A model without an id (a server's own shape) is none that it serves.
            served = [
                item.id for item in self.client.models.list(timeout=5) if isinstance(getattr(item, "id", None), str)
            ]
        except openai.NotFoundError:
            # Some OpenAI-compatible servers do not list models: reachable is all that can be told. Unless the
            # base_url lacks its /v1 (and every call is a 404 too): then /v1/models answers.
            if self.base_url and not self.base_url.rstrip("/").endswith("/v1") and self._lists_models_under_v1():
                under_v1 = f"{self.base_url.rstrip('/')}/v1/models"
                detail = f"{self.base_url}/models is not found, {under_v1} is: the base_url lacks /v1"
                return Health(False, detail, time.perf_counter() - started)
            return Health(True, "reachable (the server does not list its models)", time.perf_counter() - started)
        except openai.OpenAIError as exc:
            return Health(False, str(self._error(exc)), time.perf_counter() - started)
        except MALFORMED_REPLY as exc:
            return Health(False, str(self._malformed(exc, "a model list")), time.perf_counter() - started)
        elapsed = time.perf_counter() - started
        # Ollama's /v1 lists a model pulled without a tag as "name:latest", and serves it by either name.
        if self.model not in served and f"{self.model}:latest" not in served:
            return Health(False, f"model {self.model} is not served (served: {', '.join(served[:10])})", elapsed)
        return Health(True, f"{self.model} served", elapsed)


def _reasoning(message: Any) -> str:
    """The thinking that a reply's message, or a streamed delta, carries apart from its text (the first of
    ``_REASONING_FIELDS`` that holds text), or "". The client keeps the fields it does not know as attributes,
    whatever their value: one that is not text is ignored."""
    for name in _REASONING_FIELDS:
        value = getattr(message, name, None)
        if isinstance(value, str) and value:
            return value
    return ""


def _count(value: Any) -> int | None:
    """A token count from the reply: a whole number of at least 0, or None (a server that sends none, null or
    text)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
