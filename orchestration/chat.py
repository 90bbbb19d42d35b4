"""Chat completions for the OpenAI-compatible API (/v1/chat/completions): the request checked, the model
resolved to an LLM or a role, the call made through the load balancer, whole or streamed.

A request names its ``model`` as one of:
- an LLM's id (``smollm2-135m``): that LLM answers, as the client's messages say; the balancer still
  applies its rules to it (toggled off or locked LLMs are not offered, a cooling-down one is waited
  for, its slots are shared with the workers), but there is no other LLM to fail over to;
- a role, ``profile/role`` (``developer/planner``): the role's system prompt comes first, its
  temperature and max_tokens are the defaults, and the balancer picks among the LLMs the role may use,
  failing over as for a task's step; the profile's daily budget applies.

The engine call runs in the web process that took the request (a local model is loaded there on first
use), so that tokens stream to the client as the model makes them. Every call is counted in the
metrics like a task's (a call that named its LLM under that LLM alone).
"""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from balancer.configuration import Configuration, LLMConfig, RoleConfig
from balancer.load_balancer import (
    CallStopped,
    Decision,
    LoadBalancer,
    NoCandidate,
    candidates,
    check_servable,
    direct_call,
    estimate_tokens,
)
from llm_engines.base import Cancel, ChatOptions, ChatResult, Engine
from llm_engines.errors import ContextTooLong, EngineBadRequest, EngineError, EngineTimeout
from llm_engines.http import call_timeout
from llm_engines.registry import get_engine
from orchestration.runtime import configuration, load_balancer

# The parameters of OpenAI's chat completions that the server takes and passes on.
USED = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "stop", "response_format", "tools", "tool_choice",
})  # fmt: skip
# Parameters that only hint and change nothing the client relies on: accepted and not used.
IGNORED = frozenset({
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "seed", "prompt_cache_key",
    "safety_identifier",
})  # fmt: skip
# Parameters the server does not implement: accepted only with the value that asks for nothing, and as null
# (which clients that serialise every field send for those they leave unset).
NEUTRAL = {
    "n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "logit_bias": {},
    "top_logprobs": None, "functions": None, "function_call": None, "reasoning_effort": None, "modalities": None,
    "prediction": None, "audio": None, "web_search_options": None, "verbosity": None,
}  # fmt: skip
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
# Fields of an assistant message as OpenAI's API returns it, which clients send back in the history:
# accepted when they say nothing (null, empty), and dropped.
ECHOED_FIELDS = frozenset({"refusal", "annotations", "audio", "function_call"})
# The thinking that this server's replies carry beside an assistant's content, which clients send back in the
# history with the rest of the message: accepted in an assistant message (text or null), and dropped, as the
# chat templates of reasoning models drop the thinking of earlier turns.
ECHOED_REASONING = "reasoning_content"
MAX_MESSAGES = 1000
MAX_TOOLS = 128
MAX_STOP = 4


class ChatError(Exception):
    """A request the API refuses, in OpenAI's terms: the HTTP status, the error's ``type``, the
    ``param`` at fault and a ``code``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after
        # Whether sending it again can help, for the clients that retry a 429 or a 5xx by themselves (OpenAI's
        # read ``x-should-retry``); None: as the status says.
        self.retry = retry

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """A checked request: what to call, with what, and how to answer."""

    model: str
    config: Configuration
    role: RoleConfig
    messages: list[dict[str, Any]]
    options: ChatOptions
    stream: bool
    include_usage: bool
    budget: float | None

    @property
    def deadline_s(self) -> float:
        return self.role.time_limit_s


# --- Checking the request ------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ChatError(f"{name} must be a number", param=name)
    if not low <= value <= high or not math.isfinite(value):
        raise ChatError(f"{name} must be between {low:g} and {high:g}", param=name)
    return float(value)


def _content(content: Any, param: str, *, allow_none: bool) -> bool:
    """Check a message's content; True when it holds an image."""
    if content is None:
        if not allow_none:
            raise ChatError(f"{param} is required", param=param)
        return False
    if isinstance(content, str):
        return False
    if not isinstance(content, list) or not content:
        raise ChatError(f"{param} must be a string or a non-empty list of content parts", param=param)
    image = False
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise ChatError(f"{where} must be an object", param=where)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ChatError(f"{where}.text must be a string", param=f"{where}.text")
        elif kind == "image_url":
            url = part.get("image_url")
            if not isinstance(url, dict) or not isinstance(url.get("url"), str) or not url["url"]:
                raise ChatError(f"{where}.image_url.url must be a string", param=f"{where}.image_url")
            image = True
        else:
            raise ChatError(
                f"{where}.type must be 'text' or 'image_url', not {kind!r}: this server takes no other parts",
                param=f"{where}.type",
            )
    return image


def _tool_calls(calls: Any, param: str) -> None:
    if not isinstance(calls, list) or not calls:
        raise ChatError(f"{param} must be a non-empty list", param=param)
    for index, call in enumerate(calls):
        where = f"{param}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("id"), str)
            or call.get("type", "function") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise ChatError(
                f"{where} must be {{'id': str, 'type': 'function', 'function': {{'name': str, 'arguments': str}}}}",
                param=where,
            )


def check_messages(messages: Any) -> tuple[list[dict[str, Any]], bool]:
    """The messages in the engines' shape (``developer`` is a system message to them), and whether
    any holds an image."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ChatError(f"messages holds {len(messages)} messages; at most {MAX_MESSAGES}", param="messages")
    checked: list[dict[str, Any]] = []
    images = False
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ChatError(f"{where} must be an object", param=where)
        unknown = sorted(
            key
            for key in message
            if key not in MESSAGE_FIELDS
            and not (key in ECHOED_FIELDS and not message[key])
            and not (key == ECHOED_REASONING and message.get("role") == "assistant")
        )
        if unknown:
            raise ChatError(f"{where} has an unknown field {unknown[0]!r}", param=f"{where}.{unknown[0]}")
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise ChatError(
                f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}, not {role!r}", param=f"{where}.role"
            )
        if "name" in message and not isinstance(message["name"], str):
            raise ChatError(f"{where}.name must be a string", param=f"{where}.name")
        if not isinstance(message.get(ECHOED_REASONING), str | None):
            where_reasoning = f"{where}.{ECHOED_REASONING}"
            raise ChatError(f"{where_reasoning} must be a string", param=where_reasoning)
        has_calls = role == "assistant" and message.get("tool_calls") is not None
        if message.get("tool_calls") is not None:
            if role != "assistant":
                raise ChatError(
                    f"{where}.tool_calls: only an assistant message calls tools", param=f"{where}.tool_calls"
                )
            _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise ChatError(f"{where}.tool_call_id is required in a tool message", param=f"{where}.tool_call_id")
        if role != "tool" and "tool_call_id" in message:
            raise ChatError(f"{where}.tool_call_id: only a tool message answers a call", param=f"{where}.tool_call_id")
        images |= _content(message.get("content"), f"{where}.content", allow_none=role == "assistant")
        if role == "assistant" and message.get("content") is None and not has_calls:
            raise ChatError(f"{where}.content is required when the message calls no tool", param=f"{where}.content")
        converted = {key: value for key, value in message.items() if key in MESSAGE_FIELDS and value is not None}
        if role == "developer":
            converted["role"] = "system"
        checked.append(converted)
    return checked, images


def _response_format(value: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The JSON schema the reply must follow, from ``response_format``, and the format's other fields (its
    ``name``, ``description`` and ``strict``, which an OpenAI-compatible upstream is sent); None for plain
    text."""
    if value is None:
        return None, None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None, None
    if kind == "json_object":
        return {"type": "object"}, None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ChatError("response_format.json_schema must be an object with a name", param="response_format")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise ChatError("response_format.json_schema.schema must be a JSON schema object", param="response_format")
        if spec.get("description") is not None and not isinstance(spec["description"], str):
            raise ChatError("response_format.json_schema.description must be a string", param="response_format")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise ChatError("response_format.json_schema.strict must be true or false", param="response_format")
        _check_schema(schema, "response_format.json_schema.schema")
        settings = {key: spec[key] for key in ("name", "description", "strict") if spec.get(key) is not None}
        return schema, settings
    raise ChatError("response_format.type must be 'text', 'json_object' or 'json_schema'", param="response_format")


def _check_schema(schema: dict[str, Any], where: str) -> None:
    """A 400 naming ``where`` unless ``schema`` is a valid JSON schema."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = "".join(f"[{part!r}]" for part in exc.path)
        raise ChatError(f"{where} is not a valid JSON schema: {path} {exc.message}"[:500], param=where) from None
    except (RecursionError, ValueError) as exc:
        raise ChatError(f"{where} is not a usable JSON schema: {type(exc).__name__}", param=where) from None


def _tools(body: Mapping[str, Any]) -> tuple[tuple[dict[str, Any], ...], Any]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ChatError("tool_choice needs tools", param="tool_choice")
        return (), None
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise ChatError(f"tools must be a list of 1 to {MAX_TOOLS} tools", param="tools")
    names = set()
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ChatError(
                f"tools[{index}] must be {{'type': 'function', 'function': {{...}}}}", param=f"tools[{index}]"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ChatError(
                f"tools[{index}].function.name must be a non-empty string", param=f"tools[{index}].function.name"
            )
        if "description" in function and not isinstance(function["description"], str):
            where = f"tools[{index}].function.description"
            raise ChatError(f"{where} must be a string", param=where)
        if "parameters" in function:
            where = f"tools[{index}].function.parameters"
            if not isinstance(function["parameters"], dict):
                raise ChatError(f"{where} must be a JSON schema object", param=where)
            _check_schema(function["parameters"], where)
        names.add(name)
    if choice is None or choice in ("auto", "required"):
        pass
    elif choice == "none":
        return (), None  # the model is not to call any: it is not told of them
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
        and choice["function"]["name"] in names
    ):
        pass
    else:
        raise ChatError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': "
            "<one of the tools>}}",
            param="tool_choice",
        )
    return tuple(tools), choice


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_STOP or not all(isinstance(s, str) and s for s in value):
        raise ChatError(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings", param="stop")
    return tuple(value)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    """``max_completion_tokens``, else ``max_tokens``; both are checked when both are sent."""
    chosen = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise ChatError(f"{name} must be a positive integer", param=name)
        chosen = value if chosen is None else chosen
    return chosen


def _is_neutral(value: Any, neutral: Any) -> bool:
    """Whether a parameter this server does not implement says nothing: null, or its neutral value of the
    same type (``true`` is not ``n`` = 1, nor ``0`` ``logprobs`` = false, as Python's == would have it)."""
    if value is None:
        return True
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, int | float):
        return isinstance(value, int | float) and value == neutral
    return type(value) is type(neutral) and value == neutral


def _resolve(config: Configuration, model: Any) -> tuple[RoleConfig | None, str | None]:
    """The role that ``model`` names, or the LLM's id; ``ChatError`` 404 when it names neither that GET
    /v1/models lists (an LLM not ``offered``, a role not ``served``)."""
    if model is None or model == "":
        raise ChatError("model is required: an LLM's id or a role as profile/role (GET /v1/models)", param="model")
    if not isinstance(model, str):
        raise ChatError("model must be a string: an LLM's id or a role as profile/role", param="model")
    if "/" in model:
        profile, _, role = model.partition("/")
        try:
            role_config = config.role(profile, role)
        except LookupError:
            pass
        else:
            if served(config, role_config):  # GET /v1/models lists no other role
                return role_config, None
    elif offered(config, model):
        return None, model
    raise ChatError(
        f"The model {model!r} does not exist or you do not have access to it; GET /v1/models lists them",
        status=404,
        param="model",
        code="model_not_found",
    )


def offered(config: Configuration, llm_id: str) -> bool:
    """Whether a request may name the LLM: it is configured, enabled, not locked to roles, and free (an
    api LLM with a cost is reached through a role, whose profile's daily budget bounds what it spends)."""
    llm = config.llms.get(llm_id)
    return llm is not None and llm.toggle and not llm.locked and not llm.cost_per_1k_tokens


def served(config: Configuration, role: RoleConfig) -> bool:
    """Whether a request may name the role: an LLM can serve it (``check_servable``)."""
    try:
        check_servable(config, role)
    except NoCandidate:
        return False
    return True


def parse_request(body: Any) -> ChatRequest:
    """The request checked against OpenAI's, as far as the server implements it; ``ChatError`` names the
    first problem."""
    if not isinstance(body, dict):
        raise ChatError("the request body must be a JSON object")
    for name in body:
        if name in USED or name in IGNORED:
            continue
        if name in NEUTRAL:
            if not _is_neutral(body[name], NEUTRAL[name]):
                raise ChatError(f"{name}={body[name]!r} is not supported by this server", param=name)
            continue
        raise ChatError(f"Unrecognized request argument supplied: {name}", param=name)
    config = configuration()
    role, llm_id = _resolve(config, body.get("model"))
    messages, images = check_messages(body.get("messages"))
    stream = body.get("stream")
    if stream is None:  # null is false, as OpenAI takes it (and this server every other optional parameter)
        stream = False
    if not isinstance(stream, bool):
        raise ChatError("stream must be true or false", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise ChatError("stream_options is only allowed when stream is true", param="stream_options")
        include_usage = stream_options.get("include_usage") if isinstance(stream_options, dict) else False
        if not isinstance(stream_options, dict) or not isinstance(include_usage, bool | None):
            raise ChatError("stream_options must be {'include_usage': true or false}", param="stream_options")
    tools, tool_choice = _tools(body)
    needs = {"chat"} | ({"vision"} if images else set()) | ({"tools"} if tools else set())
    max_tokens = _max_tokens(body)
    temperature = _number(body, "temperature", 0, 2)
    json_schema, json_schema_settings = _response_format(body.get("response_format"))
    options = ChatOptions(
        max_tokens=max_tokens,
        temperature=0.7 if temperature is None else temperature,
        top_p=_number(body, "top_p", 0, 1),
        stop=_stop(body.get("stop")),
        json_schema=json_schema,
        json_schema_settings=json_schema_settings,
        tools=tools,
        tool_choice=tool_choice,
    )
    if role is not None:
        messages = [{"role": "system", "content": role.system_prompt}, *messages]
        options = replace(
            options,
            max_tokens=max_tokens or role.max_tokens,
            temperature=role.temperature if temperature is None else temperature,
        )
        call_role = replace(role, capabilities=role.capabilities | needs, max_tokens=options.max_tokens)
        call_config = config
        budget = config.profiles[role.profile].daily_budget
    else:
        assert llm_id is not None
        call_config, call_role = direct_call(
            config,
            llm_id,
            capabilities=frozenset(needs),
            max_tokens=max_tokens or 1,
            time_limit_s=settings.OPENAI_API_TIME_LIMIT_SECONDS,
        )
        budget = None
    return ChatRequest(
        model=body["model"],
        config=call_config,
        role=call_role,
        messages=messages,
        options=options,
        stream=stream,
        include_usage=bool((stream_options or {}).get("include_usage")),
        budget=budget,
    )


def check_grammar(request: ChatRequest) -> None:
    """A 400 when an LLM that may serve the call runs on llama.cpp, and llama.cpp cannot build a grammar
    from the request's schema (some schemas crash the process that tries: the engine tries in a child
    process, which takes a while: the API checks once the call holds its permit)."""
    if request.options.json_schema is None:
        return
    for llm in candidates(request.config, request.role)[0]:
        if llm.engine != "llama_cpp":
            continue
        engine = get_engine(llm.engine, llm.engine_settings(), key=llm.id)
        problem = engine.check_schema(request.options.json_schema)
        if problem:
            raise ChatError(f"response_format: {problem} (the LLM {llm.id} runs on llama.cpp)", param="response_format")


# --- Calling -------------------------------------------------------------------------------------


def _engine(
    request: ChatRequest, llm: LLMConfig, balancer: LoadBalancer, deadline: float
) -> tuple[Engine, ChatOptions]:
    """The LLM's engine, and the request's options with what is left of its time as the timeout."""
    options = replace(request.options, timeout=max(deadline - balancer.clock(), 1.0))
    return get_engine(llm.engine, llm.engine_settings(), key=llm.id), options


def _balanced(
    request: ChatRequest, balancer: LoadBalancer, deadline: float, call: Callable[[LLMConfig], ChatResult]
) -> tuple[ChatResult, Decision]:
    """``call`` through the balancer, which picks, waits, records and fails over."""
    return balancer.run(
        request.config,
        request.role,
        call,
        prompt_tokens=estimate_tokens(request.messages),
        deadline=deadline,
        budget=request.budget,
    )


class ClientGone(CallStopped):
    """The client stopped reading a stream: the generation ends, and its slot comes back; the balancer
    counts the call as cancelled, with what it had streamed."""


# An engine's timeout that ends this close to the call's deadline (or past it) is the deadline's.
DEADLINE_SLACK_S = 0.25


class DeadlineReached(CallStopped):
    """The call's time ran out after the LLM had produced text: the caller's limit (a client may ask for
    more tokens than fit in the time), not the LLM's failure, which would count towards its breaker for
    every caller. The balancer counts the call as cancelled, with what it produced; the client gets that
    text, cut as ``max_tokens`` cuts it (``finish_reason`` "length"). ``llm`` names the LLM."""

    partial: ChatResult

    def __init__(self, message: str, *, partial: ChatResult, llm: str) -> None:
        super().__init__(message, partial=partial)
        self.llm = llm


def _generate(
    request: ChatRequest,
    llm: LLMConfig,
    balancer: LoadBalancer,
    deadline: float,
    *,
    on_piece: Callable[[str, str], None] | None = None,
    stop: threading.Event | None = None,
    timed_out: threading.Event | None = None,
    cancel: Cancel | None = None,
) -> ChatResult:
    """One LLM's reply, streamed from its engine (each piece handed to ``on_piece`` with its kind: "reasoning"
    for a piece of the model's thinking, which its engine gives apart, "text" for a piece of its answer), so
    that what it had produced is known however the call ends. ``stop`` is set when the client left,
    ``timed_out`` (with it) when the reader gave up waiting; ``cancel`` breaks the engine's blocking reads
    then."""
    engine, options = _engine(request, llm, balancer, deadline)
    options = replace(options, cancel=cancel)
    started = time.monotonic()
    first_at: float | None = None
    last_at = started  # when the latest piece came
    pieces: list[str] = []
    thoughts: list[str] = []
    result = None

    def partial(unsent: str = "") -> ChatResult:
        # What the LLM produced until now, for its cost and the metrics: engines stream a token a piece (of
        # thinking or of text), and the prompt is counted as the balancer estimated it.
        return ChatResult(
            text="".join(pieces),
            model=llm.model,
            prompt_tokens=estimate_tokens(request.messages),
            completion_tokens=len(thoughts) + len(pieces) + bool(unsent),
            latency_s=time.monotonic() - started,
            time_to_first_token_s=None if first_at is None else first_at - started,
            finish_reason="length",
            reasoning="".join(thoughts),
        )

    def reader_gave_up() -> EngineTimeout:
        timeout = EngineTimeout("the LLM neither answered nor failed in time", engine=engine.name)
        timeout.transient = False  # the reader has answered the client: nothing can take over
        return timeout

    chunks = engine.stream(request.messages, options)
    try:
        for chunk in chunks:
            if chunk.result is not None:  # the generation ended: what it produced is known
                result = chunk.result
                continue
            if timed_out is not None and timed_out.is_set():
                raise reader_gave_up()
            if stop is not None and stop.is_set():
                raise ClientGone("the client left the stream", partial=partial(chunk.reasoning or chunk.text))
            for kind, piece, kept in (("reasoning", chunk.reasoning, thoughts), ("text", chunk.text, pieces)):
                if piece:
                    if on_piece is not None:
                        on_piece(kind, piece)
                    last_at = time.monotonic()
                    if first_at is None:
                        first_at = last_at
                    kept.append(piece)
    except EngineError as exc:
        # The engine's blocking read was broken by ``cancel``: the reader's reason, not the engine's.
        if timed_out is not None and timed_out.is_set():
            raise reader_gave_up() from exc
        if stop is not None and stop.is_set():
            raise ClientGone("the client left the stream", partial=partial()) from exc
        if pieces or thoughts:
            if isinstance(exc, EngineTimeout) and (
                balancer.clock() >= deadline - DEADLINE_SLACK_S or not _stalled(engine, options, last_at)
            ):
                # The call's time ran out while the LLM was writing: the deadline, or the LLM's request_timeout
                # ending a reply longer than it holds. Not a stall, which is the LLM's fault.
                raise DeadlineReached(f"the time limit ended the reply: {exc}", partial=partial(), llm=llm.id) from exc
            if isinstance(exc, ContextTooLong):
                # The client has this LLM's text (or thinking): the balancer must not hand the rest of the reply
                # to an LLM with a larger context (rule 6), as it does for a ContextTooLong.
                raise EngineBadRequest(exc.message, engine=exc.engine) from exc
            # The client has this LLM's text (or thinking): another LLM cannot take over the reply.
            exc.transient = exc.llm_at_fault = False
        raise
    finally:
        chunks.close()
    if result is None:
        raise RuntimeError(f"{engine.name}: the stream ended without a result")
    return result


def _stalled(engine: Engine, options: ChatOptions, last_at: float) -> bool:
    """Whether an engine's timeout after text came from a read that waited its whole timeout (the server
    stopped sending: the LLM's fault) rather than from the call's own time running out (the engines end a
    call at its timeout, the request's time left capped by the LLM's ``request_timeout``, however steadily
    it streams). A read waits at most the call's timeout, so a shorter silence cannot have been one."""
    limit = call_timeout(options.timeout, getattr(engine, "request_timeout", math.inf))
    return time.monotonic() - last_at >= limit - DEADLINE_SLACK_S


def complete(request: ChatRequest) -> tuple[ChatResult, str]:
    """The whole reply, and the LLM that gave it; when the time limit ended it, what came until then."""
    balancer = load_balancer()
    deadline = balancer.clock() + request.deadline_s
    try:
        result, decision = _balanced(
            request, balancer, deadline, lambda llm: _generate(request, llm, balancer, deadline)
        )
    except DeadlineReached as cut:
        return cut.partial, cut.llm
    return result, decision.llm.id


class Stream:
    """One streamed reply, produced by the balancer's call in a thread of its own and read here.

    ``first()`` waits for the first event: the first text or thinking (the LLM is then known, and no failover
    can happen any more: the client has its words), the whole result, or the error, which the caller can still
    answer with its own status. ``rest()`` yields the events after it; closing it (the client left)
    stops the generation."""

    # How long past its deadline the reader waits for the stream's thread: the engines end their calls at
    # their timeout (the time left before the deadline), the margin covers their own timeout handling.
    MARGIN_S = 30.0

    def __init__(self, request: ChatRequest, on_end: Callable[[], None] | None = None) -> None:
        """``on_end`` is called by the stream's thread once its generation has ended, however it ends."""
        self.request = request
        self.on_end = on_end
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.stop = threading.Event()
        self.timed_out = threading.Event()  # set with ``stop`` when the reader gave up waiting
        self.cancel = Cancel()  # breaks the engine's blocking reads when the stream stops
        self.balancer = load_balancer()
        self.deadline = self.balancer.clock() + request.deadline_s
        self.thread = threading.Thread(target=self._run, name="chat-stream", daemon=True)

    def halt(self) -> None:
        """Stop the generation now, even while the engine waits for its server (the client left)."""
        self.stop.set()
        self.cancel.cancel()

    def _call(self, llm: LLMConfig) -> ChatResult:
        return _generate(
            self.request,
            llm,
            self.balancer,
            self.deadline,
            on_piece=lambda kind, piece: self.events.put((kind, (llm.id, piece))),
            stop=self.stop,
            timed_out=self.timed_out,
            cancel=self.cancel,
        )

    def _run(self) -> None:
        try:
            result, decision = _balanced(self.request, self.balancer, self.deadline, self._call)
        except BaseException as exc:  # handed to the reader, who answers it
            self.events.put(("error", exc))
        else:
            self.events.put(("done", (result, decision)))
        finally:
            if self.on_end is not None:
                self.on_end()

    @property
    def started(self) -> bool:
        return self.thread.ident is not None

    def _next(self, idle_s: float | None = None) -> tuple[str, Any]:
        """The next event; ("idle", None) when none came within ``idle_s``."""
        left = max(self.deadline + self.MARGIN_S - self.balancer.clock(), 0)
        try:
            return self.events.get(timeout=left if idle_s is None else min(idle_s, left))
        except queue.Empty:
            if idle_s is not None and idle_s < left:
                return "idle", None
            self.timed_out.set()
            self.halt()
            return "error", EngineTimeout("the LLM neither answered nor failed in time")

    def first(self) -> tuple[str, Any]:
        self.thread.start()
        return self._next()

    def rest(self, idle_s: float | None = None) -> Iterator[tuple[str, Any]]:
        """The events after the first; ("idle", None) whenever none came for ``idle_s``."""
        try:
            while True:
                kind, value = self._next(idle_s)
                yield kind, value
                if kind in ("done", "error"):
                    return
        finally:
            self.halt()


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
