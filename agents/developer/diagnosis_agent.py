"""Diagnosis: from a problem report, logs and code, the likely causes ranked, their evidence, the next checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.base import PAYLOAD_TEXT, Agent, array, obj, text
from balancer.configuration import Configuration, RoleConfig
from llm_engines.base import Message

LIKELIHOODS = ("high", "medium", "low")


class DiagnosisAgent(Agent):
    name = "diagnosis"
    input_schema = obj({"problem": PAYLOAD_TEXT, "logs": PAYLOAD_TEXT, "code": PAYLOAD_TEXT}, required=("problem",))
    text_field = "problem"
    reply_format = (
        'Reply with JSON: {"causes": [{"cause": "...", "likelihood": "high|medium|low", "evidence": "..."}], '
        '"next_checks": ["..."]}. List the causes from the most to the least likely.'
    )

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any]:
        cause = obj({"cause": text(100), "likelihood": {"enum": list(LIKELIHOODS)}, "evidence": text(150)})
        return obj({"causes": array(cause, min_items=1, max_items=3), "next_checks": array(text(100), max_items=3)})

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        parts = [f"Problem:\n{payload['problem']}"]
        if payload.get("logs"):
            parts.append(f"Logs:\n{payload['logs']}")
        if payload.get("code"):
            parts.append(f"Code:\n{payload['code']}")
        return [self.system_message(role), {"role": "user", "content": "\n\n".join(parts)}]

    def parse_result(
        self, data: dict[str, Any], payload: Mapping[str, Any], context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        # The most likely first, as the result promises, whatever order the model wrote them in (a stable
        # sort: the model's order among causes of the same likelihood stands).
        causes = sorted(data["causes"], key=lambda cause: LIKELIHOODS.index(cause["likelihood"]))
        return {**data, "causes": causes}
