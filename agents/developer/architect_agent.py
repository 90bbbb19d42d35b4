"""Architect: components, interfaces, data flow and risks of a design."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.base import PAYLOAD_TEXT, Agent, array, obj, text
from balancer.configuration import Configuration, RoleConfig
from llm_engines.base import Message


class ArchitectAgent(Agent):
    name = "architect"
    input_schema = obj(
        {"requirements": PAYLOAD_TEXT, "constraints": array(text(2000), max_items=20)}, required=("requirements",)
    )
    text_field = "requirements"
    reply_format = (
        'Reply with JSON: {"components": [{"name": "...", "responsibility": "..."}], '
        '"interfaces": [{"name": "...", "between": ["component", "component"], "description": "..."}], '
        '"data_flow": ["..."], "risks": [{"risk": "...", "mitigation": "..."}]}.'
    )

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any]:
        component = obj({"name": text(30), "responsibility": text(80)})
        # "between" names components: as long as their names.
        interface = obj({"name": text(30), "between": array(text(30), max_items=2), "description": text(80)})
        risk = obj({"risk": text(80), "mitigation": text(80)})
        return obj(
            {
                "components": array(component, min_items=1, max_items=4),
                "interfaces": array(interface, max_items=3),
                "data_flow": array(text(80), max_items=3),
                "risks": array(risk, max_items=3),
            }
        )

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        content = f"Requirements:\n{payload['requirements']}"
        if payload.get("constraints"):
            content += "\n\nConstraints:\n" + "\n".join(f"- {item}" for item in payload["constraints"])
        return [self.system_message(role), {"role": "user", "content": content}]
