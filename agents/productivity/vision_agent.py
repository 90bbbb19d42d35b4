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
# How each type's bytes start (its signature): what tells an image from bytes that only say they are one.
_MAGIC = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
    "gif": (b"GIF87a", b"GIF89a"),
    "webp": (b"RIFF",),  # then the size, then WEBP (_is_image): a WAV file starts with RIFF too
}


def _is_image(image: bytes, kind: str) -> bool:
    if kind == "webp" and image[8:12] != b"WEBP":
        return False
    return any(image.startswith(magic) for magic in _MAGIC[kind])


class VisionAgent(Agent):
    name = "vision"
    input_schema = obj({"image": IMAGE_URL, "question": PAYLOAD_TEXT})
    reply_format = 'Reply with JSON: {"answer": "..."}.'

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        super().check_payload(payload)
        header, encoded = payload["image"].split(",", 1)
        try:
            image = base64.b64decode(encoded, validate=False)
        except (binascii.Error, ValueError):
            raise PayloadError("payload.image", "is not valid base64") from None
        kind = header.removeprefix("data:image/").removesuffix(";base64")
        if not _is_image(image, kind):
            # Empty, or not the image the URL says (an engine would refuse it only after the task was queued).
            raise PayloadError("payload.image", f"is not a {kind} image: its bytes do not start as one does")
        if not payload["question"].strip():
            raise PayloadError("payload.question", "must not be blank")

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
