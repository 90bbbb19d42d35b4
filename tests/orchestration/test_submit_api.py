"""POST /api/v1/{profile}/{role}: validation, the stored packet, idempotency; no worker needed.

These tests run inside a transaction, so the enqueue (an on-commit callback)
does not happen; the tests with a worker are in test_task_flow.py.
"""

import json
import uuid

import pytest
from django.urls import set_script_prefix
from rest_framework import serializers
from rest_framework.test import APIClient

from orchestration.api_handler import ClosedInputSerializer, TaskSubmitApi
from orchestration.models import Task

pytestmark = pytest.mark.django_db

URL = "/api/v1/developer/planner"


def post(api: APIClient, body, url: str = URL, **extra):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return api.post(url, data=data, content_type="application/json", **extra)


def test_submit_stores_a_queued_packet_and_answers_202_with_location(api, state_dir):
    response = post(api, {"payload": {"input": "plan a release"}})
    assert response.status_code == 202
    packet = response.json()
    assert packet["status"] == "queued"
    assert packet["version"] == 1
    assert packet["profile"] == "developer" and packet["role"] == "planner"
    assert response["Location"].endswith(f"/api/v1/tasks/{packet['task_id']}")
    stored = json.loads((state_dir / f"{packet['task_id']}.json").read_text())
    assert stored == packet
    assert [event["event"] for event in stored["history"]] == ["submitted"]
    assert stored["history"][0]["detail"]["queue"] == "developer.planner"
    row = Task.objects.get(task_id=packet["task_id"])
    assert (row.status, row.profile, row.role, row.version) == ("queued", "developer", "planner", 1)


def test_get_returns_the_stored_packet(api):
    packet = post(api, {"payload": {"input": "x"}}).json()
    response = api.get(f"/api/v1/tasks/{packet['task_id']}")
    assert response.status_code == 200
    assert response.json() == packet


def _files(state_dir):
    return sorted(path.name for path in state_dir.glob("*.json"))


@pytest.mark.parametrize(
    ("url", "status", "needle"),
    [
        ("/api/v1/nope/planner", 404, "valid profiles: developer, productivity"),
        ("/api/v1/developer/nope", 404, "valid roles: diagnosis"),
    ],
)
def test_unknown_profile_or_role_is_404_listing_the_valid_ones(api, state_dir, url, status, needle):
    before = _files(state_dir)
    response = post(api, {"payload": {"input": "x"}}, url=url)
    assert response.status_code == status
    assert needle in response.json()["detail"]
    assert _files(state_dir) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "payload"),
        ({"payload": None}, "payload"),
        ({"payload": {}}, "payload.goal"),
        ({"payload": {"input": ""}}, "payload.input"),
        ({"payload": {"input": 42}}, "payload.input"),
        ({"payload": {"input": "x", "extra": 1}}, "payload.extra"),
        ({"payload": "just text"}, "payload"),
        ({"payload": {"input": "x"}, "task_id": "not-a-uuid"}, "task_id"),
        ({"payload": {"input": "x"}, "task_id": "../../etc/passwd"}, "task_id"),
        ({"payload": {"input": "x"}, "status": "succeeded"}, "status"),
        ({"payload": {"input": "x"}, "result": {"output": "forged"}}, "result"),
        ({"payload": {"input": "x"}, "history": [{"event": "forged"}]}, "history"),
        ({"payload": {"input": "x"}, "version": 7}, "version"),
        ({"payload": {"input": "x"}, "role": "qa"}, "role"),
        ({"payload": {"input": "x"}, "surprise": True}, "surprise"),
        ({"payload": {"input": "x"}, "task_id": None}, "task_id"),
        ({"payload": {"input": "x"}, "task_id": 7}, "task_id"),
        ({"payload": {"input": "x"}, "created_at": "2026-01-01T00:00:00Z"}, "created_at"),
        ({"payload": {"input": "x"}, "updated_at": None}, "updated_at"),
    ],
)
def test_bad_body_is_400_naming_the_field_and_stores_nothing(api, state_dir, body, field):
    before = _files(state_dir)
    response = post(api, body)
    assert response.status_code == 400, response.json()
    assert response.json()["field"] == field
    assert field in response.json()["detail"]
    assert _files(state_dir) == before
    assert not Task.objects.exists()


@pytest.mark.parametrize(("field", "value"), [("version", False), ("version", 0.0), ("iteration", False)])
def test_server_fields_must_have_the_initial_value_and_type(api, field, value):
    response = post(api, {"payload": {"input": "x"}, field: value})
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_a_longer_summary_than_the_role_writes_is_400_naming_the_field(api, state_dir):
    before = _files(state_dir)
    url = "/api/v1/productivity/summarizer"
    response = post(api, {"payload": {"text": "A long text.", "max_words": 2000}}, url=url)
    assert response.status_code == 400, response.json()
    assert response.json()["field"] == "payload.max_words"
    assert "at most 115 words" in response.json()["detail"]
    assert _files(state_dir) == before
    assert not Task.objects.exists()


def test_text_that_is_not_valid_unicode_is_400(api, state_dir):
    before = _files(state_dir)
    response = api.post(URL, data=b'{"payload": {"input": "a\\ud800b"}}', content_type="application/json")
    assert response.status_code == 400
    assert response.json()["field"] == "payload"
    assert "Unicode" in response.json()["detail"]
    assert _files(state_dir) == before


def test_an_unknown_profile_is_404_even_with_a_bad_body(api):
    response = post(api, {"nonsense": True}, url="/api/v1/nope/planner")
    assert response.status_code == 404
    # Even one that does not parse, or is not JSON at all: the URL is looked at first.
    for body, content_type in ((b"{", "application/json"), (b"hello", "text/plain")):
        response = api.generic("POST", "/api/v1/nope/planner", body, content_type=content_type)
        assert response.status_code == 404 and response.json()["code"] == "not_found", response.content


def test_a_corrupt_state_file_is_a_clear_error(api, state_dir):
    task_id = str(uuid.uuid4())
    (state_dir / f"{task_id}.json").write_text("[1, 2]")
    for response in (api.get(f"/api/v1/tasks/{task_id}"), api.post(f"/api/v1/tasks/{task_id}/cancel")):
        assert response.status_code == 500
        assert response.json()["code"] == "corrupt_state"
        assert "sync_tasks" in response.json()["detail"]
    (state_dir / f"{task_id}.json").unlink()


def test_requests_for_unknown_tasks_leave_no_lock_files(api, state_dir):
    task_id = str(uuid.uuid4())
    assert api.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 404
    assert not (state_dir / ".locks" / f"{task_id}.lock").exists()


def test_initial_values_of_server_fields_are_accepted(api):
    body = {"payload": {"input": "x"}, "status": "queued", "result": None, "history": [], "version": 0}
    assert post(api, body).status_code == 202


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe{}", b"[1, 2]", b'"text"'])
def test_a_body_that_is_not_a_json_object_is_400(api, state_dir, raw):
    before = _files(state_dir)
    response = api.post(URL, data=raw, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["detail"]
    assert _files(state_dir) == before


def test_a_body_over_the_limit_is_413(api, settings, state_dir):
    settings.API_MAX_BODY_BYTES = 2048
    before = _files(state_dir)
    response = post(api, {"payload": {"input": "x" * 4096}})
    assert response.status_code == 413
    assert "2048" in response.json()["detail"]
    assert _files(state_dir) == before


def test_same_task_id_and_payload_returns_the_existing_task(api):
    task_id = str(uuid.uuid4())
    first = post(api, {"task_id": task_id, "payload": {"input": "same"}})
    again = post(api, {"task_id": task_id, "payload": {"input": "same"}})
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json() == first.json()
    assert Task.objects.count() == 1


def test_same_task_id_with_another_payload_is_409_and_keeps_the_original(api, state_dir):
    task_id = str(uuid.uuid4())
    original = post(api, {"task_id": task_id, "payload": {"input": "first"}}).json()
    response = post(api, {"task_id": task_id, "payload": {"input": "second"}})
    assert response.status_code == 409
    assert task_id in response.json()["detail"]
    assert json.loads((state_dir / f"{task_id}.json").read_text()) == original


def test_a_retry_of_a_stored_task_gets_it_back_after_its_llms_were_turned_off(api, edit_config):
    """Found by review: the retry was refused (422 no_llm) before the stored task was looked at, so a client
    retrying after the LLMs changed would think the task never taken, and submit it again under a new id."""
    task_id = str(uuid.uuid4())
    first = post(api, {"task_id": task_id, "payload": {"input": "same"}})
    assert first.status_code == 202

    def all_off(raw):
        for llm in raw["llms"]:
            llm["toggle"] = False

    edit_config(all_off)
    again = post(api, {"task_id": task_id, "payload": {"input": "same"}})
    assert again.status_code == 200
    assert again.json() == first.json()
    assert post(api, {"task_id": task_id, "payload": {"input": "another"}}).status_code == 409
    refused = post(api, {"task_id": str(uuid.uuid4()), "payload": {"input": "same"}})
    assert refused.status_code == 422 and refused.json()["code"] == "no_llm"


def test_same_task_id_on_another_role_is_409(api):
    task_id = str(uuid.uuid4())
    post(api, {"task_id": task_id, "payload": {"input": "x"}})
    response = post(api, {"task_id": task_id, "payload": {"input": "x"}}, url="/api/v1/developer/architect")
    assert response.status_code == 409


def test_a_role_no_llm_can_serve_is_422_with_the_reason(api, state_dir):
    before = _files(state_dir)
    image = "data:image/png;base64,iVBORw0KGgo="
    payload = {"image": image, "question": "what is in this picture?"}
    response = post(api, {"payload": payload}, url="/api/v1/productivity/vision")
    assert response.status_code == 422
    assert "lacks capabilities vision" in response.json()["detail"]
    assert _files(state_dir) == before


def test_a_task_whose_first_prompt_no_llms_context_holds_is_422_not_queued_to_fail(api, state_dir):
    """Rule 1's context check ran only when the step called the LLM: a text far past every context was
    accepted (202), and its step then failed."""
    before = _files(state_dir)
    payload = {"text": "The pump was checked and found in order. " * 1000}  # about 14,000 tokens
    response = post(api, {"payload": payload}, url="/api/v1/productivity/summarizer")
    assert response.status_code == 422, response.content
    assert "rule 1: context of 4096 tokens is too small for" in response.json()["detail"]
    assert _files(state_dir) == before
    assert (
        post(api, {"payload": {"text": "The pump was checked."}}, url="/api/v1/productivity/summarizer").status_code
        == 202
    )


def test_every_endpoint_but_healthz_needs_a_token(client):
    anonymous = APIClient()
    task_id = str(uuid.uuid4())
    assert post(anonymous, {"payload": {"input": "x"}}).status_code == 401
    assert anonymous.get("/api/v1/tasks/").status_code == 401
    assert anonymous.get(f"/api/v1/tasks/{task_id}").status_code == 401
    assert anonymous.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 401
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert wrong.get("/api/v1/tasks/").status_code == 401
    assert anonymous.get("/healthz").status_code == 200


def test_get_with_a_path_that_is_not_a_uuid_is_400(api):
    for bad in ["nope", "%7B12345678-1234-5678-1234-567812345678%7D", "..", "12345678123456781234567812345678"]:
        response = api.get(f"/api/v1/tasks/{bad}")
        assert response.status_code == 400, bad
        assert response.json()["field"] == "task_id"


def test_path_traversal_in_the_task_path_reaches_no_file(api):
    for bad in ["..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2e%2e%2fsecret"]:
        for response in (api.get(f"/api/v1/tasks/{bad}"), api.post(f"/api/v1/tasks/{bad}/cancel")):
            assert response.status_code in (400, 404), bad
            assert response.json()["code"] in ("invalid", "not_found")


def test_unknown_task_is_404(api):
    assert api.get(f"/api/v1/tasks/{uuid.uuid4()}").status_code == 404
    assert api.post(f"/api/v1/tasks/{uuid.uuid4()}/cancel").status_code == 404


def test_list_filters_by_status_profile_and_role_and_paginates(api):
    for _ in range(3):
        post(api, {"payload": {"input": "p"}})
    post(api, {"payload": {"input": "s"}}, url="/api/v1/productivity/summarizer")
    everything = api.get("/api/v1/tasks/", {"page_size": 2}).json()
    assert everything["count"] == 4
    assert len(everything["results"]) == 2 and everything["next"]
    planners = api.get("/api/v1/tasks/", {"profile": "developer", "role": "planner", "status": "queued"}).json()
    assert planners["count"] == 3
    assert {task["role"] for task in planners["results"]} == {"planner"}
    assert api.get("/api/v1/tasks/", {"status": "succeeded"}).json()["count"] == 0
    bad = api.get("/api/v1/tasks/", {"status": "bogus"})
    assert bad.status_code == 400 and bad.json()["field"] == "status"
    # A misspelled filter would have listed every task; a page that is not a number was a 404.
    for query in ({"stauts": "failed"}, {"page": "abc"}, {"page_size": "0"}):
        bad = api.get("/api/v1/tasks/", query)
        assert bad.status_code == 400 and bad.json()["field"] == next(iter(query)), bad.content
    assert api.get("/api/v1/tasks/", {"page": 9}).status_code == 404  # after the last page


def test_cancel_a_queued_task_marks_it_cancelled(api):
    packet = post(api, {"payload": {"input": "x"}}).json()
    response = api.post(f"/api/v1/tasks/{packet['task_id']}/cancel")
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["version"] == 2
    assert cancelled["history"][-1]["event"] == "cancelled"
    assert api.post(f"/api/v1/tasks/{packet['task_id']}/cancel").status_code == 409


_ID = "0b6f6c1e-4a8e-4c8e-9d71-2f7d3c1b5a90"


@pytest.mark.parametrize(
    "body",
    [
        {"payload": {"input": "x"}},
        {"payload": {}},
        {"payload": {"input": "x", "nested": {"a": [1, 2.5, None, True]}}},
        {"payload": {"input": "x"}, "task_id": _ID},
        {"payload": {"input": "x"}, "task_id": _ID.upper()},
        {"payload": {"input": "x"}, "task_id": f" {_ID} "},
        {"payload": {"input": "x"}, "task_id": "{" + _ID + "}"},
        {"payload": {"input": "x"}, "task_id": None},
        {"payload": {"input": "x"}, "task_id": 7},
        {"payload": {"input": "x"}, "task_id": ""},
        {"payload": {"input": "x"}, "role": "planner"},
        {"payload": {"input": "x"}, "status": "queued"},
        {"payload": {"input": "x"}, "created_at": None},
        {"payload": None},
        {"payload": "text"},
        {"payload": [1]},
        {},
        [],
        "text",
    ],
)
def test_the_usual_body_is_validated_as_the_serializer_does(body):
    """The submission's shortcut for the usual body (``InputSerializer.plain``) gives what the serializer
    gives, and leaves every other body to it."""
    serializer = TaskSubmitApi.InputSerializer(data=body, context={"profile": "developer", "role": "planner"})
    plain = TaskSubmitApi.InputSerializer.plain(body)
    if plain is not None:
        assert serializer.is_valid(), serializer.errors
        assert plain == dict(serializer.validated_data)
    assert (plain is not None) == (
        isinstance(body, dict) and isinstance(body.get("payload"), dict) and body.keys() <= {"payload", "task_id"}
        and ("task_id" not in body or body["task_id"] in (_ID, _ID.upper()))
    )  # fmt: skip


@pytest.mark.parametrize("debug", [False, True])
def test_a_path_under_the_api_that_names_nothing_is_a_json_404_never_a_redirect(api, settings, debug):
    """With DEBUG on (as `make run` serves), Django answered a POST that a slash would have matched with a
    500, and any other unknown path with its HTML page; with it off, with a 301 a client follows as a GET."""
    settings.DEBUG = debug
    assert api.get("/api/v1/tasks").status_code == 200  # the list, served without its slash too
    assert api.post("/api/v1/tasks", {}, format="json").status_code == 405
    for method, path in (("post", "/api/v1/developer/planner/"), ("get", "/api/v1/nothing/here/at/all"),
                         ("get", "/api/v2/tasks/")):  # fmt: skip
        response = getattr(api, method)(path)
        assert response.status_code == 404 and response.json()["code"] == "not_found", (path, response.content)


def test_a_task_id_or_a_role_with_spaces_around_it_is_refused(api):
    """Not trimmed into another value: " <uuid> " is not a task id, nor " planner " the URL's role."""
    for body, field in (
        ({"payload": {"input": "x"}, "task_id": f" {_ID} "}, "task_id"),
        ({"payload": {"input": "x"}, "role": " planner "}, "role"),
    ):
        response = post(api, body)
        assert response.status_code == 400 and response.json()["field"] == field, response.content


def test_location_follows_the_script_prefix(api):
    """The Location's path is built once per script prefix (a server mounted under a path)."""
    try:
        for prefix in ("/", "/agents/", "/"):
            set_script_prefix(prefix)
            response = post(api, {"payload": {"input": "x"}})
            assert response["Location"] == f"http://testserver{prefix}api/v1/tasks/{response.json()['task_id']}"
    finally:
        set_script_prefix("/")


def test_input_serializers_copy_their_fields_for_each_instance():
    """ClosedInputSerializer copies a plain field shallowly and a field holding others (a list's child, a
    nested serializer) deeply: each instance validates with fields bound to it alone."""

    class Inner(serializers.Serializer):
        code = serializers.CharField(max_length=3)

    class Body(ClosedInputSerializer):
        name = serializers.CharField(max_length=5)
        tags = serializers.ListField(child=serializers.CharField(max_length=3))
        inner = Inner()

    first, second = Body(data={}), Body(data={})
    for name in ("name", "tags", "inner"):
        assert first.fields[name] is not second.fields[name]
        assert first.fields[name].parent is first and first.fields[name] is not Body._declared_fields[name]
    assert first.fields["tags"].child is not second.fields["tags"].child
    assert first.fields["tags"].child.parent is first.fields["tags"]
    assert first.fields["inner"].fields["code"].parent is first.fields["inner"]
    good = Body(data={"name": "ab", "tags": ["x"], "inner": {"code": "c"}})
    assert good.is_valid(), good.errors
    bad = Body(data={"name": "abcdef", "tags": ["long"], "inner": {"code": "long"}, "extra": 1})
    assert not bad.is_valid() and set(bad.errors) == {"extra"}
    bad = Body(data={"name": "abcdef", "tags": ["long"], "inner": {"code": "long"}})
    assert not bad.is_valid() and set(bad.errors) == {"name", "tags", "inner"}


def stored(status, **fields):
    from orchestration.packets import new_packet
    from orchestration.runtime import task_store

    packet = new_packet(task_id=str(uuid.uuid4()), profile="developer", role="fast_coder", payload={"instruction": "x"})
    return task_store().create({**packet, "status": status, **fields})


def test_feedback_on_a_finished_step_of_a_running_plan_is_refused(api, state_dir):
    """Its result went into the plan's later steps: run again, it could fail the plan those belong to. A
    child of the plan's run before a retry is not one of its steps any more."""
    from orchestration.packets import history_event
    from orchestration.services import _in_running_plan

    step_id, old_id = str(uuid.uuid4()), str(uuid.uuid4())
    delegated = history_event("delegated", status="running", detail={"step": "delegated", "children": {"s1": step_id}})
    parent = stored("running", role="planner", payload={"goal": "x", "execute": True}, history=[delegated])
    child = stored("succeeded", task_id=step_id, parent_id=parent["task_id"])
    assert not _in_running_plan(stored("succeeded", task_id=old_id, parent_id=parent["task_id"]))
    url = f"/api/v1/tasks/{child['task_id']}/feedback"
    response = api.post(url, data=json.dumps({"feedback": "more"}), content_type="application/json")
    assert response.status_code == 409 and response.json()["code"] == "plan_running"
    assert parent["task_id"] in response.json()["detail"]


def test_a_retried_task_starts_its_rounds_afresh(state_dir):
    """The task's iteration stayed at its last run's, and the next run's rounds were shown from there. (The
    job is queued when the transaction commits, which this test's never does.)"""
    from orchestration.services import task_retry

    failed = stored("failed", iteration=4)
    assert task_retry(task_id=failed["task_id"])["iteration"] == 0


def test_a_chat_body_over_the_limit_gets_openais_error_under_a_script_prefix(api, settings):
    """The middleware looked at the path with the prefix a proxy mounts the server under (SCRIPT_NAME), so
    an OpenAI client there got the REST API's error body."""
    text = "x" * (settings.API_MAX_BODY_BYTES + 1)
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": text}]})
    response = api.post("/v1/chat/completions", data=body, content_type="application/json", SCRIPT_NAME="/agents")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


def test_an_unknown_field_with_a_huge_name_is_not_echoed_back_whole(api, state_dir):
    """A 400 KB key came back twice in the error (the field and the detail): an 800 KB answer."""
    body = json.dumps({"payload": {"input": "x"}, "k" * 400_000: 1})
    response = api.post("/api/v1/productivity/summarizer", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["field"] == "k" * 200 + "…"
    assert len(response.content) < 1000


def test_an_unsafe_method_to_an_unknown_api_path_is_the_json_404_not_a_csrf_page(api_user):
    """The catch-all view of /api/ was not exempt from CSRF, as the API's views are: a token client's POST,
    PUT or DELETE to a path that names nothing got Django's HTML 403 "CSRF verification failed"."""
    from rest_framework.authtoken.models import Token

    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=api_user).key}")
    for method in ("post", "put", "patch", "delete"):
        for path in ("/api/v1/developer/planner/", f"/api/v1/tasks/{uuid.uuid4()}/bogus", "/api/v2/tasks/"):
            response = getattr(client, method)(path, data="{}", content_type="application/json")
            assert response.status_code == 404, (method, path, response.content[:200])
            assert response.json()["code"] == "not_found"


def _corrupt_packet(**fields) -> dict:
    from orchestration.packets import new_packet

    packet = new_packet(task_id=str(uuid.uuid4()), profile="developer", role="fast_coder", payload={"instruction": "x"})
    return {**packet, "status": "failed", "version": 2, **fields}


@pytest.mark.parametrize(
    "content",
    ["[1, 2]", "{not json", json.dumps(_corrupt_packet(history=None)), json.dumps(_corrupt_packet(version="2"))],
    ids=["not-an-object", "not-json", "history-null", "version-text"],
)
def test_every_endpoint_answers_a_corrupt_state_file_with_the_corrupt_state_error(api, state_dir, content):
    """A submission with the task_id of a corrupt file got Django's HTML 500 (the read in the store's
    create raised), and a file with all its fields, one of the wrong type (`"history": null`), was read
    as a packet: GET answered it, and cancel, feedback and the events failed with HTML 500s."""
    task_id = str(uuid.uuid4())
    if content.startswith('{"'):
        content = content.replace(json.loads(content)["task_id"], task_id)
    (state_dir / f"{task_id}.json").write_text(content)
    feedback = json.dumps({"feedback": "more"})
    try:
        for response in (
            api.get(f"/api/v1/tasks/{task_id}"),
            api.post(f"/api/v1/tasks/{task_id}/cancel"),
            api.post(f"/api/v1/tasks/{task_id}/feedback", data=feedback, content_type="application/json"),
            api.get(f"/api/v1/tasks/{task_id}/events"),
            post(api, {"task_id": task_id, "payload": {"instruction": "x"}}, url="/api/v1/developer/fast_coder"),
        ):
            assert response.status_code == 500, response.content
            assert response.json()["code"] == "corrupt_state"
            assert task_id in response.json()["detail"] and "sync_tasks" in response.json()["detail"]
    finally:
        (state_dir / f"{task_id}.json").unlink()


def test_an_unexpected_error_under_the_api_is_a_json_500_and_elsewhere_djangos_page(api_user, settings, monkeypatch):
    """An exception that no handler of the API turned into an answer got Django's HTML page under /api/ too,
    where every answer is the JSON error body."""
    from rest_framework.authtoken.models import Token

    from orchestration import api_handler

    def broken(**kwargs):
        raise RuntimeError("a bug")

    settings.DEBUG = False
    monkeypatch.setattr(api_handler, "task_get", broken)
    monkeypatch.setattr(api_handler, "_check_database", broken)
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=api_user).key}")
    response = client.get(f"/api/v1/tasks/{uuid.uuid4()}")
    assert response.status_code == 500 and response["Content-Type"] == "application/json"
    assert response.json()["code"] == "server_error" and "a bug" not in response.json()["detail"]
    response = client.get("/healthz")  # not under /api/: Django's page, as before
    assert response.status_code == 500 and response["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    ("body", "field"),
    [({"feedback": 12345}, "feedback"), ({"feedback": "x", "tests": 5}, "tests"), ({"feedback": ["x"]}, "feedback")],
)
def test_feedback_whose_text_is_not_a_string_is_400_naming_it(api, state_dir, body, field):
    """Found by a walk-through: DRF's CharField took 12345 for the feedback "12345", and `"tests": 5` replaced
    the task's tests with "5"."""
    task = stored("succeeded")
    response = api.post(
        f"/api/v1/tasks/{task['task_id']}/feedback", data=json.dumps(body), content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["field"] == field and "must be a string" in response.json()["detail"]
    assert json.loads((state_dir / f"{task['task_id']}.json").read_text()) == task


def test_a_task_answers_with_its_version_as_etag_and_304_while_unchanged(api):
    submitted = post(api, {"payload": {"input": "x"}})
    assert submitted["ETag"] == '"1"'
    packet = submitted.json()
    url = f"/api/v1/tasks/{packet['task_id']}"
    first = api.get(url)
    assert first.status_code == 200 and first["ETag"] == '"1"'
    for held in ('"1"', 'W/"1"', '"7", "1"', '"a,b", ,"1",', "*"):  # RFC 9110: empty elements are ignored
        unchanged = api.get(url, HTTP_IF_NONE_MATCH=held)
        assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged["ETag"] == '"1"', held
    for other in ('"0"', '"01"', '"abc"', '""'):  # any other tag is a version the task is not at
        assert api.get(url, HTTP_IF_NONE_MATCH=other).status_code == 200, other
    for bad in ("1", '"1', "W/1", '"1" "2"'):
        refused = api.get(url, HTTP_IF_NONE_MATCH=bad)
        assert refused.status_code == 400 and refused.json()["field"] == "If-None-Match", bad


def test_cancel_and_feedback_with_if_match_act_only_on_that_version(api, state_dir):
    """The packet's version is its optimistic concurrency (DESIGN): a client acts on the version it read."""
    packet = post(api, {"payload": {"input": "x"}}).json()
    url = f"/api/v1/tasks/{packet['task_id']}/cancel"
    for stale in ('"2"', 'W/"1"', '"01"', '"x"'):  # If-Match compares strongly: a weak tag never matches
        refused = api.post(url, HTTP_IF_MATCH=stale)
        assert refused.status_code == 412 and refused.json()["code"] == "precondition_failed", stale
        assert "is at version 1, not the one If-Match names" in refused.json()["detail"]
    assert json.loads((state_dir / f"{packet['task_id']}.json").read_text()) == packet
    cancelled = api.post(url, HTTP_IF_MATCH='"9", "1"')
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled["ETag"] == '"2"'

    task = stored("succeeded")
    body = json.dumps({"feedback": "more"})
    url = f"/api/v1/tasks/{task['task_id']}/feedback"
    refused = api.post(url, data=body, content_type="application/json", HTTP_IF_MATCH='"5"')
    assert refused.status_code == 412 and refused.json()["code"] == "precondition_failed"
    assert json.loads((state_dir / f"{task['task_id']}.json").read_text()) == task


@pytest.mark.django_db(transaction=True)  # no transaction around the request: the server runs without one
def test_a_task_stored_when_the_database_stops_answering_is_queued_and_accepted(api, monkeypatch):
    """Found by a fault-injection session (PostgreSQL cut off from the web): the file was written, then
    asking the connection for the transaction to queue the job after failed, and the client was told 503
    database_unavailable; the sweep ran the task, and a client that submitted it again had it run twice."""
    from django.db import OperationalError, connection

    from orchestration import orchestration_engine
    from orchestration.state_store import TaskStore

    real_create = TaskStore.create

    def create_then_lose_the_database(self, packet, **options):
        stored = real_create(self, packet, **options)

        def lost():
            # Injected: the connection to the database drops once the file is written (the test's SQLite
            # cannot be cut off as a PostgreSQL server can).
            raise OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(connection, "ensure_connection", lost)
        return stored

    published = []
    real_queue_job = orchestration_engine.queue_job

    def queue_job(job, args, role, job_id):  # the real publish, noted (a worker may take the job at once)
        published.append(job_id)
        return real_queue_job(job, args, role, job_id)

    monkeypatch.setattr(TaskStore, "create", create_then_lose_the_database)
    monkeypatch.setattr(orchestration_engine, "queue_job", queue_job)
    response = post(api, {"payload": {"input": "plan a release"}})
    monkeypatch.undo()
    assert response.status_code == 202, response.content
    assert published == [response.json()["history"][0]["detail"]["job_id"]]


@pytest.mark.django_db(transaction=True)  # no transaction around the request: the server runs without one
def test_the_job_is_queued_once_the_file_is_written_under_the_tasks_lock_before_its_row(api, state_dir, monkeypatch):
    """The job goes on the queue as soon as the task's file is durable, while the store writes its row and its
    message: a worker's first steps overlap those writes, and its claim, which takes the task's lock, waits for
    them. A publish that fails there is told to the client as before (503), with its row written."""
    import fcntl

    from kombu.exceptions import OperationalError as BrokerError

    from orchestration import orchestration_engine
    from orchestration.runtime import task_store

    seen = []
    real_queue_job = orchestration_engine.queue_job

    def queue_job(job, args, role, job_id):  # the real publish, with what it finds when it is made
        (task_id,) = args
        with open(state_dir / ".locks" / f"{task_id}.lock", "rb") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = False
            except BlockingIOError:
                locked = True
        seen.append((task_store().read(task_id)["status"], locked, Task.objects.filter(task_id=task_id).exists()))
        return real_queue_job(job, args, role, job_id)

    monkeypatch.setattr(orchestration_engine, "queue_job", queue_job)
    response = post(api, {"payload": {"input": "plan a release"}})
    assert response.status_code == 202, response.content
    assert seen == [("queued", True, False)]  # the file written, the lock held, the row not yet
    assert Task.objects.get(task_id=response.json()["task_id"]).version == 1

    def broker_away(job, args, role, job_id):
        raise BrokerError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(orchestration_engine, "queue_job", broker_away)
    refused = post(api, {"payload": {"input": "plan a release"}})
    assert refused.status_code == 503 and refused.json()["code"] == "queue_unavailable", refused.content
    task_id = refused.json()["task_id"]
    assert [event["event"] for event in task_store().read(task_id)["history"]] == ["submitted", "enqueue_failed"]
    assert Task.objects.get(task_id=task_id).version == 2
