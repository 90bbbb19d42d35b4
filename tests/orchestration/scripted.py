"""The scripted engine set up for a test: every LLM call of the server's roles answered from rules.

The engine (llm_engines/testing.py) stands in for the model, which is the one
part these tests do not exercise: they are about the flows around it. The
rules match the agents' own prompts (their reply formats), so a rule answers
one agent.
"""

from __future__ import annotations

import json
from pathlib import Path

# Markers of each agent's prompt (from its reply format).
CODER = r'Reply with JSON: \{"files"'
QA_TESTS = r'Reply with JSON: \{"tests"'
QA_REVIEW = r'Reply with JSON: \{"passed"'
DEBUG = r"whether the code or the test is wrong"
PLANNER = r'Reply with JSON: \{"steps"'
ARCHITECT = r'Reply with JSON: \{"components"'
DIAGNOSIS = r'Reply with JSON: \{"causes"'


def code_reply(body: str) -> dict:
    return {"files": [{"path": "solution.py", "content": body}], "run": "python solution.py", "notes": "scripted"}


def use_script(edit_config, path: Path, rules: list[dict], *, llm_id: str = "scripted") -> None:
    """Write the rules and make the scripted engine the only enabled LLM. A test whose engine fails
    uses an ``llm_id`` of its own, so that the breaker it trips (in Redis) does not slow the others."""
    path.write_text(json.dumps({"rules": rules}))

    def change(raw: dict) -> None:
        for llm in raw["llms"]:
            llm["toggle"] = False
        raw["llms"].append(
            {
                "id": llm_id,
                "engine": "scripted",
                "source": "local",
                "model": "scripted",
                "capabilities": ["chat", "code"],
                "context_length": 8192,
                "max_concurrency": 4,
                "options": {"script": str(path)},
            }
        )

    edit_config(change)
