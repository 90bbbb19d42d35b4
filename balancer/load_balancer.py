"""The load balancer: which configured LLM serves a role's next call, and why.

Rules are numbered as in balancer/load_balancer_rules.md; keep the two true to
each other. This first version filters and orders by preference; health,
capacity, latency-based choice and failover come with issue 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from balancer.configuration import Configuration, LLMConfig, RoleConfig


class NoCandidate(LookupError):
    """No configured LLM can serve the role; the message says why each was excluded."""


@dataclass(frozen=True)
class Decision:
    """The LLM chosen, the candidates in order, and the rule that excluded each other LLM."""

    llm: LLMConfig
    candidates: tuple[str, ...]
    excluded: dict[str, str] = field(default_factory=dict)

    def as_detail(self) -> dict:
        return {"chosen": self.llm.id, "candidates": list(self.candidates), "excluded": dict(self.excluded)}


def _exclusion(llm: LLMConfig, role: RoleConfig) -> str | None:
    """Rule 1: why ``llm`` cannot serve ``role``, or None when it can."""
    if not llm.toggle:
        return "rule 1: toggled off"
    if llm.locked and llm.id not in role.preferred_llms:
        return "rule 1: locked to the roles that name it"
    missing = role.capabilities - llm.capabilities
    if missing:
        return f"rule 1: lacks capabilities {', '.join(sorted(missing))}"
    return None


def candidates(config: Configuration, role: RoleConfig) -> tuple[list[LLMConfig], dict[str, str]]:
    """The LLMs that can serve ``role``, in preference order (rule 2), and the reasons for the others."""
    excluded: dict[str, str] = {}
    eligible: dict[str, LLMConfig] = {}
    for llm in config.llms.values():
        reason = _exclusion(llm, role)
        if reason:
            excluded[llm.id] = reason
        else:
            eligible[llm.id] = llm
    profile = config.profiles[role.profile]
    order = [*role.preferred_llms, *profile.default_llms, *eligible]
    ranked = list(dict.fromkeys(llm_id for llm_id in order if llm_id in eligible))
    return [eligible[llm_id] for llm_id in ranked], excluded


def choose(config: Configuration, role: RoleConfig) -> Decision:
    """The LLM for the role's next call, or ``NoCandidate`` saying why there is none."""
    ranked, excluded = candidates(config, role)
    if not ranked:
        reasons = "; ".join(f"{llm_id}: {reason}" for llm_id, reason in excluded.items()) or "no LLM is configured"
        raise NoCandidate(
            f"no enabled LLM can serve role {role.queue} (needs {', '.join(sorted(role.capabilities))}): {reasons}"
        )
    return Decision(llm=ranked[0], candidates=tuple(llm.id for llm in ranked), excluded=excluded)
