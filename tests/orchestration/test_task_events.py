"""GET /api/v1/tasks/{task_id}/events: the history as Server-Sent Events, live and replayed, through a
real Celery worker and the scripted engine."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime

import pytest

from orchestration.packets import history_event, new_packet
from orchestration.runtime import task_store
from tests.conftest import wait_for
from tests.orchestration.scripted import use_script

pytestmark = [pytest.mark.django_db(transaction=True)]

SUMMARY = {"match": r'Reply with JSON: \{"summary"', "reply": {"summary": "Short.", "key_points": ["short"]}}


def submit(api) -> dict:
    response = api.post(
        "/api/v1/productivity/summarizer",
        data=json.dumps({"payload": {"input": "A long text to summarize."}}),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    return response.json()


def parse(chunks) -> list[dict]:
    """The stream's messages as {"id", "event", "data"} (comments and retry lines left out)."""
    messages = []
    for block in "".join(c.decode() if isinstance(c, bytes) else c for c in chunks).split("\n\n"):
        fields: dict = {}
        for line in block.splitlines():
            if line.startswith(":") or not line:
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" in fields:
            messages.append(
                {"id": fields.get("id"), "event": fields.get("event", "message"), "data": json.loads(fields["data"])}
            )
    return messages


@pytest.mark.worker
def test_a_finished_task_replays_from_the_last_event_id(api, celery_worker, edit_config, tmp_path):
    use_script(edit_config, tmp_path / "script.json", [SUMMARY])
    done = wait_for(submit(api)["task_id"])
    url = f"/api/v1/tasks/{done['task_id']}/events"

    response = api.get(url, HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-cache"
    messages = parse(response.streaming_content)
    assert [m["data"] for m in messages[:-1]] == done["history"]
    assert [m["id"] for m in messages[:-1]] == ["1", "2", "3", "4"]
    assert messages[-1] == {"id": None, "event": "end", "data": {"task_id": done["task_id"], "status": "succeeded"}}

    replayed = parse(api.get(url, HTTP_LAST_EVENT_ID="2").streaming_content)
    assert [(m["id"], m["data"]) for m in replayed[:-1]] == [("3", done["history"][2]), ("4", done["history"][3])]
    assert replayed[-1]["event"] == "end"
    # The query parameter, for clients that cannot set headers.
    assert [m["id"] for m in parse(api.get(f"{url}?last_event_id=3").streaming_content)] == ["4", None]
    # Finished and every event seen: 204, which tells EventSource to stop reconnecting.
    assert api.get(url, HTTP_LAST_EVENT_ID="4").status_code == 204


@pytest.mark.worker
def test_a_running_task_streams_each_event_as_it_is_recorded(api, celery_worker, edit_config, tmp_path):
    use_script(edit_config, tmp_path / "script.json", [{**SUMMARY, "delay_s": 1.5}])
    packet = submit(api)
    arrived: list[tuple[float, dict]] = []

    def follow() -> None:
        response = api.get(f"/api/v1/tasks/{packet['task_id']}/events")
        for chunk in response.streaming_content:
            for message in parse([chunk]):
                arrived.append((time.time(), message))

    reader = threading.Thread(target=follow)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive()
    done = wait_for(packet["task_id"])
    names = [message["data"].get("event") or message["event"] for _, message in arrived]
    assert names == ["submitted", "claimed", "step", "finished", "end"]
    # Live: each event reached the client within a second of being recorded (the stream wakes on the
    # feedback channel; reading the file again only at the 15 s keepalive would take longer).
    for at, message in arrived[1:-1]:
        recorded = datetime.fromisoformat(message["data"]["at"].replace("Z", "+00:00")).timestamp()
        assert at - recorded < 1.0, (message["data"]["event"], at - recorded)
    claimed_at = next(at for at, m in arrived if m["data"].get("event") == "claimed")
    finished_at = next(at for at, m in arrived if m["data"].get("event") == "finished")
    assert finished_at - claimed_at > 1.0  # the model took 1.5 s: "claimed" came before the answer
    assert [m["data"] for _, m in arrived[:-1]] == done["history"]


def test_streams_beyond_the_limit_get_503_and_a_closed_stream_frees_its_place(api, monkeypatch):
    from orchestration import api_handler

    monkeypatch.setattr(api_handler, "_STREAMS", threading.BoundedSemaphore(1))
    packet = new_packet(task_id=str(uuid.uuid4()), profile="developer", role="architect", payload={"input": "x"})
    packet["history"].append(history_event("submitted", status="queued"))
    task_store().create(packet)  # stored, not queued: it stays queued, so its stream stays open
    url = f"/api/v1/tasks/{packet['task_id']}/events"
    first = api.get(url)
    assert first.status_code == 200
    refused = api.get(url)
    assert refused.status_code == 503
    assert refused["Retry-After"] == "5" and refused.json()["code"] == "too_many_streams"
    first.close()
    second = api.get(url)
    assert second.status_code == 200
    second.close()


@pytest.mark.parametrize(
    ("last_event_id", "problem"),
    [("abc", "must be an event's id"), ("-1", "must be an event's id"), ("9", "has 1 events, not 9")],
)
def test_a_bad_last_event_id_is_a_400(api, last_event_id, problem):
    packet = new_packet(task_id=str(uuid.uuid4()), profile="developer", role="architect", payload={"input": "x"})
    packet["history"].append(history_event("submitted", status="queued"))
    task_store().create(packet)  # stored, not queued: its history stays as it is
    response = api.get(f"/api/v1/tasks/{packet['task_id']}/events", HTTP_LAST_EVENT_ID=last_event_id)
    assert response.status_code == 400
    assert response.json()["field"] == "Last-Event-ID" and problem in response.json()["detail"]


def test_an_unknown_query_parameter_is_a_400_naming_it(api):
    """A misspelt last_event_id (found by a walk-through: ignored) would replay every event."""
    packet = new_packet(task_id=str(uuid.uuid4()), profile="developer", role="architect", payload={"input": "x"})
    packet["history"].append(history_event("submitted", status="queued"))
    task_store().create(packet)
    response = api.get(f"/api/v1/tasks/{packet['task_id']}/events", {"last_event_ld": "1"})
    assert response.status_code == 400
    assert response.json()["field"] == "last_event_ld" and "unknown field" in response.json()["detail"]


def test_events_of_an_unknown_or_malformed_task_and_without_a_token(api, client):
    assert api.get(f"/api/v1/tasks/{uuid.uuid4()}/events").status_code == 404
    assert api.get("/api/v1/tasks/..%2F..%2Fetc%2Fpasswd/events").status_code == 404  # no such route
    assert api.get("/api/v1/tasks/not-a-uuid/events").status_code == 400
    assert client.get(f"/api/v1/tasks/{uuid.uuid4()}/events").status_code == 401
