"""Agent names, as configuration.json's roles name them, mapped to their classes (imported lazily)."""

from __future__ import annotations

from agents.base import Agent
from llm_engines.registry import Registry

AGENTS = Registry(
    "agent",
    {
        "generic": "agents.generic.GenericAgent",
        "diagnosis": "agents.developer.diagnosis_agent.DiagnosisAgent",
        "architect": "agents.developer.architect_agent.ArchitectAgent",
        "planner": "agents.developer.planner_agent.PlannerAgent",
        "coder": "agents.developer.coder_agent.CoderAgent",
        "qa": "agents.developer.qa_agent.QAAgent",
        "debug": "agents.developer.debug_agent.DebugAgent",
        "vision": "agents.productivity.vision_agent.VisionAgent",
        "summarizer": "agents.productivity.summarizer_agent.SummarizerAgent",
        "writer": "agents.productivity.writer_agent.WriterAgent",
        "translator": "agents.productivity.translator_agent.TranslatorAgent",
    },
)


def agent_class(name: str) -> type[Agent]:
    return AGENTS.load(name)
