"""What a coder's round is given and what it keeps, end to end: a real Celery worker, the real sandbox, and the
scripted engine in place of the model (tests/orchestration/scripted.py)."""

import json

import pytest

from tests.conftest import wait_for
from tests.orchestration.scripted import CODER, DEBUG, QA_REVIEW, use_script
from tests.orchestration.test_feedback_loop import here  # noqa: F401 - a fixture

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

TESTS = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5, add(2, 3)\n"
RIGHT = "def add(a, b):\n    return a + b\n"
REVIEW_OK = {"match": QA_REVIEW, "reply": {"passed": True, "findings": []}}


@pytest.fixture
def script(edit_config, tmp_path):
    return lambda rules: use_script(edit_config, tmp_path / "script.json", rules)


def reply(*files):
    return {"files": [{"path": p, "content": c} for p, c in files], "run": "python solution.py", "notes": "scripted"}


def submit(api, payload):
    response = api.post(
        "/api/v1/developer/fast_coder", data=json.dumps({"payload": payload}), content_type="application/json"
    )
    assert response.status_code == 202, response.content
    return response.json()["task_id"]


def test_a_file_of_an_earlier_round_that_the_reply_leaves_out_is_kept(api, celery_worker, script):
    """Each round's reply was merged onto the payload's files, not the previous round's: a helper module
    written in round 1 was gone in round 2 when the fix rewrote only solution.py."""
    helper = ("helper.py", "def twice(x):\n    return 2 * x\n")
    first = ("solution.py", "from helper import twice\n\ndef add(a, b):\n    return twice(a) - a + b - 1\n")
    fixed = ("solution.py", "from helper import twice\n\ndef add(a, b):\n    return twice(a) - a + b\n")
    script(
        [
            REVIEW_OK,
            {"match": DEBUG, "reply": {"cause": "off by one", "wrong": "code", "fix": "FIX-MARKER: drop the - 1"}},
            {"match": f"{CODER}.*FIX-MARKER", "reply": reply(fixed)},
            {"match": CODER, "reply": reply(first, helper)},
        ]
    )
    done = wait_for(submit(api, {"instruction": "add(a, b) returns a + b", "tests": TESTS}), timeout=60)
    assert done["status"] == "succeeded", done["history"][-3:]
    assert done["iteration"] == 2
    assert sorted(item["path"] for item in done["result"]["files"]) == ["helper.py", "solution.py"]


def test_tests_corrected_by_feedback_are_the_ones_the_coder_is_given(api, celery_worker, script):
    """The coder's prompt took its tests from the payload only: after a reviewer's feedback corrected them, the
    coder was told to pass the old tests while QA ran the new ones."""
    corrected = TESTS + "# NEWTESTS-MARKER\n"
    script(
        [
            REVIEW_OK,
            {"match": DEBUG, "reply": {"cause": "add(2, 3) is 5, not 6", "wrong": "test", "fix": "expect 5"}},
            {"match": f"{CODER}.*NEWTESTS-MARKER", "reply": reply(("solution.py", RIGHT))},
            {
                "match": f"{CODER}.*Your previous code",
                "reply": reply(("solution.py", "def add(a, b):\n    return 0\n")),
            },
            {"match": CODER, "reply": reply(("solution.py", RIGHT))},
        ]
    )
    task_id = submit(api, {"instruction": "add", "tests": TESTS.replace("== 5", "== 6")})
    wait_for(task_id, statuses={"awaiting_feedback"}, timeout=60)
    body = {"feedback": "The test was wrong.", "route": "coder", "tests": corrected}
    response = api.post(f"/api/v1/tasks/{task_id}/feedback", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 202, response.content
    done = wait_for(task_id, statuses={"succeeded", "failed", "awaiting_feedback", "cancelled"}, timeout=60)
    assert done["status"] == "succeeded", done["history"][-3:]
    assert done["result"]["files"] == [{"path": "solution.py", "content": RIGHT}]


def test_a_job_delivered_again_queues_only_the_steps_not_yet_recorded(here, script):  # noqa: F811
    """A job delivered again after its step was recorded queued again every job noted after it, recorded or
    not; each of those, finding its step recorded, did the same: one duplicate delivery ran the rest of the
    task's rounds three times more at every round (each check queued the next round's Debug again)."""
    from orchestration import recovery
    from orchestration.orchestration_engine import later_step
    from orchestration.runtime import task_store

    profile, broker, first_round = here
    script(
        [
            REVIEW_OK,
            {"match": DEBUG, "reply": {"cause": "it subtracts", "wrong": "code", "fix": "FIX-MARKER: add"}},
            {"match": f"{CODER}.*FIX-MARKER", "reply": reply(("solution.py", "def add(a, b):\n    return 1\n"))},
            {"match": CODER, "reply": reply(("solution.py", "def add(a, b):\n    return 0\n"))},
        ]
    )
    queues = [f"{profile}.{role}" for role in ("fast_coder", "qa", "debug")]
    task_id, checks, _ = first_round()

    def noted(step):
        history = task_store().read(task_id)["history"]
        return next(
            e["detail"]["job_ids"] for e in history if e["event"] == "scheduled" and e["detail"]["after"] == step
        )

    debug_job = noted("1.verdict")[0]
    later_step(task_id=task_id, step="2.debug", job_id=debug_job)
    coder_job = noted("2.debug")[0]
    later_step(task_id=task_id, step="2.coder", job_id=coder_job)
    assert [e["detail"]["step"] for e in task_store().read(task_id)["history"] if e["event"] == "step"][-2:] == [
        "2.debug",
        "2.coder",
    ]
    broker.delete(*queues)
    later_step(task_id=task_id, step=checks[-1][0], job_id=checks[-1][1])  # round 1's last check, again
    later_step(task_id=task_id, step="2.debug", job_id=debug_job)  # and round 2's Debug
    assert recovery.queued_jobs(broker, queues) == set()  # what follows them is recorded
    later_step(task_id=task_id, step="2.coder", job_id=coder_job)  # what follows it is not: queued again
    assert recovery.queued_jobs(broker, queues) == set(noted("2.coder")[:-1])  # the checks; the last runs the verdict


def test_a_check_that_meets_a_redis_outage_is_left_to_the_sweep_not_recorded_as_failed(here, script, monkeypatch):  # noqa: F811
    """Any other step stopped by Redis or the broker not answering is left for the recovery sweep; a check
    was recorded as failed ("internal error: ConnectionError"), and the round's verdict failed the task with
    "QA could not check round 1"."""
    import redis

    from balancer.load_balancer import LoadBalancer
    from orchestration.orchestration_engine import later_step, task_step
    from orchestration.runtime import task_store
    from orchestration.services import task_submit

    profile, _, _ = here
    script([REVIEW_OK, {"match": CODER, "reply": reply(("solution.py", RIGHT))}])
    packet, _ = task_submit(profile=profile, role="fast_coder", payload={"instruction": "add", "tests": TESTS})
    task_id = packet["task_id"]
    task_step(task_id=task_id, job_id=packet["history"][0]["detail"]["job_id"], worker="here")
    scheduled = task_store().read(task_id)["history"][-1]["detail"]
    noted = dict(zip(scheduled["steps"], scheduled["job_ids"], strict=True))

    def outage(*_args, **_kwargs):
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(LoadBalancer, "run", outage)
    with pytest.raises(redis.ConnectionError):
        later_step(task_id=task_id, step="1.review", job_id=noted["1.review"])
    stopped = task_store().read(task_id)
    assert stopped["status"] == "running"
    assert "1.review" not in [e["detail"].get("step") for e in stopped["history"] if e["event"] == "check"]


def test_a_time_limit_after_a_step_was_recorded_does_not_fail_the_task(here, script, monkeypatch):  # noqa: F811
    """The coder's step was recorded and its checks noted, then the job's soft time limit fired (while it
    queued them): the task failed with "step 1.coder exceeded its time limit", though the step was done."""
    from celery.exceptions import SoftTimeLimitExceeded

    from orchestration import orchestration_engine
    from orchestration.runtime import task_store
    from orchestration.services import task_submit

    profile, _, _ = here
    script([REVIEW_OK, {"match": CODER, "reply": reply(("solution.py", RIGHT))}])
    schedule = orchestration_engine._schedule

    def schedule_then_time_out(*args, **kwargs):
        schedule(*args, **kwargs)
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(orchestration_engine, "_schedule", schedule_then_time_out)
    packet, _ = task_submit(profile=profile, role="fast_coder", payload={"instruction": "add", "tests": TESTS})
    job_id = packet["history"][0]["detail"]["job_id"]
    orchestration_engine.task_step(task_id=packet["task_id"], job_id=job_id, worker="here")
    after = task_store().read(packet["task_id"])
    assert after["status"] == "running", after["history"][-1]
    assert [e["event"] for e in after["history"]][-2:] == ["step", "scheduled"]
    # A job of the task whose step is not recorded still fails it.
    noted = after["history"][-1]["detail"]
    orchestration_engine.task_abandoned(task_id=packet["task_id"], job_id=noted["job_ids"][0], reason="killed")
    assert task_store().read(packet["task_id"])["status"] == "failed"


def test_a_coder_that_copies_the_formats_placeholder_fails_the_task_saying_so(api, celery_worker, script):
    """SmolLM2-135M's coder answered `"<the whole file>"` every round, and each round ran QA's checks, Debug and
    the next round on it: the task failed only when the same failure repeated, after four rounds."""
    script([REVIEW_OK, {"match": CODER, "reply": reply(("solution.py", "<the whole file>"))}])
    done = wait_for(submit(api, {"instruction": "add(a, b) returns a + b", "tests": TESTS}), timeout=60)
    assert done["status"] == "failed"
    reason = done["history"][-1]["detail"]["reason"]
    assert reason.startswith("step 1.coder: the model's reply did not follow the coder agent's output format")
    assert "reply.files[0].content is '<the whole file>', the reply format's placeholder" in reason
    assert not [event for event in done["history"] if event["event"] == "check"]
