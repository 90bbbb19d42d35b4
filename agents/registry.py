"""Agent names, as configuration.json's roles name them, mapped to their classes (imported lazily)."""

from __future__ import annotations

from agents.base import Agent
from llm_engines.registry import Registry

AGENTS = Registry(
    "agent",
    {
        "generic": "agents.generic.GenericAgent",
    },
)


def agent_class(name: str) -> type[Agent]:
    return AGENTS.load(name)
