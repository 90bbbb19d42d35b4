"""Delegation: a planner task whose payload asks for execution runs its plan as child tasks, through a
real Celery worker, with the scripted engine in place of the model (tests/orchestration/scripted.py)."""

import json
import time
import uuid
from datetime import datetime

import pytest

from tests.conftest import wait_for
from tests.orchestration.scripted import ARCHITECT, DIAGNOSIS, PLANNER, use_script

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

PLAN = {
    "steps": [
        {"id": "s1", "role": "architect", "input": "Design the storage.", "depends_on": []},
        {"id": "s2", "role": "diagnosis", "input": "Why is the cache slow?", "depends_on": []},
        {"id": "s3", "role": "architect", "input": "Combine both.", "depends_on": ["s1", "s2"]},
    ]
}
DESIGN = {"components": [{"name": "store", "responsibility": "keeps data"}], "interfaces": [], "data_flow": [],
          "risks": []}  # fmt: skip
CAUSES = {"causes": [{"cause": "no index", "likelihood": "high", "evidence": "slow scans"}], "next_checks": []}


@pytest.fixture
def script(edit_config, tmp_path):
    return lambda rules: use_script(edit_config, tmp_path / "script.json", rules)


def post(api, payload):
    response = api.post(
        "/api/v1/developer/planner", data=json.dumps({"payload": payload}), content_type="application/json"
    )
    assert response.status_code == 202, response.content
    return response.json()


def at(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_a_plan_of_three_steps_runs_two_in_parallel_then_the_dependent_one(api, celery_worker, script):
    script(
        [
            {"match": PLANNER, "reply": PLAN},
            {"match": ARCHITECT, "reply": DESIGN},
            {"match": DIAGNOSIS, "reply": CAUSES, "delay_s": 1},
        ]
    )
    parent = post(api, {"goal": "Build a cache service.", "execute": True})
    done = wait_for(parent["task_id"], timeout=60)
    assert done["status"] == "succeeded", done["history"][-2:]
    assert [s["id"] for s in done["result"]["steps"]] == ["s1", "s2", "s3"]
    results = done["result"]["results"]
    assert results["s1"]["result"] == DESIGN and results["s2"]["result"] == CAUSES
    assert len(done["children"]) == 3
    children = {step: api.get(f"/api/v1/tasks/{results[step]['task_id']}").json() for step in ("s1", "s2", "s3")}
    for step, child in children.items():
        assert child["parent_id"] == parent["task_id"]
        assert child["status"] == "succeeded"
        assert child["history"][0]["detail"]["plan_step"] == step
    # s1 and s2 were queued together, before either finished; s3 only after both had.
    assert abs((at(children["s1"]["created_at"]) - at(children["s2"]["created_at"])).total_seconds()) < 1
    assert at(children["s2"]["created_at"]) < at(children["s1"]["updated_at"])
    finished = max(at(children["s1"]["updated_at"]), at(children["s2"]["updated_at"]))
    assert at(children["s3"]["created_at"]) >= finished
    # The dependent step sees what its dependencies produced.
    assert "no index" in children["s3"]["payload"]["requirements"]
    assert children["s3"]["payload"]["requirements"].startswith("Combine both.")
    # Children are listed with their parent in the API.
    listed = api.get("/api/v1/tasks/?role=architect").json()["results"]
    assert {t["task_id"] for t in listed} >= {results["s1"]["task_id"], results["s3"]["task_id"]}


def test_a_failed_step_fails_the_plan_and_names_it(api, celery_worker, script):
    script([{"match": PLANNER, "reply": PLAN}, {"match": ARCHITECT, "reply": DESIGN}])  # diagnosis has no rule
    done = wait_for(post(api, {"goal": "x", "execute": True})["task_id"], timeout=60)
    assert done["status"] == "failed"
    reason = done["history"][-1]["detail"]["reason"]
    assert reason.startswith("step s2 (diagnosis, task ") and "no rule of the script" in reason
    # s3 depended on s2, so it was never created.
    assert len(done["children"]) == 2


def test_without_execute_the_plan_is_the_result(api, celery_worker, script):
    script([{"match": PLANNER, "reply": PLAN}])
    done = wait_for(post(api, {"goal": "x"})["task_id"], timeout=30)
    assert done["status"] == "succeeded"
    assert done["result"] == PLAN
    assert done["children"] == []


def test_cancelling_the_parent_cancels_its_children(api, celery_worker, script):
    script(
        [
            {"match": PLANNER, "reply": PLAN},
            {"match": ARCHITECT, "reply": DESIGN, "delay_s": 3},
            {"match": DIAGNOSIS, "reply": CAUSES, "delay_s": 3},
        ]
    )
    parent = post(api, {"goal": "x", "execute": True})
    running = wait_for(parent["task_id"], statuses={"running"}, timeout=30)
    deadline = time.monotonic() + 20
    while not running["children"] and time.monotonic() < deadline:
        time.sleep(0.1)
        running = api.get(f"/api/v1/tasks/{parent['task_id']}").json()
    assert api.post(f"/api/v1/tasks/{parent['task_id']}/cancel").json()["status"] == "cancelled"
    for child_id in running["children"]:
        child = api.get(f"/api/v1/tasks/{child_id}").json()
        assert child["status"] == "cancelled"
        assert child["history"][-1]["detail"]["reason"] == "the parent task was cancelled"


def test_a_planner_job_delivered_again_before_it_delegated_delegates(state_dir):
    """The worker recorded the plan and died before delegating it; the job comes back (acks_late)."""
    from orchestration.orchestration_engine import task_step
    from orchestration.packets import history_event, new_packet
    from orchestration.runtime import task_store
    from orchestration.services import task_cancel

    packet = new_packet(
        task_id=str(uuid.uuid4()), profile="developer", role="planner", payload={"goal": "x", "execute": True}
    )
    packet["status"], packet["result"] = "running", PLAN
    packet["history"] = [
        history_event("claimed", status="running", detail={"worker": "w", "job_id": "job-1"}),
        history_event("step", status="running", agent="planner", detail={"step": "main"}),
    ]
    task_store().create(packet)
    assert task_step(task_id=packet["task_id"], job_id="job-1", worker="w2") == "running"
    resumed = task_store().read(packet["task_id"])
    assert [e["event"] for e in resumed["history"]][-1] == "delegated"  # no spurious "reclaimed"
    assert len(resumed["children"]) == 2  # s1 and s2 are ready; s3 waits for them
    task_cancel(task_id=packet["task_id"])
    assert all(task_store().read(child)["status"] == "cancelled" for child in resumed["children"])
