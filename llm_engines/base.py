"""The engine interface: chat completion from messages."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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


class Engine(ABC):
    """One configured model behind an engine. Instances are cached per process by the registry."""

    name: ClassVar[str]

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any]) -> dict[str, str]:
        """Problems with ``settings``, as {field: reason}; empty when they are usable."""
        return {}

    @abstractmethod
    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.7,
        stop: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> ChatResult:
        """Complete ``messages`` (``{"role", "content"}`` dicts) and return the reply."""
