"""Hostile inputs: junk in every path parameter, oversize, deeply nested and non-UTF-8 bodies, and HTML in
what the admin shows. Each gets a clear 4xx in the API's error shape, never a 5xx; nothing is written
outside TASKS_STATE_DIR; and the admin shows markup as text."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
import redis
from django.conf import settings

from orchestration import mcp_handler
from orchestration.packets import history_event
from orchestration.runtime import task_store

pytestmark = pytest.mark.django_db

MARKER = f"hostile-{uuid.uuid4().hex[:12]}"
UNKNOWN = str(uuid.uuid4())

# Each is put into a URL as it is: the %-escapes reach the server encoded, as a client would send them.
JUNK = [
    f"..%2F..%2F{MARKER}",
    f"..%2f{MARKER}.json",
    f"%2e%2e%2f%2e%2e%2f{MARKER}",
    f"..%5C..%5C{MARKER}",
    "..",
    "%2e%2e",
    ".",
    "%00",
    f"{UNKNOWN}%00",
    f"{UNKNOWN}%00.json",
    f"{UNKNOWN}.json",
    f"{UNKNOWN.upper()}x",
    f"{{{UNKNOWN}}}",
    f"urn:uuid:{UNKNOWN}",
    "a" * 10_000,
    "%C3%A9t%C3%A9",
    "日本語",
    "%ED%A0%80",  # a surrogate, encoded as UTF-8: not UTF-8
    "%FF%FE",
    "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    "%0D%0ASet-Cookie:%20x=1",
    "'%20OR%201=1--",
    "~root",
    "%252e%252e%252f",
]


def requests_with(junk: str) -> list[tuple[str, str, dict | None]]:
    """Every request of the API with ``junk`` in one path parameter: (method, path, JSON body)."""
    return [
        ("get", f"/api/v1/tasks/{junk}", None),
        ("post", f"/api/v1/tasks/{junk}/cancel", None),
        ("post", f"/api/v1/tasks/{junk}/feedback", {"feedback": "fix it"}),
        ("get", f"/api/v1/tasks/{junk}/events", None),
        ("post", f"/api/v1/{junk}/planner", {"payload": {"goal": "x"}}),
        ("post", f"/api/v1/developer/{junk}", {"payload": {"goal": "x"}}),
        ("post", f"/api/v1/{junk}/{junk}", {"payload": {"goal": "x"}}),
    ]


def send(api, method: str, path: str, body: dict | bytes | None = None, **extra):
    if body is None:
        return getattr(api, method)(path, **extra)
    data = body if isinstance(body, bytes) else json.dumps(body)
    return getattr(api, method)(path, data=data, content_type=extra.pop("content_type", "application/json"), **extra)


def assert_refused(response, statuses=(400, 404), code: str | None = None) -> dict:
    """A clear refusal: one of ``statuses``, with the API's JSON error body."""
    where = f"{response.request['REQUEST_METHOD']} {response.request['PATH_INFO'][:120]!r}"
    assert response.status_code in statuses, f"{where}: {response.status_code} {response.content[:300]!r}"
    assert response["Content-Type"].startswith("application/json"), where
    body = json.loads(response.content)
    assert isinstance(body.get("code"), str) and isinstance(body.get("detail"), str), (where, body)
    if code is not None:
        assert body["code"] == code, (where, body)
    return body


_TASK_FILE = re.compile(r"\.?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(\.json|\.lock)?(\..+\.tmp)?")


def files_not_named_by_a_task(root: Path) -> set[str]:
    """Files under the state directory that are not a task's own (state file, lock, temp file, marker)."""
    return {str(path.relative_to(root)) for path in root.rglob("*") if not _TASK_FILE.fullmatch(path.name)}


def marked(roots: list[Path]) -> list[Path]:
    """Paths whose name holds the MARKER: a junk id that named a file."""
    return [path for root in roots if root.is_dir() for path in root.rglob(f"*{MARKER}*")]


@pytest.fixture
def places(state_dir) -> list[Path]:
    """Where a traversal out of TASKS_STATE_DIR would land: the state directory's parent and grandparent
    (the session's temporary tree and pytest's), and the var directory."""
    return [state_dir.parent.parent, Path(settings.VAR_DIR)]


def test_junk_in_every_path_parameter_is_a_clear_4xx_and_names_no_file(api, state_dir, places):
    before = files_not_named_by_a_task(state_dir)
    for junk in JUNK:
        for method, path, body in requests_with(junk):
            assert_refused(send(api, method, path, body))
    assert files_not_named_by_a_task(state_dir) == before
    assert marked(places) == []


def test_an_unknown_task_is_a_404_that_leaves_no_file(api, state_dir):
    for method, path, body in requests_with(UNKNOWN)[:4]:
        assert_refused(send(api, method, path, body), statuses=(404,), code="not_found")
    assert list(state_dir.rglob(f"*{UNKNOWN}*")) == []


def test_junk_task_ids_in_the_body_and_query_are_refused(api, state_dir):
    before = sorted(path.name for path in state_dir.glob("*.json"))
    for task_id in (f"../../{MARKER}", "\u2028", "a" * 100_000, 5, {"a": 1}, [UNKNOWN], f"{UNKNOWN}/..", ""):
        body = {"task_id": task_id, "payload": {"goal": "x"}}
        refused = assert_refused(send(api, "post", "/api/v1/developer/planner", body), statuses=(400,))
        assert refused["field"] == "task_id"
    assert sorted(path.name for path in state_dir.glob("*.json")) == before
    for query in (
        "status=%3Cscript%3E",
        "status=%00",
        "status=%ED%A0%80",
        "profile=" + "x" * 10_000,
        "role=%00",
        "page=-1",
        "page=abc",
        "page=" + "9" * 40,
        "page_size=0",
        "page_size=-5",
        "page_size=abc",
        "stauts=failed",
    ):
        assert_refused(api.get(f"/api/v1/tasks/?{query}"))
    assert api.get("/api/v1/tasks/?page_size=" + "9" * 40).status_code == 200  # taken as the largest, 500
    task = send(api, "post", "/api/v1/developer/planner", {"payload": {"goal": "x"}}).json()
    for last_event_id in ("-1", "abc", "9" * 50, "\u0661", "1e3", "999"):
        refused = assert_refused(api.get(f"/api/v1/tasks/{task['task_id']}/events", HTTP_LAST_EVENT_ID=last_event_id))
        assert refused["field"] == "Last-Event-ID"


# --- bodies -------------------------------------------------------------------------------------


def post_endpoints(api, *, bodiless: bool = False) -> list[str]:
    """The POST endpoints that read a body (submit, feedback), and with ``bodiless`` cancel too, which
    ignores its body but not its size."""
    task = send(api, "post", "/api/v1/developer/planner", {"payload": {"goal": "x"}}).json()
    endpoints = ["/api/v1/developer/planner", f"/api/v1/tasks/{task['task_id']}/feedback"]
    return [*endpoints, f"/api/v1/tasks/{task['task_id']}/cancel"] if bodiless else endpoints


def test_an_oversize_body_is_a_413_before_anything_reads_it(api, state_dir):
    oversize = json.dumps({"payload": {"goal": "x" * settings.API_MAX_BODY_BYTES}}).encode()
    for path in post_endpoints(api, bodiless=True):
        before = sorted(path.name for path in state_dir.glob("*.json"))
        refused = assert_refused(send(api, "post", path, oversize), statuses=(413,), code="too_large")
        assert str(settings.API_MAX_BODY_BYTES) in refused["detail"]
        assert sorted(path.name for path in state_dir.glob("*.json")) == before
    # A Content-Length that is not a number, or is negative, is not an oversize body either.
    assert_refused(send(api, "post", "/api/v1/developer/planner", b"{}", CONTENT_LENGTH="lots"), statuses=(400,))
    assert_refused(send(api, "post", "/api/v1/developer/planner", b"{}", CONTENT_LENGTH="-1"), statuses=(400,))


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b"[" * 100_000,
        b'{"payload": {"goal": "x", "context": ' + b"[" * 64 + b"]" * 64 + b"}}",
    ],
    ids=["100k-arrays", "100k-objects", "100k-unclosed", "65-levels"],
)
def test_deeply_nested_json_is_a_400_that_says_so(api, body):
    for path in post_endpoints(api):
        refused = assert_refused(send(api, "post", path, body), statuses=(400,), code="parse_error")
        assert "nested more than 64 levels deep" in refused["detail"]


def test_json_just_within_the_depth_limit_reaches_validation(api):
    body = b'{"payload": {"goal": "x", "context": ' + b"[" * 62 + b"]" * 62 + b"}}"  # 64 levels
    refused = assert_refused(send(api, "post", "/api/v1/developer/planner", body), statuses=(400,), code="invalid")
    assert refused["field"] == "payload.context"


@pytest.mark.parametrize(
    "body",
    [
        b'{"payload": {"goal": "\xff"}}',
        b'{"payload": {"goal": "\xc0\xaf"}}',  # an overlong "/"
        b'{"payload": {"goal": "\xed\xa0\x80"}}',  # a surrogate encoded as UTF-8
        b'{"payload": {"goal": "\xe2\x82"}}',  # truncated
        b'\xef\xbb\xbf{"payload": {"goal": "x"}}',  # a byte order mark
        b'{"payload": {"goal": "\\ud800"}}',  # an unpaired surrogate, escaped
        b'{"payload": {"\\udc00": "x"}}',
        b'{"\\ud800": 1, "payload": {"goal": "x"}}',  # an unknown field, which the error would quote
        b'{"payload": {"goal": "a\\u0000b"}}',
        b'{"payload": {"goal": NaN}}',
    ],
    ids=[
        "ff",
        "overlong",
        "utf8-surrogate",
        "truncated",
        "bom",
        "escaped-surrogate",
        "surrogate-key",
        "surrogate-unknown-field",
        "nul",
        "nan",
    ],
)
def test_text_that_is_not_unicode_is_a_400(api, state_dir, body):
    before = sorted(path.name for path in state_dir.glob("*.json"))
    for path in post_endpoints(api):
        data = (
            body.replace(b'{"payload": {"goal"', b'{"feedback"', 1).replace(b"}}", b"}", 1)
            if "feedback" in path
            else body
        )
        assert_refused(send(api, "post", path, data), statuses=(400,))
    assert len(list(state_dir.glob("*.json"))) == len(before) + 1  # only post_endpoints' own task


def test_text_that_cannot_be_stored_is_named_by_its_field_with_the_bad_text_escaped(api):
    path = "/api/v1/developer/planner"
    refused = assert_refused(send(api, "post", path, b'{"payload": {"goal": "a\\udfffb"}}'), code="invalid")
    assert refused["field"] == "payload"
    assert refused["detail"] == "payload: contains text that is not valid Unicode (an unpaired surrogate)"
    refused = assert_refused(send(api, "post", path, b'{"\\ud800x": 1, "payload": {"goal": "x"}}'), code="invalid")
    assert refused["field"] == "\\ud800x"
    refused = assert_refused(send(api, "post", path, b'{"payload": {"goal": "a\\u0000"}}'), code="invalid")
    assert refused["detail"] == "payload: contains a NUL character (\\u0000)"


def test_bodies_that_are_not_json_objects_are_4xx(api):
    path = "/api/v1/developer/planner"
    for body in (b"", b"null", b"[]", b'"x"', b"1" * 5000, b"{", b"{'payload': 1}"):
        assert_refused(send(api, "post", path, body), statuses=(400,))
    assert_refused(send(api, "post", path, b"<p>hi</p>", content_type="text/html"), statuses=(415,))
    assert_refused(send(api, "post", path, b"a=1", content_type="application/x-www-form-urlencoded"), statuses=(415,))


@pytest.mark.django_db(transaction=True)
def test_the_inbound_channel_rejects_nested_and_non_unicode_packets_and_keeps_consuming(redis_url):
    """The MCP consumer used to die on RecursionError reading a deeply nested message (and on every
    delivery of it after a restart)."""
    client = redis.Redis.from_url(redis_url)
    consumer = mcp_handler.server_consumer(name=f"hostile-{uuid.uuid4().hex[:6]}")
    consumer.ensure_groups()
    sent = [
        client.xadd(mcp_handler.INBOUND, {"type": "task", "data": "[" * 100_000}).decode(),
        client.xadd(mcp_handler.INBOUND, {"type": "task", "data": '{"profile": "\\ud800"}'}).decode(),
        client.xadd(mcp_handler.INBOUND, {"type": "task", "data": b'{"profile": "\xff"}'}).decode(),
    ]
    deadline = time.monotonic() + 10
    answers: dict[str, dict] = {}
    while len(answers) < len(sent) and time.monotonic() < deadline:
        consumer.poll(block_ms=100)
        for _, fields in client.xrange(mcp_handler.FEEDBACK, min=sent[0]):
            data = json.loads(fields[b"data"])
            if fields[b"type"] == b"rejected" and data.get("message_id") in sent:
                answers[data["message_id"]] = data
    assert set(answers) == set(sent)
    assert all(answer["code"] == "invalid" for answer in answers.values())


# --- the admin ----------------------------------------------------------------------------------

SCRIPTS = {
    "payload": "<script>alert('payload')</script>",
    "result": "<img src=x onerror=alert('result')>",
    "history": "</pre></td><script>alert('history')</script>",
}


@pytest.fixture
def marked_up_task(api):
    """A task whose payload, result and history hold markup, as a model or a client could put there."""
    task = send(api, "post", "/api/v1/developer/planner", {"payload": {"goal": SCRIPTS["payload"]}}).json()

    def change(packet: dict) -> bool:
        packet["result"] = {"steps": [{"title": SCRIPTS["result"]}]}
        packet["history"].append(history_event("note", status=packet["status"], detail={"text": SCRIPTS["history"]}))
        return True

    task_store().update(task["task_id"], change)
    return task


def test_markup_in_a_task_is_shown_as_text_in_the_admin(admin_client, marked_up_task):
    page = admin_client.get(f"/admin/orchestration/task/{marked_up_task['task_id']}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    for text in SCRIPTS.values():
        assert text not in html
    assert "&lt;script&gt;alert(&#x27;payload&#x27;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(&#x27;result&#x27;)&gt;" in html
    assert "&lt;/pre&gt;&lt;/td&gt;&lt;script&gt;alert(&#x27;history&#x27;)&lt;/script&gt;" in html
    listing = admin_client.get("/admin/orchestration/task/", {"q": SCRIPTS["payload"]})
    assert listing.status_code == 200
    assert SCRIPTS["payload"] not in listing.content.decode()


def test_markup_in_the_configuration_is_shown_as_text_in_the_admin(admin_client, edit_config):
    prompt = "<script>alert('prompt')</script> You plan."
    model = "<b onmouseover=alert('model')>m</b>"

    def change(raw: dict) -> None:
        raw["profiles"]["developer"]["roles"]["planner"]["system_prompt"] = prompt
        raw["llms"].append({"id": "marked-up", "engine": "instant", "source": "local", "model": model, "toggle": False})

    edit_config(change)
    for url in ("/admin/balancer/role/", "/admin/balancer/llm/"):
        listing = admin_client.get(url, {"q": prompt} if "role" in url else {})
        assert listing.status_code == 200
        html = listing.content.decode()
        assert prompt not in html and model not in html
    from balancer.models import LLM, Role

    role = Role.objects.get(profile__name="developer", name="planner")
    html = admin_client.get(f"/admin/balancer/role/{role.pk}/change/").content.decode()
    assert prompt not in html and "&lt;script&gt;alert(&#x27;prompt&#x27;)&lt;/script&gt;" in html
    llm = LLM.objects.get(llm_id="marked-up")
    html = admin_client.get(f"/admin/balancer/llm/{llm.pk}/change/").content.decode()
    assert model not in html and "&lt;b onmouseover=alert(&#x27;model&#x27;)&gt;m&lt;/b&gt;" in html
