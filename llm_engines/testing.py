"""An engine that answers at once, for tests and benchmarks that measure everything but the model.

It is registered as ``instant`` and is never part of the default configuration.
It echoes the last user message; with a JSON schema it returns ``{}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence

from llm_engines.base import ChatChunk, ChatOptions, ChatResult, Engine, Health, Message


class InstantEngine(Engine):
    name = "instant"

    def __init__(self, *, model: str = "instant", context_length: int = 2048) -> None:
        self.model = model
        self.context_length = context_length

    def stream(self, messages: Sequence[Message], options: ChatOptions | None = None) -> Iterator[ChatChunk]:
        options = options or ChatOptions()
        started = time.perf_counter()
        if options.json_schema is not None:
            text = json.dumps({})
        else:
            last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
            text = f"echo: {last if isinstance(last, str) else json.dumps(last)}"
        yield ChatChunk(text=text)
        yield ChatChunk(
            text="",
            result=ChatResult(
                text=text,
                model=self.model,
                prompt_tokens=sum(len(str(m.get("content", "")).split()) for m in messages),
                completion_tokens=len(text.split()),
                latency_s=time.perf_counter() - started,
                time_to_first_token_s=0.0,
                finish_reason="stop",
            ),
        )

    def health(self) -> Health:
        return Health(True, "always ready", 0.0)
