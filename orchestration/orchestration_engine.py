"""The orchestration engine: runs a task's steps through their agents and decides what follows each one.

After the first step (``task_step``, which claims the queued task) the flow
depends on the role's agent (agents/base.py):

- single: the step's result finishes the task;
- plan: a planner whose payload asks for execution delegates a child task per
  step; the ready ones run in parallel, a dependent one once its dependencies
  succeeded, and the parent finishes with their results (``plan_advance``);
- loop: the QA -> Debug -> Coder feedback loop (orchestration/loop.py): QA's
  checks run as a Celery group; the check recorded last runs the verdict in that
  check's job (``verdict_step``), which routes to done, Debug, an escalation to the
  stronger coder, or giving up;
- checks: a QA task runs the same checks on the code in its payload.

Every step is a history event whose ``detail.step`` names it, so a job that is
delivered twice finds its step done and only makes sure that what follows it
was scheduled (a ``scheduled`` event, written after the jobs are queued). A
running step holds a Redis lease per step, so a live step does not run twice while it renews it. One that lost
it (its worker cut off from Redis for the lease's time) may: it stops its LLM call at its next renewal
(``StepTakenOver``), and of two answers the second to be recorded is discarded.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from kombu.exceptions import OperationalError as KombuOperationalError

from agents.base import CHECKS, LOOP, PLAN, Agent, AgentOutcome, PayloadError, ReplyError, render_files
from agents.developer import qa_agent
from agents.developer.coder_agent import merge_files
from agents.registry import agent_class
from agents.sandbox import RunCancelled, SandboxUnavailable
from balancer.configuration import Configuration, RoleConfig
from balancer.load_balancer import StepTakenOver, candidates, estimate_tokens
from llm_engines.errors import EngineError
from orchestration import loop
from orchestration.leases import StepLease
from orchestration.packets import (
    AWAITING_FEEDBACK,
    CANCELLED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    history_event,
    new_packet,
)
from orchestration.runtime import HARD_LIMIT_MARGIN_S, configuration, load_balancer, task_store
from orchestration.state_store import CorruptState, StorageUnavailable, TaskExists, TaskNotFound

logger = logging.getLogger(__name__)

MAIN = "main"  # the first step of a task that is not a loop
# Redis (the leases, the balancer's state, the channels) or the broker not answering: a step that meets one
# is left to the recovery sweep rather than failed.
OUTAGES = (redis.RedisError, KombuOperationalError, StorageUnavailable)


class StepBusy(Exception):
    """A live worker still holds the step's lease; the job should come back after ``countdown`` seconds."""

    def __init__(self, countdown: float) -> None:
        super().__init__(f"the step's lease is held for {countdown:.1f}s more")
        self.countdown = countdown


class StepRetry(Exception):
    """A transient engine failure: the job should run the step again after ``countdown`` seconds."""

    def __init__(self, countdown: float, reason: str) -> None:
        super().__init__(reason)
        self.countdown = countdown


# -- the first step -------------------------------------------------------------------------------


def task_step(*, task_id: str, job_id: str, worker: str) -> str:
    """Run the task's first step if this job may; returns the task's status afterwards.

    A job runs the step when it takes the task's lease and then claims the
    task under its file lock: a queued task, or a running one claimed by this
    same job whose worker died (its lease expired). A job that finds the lease
    held by a live worker either waits (``StepBusy``: its own job came back
    early, or the task was queued again while an old step still runs) or has
    nothing to do.
    """
    lease = StepLease(task_id, job_id)
    if not lease.acquire():
        packet = task_store().read(task_id)
        own = packet["status"] == RUNNING and _claimed_by(packet) == job_id
        if packet["status"] == QUEUED or own:
            raise StepBusy(lease.remaining_s() + 0.5)
        return packet["status"]

    def claim(packet: dict[str, Any]) -> bool:
        if packet["status"] == QUEUED:
            event = "claimed"
        elif (
            packet["status"] == RUNNING
            and _claimed_by(packet) == job_id
            and _step_event(packet, _first_key(packet)) is None
        ):
            # The worker that ran it died (its lease expired), or the job retries a transient failure.
            event = "retrying" if packet["history"][-1]["event"] == "step_retry" else "reclaimed"
        else:
            return False
        packet["status"] = RUNNING
        packet["history"].append(history_event(event, status=RUNNING, detail={"worker": worker, "job_id": job_id}))
        return True

    with lease:
        packet, claimed = task_store().update(task_id, claim)
        if not claimed:
            logger.info("task %s: job %s not run, the task is %s", task_id, job_id, packet["status"])
            _resume(packet)
            return packet["status"]
        return _supervised(packet, job_id, lambda: _first_step(packet, job_id), label=_first_key(packet))


def _first_step(packet: dict[str, Any], job_id: str) -> str:
    task_id = packet["task_id"]
    config = configuration()
    role = config.role(packet["profile"], packet["role"])
    agent = agent_class(role.agent)()
    payload = agent.validate_payload(packet["payload"])
    if agent.flow == CHECKS:
        _schedule(packet, "1.checks", _checks(1), chord=True)
        if packet["history"][-1]["event"] == "reclaimed":  # its worker died, maybe before it queued them
            _schedule(task_store().read(task_id), "1.checks", [], republish=True)
        return RUNNING
    first = _first_key(packet)
    if agent.flow == LOOP:
        return _coder_step(task_id, first, job_id=job_id)
    outcome = _run_agent(agent, payload=payload, role=role, config=config)
    delegate = agent.flow == PLAN and payload.get("execute")
    status = RUNNING if delegate else SUCCEEDED
    packet = _record(
        task_id, MAIN, agent.name, outcome, job_id=job_id, status=status, result=outcome.result, finish=not delegate
    )
    if packet is not None and delegate:
        _delegate(packet, outcome.result["steps"], config)
    elif packet is not None:
        return packet["status"]
    return task_store().read(task_id)["status"]


def _resume(packet: dict[str, Any]) -> None:
    """A first job delivered again after its step was recorded (or after the task moved on): queue
    what follows the step if that may be missing, the plan's delegation included."""
    first = _first_key(packet)
    recorded = _step_event(packet, first) is not None
    if packet["status"] == RUNNING and recorded and first == MAIN and not _delegated(packet):
        _delegate(packet, packet["result"]["steps"], configuration())
    else:
        _after_step(packet, first, republish=True)


# -- later steps ----------------------------------------------------------------------------------


def later_step(*, task_id: str, step: str, job_id: str) -> Any:
    """Run a scheduled step of a running task (a coder or debug round, a check, a verdict) once."""
    lease = StepLease(f"{task_id}:{step}", job_id)
    if not lease.acquire():
        raise StepBusy(lease.remaining_s() + 0.5)
    with lease:
        packet = task_store().read(task_id)
        if not _expects(packet, job_id):
            # A job of a run before the task was retried, or of one cancelled before its jobs were noted.
            logger.info("task %s: job %s for step %s is not one of its current run", task_id, job_id, step)
            _after_step(packet, None)
            return {"skipped": "not a job of the task's current run"}
        done = _step_event(packet, step)
        if done is not None:
            _after_step(packet, step, republish=True)
            if done["event"] == "check":
                # Its worker may have died before the verdict ran, or before what the verdict noted was queued.
                _queue_verdict(packet, _noted_after(packet, job_id), redelivered=True)
            return done["detail"]
        if packet["status"] != RUNNING:
            logger.info("task %s: step %s not run, the task is %s", task_id, step, packet["status"])
            _after_step(packet, None)
            return {"skipped": packet["status"]}
        _, kind = loop.parse_step(step)
        if kind in qa_agent.CHECK_NAMES:
            return _check_step(packet, step, job_id)
        if kind == "verdict":
            return _supervised(packet, job_id, lambda: _verdict_step(packet, step, job_id), step=step)
        if kind == "coder":
            return _supervised(packet, job_id, lambda: _coder_step(task_id, step, job_id=job_id), step=step)
        if kind == "debug":
            return _supervised(packet, job_id, lambda: _debug_step(task_id, step, job_id), step=step)
        raise ValueError(f"unknown step {step!r}")


def _supervised(
    packet: dict[str, Any],
    job_id: str,
    run: Callable[[], Any],
    *,
    step: str | None = None,
    label: str = MAIN,
) -> Any:
    """Run a step; a transient engine failure is retried with backoff (``StepRetry``), any other
    failure fails the task with a reason a person can act on. ``step`` is None for the first step,
    which the job holds by its claim; ``label`` names it then."""
    task_id = packet["task_id"]
    name = step or label
    guard = partial(_job_in_force, job_id=job_id)
    try:
        return run()
    except StepTakenOver as exc:
        # Another worker took the step's lease and runs the step: this run leaves the task to it.
        logger.warning("task %s: step %s stopped: %s", task_id, name, exc)
        return {"skipped": str(exc)}
    except SoftTimeLimitExceeded:
        limit = _role_or_none(packet)
        seconds = f" of {limit.time_limit_s:g}s" if limit else ""
        return _fail(task_id, guard, f"step {name} exceeded its time limit{seconds}")
    except EngineError as exc:
        retries = _retry_if_transient(packet, name, job_id, exc)
        tried = f" (after {retries} retries)" if retries else ""
        return _fail(task_id, guard, f"step {name}: {exc}{tried}", balancer=getattr(exc, "balancer", None))
    except (LookupError, PayloadError, ReplyError, SandboxUnavailable) as exc:
        # LookupError: the role or its agent left the configuration, or no LLM can serve the role
        # any more (the balancer's NoCandidate).
        return _fail(task_id, guard, f"step {name}: {exc}", balancer=getattr(exc, "balancer", None))
    except OUTAGES as exc:
        # Redis or the broker did not answer (the balancer's state, the step's record's messages, the next
        # jobs' queueing), or the state directory could not be written (full, read-only): not the task's
        # fault, and nothing is failed. The job ends; once they answer again, the recovery sweep finds the
        # task with nothing moving it on and queues its jobs again (a recorded step stays recorded; one that
        # was not is run again).
        logger.warning("task %s: step %s stopped by an outage of Redis, the broker or the state directory: %s",
                       task_id, name, exc)  # fmt: skip
        raise
    except Exception as exc:
        _fail(task_id, guard, f"step {name}: internal error: {type(exc).__name__}: {exc}")
        raise


def _retry_if_transient(packet: dict[str, Any], name: str, job_id: str, exc: EngineError) -> int:
    """``StepRetry`` when the engine failure is transient and the step has retries left
    (``STEP_RETRIES``, with a backoff that doubles); else the number of retries it had."""
    # Engine retries of this step so far (the job's own retry count also counts its waits for a lease).
    retries = sum(
        1
        for event in loop.current_run(packet["history"])
        if event["event"] == "step_retry" and event["detail"]["step"] == name
    )
    if exc.transient and retries < settings.STEP_RETRIES:
        countdown = settings.STEP_RETRY_BACKOFF_SECONDS * 2**retries
        _note_retry(packet["task_id"], name, job_id, str(exc), countdown, retries + 1)
        raise StepRetry(countdown, str(exc)) from exc
    return retries


def _note_retry(task_id: str, step: str, job_id: str, error: str, countdown: float, attempt: int) -> None:
    detail = {"step": step, "job_id": job_id, "error": error, "retry": attempt, "in_s": countdown}
    event = history_event("step_retry", status=RUNNING, detail=detail)

    def append(packet: dict[str, Any]) -> bool:
        # Not for a job of a round a feedback left behind: it would use up the retries of the new round's step.
        if packet["status"] != RUNNING or not _job_in_force(packet, job_id=job_id):
            return False
        packet["history"].append(event)
        return True

    task_store().update(task_id, append)


def _append_if_running(task_id: str, event: dict[str, Any]) -> bool:
    """Add ``event`` to the task's history if the task is still running; whether it was added."""

    def append(packet: dict[str, Any]) -> bool:
        if packet["status"] != RUNNING:
            return False
        packet["history"].append(event)
        return True

    return task_store().update(task_id, append)[1]


# -- the feedback loop ----------------------------------------------------------------------------


def _coder_step(task_id: str, step: str, *, job_id: str) -> str:
    packet = task_store().read(task_id)
    state = loop.loop_state(packet)
    iteration, _ = loop.parse_step(step)
    config = configuration()
    role = config.role(packet["profile"], state.coder_role)
    agent = agent_class(role.agent)()
    payload = agent.validate_payload(packet["payload"])
    context: dict[str, Any] = {}
    if iteration > 1 or state.feedback:
        context = {"previous_files": state.files, "failures": loop.failures_text(state.last_checks)}
        if state.debug and state.debug_iteration == iteration:
            context["debug"] = state.debug
        if state.feedback and state.feedback_iteration == iteration:
            context["feedback"] = state.feedback
        if state.tests_source == "given" and state.tests != payload.get("tests"):
            context["tests"] = state.tests  # corrected by a reviewer's feedback
    # Rule 8 of the balancer: a loop keeps its coder LLM across rounds, while the coder role that used it is
    # still the loop's (not after an escalation, however many rounds ago it wrote the code).
    sticky = state.llm if iteration > 1 and state.code_role == state.coder_role else None
    outcome = _run_agent(agent, payload=payload, role=role, config=config, context=context, sticky=sticky)
    # Onto the previous round's files (the given ones in the first round): a file the reply leaves out stays.
    files = merge_files(state.files, outcome.result["files"])
    packet = _record(
        task_id,
        step,
        agent.name,
        outcome,
        job_id=job_id,
        status=RUNNING,
        extra={"role": role.name, "files": files, "result": outcome.result},
        iteration=iteration,
    )
    if packet is not None:
        _after_step(packet, step)
    return RUNNING


def _debug_step(task_id: str, step: str, job_id: str) -> str:
    packet = task_store().read(task_id)
    state = loop.loop_state(packet)
    config = configuration()
    role = config.role(packet["profile"], loop.DEBUG_ROLE)
    agent = agent_class(role.agent)()
    failure = loop.failures_text(state.last_checks)
    if state.feedback and state.feedback_iteration == loop.parse_step(step)[0]:
        failure = f"A reviewer says: {state.feedback}\n\n{failure}".strip()
    texts = {
        "failure": failure or "the checks failed without output",
        "instruction": packet["payload"]["instruction"],
        "code": render_files(state.files) or "(no code yet)",
        **({"tests": state.tests} if state.tests else {}),
    }
    # The project's files and the tests may together be longer than Debug's fields take (the payload's
    # files alone may be 20 of 200,000 characters): cut, not a failed step. The model's context decides
    # whether what is left can be asked at all.
    fields = agent.input_schema["properties"]
    payload = agent.validate_payload({key: _cut(value, fields[key]["maxLength"]) for key, value in texts.items()})
    outcome = _run_agent(agent, payload=payload, role=role, config=config)
    blame_given_tests = outcome.result["wrong"] == "test" and state.tests_source == "given"
    status = AWAITING_FEEDBACK if blame_given_tests else RUNNING
    waiting = None
    if blame_given_tests:
        reason = (
            f"Debug says the given tests are wrong: {outcome.result['cause']}. Post feedback to "
            f"/api/v1/tasks/{task_id}/feedback (with corrected tests, or saying the code is wrong) to go on."
        )
        waiting = history_event("awaiting_feedback", status=AWAITING_FEEDBACK, detail={"reason": reason})
    packet = _record(
        task_id,
        step,
        agent.name,
        outcome,
        job_id=job_id,
        status=status,
        extra={"result": outcome.result},
        result=_loop_result(state),
        then=waiting,
    )
    if packet is not None and not blame_given_tests:
        _after_step(packet, step)
    return status


def _check_step(packet: dict[str, Any], step: str, job_id: str) -> dict[str, Any]:
    """One of QA's checks. A transient engine failure (an LLM down, or no slot free before the check's
    deadline: QA's two LLM checks wait for each other on an LLM with one slot) is retried like a
    step's; past its retries, or for any other failure, the check is recorded as not run, so that the
    verdict always comes and decides."""
    task_id = packet["task_id"]
    iteration, name = loop.parse_step(step)
    started = time.perf_counter()
    try:
        detail, llm = _run_check(packet, iteration, name)
    except (StepTakenOver, RunCancelled) as exc:
        # Another worker took the check's lease and runs it: this run leaves the check to it (its LLM call,
        # or its test run, was stopped).
        logger.warning("task %s: check %s stopped: %s", task_id, step, exc)
        return {"skipped": str(exc)}
    except SoftTimeLimitExceeded:
        detail, llm = qa_agent.check_result(name, False, "the check exceeded its time limit", error=True), None
    except EngineError as exc:
        retries = _retry_if_transient(packet, step, job_id, exc)
        tried = f" (after {retries} retries)" if retries else ""
        detail, llm = qa_agent.check_result(name, False, f"the check could not run: {exc}{tried}", error=True), None
    except (LookupError, ReplyError, PayloadError) as exc:
        detail, llm = qa_agent.check_result(name, False, f"the check could not run: {exc}", error=True), None
    except SandboxUnavailable as exc:
        detail, llm = qa_agent.check_result(name, False, str(exc), error=True), None
    except OUTAGES as exc:
        # Redis, the broker or the state directory is away: not the code's fault, nor the check's. As for any
        # step (``_supervised``), the job ends and the recovery sweep queues the check again once they answer.
        logger.warning("task %s: check %s stopped by an outage: %s", task_id, step, exc)
        raise
    except Exception as exc:
        logger.exception("task %s: check %s failed", task_id, step)
        detail, llm = (
            qa_agent.check_result(name, False, f"internal error: {type(exc).__name__}: {exc}", error=True),
            None,
        )
    detail = {**detail, "duration_ms": round((time.perf_counter() - started) * 1000, 1)}

    def record(current: dict[str, Any]) -> bool:
        if current["status"] != RUNNING or _step_event(current, step) is not None or not _expects(current, job_id):
            return False
        current["history"].append(
            history_event("check", status=RUNNING, agent="qa", llm=llm, detail={"step": step, **detail})
        )
        return True

    packet, written = task_store().update(task_id, record)
    if written:
        # The verdict runs in this job when the job has time to spare: its soft limit is the role's
        # time limit and 5 s (``job_options``); a check that took the role's whole time queues it.
        try:
            limit_s = configuration().role(packet["profile"], _checks_role(packet)).time_limit_s
        except LookupError:
            limit_s = 0.0  # the role left the configuration: queued, as before
        _queue_verdict(packet, _noted_after(packet, job_id), here=time.perf_counter() - started < limit_s)
    return detail


def _noted_after(packet: dict[str, Any], job_id: str) -> str | None:
    """The step after which the job was noted (scheduled) for the task's current jobs."""
    return next(
        (e["detail"]["after"] for e in reversed(loop.jobs_run(packet["history"]))
         if e["event"] == "scheduled" and job_id in e["detail"]["job_ids"]),
        None,
    )  # fmt: skip


def _checks_role(packet: dict[str, Any]) -> str:
    """The role whose LLMs, queue and time limit QA's checks of the task run under: QA's, or a QA
    task's own."""
    return _step_role(packet, loop.QA_ROLE)


def _step_role(packet: dict[str, Any], noted: str) -> str:
    """The role a step noted under the role ``noted`` runs under: that one, except QA's, whose checks
    of a QA task run under the task's own role."""
    return packet["role"] if noted == loop.QA_ROLE and _flow(packet) == CHECKS else noted


def _run_check(packet: dict[str, Any], iteration: int, name: str) -> tuple[dict[str, Any], str | None]:
    state = loop.loop_state(packet)
    payload = packet["payload"]
    instruction = payload.get("instruction", "")
    if name == "static":
        return qa_agent.static_check(state.files), None
    config = configuration()
    role = config.role(packet["profile"], _checks_role(packet))
    agent = qa_agent.QAAgent()
    balancer = load_balancer()
    call = {"role": role, "config": config, "balancer": balancer, "deadline": balancer.clock() + role.time_limit_s}
    if name == "review":
        outcome = agent.review(files=state.files, instruction=instruction, tests=state.tests, **call)
        result = outcome.result
        findings = "\n".join(f"- {item}" for item in result["findings"]) or "no findings"
        return qa_agent.check_result("review", result["passed"], findings, **_call_detail(outcome)), outcome.llm
    # The tests: the given ones, or QA's own, written now when there are none yet or when Debug
    # said that QA's tests were wrong and the code stood.
    rewrite = state.debug_iteration == iteration and loop.keeps_code(state)
    extra: dict[str, Any] = {"tests_source": state.tests_source}
    tests, llm = state.tests, None
    if tests is None or rewrite:
        notes = f"{state.debug['cause']} {state.debug['fix']}" if rewrite else None
        outcome = agent.write_tests(files=state.files, instruction=instruction, notes=notes, **call)
        tests, llm = outcome.result["tests"], outcome.llm
        extra = {"tests_source": "written", "test_code": tests, **_call_detail(outcome)}
    detail = qa_agent.run_tests(state.files, tests)
    return {**detail, **extra}, llm


def _call_detail(outcome: AgentOutcome) -> dict[str, Any]:
    return {"llm_call": outcome.step_detail()}


def _verdict_step(packet: dict[str, Any], step: str, job_id: str) -> str:
    """The join of a round's checks: every check is recorded; decide the route."""
    task_id = packet["task_id"]
    iteration, _ = loop.parse_step(step)
    checks = [
        event["detail"]
        for event in loop.current_run(packet["history"])
        if event["event"] == "check" and event["detail"]["step"].startswith(f"{iteration}.")
    ]
    config = configuration()
    flow = _flow(packet)
    state = loop.loop_state(packet)
    record = partial(_verdict_record, task_id, step, state=state, job_id=job_id)
    broken = [check for check in checks if check.get("error")]
    if broken:
        reasons = "; ".join(f"{check['check']}: {check['output']}" for check in broken)
        return _fail(task_id, lambda p: _expects(p, job_id), f"QA could not check round {iteration}: {reasons}")
    if flow == CHECKS:
        verdict = loop.Verdict(loop.DONE, "checked", loop.failure_signature(checks))
        result = {"verdict": "fail" if verdict.signature else "pass", "checks": checks}
        record(verdict, checks, status=SUCCEEDED, result=result, finish=True)
        return SUCCEEDED
    role = config.role(packet["profile"], state.coder_role)
    max_iterations = packet["payload"].get("max_iterations") or role.max_iterations
    escalate_to = _escalation_role(config, packet["profile"], state.coder_role)
    verdict = loop.decide(state, checks, max_iterations=max_iterations, escalate_to=escalate_to)
    state.last_checks, state.iteration = checks, iteration
    result = _loop_result(state)
    if verdict.route == loop.DONE:
        record(verdict, checks, status=SUCCEEDED, result=result, finish=True)
        return SUCCEEDED
    if verdict.route == loop.GIVE_UP:
        reason = f"the code did not pass QA: {verdict.reason}"
        record(verdict, checks, status=FAILED, result=result, finish=True, reason=reason)
        return FAILED
    escalated = None
    if verdict.route == loop.ESCALATE:
        detail = {"step": step, "from": state.coder_role, "to": escalate_to}
        escalated = history_event("escalated", status=RUNNING, detail=detail)
    written = record(verdict, checks, status=RUNNING, result=result, then=escalated)
    if written is not None:
        _after_step(task_store().read(task_id), step)
    return RUNNING


def _verdict_record(
    task_id: str,
    step: str,
    verdict: loop.Verdict,
    checks: list[dict[str, Any]],
    *,
    state: loop.LoopState,
    job_id: str,
    status: str,
    result: dict[str, Any],
    finish: bool = False,
    reason: str | None = None,
    then: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    detail = {
        "step": step,
        "iteration": loop.parse_step(step)[0],
        "coder_role": state.coder_role,
        "passed": verdict.route == loop.DONE and verdict.signature is None,
        "route": verdict.route,
        "reason": verdict.reason,
        "signature": verdict.signature,
        "checks": checks,
        "summary": [{"check": c["check"], "passed": c["passed"]} for c in checks],
    }
    event = history_event("verdict", status=status, agent="qa", llm=state.llm, detail=detail)
    return _commit(task_id, step, job_id, event, status=status, result=result, finish=finish, reason=reason, then=then)


def _loop_result(state: loop.LoopState) -> dict[str, Any]:
    """A loop task's result: the latest code, and how far it got."""
    return {
        "files": state.files,
        "run": state.run,
        "notes": state.notes,
        "tests": state.tests,
        "iterations": state.iteration,
        "coder_role": state.coder_role,
        "checks": [{"check": c["check"], "passed": c["passed"], "output": c["output"]} for c in state.last_checks],
    }


def _escalation_role(config: Configuration, profile: str, current: str) -> str | None:
    roles = config.profiles[profile].roles
    target = roles.get(loop.ESCALATION_ROLE)
    if target is None or current == loop.ESCALATION_ROLE or target.agent != "coder":
        return None
    return target.name


# -- scheduling -----------------------------------------------------------------------------------


def _after_step(packet: dict[str, Any], step: str | None, *, republish: bool = False) -> None:
    """Queue what follows ``step``. A job delivered again (``republish``) queues again the jobs that
    were noted for it, under the same ids: if they ran, they find their steps done."""
    if packet["parent_id"] and packet["status"] in FINISHED:
        plan_advance(parent_id=packet["parent_id"], republish=republish)
    if step is None or packet["status"] != RUNNING:
        return
    if step == MAIN:
        if _delegated(packet):
            plan_advance(parent_id=packet["task_id"], republish=republish)
        return
    follow = _follow_up(packet, step)
    if follow is not None:
        _schedule(packet, step, follow[0], chord=follow[1])
    if republish:
        _schedule(packet, step, [], republish=True)


def _follow_up(packet: dict[str, Any], step: str) -> tuple[list[tuple[str, str]], bool] | None:
    """The jobs that follow ``step`` of a running loop task, as (step, role) and whether they are a
    chord (QA's checks and their verdict); None when nothing follows it or a later step was recorded."""
    if packet["status"] != RUNNING or step == MAIN or step != _last_step(packet):
        return None
    iteration, kind = loop.parse_step(step)
    if kind in ("coder", "checks"):
        return _checks(iteration), True
    if kind == "verdict":
        return [(loop.step_key(iteration + 1, "debug"), loop.DEBUG_ROLE)], False
    if kind == "debug":
        state = loop.loop_state(packet)
        if loop.keeps_code(state):
            return _checks(iteration), True  # the code stands; QA writes new tests
        return [(loop.step_key(iteration, "coder"), state.coder_role)], False
    if kind == "feedback":
        route = _step_event(packet, step)["detail"]["route"]
        target = loop.DEBUG_ROLE if route == "debug" else loop.loop_state(packet).coder_role
        return [(loop.step_key(iteration, route), target)], False
    return None


def _checks(iteration: int) -> list[tuple[str, str]]:
    """QA's checks of a round and their verdict (run by the last check's job), on the QA role's queue."""
    return [(loop.step_key(iteration, name), loop.QA_ROLE) for name in (*qa_agent.CHECK_NAMES, "verdict")]


def _schedule(
    packet: dict[str, Any],
    after: str,
    steps: list[tuple[str, str]],
    *,
    chord: bool = False,
    republish: bool = False,
) -> None:
    """Note the jobs of ``steps`` (step, role) in the history, then queue them, each on its role's
    queue; with ``chord`` the last one (the verdict) joins the others: the check that is recorded last
    runs it (``_queue_verdict``), no result backend counts them. The note comes first, so that a
    job runs only if its task still expects it (``_expects``). Nothing is queued twice unless
    ``republish`` asks to queue the noted jobs again."""
    from celery import group

    from orchestration.tasks import run_step

    noted = next((e for e in loop.jobs_run(packet["history"]) if e["event"] == "scheduled"
                  and e["detail"]["after"] == after), None)  # fmt: skip
    if noted is not None:
        if not republish:
            return
        detail = noted["detail"]
        steps, job_ids, chord = (
            list(zip(detail["steps"], detail["roles"], strict=True)),
            detail["job_ids"],
            detail["chord"],
        )
    elif republish:
        return
    else:
        job_ids = [str(uuid.uuid4()) for _ in steps]
        if not _note_scheduled(packet, after, steps, job_ids, chord=chord):
            return
    config = configuration()
    task_id = packet["task_id"]
    signatures = []
    for (step, role_name), job_id in zip(steps[:-1] if chord else steps, job_ids, strict=False):
        if republish and _step_event(packet, step) is not None:
            # Its job ran, and queued what follows it (or that job's redelivery, or the sweep, will): queued
            # again, it would queue its own followers again, and so on through every later round, three
            # times more with each round's checks.
            continue
        role = config.role(packet["profile"], _step_role(packet, role_name))
        signatures.append(run_step.signature(args=[task_id, step], **job_options(role, job_id)))
    if chord:
        if signatures:
            group(signatures).apply_async()
        if republish:
            _queue_verdict(task_store().read(task_id), after)
    else:
        for signature in signatures:
            signature.apply_async()


def _queue_verdict(packet: dict[str, Any], after: str, *, here: bool = False, redelivered: bool = False) -> None:
    """Run or queue the verdict noted after ``after`` if every check of its round is recorded and it is
    not: the join of QA's checks. Called by each check once recorded (the last one runs it), and
    again by a check delivered twice or a republish (a verdict delivered twice finds its step done).
    A check delivered twice (``redelivered``) whose round's verdict is recorded queues again what the
    verdict noted, as a verdict job delivered twice would: its worker may have died in between.

    ``here``: the check that was just recorded runs the verdict itself, in the check's job, under the
    verdict's noted job id, rather than queueing it: the verdict asks no LLM and belongs to the same
    role as the checks, so another job would only add a trip through the broker and the worker's
    dispatch to every round. Its lease and guards are those of a queued verdict. When the verdict's
    lease is held (a redelivered verdict job runs it) it is queued as before. A worker that dies
    meanwhile leaves the check's job unacknowledged: its redelivery, or the recovery sweep, queues
    the verdict."""
    from orchestration.tasks import run_step

    noted = next((e["detail"] for e in loop.jobs_run(packet["history"]) if e["event"] == "scheduled"
                  and e["detail"]["after"] == after and e["detail"]["chord"]), None)  # fmt: skip
    if noted is None or packet["status"] != RUNNING:
        return
    *checks, verdict = noted["steps"]
    if any(_step_event(packet, step) is None for step in checks):
        return
    if _step_event(packet, verdict) is not None:
        if redelivered:
            _after_step(packet, verdict, republish=True)
        return
    if here:
        try:
            later_step(task_id=packet["task_id"], step=verdict, job_id=noted["job_ids"][-1])
            return
        except StepBusy:
            pass
        except Exception:
            # Not the check's failure: it stays recorded. A failing verdict has failed the task with the
            # reason (``_supervised``); one that could not start (Redis away for its lease) leaves the
            # round to the recovery sweep, which queues the verdict.
            logger.exception("task %s: verdict %s failed", packet["task_id"], verdict)
            return
    role = configuration().role(packet["profile"], _step_role(packet, noted["roles"][-1]))
    queue_job(run_step, [packet["task_id"], verdict], role, noted["job_ids"][-1])


def _note_scheduled(
    packet: dict[str, Any], after: str, steps: list[tuple[str, str]], job_ids: list[str], *, chord: bool
) -> bool:
    def note(current: dict[str, Any]) -> bool:
        if current["status"] != RUNNING:
            return False
        _add_note(current, after, steps, job_ids, chord=chord)
        return True

    _, written = task_store().update(packet["task_id"], note)
    return written


def _add_note(
    packet: dict[str, Any], after: str, steps: list[tuple[str, str]], job_ids: list[str], *, chord: bool
) -> None:
    """Append the ``scheduled`` event of the jobs that follow ``after`` (before they are queued)."""
    detail = {
        "after": after,
        "steps": [step for step, _ in steps],
        "roles": [role for _, role in steps],
        "job_ids": job_ids,
        "chord": chord,
    }
    packet["iteration"] = max(packet["iteration"], loop.parse_step(steps[0][0])[0])
    packet["history"].append(history_event("scheduled", status=RUNNING, detail=detail))


def _job_in_force(packet: dict[str, Any], *, job_id: str) -> bool:
    """Whether a failure of the job is the task's: the job holds the task's claim or was noted for its
    current jobs, and the step it runs is not recorded yet. A job whose step is recorded has done its part:
    what stops it afterwards (a time limit while it queued what follows, the deaths of an old job delivered
    again) must not fail a task that has moved on."""
    if _claimed_by(packet) == job_id:
        return _step_event(packet, _first_key(packet)) is None
    for event in loop.jobs_run(packet["history"]):
        if event["event"] == "scheduled" and job_id in event["detail"]["job_ids"]:
            step = event["detail"]["steps"][event["detail"]["job_ids"].index(job_id)]
            return _step_event(packet, step) is None
    return False


def _expects(packet: dict[str, Any], job_id: str) -> bool:
    """Whether the job was noted for the task's current jobs (one noted before a retry or a feedback is not)."""
    return any(
        event["event"] == "scheduled" and job_id in event["detail"]["job_ids"]
        for event in loop.jobs_run(packet["history"])
    )


def job_options(role: RoleConfig, job_id: str) -> dict[str, Any]:
    """A job's Celery options: its id, its role's queue, and the role's time limit (the soft limit leaves
    the engine's own timeout room to act first)."""
    return {
        "task_id": job_id,
        "queue": role.queue,
        "soft_time_limit": role.time_limit_s + 5,
        "time_limit": role.time_limit_s + HARD_LIMIT_MARGIN_S,
    }


def queue_job(task: Task, args: list[Any], role: RoleConfig, job_id: str) -> None:
    """Put one job of ``task`` on the role's queue, with ``job_options``. Sent by the task's name: the
    message is the one ``task.apply_async`` sends, without checking the arguments against the task's
    signature and merging its options again, which took 0.26 M instructions of a submission's 8.7 M
    (the arguments are the server's own). A group of jobs goes through Celery's canvas as before."""
    task.app.send_task(task.name, args=args, ignore_result=task.ignore_result, **job_options(role, job_id))


# -- delegation -----------------------------------------------------------------------------------


def _delegate(packet: dict[str, Any], steps: list[dict[str, Any]], config: Configuration) -> None:
    """Record the plan to execute, then start its ready steps."""
    profile = config.profiles[packet["profile"]]
    problems = [
        f"step {step['id']}: no role {step['role']!r} in profile {profile.name}"
        for step in steps
        if step["role"] not in profile.roles
    ]
    if problems:
        _fail(packet["task_id"], lambda p: True, "the plan cannot be executed: " + "; ".join(problems))
        return

    detail = {"step": "delegated", "plan": steps, "children": _child_ids(packet, steps)}
    _append_if_running(packet["task_id"], history_event("delegated", status=RUNNING, agent="planner", detail=detail))
    plan_advance(parent_id=packet["task_id"])


def _child_ids(parent: dict[str, Any], steps: list[dict[str, Any]]) -> dict[str, str]:
    """Each step's child task id: derived from the parent's (and how often it was retried), so that
    creating a child twice is harmless."""
    runs = sum(event["event"] == "retried" for event in parent["history"])
    namespace = uuid.UUID(parent["task_id"])
    return {step["id"]: str(uuid.uuid5(namespace, f"{runs}:{step['id']}")) for step in steps}


def plan_advance(*, parent_id: str, republish: bool = False) -> None:
    """Create and queue the plan's steps whose dependencies have succeeded; finish the parent when
    every step has, or fail it when one failed or was cancelled. Safe to call any number of times."""
    from celery import group

    from orchestration.tasks import run_task

    created: list[tuple[dict[str, Any], RoleConfig, str]] = []
    to_cancel: list[str] = []

    def fail_plan(parent: dict[str, Any], statuses: dict, ids: dict[str, str], reason: str) -> bool:
        """Fail the parent; its unfinished children are cancelled once its lock is released."""
        to_cancel.extend(ids[s] for s, status in statuses.items() if status in (QUEUED, RUNNING, AWAITING_FEEDBACK))
        parent["status"] = FAILED
        parent["history"].append(history_event("failed", status=FAILED, detail={"reason": reason}))
        return True

    def advance(parent: dict[str, Any]) -> bool:
        created.clear()
        to_cancel.clear()
        if parent["status"] != RUNNING:
            return False
        delegated = next((e for e in reversed(loop.current_run(parent["history"])) if e["event"] == "delegated"), None)
        if delegated is None:
            return False
        plan, ids = delegated["detail"]["plan"], delegated["detail"]["children"]
        children: dict[str, dict[str, Any] | None] = {}
        for step_id, task_id in ids.items():
            try:
                children[step_id] = _packet_or_none(task_id)
            except CorruptState as exc:
                # The step's state cannot be known, nor its result: the plan cannot finish. Failed, not stuck.
                statuses = {s: c and c["status"] for s, c in children.items()}
                return fail_plan(parent, statuses, ids, f"step {step_id} cannot be followed: {exc}")
        statuses = {step_id: child and child["status"] for step_id, child in children.items()}
        for step_id, child in children.items():
            if child is not None and child["parent_id"] != parent["task_id"]:
                # A task that took the step's id (child ids can be worked out): not the step's, nor cancelled.
                del statuses[step_id]
                why = f"step {step_id} cannot start: a task {ids[step_id]} that is not this plan's step already exists"
                return fail_plan(parent, statuses, ids, why)
        results: dict[str, Any] = {}
        for step in plan:
            status, child = statuses[step["id"]], children[step["id"]]
            if status in (FAILED, CANCELLED):
                reason = next(
                    (e["detail"].get("reason") for e in reversed(child["history"]) if e["event"] == status), ""
                )
                why = f"step {step['id']} ({step['role']}, task {ids[step['id']]}) {status}"
                return fail_plan(parent, statuses, ids, why + (f": {reason}" if reason else ""))
            if status == SUCCEEDED:
                results[step["id"]] = child["result"]
        if len(results) == len(plan):
            parent["status"] = SUCCEEDED
            parent["result"] = {
                "steps": plan,
                "results": {s["id"]: {"task_id": ids[s["id"]], "result": results[s["id"]]} for s in plan},
            }
            parent["history"].append(history_event("finished", status=SUCCEEDED))
            return True
        config = configuration()
        for step in plan:
            child_id = ids[step["id"]]
            if statuses[step["id"]] is not None:
                if republish and statuses[step["id"]] == QUEUED:
                    child = children[step["id"]]
                    created.append((child, config.role(parent["profile"], step["role"]), _job_of(child)))
                continue
            if not all(statuses[d] == SUCCEEDED for d in step["depends_on"]):
                continue
            try:
                child, role = _create_child(parent, step, child_id, {d: results[d] for d in step["depends_on"]}, config)
            except (LookupError, PayloadError) as exc:
                # The role left the configuration, or its agent cannot take the step's input: the steps
                # created before it in this pass are cancelled with the others, not left queued.
                to_cancel.extend(child["task_id"] for child, _, _ in created)
                created.clear()
                return fail_plan(parent, statuses, ids, f"step {step['id']} cannot start: {exc}")
            created.append((child, role, _job_of(child)))
            if child_id not in parent["children"]:
                parent["children"].append(child_id)
        return bool(created)

    parent, written = task_store().update(parent_id, advance)
    if written and parent["status"] in FINISHED:
        for child_id in to_cancel:
            _cancel_child(child_id, parent_id)
        _finished(parent)
    if created:
        group(
            run_task.signature(args=[c["task_id"]], **job_options(role, job)) for c, role, job in created
        ).apply_async()


def _create_child(
    parent: dict[str, Any], step: dict[str, Any], child_id: str, inputs: dict[str, Any], config: Configuration
) -> tuple[dict[str, Any], RoleConfig]:
    role = config.role(parent["profile"], step["role"])
    payload = _step_payload(agent_class(role.agent), step["input"], inputs, role, config)
    job_id = str(uuid.uuid4())
    child = new_packet(task_id=child_id, profile=parent["profile"], role=step["role"], payload=payload)
    child["parent_id"] = parent["task_id"]
    child["history"].append(
        history_event(
            "submitted", status=QUEUED, detail={"queue": role.queue, "job_id": job_id, "plan_step": step["id"]}
        )
    )
    try:
        return task_store().create(child), role
    except TaskExists as exists:
        # Created by an earlier pass. Not any task with its id: a client may submit one (the ids can be
        # worked out), and its result would then be taken as the step's.
        found = exists.packet
        expected = (parent["task_id"], parent["profile"], step["role"])
        if (found["parent_id"], found["profile"], found["role"]) != expected:
            raise LookupError(f"a task {child_id} that is not this plan's step already exists") from None
        return found, role


DEPENDENCIES_HEADER = "\n\nResults of the steps this one depends on:\n"


def _step_payload(
    agent: type[Agent], step_input: str, inputs: dict[str, Any], role: RoleConfig, config: Configuration
) -> dict[str, Any]:
    """A step's payload: its input, then the results of the steps it depends on, each whole when they all
    fit, else each cut to a fair share of the room (the shorter ones whole, the rest cut alike). The room is
    what the largest context among the LLMs that can serve the role leaves for the prompt besides the
    role's ``max_tokens`` (counted as the balancer counts a prompt, rule 1), and what the agent's text field
    holds. ``PayloadError`` when the agent cannot take the text."""
    if not inputs:
        return agent.payload_from_text(step_input)
    texts = {step_id: json.dumps(result, ensure_ascii=False) for step_id, result in inputs.items()}
    bare = step_input + DEPENDENCIES_HEADER + "\n".join(f"{step_id}: " for step_id in texts)
    room = agent.input_schema["properties"][agent.text_field]["maxLength"] - len(bare) if agent.text_field else 0
    contexts = [llm.context_length for llm in candidates(config, role)[0]]
    if contexts:
        prompt = estimate_tokens(agent().build_messages(agent.payload_from_text(bare), role))
        # A prompt's tokens are counted as a third of its characters (estimate_tokens), rounded down: so many
        # characters more, less one token for the rounding.
        room = min(room, (max(contexts) - role.max_tokens - prompt - 1) * 3)
    shares = _fair_shares({step_id: len(text) for step_id, text in texts.items()}, max(room, 0))
    lines = []
    for step_id, text in texts.items():
        share = shares[step_id]
        if share < len(text):
            marker = f" [... cut: {share} of {len(text)} characters]"
            text = text[: max(share - len(marker), 0)] + marker
        lines.append(f"{step_id}: {text}")
    return agent.payload_from_text(step_input + DEPENDENCIES_HEADER + "\n".join(lines))


def _cut(text: str, limit: int) -> str:
    """``text``, or its start and end with a marker between them, in ``limit`` characters."""
    if len(text) <= limit:
        return text
    marker = f"\n[... {len(text)} characters cut ...]\n"  # as long as the final one, or longer
    keep = limit - len(marker)
    marker = f"\n[... {len(text) - keep} characters cut ...]\n".ljust(len(marker))
    return text[: keep // 2] + marker + text[len(text) - (keep - keep // 2) :]


def _fair_shares(lengths: dict[str, int], room: int) -> dict[str, int]:
    """Characters for each text: the whole of it when the shorter ones leave it room enough, else an equal
    share of what is left (max-min fairness)."""
    shares: dict[str, int] = {}
    left = room
    ordered = sorted(lengths, key=lengths.__getitem__)
    for index, key in enumerate(ordered):
        shares[key] = min(lengths[key], left // (len(ordered) - index))
        left -= shares[key]
    return shares


def status_of(task_id: str) -> str | None:
    """A task's status; None when its state file is missing or unreadable: nothing moves such a task on,
    and nothing can be done with it (a plan with such a step fails, ``plan_advance``)."""
    try:
        packet = _packet_or_none(task_id)
    except CorruptState as exc:
        logger.error("%s", exc)
        return None
    return None if packet is None else packet["status"]


def _packet_or_none(task_id: str) -> dict[str, Any] | None:
    try:
        return task_store().read(task_id)
    except TaskNotFound:
        return None


def _job_of(packet: dict[str, Any]) -> str:
    from orchestration.selectors import task_job_id

    return task_job_id(packet)


def _cancel_child(task_id: str, parent_id: str) -> None:
    from orchestration.services import task_cancel

    try:
        if task_store().read(task_id)["parent_id"] != parent_id:
            return  # not this plan's: a task that took the step's id (the plan failed for it)
        task_cancel(task_id=task_id, reason="the parent task failed")
    except Exception as exc:  # a child that finished meanwhile cannot be cancelled; nothing to do
        logger.info("child %s not cancelled: %s", task_id, exc)


# -- recording ------------------------------------------------------------------------------------


def _run_agent(
    agent: Any, *, payload: dict[str, Any], role: RoleConfig, config: Configuration, **kwargs: Any
) -> AgentOutcome:
    balancer = load_balancer()
    return agent.run(
        payload=payload,
        role=role,
        config=config,
        balancer=balancer,
        deadline=balancer.clock() + role.time_limit_s,
        **kwargs,
    )


def _record(
    task_id: str,
    step: str,
    agent_name: str,
    outcome: AgentOutcome,
    *,
    status: str,
    job_id: str,
    result: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    finish: bool = False,
    iteration: int | None = None,
    then: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Record an agent's step; an answer the task can no longer use is recorded as discarded."""
    detail = {"step": step, **outcome.step_detail(), **(extra or {})}
    event = history_event("step", status=status, agent=agent_name, llm=outcome.llm, detail=detail)

    def discarded(packet: dict[str, Any], holds: bool) -> dict[str, Any]:
        reason = _discard_reason(packet, step, holds)
        detail = {"step": None, "discarded_step": step, "reason": reason, **outcome.step_detail()}
        return history_event(
            "step_discarded", status=packet["status"], agent=agent_name, llm=outcome.llm, detail=detail
        )

    return _commit(
        task_id, step, job_id, event, status=status, result=result, finish=finish, iteration=iteration, then=then,
        discarded=discarded,
    )  # fmt: skip


def _commit(
    task_id: str,
    step: str,
    job_id: str,
    event: dict[str, Any],
    *,
    status: str,
    result: dict[str, Any] | None = None,
    finish: bool = False,
    reason: str | None = None,
    iteration: int | None = None,
    then: dict[str, Any] | None = None,
    discarded: Callable[[dict[str, Any], bool], dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """Record ``step`` with ``event`` if the task is still running, the job still holds the step (its
    claim, or a note of the current run) and no other delivery recorded it first; then finish or fail
    the task when ``finish``. Returns the packet, or None when the step was not recorded."""
    recorded: list[bool] = []
    noted: list[bool] = []

    def record(packet: dict[str, Any]) -> bool:
        holds = _claimed_by(packet) == job_id or _expects(packet, job_id)
        if packet["status"] != RUNNING or not holds or _step_event(packet, step) is not None:
            if discarded is None:
                return False
            packet["history"].append(discarded(packet, holds))
            return True
        recorded.append(True)
        packet["status"] = status
        if result is not None:
            packet["result"] = result
        if iteration is not None:
            packet["iteration"] = iteration
        packet["history"].append(event)
        if finish and status == FAILED:
            packet["history"].append(history_event("failed", status=FAILED, detail={"reason": reason}))
        elif finish:
            packet["history"].append(history_event("finished", status=status))
        if then is not None:
            packet["history"].append(then)
        # The jobs that follow the step are noted in the same write (one write less per step), and
        # queued once it is stored.
        follow = _follow_up(packet, step)
        if follow is not None:
            _add_note(packet, step, follow[0], [str(uuid.uuid4()) for _ in follow[0]], chord=follow[1])
            noted.append(True)
        return True

    packet, _ = task_store().update(task_id, record)
    if not recorded:
        return None
    if noted:
        _schedule(packet, step, [], republish=True)
    if finish:
        _finished(packet)
    return packet


def _discard_reason(packet: dict[str, Any], step: str, holds: bool) -> str:
    if packet["status"] != RUNNING:
        return f"the task was {packet['status']} during the step"
    if not holds:
        return "the step was taken over by another job (its worker was thought dead) or belongs to an earlier run"
    return "the step had been recorded already by another delivery of its job"


def _fail(task_id: str, guard: Callable[[dict[str, Any]], bool], reason: str, *, balancer: dict | None = None) -> str:
    """Fail the task if it is running and ``guard`` says this job's run is still the one in force;
    ``balancer`` is the last LLM decision (its failovers and exclusions), when the step got that far."""

    def fail(packet: dict[str, Any]) -> bool:
        if packet["status"] != RUNNING or not guard(packet):
            return False
        packet["status"] = FAILED
        detail: dict[str, Any] = {"reason": reason}
        if balancer:
            detail["balancer"] = balancer
        packet["history"].append(history_event("failed", status=FAILED, detail=detail))
        return True

    packet, failed = task_store().update(task_id, fail)
    if failed:
        logger.warning("task %s failed: %s", task_id, reason)
        _finished(packet)
    return packet["status"]


def _finished(packet: dict[str, Any]) -> None:
    """A task finished: its plan's unfinished steps are cancelled if it failed (however it failed: a
    time limit, an internal error, its recovery given up), and its parent's plan may go on."""
    if packet["status"] in (FAILED, CANCELLED):
        for child_id in plan_children(packet):
            if status_of(child_id) in (QUEUED, RUNNING, AWAITING_FEEDBACK):
                _cancel_child(child_id, packet["task_id"])
    if packet["parent_id"]:
        plan_advance(parent_id=packet["parent_id"])


def plan_children(packet: dict[str, Any]) -> tuple[str, ...]:
    """The child task ids of the plan the task delegated in its current run (none if it did not)."""
    delegated = next((e for e in reversed(loop.current_run(packet["history"])) if e["event"] == "delegated"), None)
    return tuple(delegated["detail"]["children"].values()) if delegated else ()


def loop_continue(*, packet: dict[str, Any], step: str) -> None:
    """Queue what follows a step recorded outside a job (a person's feedback)."""
    _after_step(packet, step)


def task_abandoned(*, task_id: str, job_id: str, reason: str) -> str:
    """The job ended without recording its step (Celery's hard time limit killed it, or it raised): fail
    the task, if the job is the task's current one (its claim, or a job scheduled after its latest step).
    A job stopped by an outage (``OUTAGES``) is not abandoned: ``StepJob`` leaves it to the sweep."""

    return _fail(task_id, partial(_job_in_force, job_id=job_id), reason)


# -- recovery -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Waiting:
    """What moves a queued or running task on: jobs (on a queue, or held by a worker), steps running
    under a lease (the lease names), or a plan's children."""

    jobs: tuple[str, ...]
    leases: tuple[str, ...]
    children: tuple[str, ...] = ()


def task_waiting(packet: dict[str, Any]) -> Waiting:
    """What the task waits for (see ``task_recover``)."""
    task_id = packet["task_id"]
    if packet["status"] == QUEUED:
        return Waiting(jobs=(_job_of(packet),), leases=(task_id,))
    if _delegated(packet):
        return Waiting(jobs=(), leases=(task_id,), children=plan_children(packet))
    jobs_run = loop.jobs_run(packet["history"])
    scheduled = [e["detail"] for e in jobs_run if e["event"] == "scheduled"]
    if not scheduled and _feedback_run(jobs_run):
        return Waiting(jobs=(), leases=(task_id,))  # the round the feedback asked for was never queued
    if not scheduled:  # the first step, under its claim
        return Waiting(jobs=(_claimed_by(packet),), leases=(task_id,))
    pending = [
        (step, job)
        for step, job in zip(scheduled[-1]["steps"], scheduled[-1]["job_ids"], strict=True)
        if _step_event(packet, step) is None
    ]
    return Waiting(jobs=tuple(job for _, job in pending), leases=(task_id, *(f"{task_id}:{s}" for s, _ in pending)))


def task_recover(*, packet: dict[str, Any], reason: str, retries: int) -> str:
    """A queued or running task that nothing moves on any more (its jobs were lost with Redis, or with
    a worker that died holding them): queue its jobs again under the same ids, with a ``recovered``
    event, or fail it once it was recovered ``retries`` times in its run. Nothing happens if the task
    changed since ``packet`` was read. Returns what was done: recovered, failed or changed."""
    from orchestration.tasks import run_task

    task_id, version = packet["task_id"], packet["version"]
    times = sum(1 for e in loop.jobs_run(packet["history"]) if e["event"] == "recovered")
    role = _role_or_none(packet)
    give_up = None
    if role is None:
        give_up = f"{reason}, and its role {packet['profile']}/{packet['role']} is no longer configured"
    elif times >= retries:
        give_up = f"{reason}, after it was recovered {times} times"

    def change(current: dict[str, Any]) -> bool:
        if current["version"] != version:
            return False
        if give_up is not None:
            current["status"] = FAILED
            current["history"].append(history_event("failed", status=FAILED, detail={"reason": give_up}))
        else:
            detail = {"reason": reason, "jobs": list(task_waiting(current).jobs)}
            current["history"].append(history_event("recovered", status=current["status"], detail=detail))
        return True

    updated, written = task_store().update(task_id, change)
    if not written:
        return "changed"
    if give_up is not None:
        logger.warning("task %s failed: %s", task_id, give_up)
        _finished(updated)
        return "failed"
    logger.warning("task %s recovered: %s", task_id, reason)
    jobs_run = loop.jobs_run(updated["history"])
    scheduled = [e["detail"] for e in jobs_run if e["event"] == "scheduled"]
    if _delegated(updated):
        plan_advance(parent_id=task_id)
    elif updated["status"] == QUEUED or not (scheduled or _feedback_run(jobs_run)):
        queue_job(run_task, [task_id], role, task_waiting(updated).jobs[0])
    else:
        # What the last step's worker (or the feedback's request) died before queueing.
        _after_step(updated, _last_step(updated))
        if scheduled and task_store().read(task_id)["version"] == updated["version"]:
            _schedule(updated, scheduled[-1]["after"], [], republish=True)
    return "recovered"


def _feedback_run(jobs_run: list[dict[str, Any]]) -> bool:
    """Whether the task's current jobs were started by a feedback (``loop.jobs_run``)."""
    return bool(jobs_run) and jobs_run[0]["event"] == "feedback"


def _claimed_by(packet: dict[str, Any]) -> str | None:
    """The job id of the task's latest claim."""
    for event in reversed(packet["history"]):
        if event["event"] in ("claimed", "reclaimed", "retrying"):
            return event["detail"].get("job_id")
    return None


def _step_event(packet: dict[str, Any], step: str) -> dict[str, Any] | None:
    """The event that recorded ``step``, if any."""
    for event in reversed(loop.current_run(packet["history"])):
        if event["detail"].get("step") == step and event["event"] in ("step", "check", "verdict", "feedback"):
            return event
    return None


def _last_step(packet: dict[str, Any]) -> str | None:
    """The step recorded last in the task's current run (a retried task starts its steps afresh)."""
    for event in reversed(loop.current_run(packet["history"])):
        if event["event"] in ("step", "verdict", "delegated", "feedback") and event["detail"].get("step"):
            return MAIN if event["event"] == "delegated" else event["detail"]["step"]
    return None


def _first_key(packet: dict[str, Any]) -> str:
    """The name of a task's first step: a coder's first round, or the one step of other roles."""
    try:
        return loop.step_key(1, "coder") if _flow(packet) == LOOP else MAIN
    except LookupError:
        return MAIN


def _delegated(packet: dict[str, Any]) -> bool:
    return any(event["event"] == "delegated" for event in loop.current_run(packet["history"]))


def _flow(packet: dict[str, Any]) -> str:
    return agent_class(configuration().role(packet["profile"], packet["role"]).agent).flow


def _role_or_none(packet: dict[str, Any]) -> RoleConfig | None:
    try:
        return configuration().role(packet["profile"], packet["role"])
    except LookupError:
        return None
