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


def delegated_parent(steps):
    """A running planner task whose plan of ``steps`` was recorded and delegated (no child made yet)."""
    from orchestration.orchestration_engine import _child_ids
    from orchestration.packets import history_event, new_packet
    from orchestration.runtime import task_store

    packet = new_packet(
        task_id=str(uuid.uuid4()), profile="developer", role="planner", payload={"goal": "x", "execute": True}
    )
    packet["status"], packet["result"] = "running", {"steps": steps}
    ids = _child_ids(packet, steps)
    packet["history"] = [
        history_event("claimed", status="running", detail={"worker": "w", "job_id": "job-1"}),
        history_event("step", status="running", agent="planner", detail={"step": "main"}),
        history_event(
            "delegated", status="running", agent="planner", detail={"step": "delegated", "plan": steps, "children": ids}
        ),
    ]
    task_store().create(packet)
    return packet["task_id"], ids


def step(step_id, role="architect", depends_on=()):
    return {"id": step_id, "role": role, "input": f"Do {step_id}.", "depends_on": list(depends_on)}


def test_a_step_that_cannot_start_cancels_the_steps_made_before_it_in_the_same_pass(state_dir):
    """s1 was created, then s2's role was gone: the plan failed, and s1 stayed queued with no job, for the
    recovery sweep to queue and run for a failed plan."""
    from orchestration.orchestration_engine import plan_advance
    from orchestration.runtime import task_store

    parent_id, ids = delegated_parent([step("s1"), step("s2", role="gone")])
    plan_advance(parent_id=parent_id)
    parent = task_store().read(parent_id)
    assert parent["status"] == "failed"
    assert parent["history"][-1]["detail"]["reason"].startswith("step s2 cannot start: ")
    assert task_store().read(ids["s1"])["status"] == "cancelled"


def test_a_task_that_took_a_steps_id_is_not_adopted_as_the_step_nor_cancelled(state_dir):
    """Child ids can be worked out from the parent's: a task submitted under one was taken as the step,
    its result fed to the steps after it."""
    from orchestration.orchestration_engine import plan_advance
    from orchestration.packets import new_packet
    from orchestration.runtime import task_store

    parent_id, ids = delegated_parent([step("s1")])
    foreign = new_packet(task_id=ids["s1"], profile="developer", role="architect", payload={"input": "mine"})
    task_store().create(foreign)
    plan_advance(parent_id=parent_id)
    parent = task_store().read(parent_id)
    assert parent["status"] == "failed"
    assert parent["history"][-1]["detail"]["reason"] == (
        f"step s1 cannot start: a task {ids['s1']} that is not this plan's step already exists"
    )
    assert task_store().read(ids["s1"])["status"] == "queued"  # the client's own task is left alone


def test_a_plan_that_fails_by_its_time_limit_cancels_its_children(state_dir):
    """Only a failed step (fail_plan) or a cancel cancelled the children: a parent failed any other way (its
    step's time limit during the delegation, an internal error, its recovery given up) left them to run."""
    from orchestration.orchestration_engine import _fail
    from orchestration.packets import history_event, new_packet
    from orchestration.runtime import task_store

    parent_id, ids = delegated_parent([step("s1"), step("s2")])
    for step_id in ("s1", "s2"):
        child = new_packet(task_id=ids[step_id], profile="developer", role="architect", payload={"input": "x"})
        child["parent_id"] = parent_id
        child["history"].append(history_event("submitted", status="queued", detail={"job_id": str(uuid.uuid4())}))
        task_store().create(child)
    assert _fail(parent_id, lambda packet: True, "step main exceeded its time limit of 300s") == "failed"
    for step_id in ("s1", "s2"):
        child = task_store().read(ids[step_id])
        assert child["status"] == "cancelled"
        assert child["history"][-1]["detail"]["reason"] == "the parent task failed"


def make_child(parent_id, child_id, status="queued", result=None):
    from orchestration.packets import history_event, new_packet
    from orchestration.runtime import task_store

    child = new_packet(task_id=child_id, profile="developer", role="architect", payload={"input": "x"})
    child["parent_id"], child["status"], child["result"] = parent_id, status, result
    child["history"].append(history_event("submitted", status="queued", detail={"job_id": str(uuid.uuid4())}))
    task_store().create(child)


def test_a_plan_with_an_unreadable_childs_file_fails_and_cancels_the_others(state_dir):
    """A child's state file that is not a packet made plan_advance raise in every sibling's job, and the
    sweep skipped the parent: the plan stayed running for ever."""
    from orchestration.orchestration_engine import plan_advance
    from orchestration.runtime import task_store

    parent_id, ids = delegated_parent([step("s1"), step("s2")])
    make_child(parent_id, ids["s1"])
    (state_dir / f"{ids['s2']}.json").write_text("{not json")
    plan_advance(parent_id=parent_id)
    parent = task_store().read(parent_id)
    assert parent["status"] == "failed"
    reason = parent["history"][-1]["detail"]["reason"]
    assert reason.startswith(f"step s2 cannot be followed: the state file of task {ids['s2']} is not valid JSON")
    assert task_store().read(ids["s1"])["status"] == "cancelled"


def test_a_plan_with_an_unreadable_childs_file_is_failed_by_the_sweep(state_dir, redis_url):
    from orchestration import recovery
    from orchestration.runtime import task_store

    parent_id, ids = delegated_parent([step("s1"), step("s2")])
    make_child(parent_id, ids["s1"], status="succeeded", result=DESIGN)
    (state_dir / f"{ids['s2']}.json").write_text("[]")
    assert parent_id in recovery.sweep(grace_s=0, inspect_timeout_s=0.2).recovered  # its plan went on: failed
    parent = task_store().read(parent_id)
    assert parent["status"] == "failed"
    assert "does not hold a JSON object" in parent["history"][-1]["detail"]["reason"]


def test_a_plan_whose_childs_file_is_missing_is_moved_on_by_the_sweep(state_dir, redis_url):
    """A child that does not exist (its file lost, or its parent died before writing it) was taken as one
    still running: the plan waited for it for ever."""
    from orchestration import recovery
    from orchestration.runtime import task_store
    from orchestration.services import task_cancel

    parent_id, ids = delegated_parent([step("s1")])
    try:
        assert parent_id in recovery.sweep(grace_s=0, inspect_timeout_s=0.2).recovered
        assert task_store().read(ids["s1"])["status"] == "queued"  # made, and its job queued
    finally:
        task_cancel(task_id=parent_id)  # its child's job then finds it cancelled


def test_a_steps_dependencies_are_passed_whole_when_they_fit():
    """Each dependency's result was cut at 1,500 characters, whatever the model could take: a coder step's
    files reached the step after it cut."""
    from agents.registry import agent_class
    from orchestration.orchestration_engine import _step_payload
    from orchestration.runtime import configuration

    config = configuration()
    role = config.role("developer", "architect")
    result = {"text": "x" * 4000}
    payload = _step_payload(agent_class(role.agent), "Do s3.", {"s1": result, "s2": DESIGN}, role, config)
    assert payload["requirements"] == (
        f"Do s3.\n\nResults of the steps this one depends on:\ns1: {json.dumps(result)}\ns2: {json.dumps(DESIGN)}"
    )


def test_a_steps_dependencies_are_cut_to_fair_shares_of_what_the_context_holds():
    """Six results of 1,500 characters each did not fit SmolLM2's context with the role's max_tokens: the step
    failed at the balancer. Now the prompt fits the largest context among the role's LLMs."""
    from agents.registry import agent_class
    from balancer.load_balancer import candidates, estimate_tokens
    from orchestration.orchestration_engine import _step_payload
    from orchestration.runtime import configuration

    config = configuration()
    role = config.role("developer", "architect")
    agent = agent_class(role.agent)
    inputs = {"short": {"note": "keep me"}, "long1": {"text": "a" * 50_000}, "long2": {"text": "b" * 60_000}}
    payload = _step_payload(agent, "Do s3.", inputs, role, config)
    text = payload["requirements"]
    assert '\nshort: {"note": "keep me"}\n' in text
    long1 = text.split("\nlong1: ", 1)[1].split("\nlong2: ")[0]
    long2 = text.split("\nlong2: ", 1)[1]
    assert long1.startswith('{"text": "aaa') and long1.endswith(" of 50012 characters]")
    assert long2.startswith('{"text": "bbb') and long2.endswith(" of 60012 characters]")
    assert abs(len(long1) - len(long2)) <= 1  # cut alike
    largest = max(llm.context_length for llm in candidates(config, role)[0])
    needed = estimate_tokens(agent().build_messages(payload, role)) + role.max_tokens
    assert largest - 10 <= needed <= largest  # as much as fits, and no more


def test_fair_shares_give_the_short_texts_whole_and_split_the_rest():
    from orchestration.orchestration_engine import _fair_shares

    assert _fair_shares({"a": 10, "b": 100, "c": 100}, 110) == {"a": 10, "b": 50, "c": 50}
    assert _fair_shares({"a": 10, "b": 100}, 500) == {"a": 10, "b": 100}
    assert _fair_shares({"a": 10, "b": 100}, 0) == {"a": 0, "b": 0}
