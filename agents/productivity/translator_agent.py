"""Translator: a text in another language."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.base import PAYLOAD_TEXT, Agent, long_text, obj, text
from balancer.configuration import Configuration, RoleConfig
from llm_engines.base import Message


class TranslatorAgent(Agent):
    name = "translator"
    input_schema = obj(
        {"text": PAYLOAD_TEXT, "target_language": text(40), "source_language": text(40)}, required=("text",)
    )
    text_field = "text"
    defaults = {"target_language": "English"}
    reply_format = 'Reply with JSON: {"translation": "...", "source_language": "<the language of the original>"}.'

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any]:
        return obj({"translation": long_text(role, 0.8), "source_language": text(40)})

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        content = f"Translate into {payload['target_language']}"
        if payload.get("source_language"):
            content += f" from {payload['source_language']}"
        content += f":\n\n{payload['text']}"
        return [self.system_message(role), {"role": "user", "content": content}]

    def check_reply_room(self, payload: Mapping[str, Any], role: RoleConfig, config: Configuration) -> None:
        room = self.reply_room(role, config, "translation")
        if len(payload["text"]) > room:
            # A translation is about as long as its text (longer into some languages, shorter into others).
            asked = f"a text of {len(payload['text']):,} characters to translate"
            raise self.room_error("text", asked, f"a translation of {room:,} characters at most", role)
