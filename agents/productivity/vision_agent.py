"""Vision: an image and a question about it. Only an LLM with the vision capability can serve it."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from agents.base import PAYLOAD_TEXT, Agent, PayloadError, obj, text
from balancer.configuration import Configuration, RoleConfig
from llm_engines.base import Message

IMAGE_URL = {"type": "string", "pattern": r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]+$"}


class VisionAgent(Agent):
    name = "vision"
    input_schema = obj({"image": IMAGE_URL, "question": PAYLOAD_TEXT})
    reply_format = 'Reply with JSON: {"answer": "..."}.'

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        try:
            base64.b64decode(payload["image"].split(",", 1)[1], validate=False)
        except (binascii.Error, ValueError):
            raise PayloadError("payload.image", "is not valid base64") from None

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any]:
        return obj({"answer": text(400)})

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        parts = [
            {"type": "text", "text": payload["question"]},
            {"type": "image_url", "image_url": {"url": payload["image"]}},
        ]
        return [self.system_message(role), {"role": "user", "content": parts}]
