"""The generic agent: answers any role with the role's system prompt and the user's input, as free text.

It is for roles an operator adds without an agent of their own; the built-in
roles have agents with structured output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.base import PAYLOAD_TEXT, Agent, obj
from balancer.configuration import RoleConfig
from llm_engines.base import Message


class GenericAgent(Agent):
    """Payload ``{"input": "<text>"}``; result ``{"output": "<the model's answer>"}``."""

    name = "generic"
    input_schema = obj({"input": PAYLOAD_TEXT})
    text_field = "input"

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        return [self.system_message(role), {"role": "user", "content": payload["input"]}]
