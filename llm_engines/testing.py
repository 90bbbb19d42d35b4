"""An engine that answers at once, for tests and benchmarks that measure everything but the model.

It is registered as ``instant`` and is never part of the default configuration.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from llm_engines.base import ChatResult, Engine, Message


class InstantEngine(Engine):
    name = "instant"

    def __init__(self, model: str = "instant", **_settings: object) -> None:
        self.model = model

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.7,
        stop: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> ChatResult:
        started = time.perf_counter()
        last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        text = f"echo: {last}"
        words = text.split()
        return ChatResult(
            text=text,
            model=self.model,
            prompt_tokens=sum(len(str(m.get("content", "")).split()) for m in messages),
            completion_tokens=len(words),
            latency_s=time.perf_counter() - started,
            time_to_first_token_s=0.0,
            finish_reason="stop",
        )
