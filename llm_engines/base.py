"""The engine interface: chat completion from messages, whole or streamed, and a cheap health check.

Messages use the OpenAI shape, the lingua franca of the engines: ``{"role": ...,
"content": "text"}``, or ``content`` as a list of parts ``{"type": "text",
"text": ...}`` and ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``.
Each engine translates them to its own form.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from llm_engines.errors import EngineBadRequest

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


@dataclass(frozen=True)
class ChatChunk:
    """A piece of a streamed reply; the last chunk carries the whole ``result`` and no text."""

    text: str
    result: ChatResult | None = None


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
    # Functions the model may call, in the OpenAI shape ({"type": "function", "function": {"name",
    # "description", "parameters"}}), and OpenAI's ``tool_choice``; only for engines whose
    # ``supports_tools`` is true (the others raise EngineBadRequest).
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None


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
        """Complete ``messages``, yielding text as it comes and, last, a chunk with the result."""

    def refuse_tools(self, options: ChatOptions) -> None:
        """``EngineBadRequest`` when ``options`` carry tools that this engine cannot pass to its model."""
        if options.tools and not self.supports_tools:
            raise EngineBadRequest(f"the {self.name} engine cannot call tools", engine=self.name)

    @abstractmethod
    def health(self) -> Health:
        """A cheap check that the engine can serve: reachable, and the model present."""


def estimate_tokens(messages: Iterable[Message]) -> int:
    """A cheap upper estimate of a prompt's tokens (about three characters a token, plus framing).

    The balancer checks contexts and budgets with it before a call, and an engine whose server gave
    no token counts fills them with it."""
    total = 0
    for message in messages:
        content = message.get("content")
        text = (
            content
            if isinstance(content, str)
            else " ".join(part.get("text", "") for part in content or [] if isinstance(part, dict))
        )
        total += len(text) // 3 + 8
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
