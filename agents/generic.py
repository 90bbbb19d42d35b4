"""The generic agent: answers any role with the role's system prompt and the user's input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.base import Agent, PayloadError
from balancer.configuration import RoleConfig
from llm_engines.base import ChatResult, Message


class GenericAgent(Agent):
    """Payload ``{"input": "<text>"}``; result ``{"output": "<the model's answer>"}``."""

    name = "generic"

    @classmethod
    def validate_payload(cls, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise PayloadError("payload", 'must be a JSON object such as {"input": "..."}')
        if "input" not in payload:
            raise PayloadError("payload.input", "is required")
        text = payload["input"]
        if not isinstance(text, str) or not text.strip():
            raise PayloadError("payload.input", "must be a non-empty string")
        extra = sorted(payload.keys() - {"input"})
        if extra:
            raise PayloadError(f"payload.{extra[0]}", "unknown field (the generic agent takes only 'input')")
        return {"input": text}

    def build_messages(self, payload: Mapping[str, Any], role: RoleConfig) -> list[Message]:
        return [
            {"role": "system", "content": role.system_prompt},
            {"role": "user", "content": payload["input"]},
        ]

    def parse_result(self, reply: ChatResult) -> dict[str, Any]:
        return {"output": reply.text.strip()}
