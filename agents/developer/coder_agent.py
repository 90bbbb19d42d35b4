"""The coders (fast_coder and deep_coder): code for an instruction, plus how to run it.

Both roles use this agent; deep_coder gets a stronger, larger-context LLM
through its role's preferences. In the feedback loop the orchestration adds
the round's context: the previous code, QA's failures and Debug's instruction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents.base import (
    FILES,
    LOOP,
    PAYLOAD_TEXT,
    Agent,
    ReplyProblem,
    array,
    long_text,
    obj,
    path_problem,
    render_files,
    text,
)
from balancer.configuration import Configuration, RoleConfig
from llm_engines.base import Message

# The sandbox runs Python; other languages are refused on submit rather than accepted and never tested.
LANGUAGES = ("python",)
MAIN_MODULE = "solution.py"
# A reply's file path: simple enough for every engine's grammar; ".." is refused after parsing.
REPLY_PATH = {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_./-]{0,59}$", "maxLength": 60}


class CoderAgent(Agent):
    name = "coder"
    placeholder_fields = frozenset({"content"})
    input_schema = obj(
        {
            "instruction": PAYLOAD_TEXT,
            "language": {"enum": list(LANGUAGES)},
            "files": FILES,
            "tests": PAYLOAD_TEXT,
            "max_iterations": {"type": "integer", "minimum": 1, "maximum": 10},
        },
        required=("instruction",),
    )
    text_field = "instruction"
    defaults = {"language": "python"}
    flow = LOOP
    reply_format = (
        'Reply with JSON: {"files": [{"path": "solution.py", "content": "<the whole file>"}], '
        '"run": "<the command that runs it>", "notes": "<one sentence>"}. Put the code in solution.py unless the '
        "request names other files: tests import it with `from solution import ...`. Write complete files, "
        "not fragments."
    )

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any]:
        file = obj({"path": REPLY_PATH, "content": long_text(role, 0.36)})
        return obj({"files": array(file, min_items=1, max_items=2), "run": text(100), "notes": text(150, min_length=0)})

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        parts = [f"Write {payload['language']} code for this request:\n{payload['instruction']}"]
        if payload.get("files"):
            parts.append(f"The existing files:\n{render_files(payload['files'])}")
        context = context or {}
        # Tests a reviewer's feedback gave replace the payload's: they are the ones QA runs.
        tests = context.get("tests") or payload.get("tests")
        if tests:
            parts.append(f"The code must pass these tests:\n{tests}")
        if context.get("previous_files"):
            parts.append(f"Your previous code:\n{render_files(context['previous_files'])}")
        if context.get("failures"):
            parts.append(f"It failed these checks:\n{context['failures']}")
        if context.get("debug"):
            debug = context["debug"]
            parts.append(f"The debugger found: {debug['cause']}\nFix: {debug['fix']}")
        if context.get("feedback"):
            parts.append(f"Feedback from a reviewer:\n{context['feedback']}")
        if context.get("previous_files"):
            parts.append("Write the corrected files in full.")
        return [self.system_message(role), {"role": "user", "content": "\n\n".join(parts)}]

    def parse_result(
        self, data: dict[str, Any], payload: Mapping[str, Any], context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        # The reply is merged onto the given files, or onto the previous round's (which include them).
        earlier = [*(payload.get("files") or []), *((context or {}).get("previous_files") or [])]
        given = tuple(dict.fromkeys(item["path"] for item in earlier))
        if found := path_problem([item["path"] for item in data["files"]], others=given):
            index, problem = found
            raise ReplyProblem(f"files[{index}].path {data['files'][index]['path']!r} {problem}")
        # A path given twice: the later file is the one meant, as when files are written in turn.
        return {"files": merge_files([], data["files"]), "run": data["run"], "notes": data["notes"]}


def merge_files(base: list[Mapping[str, str]], changed: list[Mapping[str, str]]) -> list[dict[str, str]]:
    """The project's files after a coder's reply: the given files, with the reply's replacing those of the
    same path."""
    merged = {item["path"]: dict(item) for item in base}
    merged.update({item["path"]: dict(item) for item in changed})
    return list(merged.values())
