"""The engine interface: chat completion from messages, whole or streamed, and a cheap health check.

Messages use the OpenAI shape, the lingua franca of the engines: ``{"role": ...,
"content": "text"}``, or ``content`` as a list of parts ``{"type": "text",
"text": ...}`` and ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``.
Each engine translates them to its own form.
"""

from __future__ import annotations

import contextlib
import inspect
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from llm_engines.errors import EngineBadRequest

if TYPE_CHECKING:  # only annotations here: httpx brings rich with it, 4 MB in every worker process, which a worker
    import httpx  # whose engines are in-process (llama.cpp) never needs

Message = Mapping[str, Any]


@dataclass(frozen=True)
class ChatResult:
    """What one chat completion produced, and what it cost."""

    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    time_to_first_token_s: float | None = None
    finish_reason: str | None = None
    # The functions the model asked to call, in the OpenAI shape: {"id", "type": "function",
    # "function": {"name", "arguments": a JSON text}}. Only engines that support tools fill it.
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    # A reasoning model's thinking, when its server gives it apart from the answer ("" otherwise): never part
    # of ``text``, which is the answer alone. A model whose server leaves it in the text (<think>…</think>)
    # has it there.
    reasoning: str = ""


@dataclass(frozen=True)
class ChatChunk:
    """A piece of a streamed reply: of its answer (``text``) or of its thinking (``reasoning``), which comes
    first; the last chunk carries the whole ``result`` and neither."""

    text: str
    result: ChatResult | None = None
    reasoning: str = ""


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str
    latency_s: float


@dataclass(frozen=True)
class ChatOptions:
    """Generation settings shared by every engine."""

    # None: as many as the engine allows (the context's end, or the API's own limit).
    max_tokens: int | None = 256
    temperature: float = 0.7
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    timeout: float | None = None
    # A JSON schema the reply must follow (llama.cpp grammar, OpenAI json_schema, Ollama format).
    json_schema: Mapping[str, Any] | None = None
    # The other fields of OpenAI's ``json_schema`` response format, as a client of the OpenAI-compatible API
    # sent them (``name``, ``description``, ``strict``): an OpenAI-compatible API enforces a schema only when
    # ``strict`` is true.
    json_schema_settings: Mapping[str, Any] | None = None
    # Functions the model may call, in the OpenAI shape ({"type": "function", "function": {"name",
    # "description", "parameters"}}), and OpenAI's ``tool_choice``; only for engines whose
    # ``supports_tools`` is true (the others raise EngineBadRequest).
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None
    # Lets the caller stop the call from another thread (a client that left its stream): engines whose
    # reads block break them when it is cancelled.
    cancel: Cancel | None = field(default=None, compare=False)


class Cancel:
    """A caller's way to stop a call from another thread. An engine registers how to break its blocking
    reads (``register``); ``cancel()`` runs it, at once or, for an engine that registers later, then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: dict[object, Callable[[], None]] = {}
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            hooks = list(self._hooks.values())
        for hook in hooks:
            hook()

    def register(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run ``hook`` when the call is cancelled; returns what unregisters it."""
        key = object()
        with self._lock:
            if not self.cancelled:
                self._hooks[key] = hook
                return lambda: self._hooks.pop(key, None)
        hook()
        return lambda: None


_watched = threading.local()
_work = threading.local()


def work_cancel() -> Cancel | None:
    """The ``Cancel`` of the work the running thread does, if it has one: a task's step sets it while it holds
    its lease (orchestration/leases.py), and the step's LLM calls take it, so that a step whose lease went
    to another worker stops its call."""
    return getattr(_work, "cancel", None)


def set_work_cancel(cancel: Cancel | None) -> None:
    _work.cancel = cancel


class Watchdog:
    """Ends one HTTP call at its timeout, or when its caller cancels it, however its server behaves.

    httpx's timeout bounds each read, not the call: a server that keeps its connection alive with bytes that
    carry nothing (SSE comments, whitespace) would hold the call, its slot and its thread for ever. The
    watchdog, a timer armed for the call's timeout, shuts the response's socket down: the blocked read fails
    at once, and ``fired`` says why ("timeout" or "cancelled"). The engine's HTTP client hands it the response
    through its ``response`` event hook (``on_response``), in the thread that runs the call."""

    def __init__(self, timeout: float, cancel: Cancel | None = None) -> None:
        self.fired: str | None = None
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._response: httpx.Response | None = None
        self._done = False
        self._timer = threading.Timer(timeout, self._fire, args=("timeout",))
        self._timer.daemon = True
        self._cancel = cancel
        self._unregister: Callable[[], None] | None = None
        self._previous: Watchdog | None = None

    def __enter__(self) -> Watchdog:
        self._previous = getattr(_watched, "watchdog", None)
        _watched.watchdog = self
        self._timer.start()
        if self._cancel is not None:
            self._unregister = self._cancel.register(lambda: self._fire("cancelled"))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disarm()
        self._timer.cancel()
        if self._unregister is not None:
            self._unregister()
        if getattr(_watched, "watchdog", None) is self:
            _watched.watchdog = self._previous

    def disarm(self) -> None:
        """The call is over: the engine calls it before it closes the response, so that a socket that may
        go back to the pool (and serve another call) is never shut."""
        with self._lock:
            self._done = True

    @staticmethod
    def on_response(response: httpx.Response) -> None:
        """httpx's ``response`` event hook: the response of the call that the running thread's watchdog
        guards."""
        watchdog = getattr(_watched, "watchdog", None)
        if watchdog is None:
            return
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        with watchdog._lock:
            if watchdog._done:
                return
            # The latest response is the call's: a redirect's response comes first and is closed (its
            # connection back in the pool, for other calls) before the one it leads to.
            watchdog._response, watchdog._socket = response, sock
            if watchdog.fired:  # it fired while the server was still sending its headers
                _shut(sock)

    def _fire(self, why: str) -> None:
        with self._lock:
            if self._done or self.fired:
                return
            self.fired = why
            # A closed response's connection may be serving another call by now: it is not this call's.
            if self._socket is not None and self._response is not None and not self._response.is_closed:
                _shut(self._socket)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also under TLS (SSLSocket's own drops its TLS state, which the blocked
    # read still uses): the read sees the connection end.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Engine(ABC):
    """One configured model behind an engine. Instances are cached per process by the registry."""

    name: ClassVar[str]
    # Whether the engine passes ``ChatOptions.tools`` to the model and returns its tool calls; an
    # LLM may declare the ``tools`` capability only on such an engine.
    supports_tools: ClassVar[bool] = False

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any]) -> dict[str, str]:
        """Problems with ``settings``, as {field: reason}; empty when they are usable.

        The base checks that the engine takes every setting and gets the ones it
        requires; engines add their own checks.
        """
        parameters = inspect.signature(cls.__init__).parameters
        problems = {key: f"the {cls.name} engine has no such setting" for key in settings if key not in parameters}
        for name, parameter in parameters.items():
            required = parameter.kind is parameter.KEYWORD_ONLY and parameter.default is parameter.empty
            if required and settings.get(name) in (None, ""):
                problems[name] = f"is required by the {cls.name} engine"
            elif name in settings and (problem := _type_problem(settings[name], parameter.default)):
                problems[name] = problem
        return problems

    def chat(self, messages: Sequence[Message], options: ChatOptions | None = None) -> ChatResult:
        """Complete ``messages`` and return the whole reply."""
        result = None
        for chunk in self.stream(messages, options):
            result = chunk.result or result
        if result is None:
            raise RuntimeError(f"{self.name}: the stream ended without a result")
        return result

    @abstractmethod
    def stream(self, messages: Sequence[Message], options: ChatOptions | None = None) -> Iterator[ChatChunk]:
        """Complete ``messages``, yielding text (and thinking, apart) as it comes and, last, a chunk with the
        result."""

    def refuse_tools(self, options: ChatOptions) -> None:
        """``EngineBadRequest`` when ``options`` carry tools that this engine cannot pass to its model."""
        if options.tools and not self.supports_tools:
            raise EngineBadRequest(f"the {self.name} engine cannot call tools", engine=self.name)

    @abstractmethod
    def health(self) -> Health:
        """A cheap check that the engine can serve: reachable, and the model present."""


def text_parts(content: Any) -> str:
    """A message's text: its content when that is a string; the text of its ``text`` parts, a line each,
    when it is a list of parts (images left out)."""
    if isinstance(content, str):
        return content
    return "\n".join(
        part.get("text", "") for part in content or [] if isinstance(part, Mapping) and part.get("type") == "text"
    )


def estimate_tokens(messages: Iterable[Message]) -> int:
    """A cheap upper estimate of a prompt's tokens (about three characters a token, plus framing).

    The balancer checks contexts and budgets with it before a call, and an engine whose server gave
    no token counts fills them with it."""
    total = 0
    for message in messages:
        total += len(text_parts(message.get("content"))) // 3 + 8
    return total


def estimate_completion_tokens(
    text: str, tool_calls: Iterable[Mapping[str, Any]] = (), *, max_tokens: int | None = None
) -> int:
    """A reply's tokens when its server gave no count: about three characters a token of its text and
    of its tool calls' names and arguments, rounded up (a short reply is a token, not none), and no
    more than the ``max_tokens`` it was asked for."""
    characters = len(text) + sum(
        len(call["function"]["name"]) + len(call["function"]["arguments"]) for call in tool_calls
    )
    tokens = -(-characters // 3)
    return tokens if max_tokens is None else min(tokens, max_tokens)


def _type_problem(value: Any, default: Any) -> str | None:
    """Why ``value`` cannot stand for a setting whose default is ``default``: of the default's type (a
    number for a float, a finite one), or None. Settings without a default, or with None, are the
    engine's own to check."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if isinstance(default, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value != value
            or value in (float("inf"), float("-inf"))
        ):
            return "must be a number"
        return None
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    return None
