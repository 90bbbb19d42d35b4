"""The load balancer's rules, by the numbers in balancer/load_balancer_rules.md."""

import pytest

from balancer.configuration import parse_configuration
from balancer.load_balancer import NoCandidate, choose


def config_with(llms, role_overrides=None, default_llms=()):
    role = {"agent": "generic", "system_prompt": "be useful", **(role_overrides or {})}
    return parse_configuration(
        {
            "llms": [{"engine": "instant", "source": "local", "model": "m", **llm} for llm in llms],
            "profiles": {"p": {"default_llms": list(default_llms), "roles": {"r": role}}},
        }
    )


def decide(config):
    return choose(config, config.role("p", "r"))


def test_rule_1_toggled_off_llms_are_never_candidates():
    config = config_with([{"id": "off", "toggle": False}, {"id": "on"}])
    decision = decide(config)
    assert decision.llm.id == "on"
    assert decision.excluded == {"off": "rule 1: toggled off"}


def test_rule_1_a_locked_llm_serves_only_the_roles_that_name_it():
    llms = [{"id": "locked", "locked": True}, {"id": "open"}]
    assert decide(config_with(llms)).llm.id == "open"
    assert "locked" in decide(config_with(llms)).excluded["locked"]
    assert decide(config_with(llms, {"preferred_llms": ["locked"]})).llm.id == "locked"


def test_rule_1_a_role_gets_only_llms_with_its_capabilities():
    config = config_with(
        [{"id": "text", "capabilities": ["chat"]}, {"id": "eyes", "capabilities": ["chat", "vision"]}],
        {"capabilities": ["vision"]},
    )
    decision = decide(config)
    assert decision.llm.id == "eyes"
    assert decision.excluded["text"] == "rule 1: lacks capabilities vision"


def test_rule_1_no_candidate_says_why_each_llm_was_excluded():
    config = config_with([{"id": "off", "toggle": False}, {"id": "text"}], {"capabilities": ["vision"]})
    with pytest.raises(NoCandidate) as error:
        decide(config)
    assert "off: rule 1: toggled off" in str(error.value)
    assert "text: rule 1: lacks capabilities vision" in str(error.value)


def test_rule_2_role_preferences_then_profile_defaults_then_the_rest():
    llms = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    assert decide(config_with(llms)).candidates == ("a", "b", "c")
    assert decide(config_with(llms, default_llms=["c"])).candidates == ("c", "a", "b")
    assert decide(config_with(llms, {"preferred_llms": ["b"]}, default_llms=["c"])).candidates == ("b", "c", "a")
    assert decide(config_with(llms, {"preferred_llms": ["b"]})).llm.id == "b"
