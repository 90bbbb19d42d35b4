"""The OpenAI-compatible API under /v1/: POST /v1/chat/completions (whole or streamed), GET /v1/models and
GET /v1/models/{model}, for the clients that already speak OpenAI's API (its SDKs, LangChain, editor
assistants, Open WebUI).

The same token as the REST API, sent as ``Authorization: Bearer <key>``; the same per-client
throttling (a completion counts as work, like a task submission). Every error comes in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``. The endpoints follow OpenAI's own specification,
so they are left out of this server's OpenAPI schema; doc/api_endpoints.md says what is implemented.
The work is in orchestration/chat.py.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import redis
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.views import APIView

from balancer.configuration import Configuration
from balancer.load_balancer import NoCandidate, NoCapacity
from llm_engines.base import ChatResult
from llm_engines.errors import (
    ContextTooLong,
    EngineBadRequest,
    EngineError,
    EngineQuotaExceeded,
    EngineRateLimited,
    EngineTimeout,
)
from orchestration.authentication import BearerAuthentication
from orchestration.chat import (
    ChatError,
    ChatRequest,
    DeadlineReached,
    Stream,
    check_grammar,
    complete,
    completion_id,
    now,
    offered,
    parse_request,
    served,
)
from orchestration.exceptions import RETRY_AFTER_OUTAGE_S
from orchestration.exceptions import error_response as rest_error_response
from orchestration.runtime import configuration

logger = logging.getLogger(__name__)

OWNER = "ai-agent-server"
# A stream that has sent nothing for this long sends an SSE comment (which clients skip): a proxy in front
# does not time the stream out while the LLM thinks, and a client that left is noticed when the write fails
# (the generation then stops), rather than when the next piece comes, if one ever does.
KEEPALIVE_S = 2.0
# Why the balancer left out an LLM that could never serve any such call (rule 1, static): beside another
# reason, it says nothing about this request.
_NEVER = ("rule 1: toggled off", "rule 1: locked", "rule 1: lacks capabilities")


def _no_candidate(exc: NoCandidate) -> ChatError:
    """What no LLM that can serve the call answers, from the reasons of the LLMs that might have served
    it (those that never could, toggled off, locked to other roles or lacking a capability, are left out
    as long as another reason remains): a spent budget (rule 7) is OpenAI's 429 ``insufficient_quota``; a
    context too small for the messages and max_tokens (rule 1), ``context_length_exceeded``."""
    reasons = [reason for reason in exc.reasons.values() if not reason.startswith(_NEVER)]
    if reasons and all(reason.startswith(("rule 7:", "rule 1: context of")) for reason in reasons):
        if any(reason.startswith("rule 7:") for reason in reasons):
            return ChatError(
                f"the role's daily budget cannot pay for this request: {exc}", status=429,
                type="insufficient_quota", code="insufficient_quota", retry=False,
            )  # fmt: skip
        return ChatError(
            f"the messages and max_tokens do not fit the context: {exc}", code="context_length_exceeded",
            param="messages",
        )  # fmt: skip
    return ChatError(f"no LLM can serve this request: {exc}", code="no_llm_available")


def engine_error(exc: BaseException) -> ChatError:
    """What a failed call answers: the client's fault is a 400, the server's or the LLM's a 5xx."""
    if isinstance(exc, ChatError):
        return exc
    if isinstance(exc, NoCapacity):
        return ChatError(
            str(exc), status=503, type="server_error", code="no_capacity", retry_after=RETRY_AFTER_OUTAGE_S
        )
    if isinstance(exc, NoCandidate):
        return _no_candidate(exc)
    if isinstance(exc, ContextTooLong):
        return ChatError(str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, EngineBadRequest):
        return ChatError(str(exc))
    if isinstance(exc, EngineQuotaExceeded):  # the upstream account's: waiting does not lift it
        return ChatError(str(exc), status=429, type="insufficient_quota", code="insufficient_quota", retry=False)
    if isinstance(exc, EngineRateLimited):
        return ChatError(
            str(exc), status=429, type="rate_limit_error", code="rate_limit_exceeded", retry_after=exc.retry_after
        )
    if isinstance(exc, EngineTimeout):
        return ChatError(str(exc), status=504, type="server_error", code="timeout")
    if isinstance(exc, EngineError):
        status = 502 if exc.llm_at_fault else 503
        return ChatError(
            f"the LLM failed: {exc}", status=status, type="server_error", code="llm_failed",
            retry=False if exc.llm_at_fault else None,  # its key, its settings: the same again until they change
        )  # fmt: skip
    if isinstance(exc, redis.RedisError | DatabaseError):
        status, body = rest_error_response(exc)  # the REST API's own answer to an outage, in OpenAI's shape
        return ChatError(
            body["detail"], status=status, type="server_error", code=body["code"], retry_after=RETRY_AFTER_OUTAGE_S
        )
    logger.error("a chat completion failed", exc_info=(type(exc), exc, exc.__traceback__))
    return ChatError("the server failed to complete the request", status=500, type="server_error")


def error_response(error: ChatError) -> JsonResponse:
    response = JsonResponse(error.body(), status=error.status)
    if error.retry_after:
        response["Retry-After"] = str(max(1, round(error.retry_after)))
    if error.retry is not None:
        response["x-should-retry"] = "true" if error.retry else "false"
    return response


def openai_exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponse:
    """DRF's errors (credentials, throttling, a body that is not JSON) and the server's, in OpenAI's shape."""
    if isinstance(exc, exceptions.NotAuthenticated):
        error = ChatError(
            "You didn't provide an API key: send Authorization: Bearer <key> (manage.py create_token NAME)",
            status=401, type="invalid_request_error", code="missing_api_key",
        )  # fmt: skip
    elif isinstance(exc, exceptions.AuthenticationFailed):
        error = ChatError(f"Incorrect API key provided: {exc.detail}", status=401, code="invalid_api_key")
    elif isinstance(exc, exceptions.Throttled):
        error = ChatError(
            f"Rate limit reached for this client: {exc.detail}",
            status=429, type="rate_limit_error", code="rate_limit_exceeded", retry_after=exc.wait,
        )  # fmt: skip
    elif isinstance(exc, exceptions.ValidationError):  # e.g. the body's parser refusing a NUL character
        _, body = rest_error_response(exc)  # the first error with the field it names, as the REST API says it
        error = ChatError(body["detail"], param=body.get("field"), code="invalid")
    elif isinstance(exc, exceptions.APIException):
        error = ChatError(str(exc.detail), status=exc.status_code, code=str(exc.default_code))
    else:
        error = engine_error(exc)
    response = error_response(error)
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


class OpenAIView(APIView):
    authentication_classes = [BearerAuthentication]

    def get_exception_handler(self):
        return openai_exception_handler


def _usage(result: ChatResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _finish_reason(result: ChatResult) -> str:
    if result.tool_calls:
        return "tool_calls"
    return result.finish_reason if result.finish_reason in ("stop", "length", "content_filter") else "stop"


def _tool_calls(result: ChatResult) -> list[dict[str, Any]]:
    return [dict(call) for call in result.tool_calls]


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# The engine calls that each web process runs at once (each holds one of its threads until the reply
# is whole); past them a request is answered 503 at once, so that the REST API and /healthz keep
# threads of their own.
_CALLS = threading.BoundedSemaphore(settings.OPENAI_API_MAX_CALLS)


class _Released:
    """Gives the process's call back exactly once, however the request ends."""

    def __init__(self) -> None:
        self._done = threading.Event()

    def __call__(self) -> None:
        if not self._done.is_set():
            self._done.set()
            _CALLS.release()


class _StreamBody:
    """The stream's events as a response body whose ``close()`` (the server calls it however the
    response ends, even before the first event was read) stops the generation; the stream's thread gives
    the call back once the generation has stopped (at its next token, or at the engine's timeout)."""

    def __init__(self, events: Iterator[bytes], stream: Stream) -> None:
        self.events = events
        self.stream = stream

    def __iter__(self) -> _StreamBody:
        return self

    def __next__(self) -> bytes:
        return next(self.events)

    def close(self) -> None:
        try:
            self.events.close()
        finally:
            self.stream.halt()


class ChatCompletionsApi(OpenAIView):
    """POST /v1/chat/completions."""

    @extend_schema(exclude=True)
    def post(self, request: Request) -> HttpResponse:
        chat = parse_request(request.data)
        if not _CALLS.acquire(blocking=False):
            busy = f"this server process runs {settings.OPENAI_API_MAX_CALLS} completions already; try again shortly"
            raise ChatError(busy, status=503, type="server_error", code="server_busy", retry_after=RETRY_AFTER_OUTAGE_S)
        release = _Released()
        try:
            check_grammar(chat)  # a child process: under the permit, so that a busy process starts none
        except BaseException:
            release()
            raise
        if not chat.stream:
            try:
                return self._whole(chat)
            finally:
                release()
        return self._stream(chat, release)

    def _whole(self, chat: ChatRequest) -> HttpResponse:
        result, llm = complete(chat)
        message: dict[str, Any] = {"role": "assistant", "content": result.text or None, "refusal": None}
        if result.tool_calls:
            message["tool_calls"] = _tool_calls(result)
        elif message["content"] is None:
            message["content"] = ""
        if result.reasoning:  # only then: a reply without thinking is as it always was
            message["reasoning_content"] = result.reasoning
        response = JsonResponse({
            "id": completion_id(),
            "object": "chat.completion",
            "created": now(),
            "model": chat.model,
            "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(result), "logprobs": None}],
            "usage": _usage(result),
            "system_fingerprint": None,
        })  # fmt: skip
        response["X-LLM"] = llm
        return response

    def _stream(self, chat: ChatRequest, release: _Released) -> HttpResponse:
        """The streamed answer. The call is given back by the stream's thread when its generation has ended
        (a client that leaves does not free it while the engine still works), or here if it never started."""
        stream = None
        try:
            stream = Stream(chat, on_end=release)
            kind, value = stream.first()
        except BaseException:
            if stream is None or not stream.started:
                release()
            raise
        if kind == "error":  # before its first text: answered whole (the thread has ended, or will)
            return error_response(engine_error(value))
        llm = value[0] if kind in ("reasoning", "text") else value[1].llm.id
        body = _StreamBody(self._events(chat, stream, kind, value), stream)
        response = StreamingHttpResponse(body, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # a proxy in front must not hold the tokens back
        response["X-LLM"] = llm
        return response

    def _events(self, chat: ChatRequest, stream: Stream, kind: str, value: Any) -> Iterator[bytes]:
        ident, created = completion_id(), now()

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return _sse({
                "id": ident, "object": "chat.completion.chunk", "created": created, "model": chat.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            })  # fmt: skip

        events = stream.rest(idle_s=KEEPALIVE_S)
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if kind == "error" and isinstance(value, DeadlineReached):
                    # The time limit ended the reply: what came is the reply, cut as max_tokens cuts one.
                    kind, value = "done", (value.partial, None)
                if kind == "idle":
                    yield b": keep-alive\n\n"
                elif kind == "reasoning":  # the field of DeepSeek's API (and vLLM's, before its rename)
                    yield chunk({"reasoning_content": value[1]})
                elif kind == "text":
                    yield chunk({"content": value[1]})
                elif kind == "done":
                    result: ChatResult = value[0]
                    if result.tool_calls:
                        calls = [{"index": i, **call} for i, call in enumerate(_tool_calls(result))]
                        yield chunk({"tool_calls": calls})
                    yield chunk({}, _finish_reason(result))
                    if chat.include_usage:
                        yield _sse({
                            "id": ident, "object": "chat.completion.chunk", "created": created, "model": chat.model,
                            "system_fingerprint": None, "choices": [], "usage": _usage(result),
                        })  # fmt: skip
                    break
                else:  # an error after the first text: OpenAI's clients raise it from the stream
                    yield _sse(engine_error(value).body())
                    break
                kind, value = next(events)
            yield b"data: [DONE]\n\n"
        finally:
            events.close()  # the client left, or the reply is whole: the generation stops


@csrf_exempt
def unknown_url(request: Any) -> JsonResponse:
    """Any other path under /v1/: OpenAI's 404 (with or without DEBUG)."""
    error = ChatError(f"Unknown request URL: {request.method} {request.path}", status=404, code="unknown_url")
    return error_response(error)


def _model(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}


def models(config: Configuration) -> list[str]:
    """The models a request may name: the LLMs offered by id, then every role that an LLM can serve."""
    llms = [llm_id for llm_id in config.llms if offered(config, llm_id)]
    roles = [
        f"{profile.name}/{role.name}"
        for profile in config.profiles.values()
        for role in profile.roles.values()
        if served(config, role)
    ]
    return llms + roles


def _created() -> int:
    """When the models were last configured: the configuration file's time."""
    try:
        return int(os.path.getmtime(settings.AIAGENT_CONFIG))
    except OSError:
        return now()


class ModelListApi(OpenAIView):
    """GET /v1/models."""

    @extend_schema(exclude=True)
    def get(self, request: Request) -> HttpResponse:
        created = _created()
        return JsonResponse({"object": "list", "data": [_model(m, created) for m in models(configuration())]})


class ModelDetailApi(OpenAIView):
    """GET /v1/models/{model}; a role's model has a slash in it (developer/planner)."""

    @extend_schema(exclude=True)
    def get(self, request: Request, model: str) -> HttpResponse:
        if model not in models(configuration()):
            raise ChatError(
                f"The model {model!r} does not exist or you do not have access to it",
                status=404, param="model", code="model_not_found",
            )  # fmt: skip
        return JsonResponse(_model(model, _created()))
