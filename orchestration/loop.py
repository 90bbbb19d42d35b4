"""The feedback loop's state, read from a task's history, and the decision after each round's checks.

A coder task runs rounds. Round n is: Debug's diagnosis of round n-1 (from
round 2 on), the coder's code, QA's checks in parallel, and the verdict. Every
step is a history event whose ``detail.step`` is ``"<n>.<kind>"``, so the state
is the history: nothing about the loop lives only in a worker's memory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Routes a verdict can take.
DONE = "done"  # every check passed
DEBUG = "debug"  # Debug diagnoses, then the coder (or QA's tests) try again
ESCALATE = "escalate"  # the same, with the stronger coder role from now on
GIVE_UP = "give_up"  # out of rounds, or the same failure again with nowhere to escalate

# The roles a loop uses, by name, in the coder's profile.
QA_ROLE = "qa"
DEBUG_ROLE = "debug"
ESCALATION_ROLE = "deep_coder"


def current_run(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history since the task was last retried: a retried task starts its steps afresh."""
    for index in range(len(history) - 1, -1, -1):
        if history[index]["event"] == "retried":
            return history[index:]
    return history


def jobs_run(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history since the task's current jobs were started: since it was last retried or took
    feedback. Jobs noted before are no longer the task's: feedback comes only to a task that awaits it
    or has finished, and a job of the round before it (a check still running when its task failed)
    must neither record into the feedback's round nor fail it."""
    for index in range(len(history) - 1, -1, -1):
        if history[index]["event"] in ("retried", "feedback"):
            return history[index:]
    return history


def step_key(iteration: int, kind: str) -> str:
    return f"{iteration}.{kind}"


def parse_step(step: str) -> tuple[int, str]:
    number, _, kind = step.partition(".")
    return int(number), kind


@dataclass
class LoopState:
    """Where a coder task's loop stands, from its history."""

    iteration: int = 0
    coder_role: str = ""
    escalated: bool = False
    # Rounds judged since the loop started, escalated or took feedback: what max_iterations bounds.
    rounds_in_role: int = 0
    files: list[dict[str, str]] = field(default_factory=list)
    run: str = ""
    notes: str = ""
    tests: str | None = None
    tests_source: str | None = None  # "given" (payload or feedback) or "written" (by QA)
    signatures: list[str | None] = field(default_factory=list)  # per judged round of the current role
    last_checks: list[dict[str, Any]] = field(default_factory=list)
    debug: dict[str, Any] | None = None  # the latest diagnosis
    debug_iteration: int = 0
    feedback: str | None = None
    feedback_iteration: int = 0
    llm: str | None = None
    code_role: str | None = None  # the coder role that wrote ``files`` (and whose LLM ``llm`` is)


def undone_feedback(history: list[dict[str, Any]]) -> set[int]:
    """The positions in ``history`` of the feedback events whose round could not be queued: the request
    that recorded one undid it (``services.task_feedback``) with an ``enqueue_failed`` right after it, or
    after the ``scheduled`` note of the round's jobs. Such feedback was refused: it counts for nothing."""
    undone = set()
    feedback = None
    for index, event in enumerate(history):
        kind = event["event"]
        if kind == "feedback":
            feedback = index
        elif kind == "enqueue_failed" and feedback is not None:
            undone.add(feedback)
            feedback = None
        elif kind != "scheduled":
            feedback = None
    return undone


def loop_state(packet: Mapping[str, Any]) -> LoopState:
    """The loop's state from the packet's payload and history."""
    payload = packet["payload"]
    state = LoopState(coder_role=packet["role"], files=[dict(item) for item in payload.get("files", [])])
    if payload.get("tests"):
        state.tests, state.tests_source = payload["tests"], "given"
    history = current_run(packet["history"])
    undone = undone_feedback(history)
    for index, event in enumerate(history):
        detail = event["detail"]
        step = detail.get("step")
        kind = event["event"]
        if kind == "escalated":
            state.coder_role, state.escalated = detail["to"], True
            state.rounds_in_role, state.signatures = 0, []
        elif kind == "feedback":
            if index in undone:
                continue  # its round was never queued, and the task went back to where it was
            state.rounds_in_role, state.signatures = 0, []
            state.feedback, state.feedback_iteration = detail["feedback"], detail["iteration"]
            if detail.get("tests"):
                state.tests, state.tests_source = detail["tests"], "given"
        elif not step or "." not in step:
            continue
        elif kind == "step" and step.endswith(".coder"):
            result = detail["result"]
            state.iteration = parse_step(step)[0]
            state.files = detail["files"]
            state.run, state.notes = result["run"], result["notes"]
            state.llm, state.code_role = event["llm"], state.coder_role
        elif kind == "step" and step.endswith(".debug"):
            state.debug, state.debug_iteration = detail["result"], parse_step(step)[0]
        elif kind == "check" and detail["check"] == "tests" and detail.get("test_code") is not None:
            # QA wrote these tests in this round (a round that reuses them records no code).
            state.tests, state.tests_source = detail["test_code"], "written"
        elif kind == "verdict":
            state.iteration = parse_step(step)[0]
            state.rounds_in_role += 1
            state.signatures.append(detail.get("signature"))
            state.last_checks = detail["checks"]
    return state


def keeps_code(state: LoopState) -> bool:
    """After Debug's step: whether the code stands and QA writes new tests, rather than the coder
    fixing the code. Debug must have blamed QA's own tests (given tests it blames wait for a person),
    no check that does not run the tests may have failed (a static check's failure is the code's,
    whatever Debug says about the tests), and the code must be the current coder's: after an
    escalation the role escalated to writes the code first, or its rounds would be spent on checks of
    the code it was called in to replace."""
    return (
        state.code_role == state.coder_role
        and bool(state.debug)
        and state.debug["wrong"] == "test"
        and state.tests_source == "written"
        and not any(check["check"] == "static" and not check["passed"] for check in state.last_checks)
    )


def failure_signature(checks: list[Mapping[str, Any]]) -> str | None:
    """What identifies a round's failure, to tell when it repeats; None when everything passed.

    The LLM review's wording varies from call to call, so it counts only when
    it is the sole failure; memory addresses in tracebacks are masked.
    """
    failed = [check for check in checks if not check["passed"]]
    if not failed:
        return None
    core = [check for check in failed if check["check"] != "review"] or failed
    text = "\n".join(f"{check['check']}: {check['output']}" for check in sorted(core, key=lambda c: c["check"]))
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Verdict:
    route: str
    reason: str
    signature: str | None


def decide(
    state: LoopState, checks: list[Mapping[str, Any]], *, max_iterations: int, escalate_to: str | None
) -> Verdict:
    """The route after a round's checks. ``state`` is the loop before this round's verdict;
    ``escalate_to`` is the role to escalate to, or None when escalation is not possible."""
    signature = failure_signature(checks)
    if signature is None:
        return Verdict(DONE, "every check passed", None)
    failed = ", ".join(check["check"] for check in checks if not check["passed"])
    rounds = state.rounds_in_role + 1
    repeated = bool(state.signatures) and state.signatures[-1] == signature
    if repeated:
        why = f"the same failure ({failed}) repeated"
    elif rounds >= max_iterations:
        why = f"{failed} still failing after {rounds} round{'s' if rounds > 1 else ''} of {state.coder_role}"
    else:
        return Verdict(DEBUG, f"{failed} failed", signature)
    if escalate_to and not state.escalated:
        return Verdict(ESCALATE, f"{why}: escalating from {state.coder_role} to {escalate_to}", signature)
    return Verdict(GIVE_UP, why, signature)


# How much of the failed checks' output a prompt carries: enough to see the failure, and little
# enough that the previous code, the failure and Debug's notes fit a small model's context.
FAILURES_CHARS = 1500


def failures_text(checks: list[Mapping[str, Any]]) -> str:
    """The failed checks, as Debug and the coder read them."""
    text = "\n\n".join(f"[{check['check']}] {check['output']}" for check in checks if not check["passed"])
    return text if len(text) <= FAILURES_CHARS else text[:FAILURES_CHARS] + "\n[... cut ...]"
