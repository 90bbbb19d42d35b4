"""Planner: a goal broken into ordered steps, each naming the role that runs it, its input and its dependencies.

With ``"execute": true`` the orchestration runs the plan: a child task per
step, the independent ones in parallel (orchestration/orchestration_engine.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.base import PAYLOAD_TEXT, PLAN, Agent, ReplyProblem, array, obj, text
from balancer.configuration import Configuration, RoleConfig
from llm_engines.base import Message

MAX_STEPS = 5


def step_roles(role: RoleConfig, config: Configuration) -> list[str]:
    """The roles of the planner's profile that a step can name: those that take a text request, except
    planners (a plan does not plan again) and Debug (it diagnoses QA's failures inside the loop)."""
    from agents.registry import agent_class

    names = []
    for name, candidate in config.profiles[role.profile].roles.items():
        cls = agent_class(candidate.agent)
        if cls.text_field and cls.plannable and cls.flow != PLAN:
            names.append(name)
    return names


class PlannerAgent(Agent):
    name = "planner"
    placeholder_fields = frozenset({"input"})
    input_schema = obj(
        {"goal": PAYLOAD_TEXT, "context": PAYLOAD_TEXT, "execute": {"type": "boolean"}}, required=("goal",)
    )
    text_field = "goal"
    defaults = {"execute": False}
    flow = PLAN

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any]:
        # One schema per position, so that even a grammar-driven small model can only name the step's
        # own id ("s1", "s2"...) and depend on steps listed before it.
        positions = []
        for index in range(MAX_STEPS):
            earlier = [f"s{number}" for number in range(1, index + 1)]
            # The first step depends on nothing: a constant, which every engine's grammar can express.
            depends_on = array({"enum": earlier}, max_items=index) if earlier else {"const": []}
            positions.append(
                obj(
                    {
                        "id": {"const": f"s{index + 1}"},
                        "role": {"enum": step_roles(role, config)},
                        "input": text(240),
                        "depends_on": depends_on,
                    }
                )
            )
        steps = {"type": "array", "prefixItems": positions, "items": False, "minItems": 1, "maxItems": MAX_STEPS}
        return obj({"steps": steps})

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        config = (context or {}).get("config")
        roles = ", ".join(step_roles(role, config)) if config else "the roles of the profile"
        system = self.system_message(role)
        system = {
            **system,
            "content": system["content"]
            + "\n\nReply with JSON: "
            + '{"steps": [{"id": "s1", "role": "...", "input": "<what this step must do>", "depends_on": []}]}. '
            + f"Each step's role is one of: {roles}. A step depends only on steps listed before it; "
            + "steps that do not depend on each other can run at the same time.",
        }
        content = f"Goal:\n{payload['goal']}"
        if payload.get("context"):
            content += f"\n\nContext:\n{payload['context']}"
        return [system, {"role": "user", "content": content}]

    def run(self, **kwargs: Any) -> Any:
        # The prompt names the roles a step may use, which are the configuration's.
        kwargs["context"] = {**(kwargs.get("context") or {}), "config": kwargs["config"]}
        return super().run(**kwargs)

    def parse_result(
        self, data: dict[str, Any], payload: Mapping[str, Any], context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        seen: set[str] = set()
        for index, step in enumerate(data["steps"]):
            if step["id"] in seen:
                raise ReplyProblem(f"steps[{index}].id {step['id']!r} is used twice")
            if not step["input"].strip():
                # The step's role would refuse it when the plan starts it, failing the whole plan then.
                raise ReplyProblem(f"steps[{index}].input is blank: say what the step is to do")
            for dependency in step["depends_on"]:
                if dependency not in seen:
                    raise ReplyProblem(
                        f"steps[{index}].depends_on names {dependency!r}, which is not a step listed before it"
                    )
            seen.add(step["id"])
        return {"steps": data["steps"]}
