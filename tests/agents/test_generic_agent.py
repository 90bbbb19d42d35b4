"""The generic agent: its payload rules, and one real step with SmolLM2 through the balancer."""

import dataclasses

import pytest

from agents.base import PayloadError
from agents.generic import GenericAgent
from agents.registry import agent_class
from orchestration.runtime import configuration, load_balancer


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (None, "payload"),
        ([], "payload"),
        ({}, "payload.input"),
        ({"input": "   "}, "payload.input"),
        ({"input": ["a"]}, "payload.input"),
        ({"input": "a", "mode": "x"}, "payload.mode"),
    ],
)
def test_payload_rejections_name_the_field(payload, field):
    with pytest.raises(PayloadError) as error:
        GenericAgent.validate_payload(payload)
    assert error.value.field == field


def test_a_real_step_with_the_default_model():
    config = configuration()
    # A role an operator added with the generic agent.
    role = dataclasses.replace(config.role("productivity", "writer"), agent="generic")
    agent = agent_class(role.agent)()
    outcome = agent.run(
        payload={"input": "Write one short sentence about the sea."}, role=role, config=config, balancer=load_balancer()
    )
    assert outcome.result["output"]
    assert outcome.llm == "smollm2-135m"
    detail = outcome.step_detail()
    assert detail["tokens"]["completion"] > 0
    assert detail["balancer"]["chosen"] == "smollm2-135m"
