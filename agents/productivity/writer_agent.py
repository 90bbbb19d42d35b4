"""Writer: a text from a brief, with a title."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.base import PAYLOAD_TEXT, WORD_CHARS, Agent, long_text, obj, text
from balancer.configuration import Configuration, RoleConfig
from llm_engines.base import Message


class WriterAgent(Agent):
    name = "writer"
    input_schema = obj(
        {"brief": PAYLOAD_TEXT, "tone": text(60), "length_words": {"type": "integer", "minimum": 10, "maximum": 5000}},
        required=("brief",),
    )
    text_field = "brief"
    reply_format = 'Reply with JSON: {"title": "...", "text": "..."}.'

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any]:
        return obj({"title": text(80), "text": long_text(role, 0.85)})

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        content = payload["brief"]
        if payload.get("tone"):
            content += f"\n\nTone: {payload['tone']}"
        if payload.get("length_words"):
            content += f"\n\nLength: about {payload['length_words']} words"
        return [self.system_message(role), {"role": "user", "content": content}]

    def check_reply_room(self, payload: Mapping[str, Any], role: RoleConfig, config: Configuration) -> None:
        room = self.reply_room(role, config, "text")
        if payload.get("length_words") and payload["length_words"] * WORD_CHARS > room:
            words = f"about {room // WORD_CHARS} words at most"
            raise self.room_error("length_words", f"{payload['length_words']} words", words, role)
