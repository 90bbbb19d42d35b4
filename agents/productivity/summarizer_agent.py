"""Summarizer: a summary of a text and its key points."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.base import PAYLOAD_TEXT, WORD_CHARS, Agent, array, long_text, obj, text
from balancer.configuration import Configuration, RoleConfig
from llm_engines.base import Message


class SummarizerAgent(Agent):
    name = "summarizer"
    input_schema = obj(
        {"text": PAYLOAD_TEXT, "max_words": {"type": "integer", "minimum": 10, "maximum": 2000}}, required=("text",)
    )
    text_field = "text"
    defaults = {"max_words": 100}
    reply_format = 'Reply with JSON: {"summary": "...", "key_points": ["..."]}.'

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any]:
        return obj({"summary": long_text(role, 0.45), "key_points": array(text(80), max_items=3)})

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        content = f"Summarize in at most {payload['max_words']} words:\n\n{payload['text']}"
        return [self.system_message(role), {"role": "user", "content": content}]

    def check_reply_room(self, payload: Mapping[str, Any], role: RoleConfig, config: Configuration) -> None:
        room = self.reply_room(role, config, "summary")
        if payload["max_words"] * WORD_CHARS > room:
            words = f"at most {room // WORD_CHARS} words"
            raise self.room_error("max_words", f"{payload['max_words']} words", words, role)
