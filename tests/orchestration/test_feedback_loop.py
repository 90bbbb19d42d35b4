"""The QA -> Debug -> Coder feedback loop end to end: real Celery workers and chords, real Redis, the
real sandbox for the tests, and the scripted engine in place of the model (tests/orchestration/scripted.py)."""

import json
import threading
import time
import uuid

import pytest

from tests.conftest import wait_for
from tests.orchestration.scripted import CODER, DEBUG, QA_REVIEW, QA_TESTS, code_reply, use_script

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

TESTS = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5, add(2, 3)\n"
RIGHT = "def add(a, b):\n    return a + b\n"
REVIEW_OK = {"match": QA_REVIEW, "reply": {"passed": True, "findings": []}}
DEBUG_CODE = {"match": DEBUG, "reply": {"cause": "it subtracts", "wrong": "code", "fix": "FIX-MARKER: add them"}}


def wrong(offset: int) -> str:
    return f"def add(a, b):\n    return a - b - {offset}\n"


def submit(api, role, payload):
    response = api.post(
        f"/api/v1/developer/{role}", data=json.dumps({"payload": payload}), content_type="application/json"
    )
    assert response.status_code == 202, response.content
    return response.json()


def rounds(packet):
    """Each verdict as (iteration, coder role, route)."""
    return [
        (e["detail"]["iteration"], e["detail"]["coder_role"], e["detail"]["route"])
        for e in packet["history"]
        if e["event"] == "verdict"
    ]


def steps(packet):
    return [e["detail"]["step"] for e in packet["history"] if e["event"] in ("step", "check", "verdict")]


@pytest.fixture
def script(edit_config, tmp_path):
    return lambda rules: use_script(edit_config, tmp_path / "script.json", rules)


def test_wrong_code_then_right_code_succeeds_at_iteration_2_with_the_route_in_the_history(api, celery_worker, script):
    script(
        [
            REVIEW_OK,
            DEBUG_CODE,
            {"match": f"{CODER}.*FIX-MARKER", "reply": code_reply(RIGHT)},
            {"match": CODER, "reply": code_reply(wrong(0))},
        ]
    )
    packet = submit(api, "fast_coder", {"instruction": "add(a, b) returns a + b", "tests": TESTS})
    done = wait_for(packet["task_id"], timeout=60)
    assert done["status"] == "succeeded", done["history"][-3:]
    assert done["iteration"] == 2
    assert rounds(done) == [(1, "fast_coder", "debug"), (2, "fast_coder", "done")]
    assert steps(done)[:1] + steps(done)[4:6] == ["1.coder", "1.verdict", "2.debug"]
    assert sorted(steps(done)[1:4]) == ["1.review", "1.static", "1.tests"]
    assert done["result"]["files"] == [{"path": "solution.py", "content": RIGHT}]
    assert all(check["passed"] for check in done["result"]["checks"])
    first = next(e for e in done["history"] if e["event"] == "verdict")
    tests_check = next(c for c in first["detail"]["checks"] if c["check"] == "tests")
    assert not tests_check["passed"] and "-1" in tests_check["output"]  # add(2, 3) was -1
    assert tests_check["sandbox"]["sandboxed"] is True
    assert all(e["llm"] == "scripted" for e in done["history"] if e["event"] == "step")
    # The debug notes reached the coder of round 2.
    debug = next(e for e in done["history"] if e["detail"].get("step") == "2.debug")
    assert debug["detail"]["result"]["wrong"] == "code"


def test_always_wrong_code_fails_at_max_iterations_after_escalating_once(api, celery_worker, script):
    chain = [{"match": f"{CODER}.*a - b - {n}\\n", "reply": code_reply(wrong(n + 1))} for n in range(5, 0, -1)]
    script([REVIEW_OK, DEBUG_CODE, *chain, {"match": CODER, "reply": code_reply(wrong(1))}])
    payload = {"instruction": "add(a, b) returns a + b", "tests": TESTS, "max_iterations": 2}
    done = wait_for(submit(api, "fast_coder", payload)["task_id"], timeout=90)
    assert done["status"] == "failed"
    assert rounds(done) == [
        (1, "fast_coder", "debug"),
        (2, "fast_coder", "escalate"),
        (3, "deep_coder", "debug"),
        (4, "deep_coder", "give_up"),
    ]
    escalated = [e for e in done["history"] if e["event"] == "escalated"]
    assert [(e["detail"]["from"], e["detail"]["to"]) for e in escalated] == [("fast_coder", "deep_coder")]
    coders = [e for e in done["history"] if e["event"] == "step" and e["detail"]["step"].endswith(".coder")]
    assert [e["detail"]["role"] for e in coders] == ["fast_coder", "fast_coder", "deep_coder", "deep_coder"]
    assert "still failing after 2 rounds of deep_coder" in done["history"][-1]["detail"]["reason"]
    assert done["result"]["files"][0]["content"] == wrong(4)


def test_the_same_failure_twice_stops_the_loop_early(api, celery_worker, script):
    script([REVIEW_OK, DEBUG_CODE, {"match": CODER, "reply": code_reply(wrong(1))}])
    done = wait_for(submit(api, "deep_coder", {"instruction": "add", "tests": TESTS})["task_id"], timeout=60)
    assert done["status"] == "failed"
    assert rounds(done) == [(1, "deep_coder", "debug"), (2, "deep_coder", "give_up")]
    assert "the same failure (tests) repeated" in done["history"][-1]["detail"]["reason"]


def test_qa_writes_the_tests_when_none_are_given(api, celery_worker, script):
    written = "from solution import add\n\ndef test_small():\n    assert add(1, 1) == 2\n"
    script([REVIEW_OK, {"match": QA_TESTS, "reply": {"tests": written}}, {"match": CODER, "reply": code_reply(RIGHT)}])
    done = wait_for(submit(api, "fast_coder", {"instruction": "add(a, b) returns a + b"})["task_id"], timeout=60)
    assert done["status"] == "succeeded", done["history"][-3:]
    check = next(e for e in done["history"] if e["event"] == "check" and e["detail"]["check"] == "tests")
    assert check["detail"]["tests_source"] == "written"
    assert check["detail"]["test_code"] == written
    assert done["result"]["tests"] == written


def test_qas_own_tests_are_kept_for_the_next_round(api, celery_worker, script):
    written = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5, add(2, 3)\n"
    script(
        [
            REVIEW_OK,
            {"match": QA_TESTS, "reply": {"tests": written}},
            DEBUG_CODE,
            {"match": f"{CODER}.*FIX-MARKER", "reply": code_reply(RIGHT)},
            {"match": CODER, "reply": code_reply(wrong(0))},
        ]
    )
    done = wait_for(submit(api, "fast_coder", {"instruction": "add(a, b) returns a + b"})["task_id"], timeout=60)
    assert done["status"] == "succeeded", done["history"][-3:]
    assert rounds(done) == [(1, "fast_coder", "debug"), (2, "fast_coder", "done")]
    tests_checks = [e["detail"] for e in done["history"] if e["event"] == "check" and e["detail"]["check"] == "tests"]
    assert [c.get("test_code") for c in tests_checks] == [written, None]  # written once, then reused
    assert done["result"]["tests"] == written


def test_a_failing_lint_or_review_sends_the_code_back(api, celery_worker, script):
    bad = "def add(a, b):\n    return a + b + undefined_name * 0\n"
    script(
        [
            {
                "match": f"{QA_REVIEW}.*undefined_name",
                "reply": {"passed": False, "findings": ["uses an undefined name"]},
            },
            REVIEW_OK,
            DEBUG_CODE,
            {"match": f"{CODER}.*FIX-MARKER", "reply": code_reply(RIGHT)},
            {"match": CODER, "reply": code_reply(bad)},
        ]
    )
    done = wait_for(submit(api, "fast_coder", {"instruction": "add", "tests": TESTS})["task_id"], timeout=60)
    assert done["status"] == "succeeded"
    first = next(e for e in done["history"] if e["event"] == "verdict")
    failed = {c["check"] for c in first["detail"]["checks"] if not c["passed"]}
    assert failed == {"static", "review", "tests"}
    static = next(c for c in first["detail"]["checks"] if c["check"] == "static")
    assert "F821" in static["output"]


def test_debug_blaming_the_given_tests_waits_for_a_person_whose_feedback_carries_on(api, celery_worker, script):
    script(
        [
            REVIEW_OK,
            {"match": DEBUG, "reply": {"cause": "add(2, 3) is 5, not 6", "wrong": "test", "fix": "expect 5"}},
            {"match": CODER, "reply": code_reply(RIGHT)},
        ]
    )
    wrong_tests = TESTS.replace("== 5", "== 6")
    task_id = submit(api, "fast_coder", {"instruction": "add", "tests": wrong_tests})["task_id"]
    waiting = wait_for(task_id, statuses={"awaiting_feedback"}, timeout=60)
    assert "Debug says the given tests are wrong: add(2, 3) is 5, not 6" in waiting["history"][-1]["detail"]["reason"]
    assert waiting["result"]["files"][0]["content"] == RIGHT
    body = {"feedback": "You are right, the test was wrong.", "route": "coder", "tests": TESTS}
    response = api.post(f"/api/v1/tasks/{task_id}/feedback", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 202, response.content
    done = wait_for(task_id, timeout=60)
    assert done["status"] == "succeeded"
    assert done["result"]["tests"] == TESTS
    # Round 2 was Debug's diagnosis, which stopped for a person; the feedback started round 3.
    assert rounds(done) == [(1, "fast_coder", "debug"), (3, "fast_coder", "done")]


def test_debug_blaming_qas_own_tests_has_them_written_again_and_keeps_the_code(api, celery_worker, script):
    good = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    bad = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 6\n"
    script(
        [
            REVIEW_OK,
            {"match": f"{QA_TESTS}.*previous tests were wrong", "reply": {"tests": good}},
            {"match": QA_TESTS, "reply": {"tests": bad}},
            {"match": DEBUG, "reply": {"cause": "the test expects 6", "wrong": "test", "fix": "expect 5"}},
            {"match": CODER, "reply": code_reply(RIGHT)},
        ]
    )
    done = wait_for(submit(api, "fast_coder", {"instruction": "add"})["task_id"], timeout=60)
    assert done["status"] == "succeeded", done["history"][-3:]
    assert rounds(done) == [(1, "fast_coder", "debug"), (2, "fast_coder", "done")]
    assert "2.coder" not in steps(done)  # the code stood; only the tests changed
    assert done["result"]["tests"] == good


def test_cancelling_in_the_middle_of_a_loop_stops_it(api, celery_worker, script):
    slow_debug = {**DEBUG_CODE, "delay_s": 3}
    script([REVIEW_OK, slow_debug, {"match": CODER, "reply": code_reply(wrong(1))}])
    task_id = submit(api, "fast_coder", {"instruction": "add", "tests": TESTS})["task_id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        packet = api.get(f"/api/v1/tasks/{task_id}").json()
        if any(e["event"] == "scheduled" and "2.debug" in e["detail"]["steps"] for e in packet["history"]):
            break
        time.sleep(0.1)
    cancelled = api.post(f"/api/v1/tasks/{task_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    time.sleep(5)  # the slow debug step ends meanwhile; its answer must not be used
    after = api.get(f"/api/v1/tasks/{task_id}").json()
    assert after["status"] == "cancelled"
    assert "2.coder" not in steps(after)
    assert "2.debug" not in steps(after)


def test_feedback_on_a_finished_task_routes_back_into_the_loop(api, celery_worker, script):
    script(
        [
            REVIEW_OK,
            {"match": f"{CODER}.*ALSO-NEGATIVE", "reply": code_reply(RIGHT + "\n# handles negatives\n")},
            {"match": CODER, "reply": code_reply(RIGHT)},
        ]
    )
    task_id = submit(api, "fast_coder", {"instruction": "add", "tests": TESTS})["task_id"]
    assert wait_for(task_id, timeout=60)["status"] == "succeeded"
    url = f"/api/v1/tasks/{task_id}/feedback"
    bad = api.post(url, data=json.dumps({"feedback": "x", "route": "qa"}), content_type="application/json")
    assert bad.status_code == 400 and bad.json()["field"] == "route"
    response = api.post(
        url, data=json.dumps({"feedback": "ALSO-NEGATIVE numbers", "route": "coder"}), content_type="application/json"
    )
    assert response.status_code == 202, response.content
    assert response.json()["status"] == "running"
    done = wait_for(task_id, timeout=60)
    assert done["status"] == "succeeded"
    assert done["iteration"] == 2
    assert "# handles negatives" in done["result"]["files"][0]["content"]
    feedback = next(e for e in done["history"] if e["event"] == "feedback")
    assert feedback["detail"]["route"] == "coder"
    assert rounds(done)[-1] == (2, "fast_coder", "done")


def test_feedback_whose_round_cannot_be_queued_leaves_a_cancel_made_meanwhile(api, celery_worker, script, monkeypatch):
    """The broker kept the feedback's request waiting, and the task was cancelled meanwhile: the feedback's
    undo put it back to where it was before the feedback, and the cancel was lost."""
    from kombu.exceptions import OperationalError

    from orchestration import orchestration_engine, services

    script([REVIEW_OK, {"match": CODER, "reply": code_reply(RIGHT)}])
    task_id = submit(api, "fast_coder", {"instruction": "add", "tests": TESTS})["task_id"]
    assert wait_for(task_id, timeout=60)["status"] == "succeeded"

    def cancelled_meanwhile(*, packet, step):
        services.task_cancel(task_id=packet["task_id"], reason="a person cancelled it meanwhile")
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(orchestration_engine, "loop_continue", cancelled_meanwhile)
    response = api.post(
        f"/api/v1/tasks/{task_id}/feedback", data=json.dumps({"feedback": "more"}), content_type="application/json"
    )
    assert response.status_code == 503 and response.json()["code"] == "queue_unavailable"
    after = api.get(f"/api/v1/tasks/{task_id}").json()
    assert after["status"] == "cancelled"
    assert [e["event"] for e in after["history"]][-2:] == ["feedback", "cancelled"]


def test_feedback_is_refused_where_there_is_no_loop_or_the_task_runs(api, celery_worker, script):
    script([{"match": r'\{"components"', "reply": {"components": [{"name": "a", "responsibility": "b"}],
            "interfaces": [], "data_flow": [], "risks": []}}])  # fmt: skip
    architect = api.post(
        "/api/v1/developer/architect", data=json.dumps({"payload": {"input": "x"}}), content_type="application/json"
    ).json()
    wait_for(architect["task_id"], timeout=30)
    body = json.dumps({"feedback": "more detail"})
    refused = api.post(f"/api/v1/tasks/{architect['task_id']}/feedback", data=body, content_type="application/json")
    assert refused.status_code == 409 and refused.json()["code"] == "no_feedback_loop"


def test_qa_on_given_code_reports_each_check(api, celery_worker, script):
    script([REVIEW_OK])
    payload = {"files": [{"path": "solution.py", "content": wrong(0)}], "tests": TESTS}
    done = wait_for(submit(api, "qa", payload)["task_id"], timeout=60)
    assert done["status"] == "succeeded"
    assert done["result"]["verdict"] == "fail"
    by_name = {c["check"]: c for c in done["result"]["checks"]}
    assert set(by_name) == {"tests", "static", "review"}
    assert not by_name["tests"]["passed"] and by_name["static"]["passed"] and by_name["review"]["passed"]
    assert by_name["tests"]["tests"][0]["name"] == "test_add"


# Its own id each session: the breaker it trips lives in Redis, which a run outside `make test` keeps.
DOWN = f"down-{uuid.uuid4().hex[:8]}"


def test_a_step_whose_engine_is_down_is_retried_with_backoff_then_fails_naming_it(
    api, celery_worker, edit_config, tmp_path
):
    use_script(
        edit_config, tmp_path / "down.json", [{"match": CODER, "reply": "", "error": "unavailable"}], llm_id=DOWN
    )
    done = wait_for(submit(api, "fast_coder", {"instruction": "add"})["task_id"], timeout=60)
    assert done["status"] == "failed"
    retries = [e for e in done["history"] if e["event"] == "step_retry"]
    assert [(e["detail"]["retry"], e["detail"]["in_s"]) for e in retries] == [(1, 1), (2, 2)]
    assert [e["event"] for e in done["history"]].count("retrying") == 2
    reason = done["history"][-1]["detail"]["reason"]
    assert reason.startswith("step 1.coder: ") and "down" in reason and reason.endswith("(after 2 retries)")


def test_a_job_the_current_run_did_not_note_does_nothing(state_dir):
    """A job left from before a retry (or delivered after its task moved on) is not run."""
    from orchestration.orchestration_engine import later_step
    from orchestration.packets import new_packet
    from orchestration.runtime import task_store

    packet = new_packet(task_id=str(uuid.uuid4()), profile="developer", role="fast_coder", payload={"instruction": "x"})
    packet["status"] = "running"
    task_store().create(packet)
    outcome = later_step(task_id=packet["task_id"], step="2.coder", job_id="job-of-an-earlier-run")
    assert outcome == {"skipped": "not a job of the task's current run"}
    assert task_store().read(packet["task_id"])["history"] == []


def test_code_that_fails_the_static_check_goes_back_to_the_coder_whatever_debug_says(api, celery_worker, script):
    broken = "def add(a, b):\n    return a +\n"
    written = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    script(
        [
            REVIEW_OK,
            {"match": QA_TESTS, "reply": {"tests": written}},
            {"match": DEBUG, "reply": {"cause": "the test imports add", "wrong": "test", "fix": "rewrite it"}},
            {"match": "Your previous code", "reply": code_reply(RIGHT)},
            {"match": CODER, "reply": code_reply(broken)},
        ]
    )
    done = wait_for(submit(api, "fast_coder", {"instruction": "add"})["task_id"], timeout=60)
    assert done["status"] == "succeeded", done["history"][-3:]
    assert rounds(done) == [(1, "fast_coder", "debug"), (2, "fast_coder", "done")]
    assert "2.coder" in steps(done)  # the coder fixed the code rather than QA rewriting its tests
    assert done["result"]["tests"] == written


def test_a_check_whose_llm_fails_transiently_is_retried_before_the_round_gives_up(
    api, celery_worker, edit_config, tmp_path
):
    rules = [
        {"match": QA_REVIEW, "reply": "", "error": "unavailable"},
        {"match": CODER, "reply": code_reply(RIGHT)},
    ]
    use_script(edit_config, tmp_path / "review_down.json", rules, llm_id=f"{DOWN}-review")
    done = wait_for(submit(api, "fast_coder", {"instruction": "add", "tests": TESTS})["task_id"], timeout=60)
    assert done["status"] == "failed"
    retries = [e["detail"] for e in done["history"] if e["event"] == "step_retry"]
    assert [(r["step"], r["retry"], r["in_s"]) for r in retries] == [("1.review", 1, 1), ("1.review", 2, 2)]
    reason = done["history"][-1]["detail"]["reason"]
    assert reason.startswith("QA could not check round 1: review: ") and reason.endswith("(after 2 retries)")


@pytest.fixture
def here(edit_config, redis_url):
    """A copy of the developer profile under a name of its own, whose steps the test runs in its own
    process: no worker consumes the profile's queues, so the jobs the steps queue stay on them for the
    test to see (they are removed afterwards). Yields (profile, broker, run_first_round), the last
    submitting a coder task and running its coder step and its three checks here, in order."""
    import redis

    from orchestration.orchestration_engine import later_step, task_step
    from orchestration.runtime import task_store
    from orchestration.services import task_submit

    profile = f"here_{uuid.uuid4().hex[:8]}"
    edit_config(lambda raw: raw["profiles"].__setitem__(profile, raw["profiles"]["developer"]))
    broker = redis.Redis.from_url(redis_url)

    def first_round(before_last_check=lambda task_id: None):
        """The task's id, its checks' (step, job id) and its verdict's; the last check runs after
        ``before_last_check``."""
        packet, _ = task_submit(profile=profile, role="fast_coder", payload={"instruction": "add", "tests": TESTS})
        task_id = packet["task_id"]
        task_step(task_id=task_id, job_id=packet["history"][0]["detail"]["job_id"], worker="here")
        noted = task_store().read(task_id)["history"][-1]["detail"]
        assert noted["steps"] == ["1.tests", "1.static", "1.review", "1.verdict"]
        *checks, verdict = zip(noted["steps"], noted["job_ids"], strict=True)
        for n, (step, job_id) in enumerate(checks):
            if n == len(checks) - 1:
                before_last_check(task_id)
            later_step(task_id=task_id, step=step, job_id=job_id)
        return task_id, checks, verdict

    yield profile, broker, first_round
    broker.delete(*(f"{profile}.{role}" for role in ("fast_coder", "deep_coder", "qa", "debug")))


def test_the_check_recorded_last_runs_the_verdict_in_its_job(here, script):
    """No verdict job goes through the broker: the last check's job decides. A verdict that was only
    queued would not be recorded here; the QA queue holds the checks' jobs and nothing else."""
    from orchestration import recovery
    from orchestration.runtime import task_store

    profile, broker, first_round = here
    script([REVIEW_OK, {"match": CODER, "reply": code_reply(RIGHT)}])
    task_id, checks, verdict = first_round()
    done = task_store().read(task_id)
    assert done["status"] == "succeeded", done["history"][-3:]
    assert [e["detail"]["step"] for e in done["history"] if e["event"] == "verdict"] == [verdict[0]]
    assert recovery.queued_jobs(broker, [f"{profile}.qa"]) == {job_id for _, job_id in checks}


def test_a_verdict_whose_lease_is_held_is_queued_by_the_last_check(here, script):
    """Another delivery of the verdict's job runs it (its lease is held): the last check queues the
    verdict's job, under its noted id, instead of waiting for the lease."""
    from orchestration import recovery
    from orchestration.leases import StepLease
    from orchestration.runtime import task_store

    profile, broker, first_round = here
    script([REVIEW_OK, {"match": CODER, "reply": code_reply(RIGHT)}])
    held = []

    def hold_the_verdict(task_id):
        lease = StepLease(f"{task_id}:1.verdict", "another-delivery")
        assert lease.acquire()
        held.append(lease)

    try:
        task_id, checks, verdict = first_round(hold_the_verdict)
    finally:
        for lease in held:
            lease.__exit__(None, None, None)
    packet = task_store().read(task_id)
    assert packet["status"] == "running"
    assert "verdict" not in [e["event"] for e in packet["history"]]
    assert recovery.queued_jobs(broker, [f"{profile}.qa"]) == {job_id for _, job_id in [*checks, verdict]}


def test_a_last_check_that_used_its_roles_time_limit_queues_the_verdict(here, script, edit_config):
    """The verdict would run past the check job's soft limit (the role's time limit and 5 s): the last
    check queues it, under its noted id, rather than run it. QA's time limit is 1 s here and the review
    takes 1 s (the engine waits as long as the call's timeout, 1 s at the least, so it is no timeout)."""
    from orchestration import recovery
    from orchestration.runtime import task_store

    profile, broker, first_round = here
    edit_config(lambda raw: raw["profiles"][profile]["roles"]["qa"].__setitem__("time_limit_s", 1))
    script([{**REVIEW_OK, "delay_s": 1.0}, {"match": CODER, "reply": code_reply(RIGHT)}])
    task_id, checks, verdict = first_round()
    packet = task_store().read(task_id)
    assert packet["status"] == "running"
    review = next(e["detail"] for e in packet["history"] if e["event"] == "check" and e["detail"]["step"] == "1.review")
    assert review["passed"] and review["duration_ms"] >= 1000, review
    assert "verdict" not in [e["event"] for e in packet["history"]]
    assert recovery.queued_jobs(broker, [f"{profile}.qa"]) == {job_id for _, job_id in [*checks, verdict]}


def test_a_check_whose_lease_goes_to_another_worker_stops_its_test_run(here, script, settings):
    """A lost lease stopped a check's LLM call but not its test run, which went on to the sandbox's
    wall-clock timeout beside the worker that took the check over. Now the run is killed at the next
    renewal, and the check is left to the other worker: nothing recorded, the task not failed."""
    from orchestration.leases import StepLease
    from orchestration.orchestration_engine import later_step, task_step
    from orchestration.runtime import task_store
    from orchestration.services import task_submit

    profile, broker, _ = here
    script([REVIEW_OK, {"match": CODER, "reply": code_reply(RIGHT)}])
    settings.TASK_LEASE_SECONDS = 1.5  # renewed every 0.5 s
    settings.SANDBOX_WALL_SECONDS = 60  # the run would go on for a minute
    hanging = "import time\nfrom solution import add\n\ndef test_add():\n    time.sleep(60)\n"
    packet, _ = task_submit(profile=profile, role="fast_coder", payload={"instruction": "add", "tests": hanging})
    task_id = packet["task_id"]
    task_step(task_id=task_id, job_id=packet["history"][0]["detail"]["job_id"], worker="here")
    noted = task_store().read(task_id)["history"][-1]["detail"]
    step, job_id = noted["steps"][0], noted["job_ids"][0]
    assert step == "1.tests"
    key = StepLease(f"{task_id}:{step}", job_id).key

    def take_over() -> None:  # another worker takes the lease, as after it expired
        time.sleep(1.0)
        broker.set(key, f"{job_id}:other:1", px=60_000)

    threading.Thread(target=take_over, daemon=True).start()
    started = time.monotonic()
    try:
        outcome = later_step(task_id=task_id, step=step, job_id=job_id)
    finally:
        broker.delete(key)
    assert time.monotonic() - started < 8, "the test run went on"
    assert "cancelled" in outcome["skipped"], outcome
    stored = task_store().read(task_id)
    assert stored["status"] == "running"
    assert step not in steps(stored)


def test_a_last_check_delivered_again_queues_what_its_verdict_noted(here, script):
    """The worker died after the verdict was recorded and before Debug's job reached Redis: the check's
    job comes back (it was not acknowledged) and queues Debug's job again, under its noted id."""
    from orchestration import recovery
    from orchestration.orchestration_engine import later_step
    from orchestration.runtime import task_store

    profile, broker, first_round = here
    script([REVIEW_OK, DEBUG_CODE, {"match": CODER, "reply": code_reply(wrong(0))}])
    task_id, checks, _ = first_round()
    packet = task_store().read(task_id)
    assert rounds(packet) == [(1, "fast_coder", "debug")]
    debug_job = packet["history"][-1]["detail"]["job_ids"]
    assert packet["history"][-1]["detail"]["steps"] == ["2.debug"]
    broker.delete(f"{profile}.debug")  # the job that did not reach Redis
    last_step, last_job = checks[-1]
    later_step(task_id=task_id, step=last_step, job_id=last_job)
    assert recovery.queued_jobs(broker, [f"{profile}.debug"]) == set(debug_job)


def test_a_check_of_the_round_before_a_feedback_neither_records_into_its_round_nor_fails_it(here, script):
    """A task failed while one of its checks was still running (another delivery of the check's job was
    killed by the hard time limit), and a person's feedback came: the check then recorded into the
    feedback's round, and its verdict finished the task while the feedback's round ran; killed again,
    it failed the feedback's round."""
    from orchestration import recovery
    from orchestration.orchestration_engine import task_abandoned, task_waiting
    from orchestration.runtime import task_store
    from orchestration.services import task_feedback

    profile, broker, first_round = here
    script([REVIEW_OK, {"match": CODER, "reply": code_reply(RIGHT)}])

    def failed_then_feedback(task_id):
        history = task_store().read(task_id)["history"]
        noted = next(e["detail"] for e in reversed(history) if e["event"] == "scheduled")
        killed = noted["job_ids"][2]  # the review's, the last check
        assert task_abandoned(task_id=task_id, job_id=killed, reason="the job was killed") == "failed"
        assert task_feedback(task_id=task_id, feedback="say what it does", route="coder")["status"] == "running"

    task_id, checks, _ = first_round(failed_then_feedback)
    packet = task_store().read(task_id)
    assert packet["status"] == "running" and packet["iteration"] == 2
    assert steps(packet) == ["1.coder", "1.tests", "1.static"]  # no 1.review, no 1.verdict
    noted = packet["history"][-1]["detail"]
    assert (noted["after"], noted["steps"]) == ("2.feedback", ["2.coder"])
    assert task_waiting(packet).jobs == tuple(noted["job_ids"])  # not the round before's
    assert set(noted["job_ids"]) <= recovery.queued_jobs(broker, [f"{profile}.fast_coder"])
    assert task_abandoned(task_id=task_id, job_id=checks[-1][1], reason="killed again") == "running"
    assert task_store().read(task_id)["version"] == packet["version"]


def test_recoveries_before_a_feedback_do_not_count_against_its_round(here):
    """A task recovered RECOVERY_RETRIES times before it failed and took feedback was failed at the first
    lost job of the feedback's round ("after it was recovered 3 times")."""
    from orchestration import recovery
    from orchestration.orchestration_engine import task_recover
    from orchestration.packets import history_event, new_packet
    from orchestration.runtime import task_store

    profile, broker, _ = here
    packet = new_packet(task_id=str(uuid.uuid4()), profile=profile, role="fast_coder", payload={"instruction": "x"})
    lost = {"reason": "its jobs were lost", "jobs": []}
    packet["status"], packet["iteration"] = "running", 2
    packet["history"] = [
        history_event("claimed", status="running", detail={"worker": "w", "job_id": "job-1"}),
        *(history_event("recovered", status="running", detail=lost) for _ in range(3)),
        history_event("failed", status="failed", detail={"reason": "step 1.coder: no answer"}),
        history_event("feedback", status="running",
                      detail={"step": "2.feedback", "iteration": 2, "route": "coder", "feedback": "try again"}),
    ]  # fmt: skip
    task_store().create(packet)
    stored = task_store().read(packet["task_id"])
    assert task_recover(packet=stored, reason="its jobs were lost", retries=3) == "recovered"
    noted = task_store().read(packet["task_id"])["history"][-1]["detail"]
    assert noted["steps"] == ["2.coder"]  # the feedback's round, queued
    assert set(noted["job_ids"]) <= recovery.queued_jobs(broker, [f"{profile}.fast_coder"])


def test_feedback_whose_round_could_not_be_queued_leaves_the_task_as_it_was(api, here, monkeypatch):
    """Redis refused the feedback's round (503, "the task is as it was"), and the undo gave back only the
    status: the refused feedback's tests replaced the task's for every later round (posted again without
    tests, the round still ran them), its text stayed the loop's feedback, and the task's iteration
    stayed a round on. Posted again once Redis is back, the feedback's round is queued."""
    from celery.canvas import Signature
    from kombu.exceptions import OperationalError

    from orchestration import loop, recovery
    from orchestration.packets import history_event, new_packet
    from orchestration.runtime import task_store

    profile, broker, _ = here
    payload = {"instruction": "add", "tests": TESTS}
    packet = new_packet(task_id=str(uuid.uuid4()), profile=profile, role="fast_coder", payload=payload)
    packet["status"], packet["iteration"] = "failed", 1
    packet["history"] = [history_event("failed", status="failed", detail={"reason": "step 1.coder: no answer"})]
    before = task_store().create(packet)
    url = f"/api/v1/tasks/{packet['task_id']}/feedback"

    def redis_down(*args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    refused = {"feedback": "REFUSED", "tests": "def test_refused():\n    assert False\n"}
    with monkeypatch.context() as down:
        down.setattr(Signature, "apply_async", redis_down)
        response = api.post(url, data=json.dumps(refused), content_type="application/json")
    assert response.status_code == 503 and response.json()["code"] == "queue_unavailable"
    after = task_store().read(packet["task_id"])
    assert [e["event"] for e in after["history"]] == ["failed", "feedback", "scheduled", "enqueue_failed"]
    assert (after["status"], after["iteration"]) == ("failed", 1)
    assert loop.loop_state(after) == loop.loop_state(before)

    response = api.post(url, data=json.dumps({"feedback": "take two"}), content_type="application/json")
    assert response.status_code == 202, response.content
    taken = task_store().read(packet["task_id"])
    state = loop.loop_state(taken)
    assert (state.tests, state.feedback, state.feedback_iteration) == (TESTS, "take two", taken["iteration"])
    # Round 2 again: the undone round's note, under the same step's name, is not this round's.
    assert taken["iteration"] == 2
    noted = taken["history"][-1]["detail"]
    assert noted["after"] == "2.feedback"
    undone = next(e["detail"] for e in taken["history"] if e["event"] == "scheduled")
    assert undone["after"] == "2.feedback" and not set(undone["job_ids"]) & set(noted["job_ids"])
    assert set(noted["job_ids"]) <= recovery.queued_jobs(broker, [f"{profile}.debug"])
