"""Debug: from a QA failure, the cause, who is wrong (the code or the test), and an instruction for the fix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.base import PAYLOAD_TEXT, Agent, obj, text
from balancer.configuration import Configuration, RoleConfig
from llm_engines.base import Message


class DebugAgent(Agent):
    name = "debug"
    input_schema = obj(
        {"failure": PAYLOAD_TEXT, "instruction": PAYLOAD_TEXT, "code": PAYLOAD_TEXT, "tests": PAYLOAD_TEXT},
        required=("failure",),
    )
    text_field = "failure"
    plannable = False  # it diagnoses a QA failure inside the loop, not a step of a plan
    reply_format = (
        'Reply with JSON: {"cause": "...", "wrong": "code" or "test", "fix": "..."}: the cause of the failure, '
        "whether the code or the test is wrong, and a precise instruction for the fix."
    )

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any]:
        return obj({"cause": text(200), "wrong": {"enum": ["code", "test"]}, "fix": text(300)})

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        parts = []
        if payload.get("instruction"):
            parts.append(f"The code was written for this instruction:\n{payload['instruction']}")
        if payload.get("code"):
            parts.append(f"The code:\n{payload['code']}")
        if payload.get("tests"):
            parts.append(f"The tests:\n{payload['tests']}")
        parts.append(f"The failure:\n{payload['failure']}")
        return [self.system_message(role), {"role": "user", "content": "\n\n".join(parts)}]
