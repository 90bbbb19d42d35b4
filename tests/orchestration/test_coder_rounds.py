"""What a coder's round is given and what it keeps, end to end: a real Celery worker, the real sandbox, and the
scripted engine in place of the model (tests/orchestration/scripted.py)."""

import json

import pytest

from tests.conftest import wait_for
from tests.orchestration.scripted import CODER, DEBUG, QA_REVIEW, use_script

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
