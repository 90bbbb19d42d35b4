"""The feedback loop's decision and its state read from a history, without a worker."""

from orchestration import loop


def check(name, passed, output=""):
    return {"check": name, "passed": passed, "output": output}


FAIL_A = [check("tests", False, "AssertionError: -1"), check("static", True), check("review", True)]
FAIL_B = [check("tests", False, "AssertionError: -2"), check("static", True), check("review", True)]
PASS = [check("tests", True), check("static", True), check("review", True)]


def decide(state, checks, max_iterations=3, escalate_to="deep_coder"):
    return loop.decide(state, checks, max_iterations=max_iterations, escalate_to=escalate_to)


def test_everything_passing_is_done():
    assert decide(loop.LoopState(coder_role="fast_coder"), PASS).route == loop.DONE


def test_a_new_failure_with_rounds_left_goes_to_debug():
    verdict = decide(loop.LoopState(coder_role="fast_coder"), FAIL_A)
    assert verdict.route == loop.DEBUG
    assert verdict.reason == "tests failed"


def test_a_repeated_failure_escalates_once_then_gives_up():
    state = loop.LoopState(coder_role="fast_coder", rounds_in_role=1, signatures=[loop.failure_signature(FAIL_A)])
    assert decide(state, FAIL_A).route == loop.ESCALATE
    state.escalated, state.coder_role = True, "deep_coder"
    verdict = decide(state, FAIL_A)
    assert verdict.route == loop.GIVE_UP
    assert verdict.reason == "the same failure (tests) repeated"


def test_the_last_round_escalates_or_gives_up():
    state = loop.LoopState(coder_role="fast_coder", rounds_in_role=2, signatures=["x", "y"])
    assert decide(state, FAIL_B).route == loop.ESCALATE
    assert decide(state, FAIL_B, escalate_to=None).route == loop.GIVE_UP
    assert "still failing after 3 rounds of fast_coder" in decide(state, FAIL_B, escalate_to=None).reason


def test_the_review_wording_alone_does_not_make_a_failure_new():
    with_review = [*FAIL_A[:2], check("review", False, "some words")]
    other_words = [*FAIL_A[:2], check("review", False, "other words")]
    assert loop.failure_signature(with_review) == loop.failure_signature(other_words)
    only_review = [check("tests", True), check("static", True), check("review", False, "a")]
    assert loop.failure_signature(only_review) != loop.failure_signature(
        [*only_review[:2], check("review", False, "b")]
    )


def test_memory_addresses_do_not_make_a_failure_new():
    first = [check("tests", False, "<object at 0x7f12aa>")]
    assert loop.failure_signature(first) == loop.failure_signature([check("tests", False, "<object at 0x7f99bb>")])


def test_the_state_comes_from_the_history_since_the_last_retry():
    def event(kind, **detail):
        return {"event": kind, "llm": "m", "detail": detail}

    files = [{"path": "solution.py", "content": "x"}]
    packet = {
        "role": "fast_coder",
        "payload": {"instruction": "i", "tests": "t"},
        "history": [
            event("step", step="1.coder", files=files, result={"run": "r", "notes": "n"}),
            event("verdict", step="1.verdict", signature="s1", checks=FAIL_A),
            event("retried"),
            event("step", step="1.coder", files=files, result={"run": "r2", "notes": "n2"}),
        ],
    }
    state = loop.loop_state(packet)
    assert (state.iteration, state.run, state.rounds_in_role, state.tests_source) == (1, "r2", 0, "given")


def test_what_follows_a_step_is_decided_within_the_current_run():
    """A retried task starts afresh: the previous run's verdict is not its last step (a sweep that took it
    for one queued the next round's debug on a task whose first checks had not run)."""
    from orchestration import orchestration_engine

    def event(kind, **detail):
        return {"event": kind, "llm": "m", "detail": detail}

    history = [
        event("step", step="1.coder"),
        event("verdict", step="1.verdict", signature="s1", checks=FAIL_A),
        event("retried"),
    ]
    assert orchestration_engine._last_step({"history": history}) is None
    assert orchestration_engine._last_step({"history": [*history, event("step", step="1.coder")]}) == "1.coder"
    assert orchestration_engine._last_step({"history": history[:2]}) == "1.verdict"


def test_after_an_escalation_the_new_coder_writes_the_code_before_debug_may_keep_it():
    """Debug blaming QA's own tests keeps the code, unless the coder escalated since it was written: then
    the role escalated to must write first (its rounds were spent re-checking the old coder's code, and
    its first step was handed the old coder's LLM as sticky)."""

    def event(kind, llm="m", **detail):
        return {"event": kind, "llm": llm, "detail": detail}

    files = [{"path": "solution.py", "content": "x"}]
    history = [
        event("step", llm="small", step="1.coder", files=files, result={"run": "r", "notes": "n"}),
        event("check", step="1.tests", check="tests", passed=False, output="", test_code="def test(): ..."),
        event("verdict", step="1.verdict", signature="s1", checks=FAIL_A),
        event("step", step="2.debug", result={"wrong": "test", "diagnosis": "d"}),
    ]
    packet = {"role": "fast_coder", "payload": {"instruction": "i"}, "history": history}
    state = loop.loop_state(packet)
    assert loop.keeps_code(state) and state.code_role == state.coder_role == "fast_coder"
    escalated = [*history[:3], event("escalated", step="1.verdict", to="deep_coder"), history[3]]
    state = loop.loop_state({**packet, "history": escalated})
    assert state.coder_role == "deep_coder" and state.code_role == "fast_coder"
    assert not loop.keeps_code(state)
    rewritten = [*escalated, event("step", llm="big", step="2.coder", files=files, result={"run": "r", "notes": "n"}),
                 event("step", step="3.debug", result={"wrong": "test", "diagnosis": "d"})]  # fmt: skip
    state = loop.loop_state({**packet, "history": rewritten})
    assert loop.keeps_code(state) and (state.llm, state.code_role) == ("big", "deep_coder")


def test_feedback_whose_round_could_not_be_queued_counts_for_nothing():
    """The request that took the feedback undid it (Redis refused its round: an ``enqueue_failed`` after it,
    or after its round's ``scheduled`` note), but the loop still read it: its tests replaced the task's,
    its text was the feedback, and the rounds since it started again from 0."""

    def event(kind, **detail):
        return {"event": kind, "llm": "m", "detail": detail}

    refused = event("feedback", step="2.feedback", iteration=2, route="debug", feedback="refused", tests="bad")
    history = [
        event("verdict", step="1.verdict", signature="s1", checks=FAIL_A),
        event("failed", reason="the same failure"),
        refused,
        event("scheduled", after="2.feedback", steps=["2.debug"]),
        event("enqueue_failed", error="Connection refused"),
    ]
    packet = {"role": "fast_coder", "payload": {"instruction": "i", "tests": "t"}, "history": history}
    state = loop.loop_state(packet)
    assert state == loop.loop_state({**packet, "history": history[:2]})
    assert (state.tests, state.feedback, state.rounds_in_role) == ("t", None, 1)
    assert loop.loop_state({**packet, "history": [*history[:3], history[4]]}) == state  # undone before any note
    taken = event("feedback", step="3.feedback", iteration=3, route="debug", feedback="taken")
    state = loop.loop_state({**packet, "history": [*history, taken]})
    assert (state.tests, state.feedback, state.feedback_iteration, state.rounds_in_role) == ("t", "taken", 3, 0)
    # A feedback taken stays taken whatever comes after its round's note.
    later = [*history[:4], event("step", step="2.debug", result={}), event("enqueue_failed", error="x")]
    assert loop.loop_state({**packet, "history": later}).feedback == "refused"
