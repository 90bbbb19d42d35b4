"""The MCP channels end to end: real Redis Streams, a real ``manage.py mcp_consume`` process, a real
Celery worker, and the scripted engine in place of the model (tests/orchestration/scripted.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
import redis

from orchestration import mcp_handler
from orchestration.models import Task
from tests.conftest import BASE_DIR, _stop, server_env, start_mcp_consume, wait_for
from tests.orchestration.scripted import CODER, QA_REVIEW, code_reply, use_script

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

SUMMARY = {"match": r'Reply with JSON: \{"summary"', "reply": {"summary": "A cat sat.", "key_points": ["cat"]}}
TESTS = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"


@pytest.fixture
def channels(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def script(edit_config, tmp_path):
    return lambda rules: use_script(edit_config, tmp_path / "script.json", rules)


def add(client: redis.Redis, channel: str, message_type: str, data: dict) -> str:
    return client.xadd(channel, mcp_handler.encode(message_type, data)).decode()


def feedback_messages(client: redis.Redis, since: str = "-") -> list[tuple[str, str, dict]]:
    return [
        (entry_id.decode(), fields[b"type"].decode(), json.loads(fields[b"data"]))
        for entry_id, fields in client.xrange(mcp_handler.FEEDBACK, min=since)
    ]


def answer_to(
    client: redis.Redis, message_id: str, timeout: float = 30, channel: str | None = None
) -> tuple[str, dict]:
    """The accepted or rejected message that answers ``message_id`` (of the inbound channel by default;
    ids are per channel)."""
    channel = channel or mcp_handler.INBOUND
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, kind, data in feedback_messages(client, since=message_id):
            if kind in (mcp_handler.ACCEPTED, mcp_handler.REJECTED) and (data["channel"], data["message_id"]) == (
                channel,
                message_id,
            ):
                return kind, data
        time.sleep(0.1)
    raise AssertionError(f"no answer to {message_id}")


def pending(client: redis.Redis, channel: str, *message_ids: str) -> list[str]:
    """Which of ``message_ids`` the server's group has read and not acknowledged."""
    waiting = client.xpending_range(channel, mcp_handler.GROUP, min="-", max="+", count=10_000)
    return [w["message_id"].decode() for w in waiting if w["message_id"].decode() in message_ids]


def test_an_inbound_packet_is_submitted_run_and_every_state_change_published(
    channels, mcp_consumer, celery_worker, script
):
    script([SUMMARY])
    start = mcp_handler.feedback_cursor()
    packet = {"profile": "productivity", "role": "summarizer", "payload": {"input": "The cat sat on the mat."}}
    message_id = add(channels, mcp_handler.INBOUND, mcp_handler.TASK, packet)
    kind, answer = answer_to(channels, message_id)
    assert kind == "accepted", answer
    assert answer["channel"] == mcp_handler.INBOUND and answer["created"] is True
    # Without a task_id of its own, the task's id comes from the message's, so a second delivery is idempotent.
    assert answer["task_id"] == str(
        uuid.uuid5(mcp_handler.INBOUND_TASK_NAMESPACE, f"{mcp_handler.INBOUND}:{message_id}")
    )
    done = wait_for(answer["task_id"])
    assert done["status"] == "succeeded" and done["result"]["summary"] == "A cat sat."
    assert pending(channels, mcp_handler.INBOUND, message_id) == []

    def published() -> list[dict]:
        states = [data for _, kind, data in feedback_messages(channels, since=start) if kind == mcp_handler.STATE]
        return [data for data in states if data["task_id"] == done["task_id"]]

    deadline = time.monotonic() + 10  # the last event is published just after its file is written
    while len(mine := published()) < len(done["history"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [data["event"] for data in mine] == done["history"]
    assert [data["event_id"] for data in mine] == list(range(1, len(done["history"]) + 1))
    assert [data["event"]["event"] for data in mine] == ["submitted", "claimed", "step", "finished"]
    assert mine[-1]["status"] == "succeeded" and mine[-1]["version"] == done["version"]
    assert {(d["profile"], d["role"]) for d in mine} == {("productivity", "summarizer")}


def test_rejected_packets_are_answered_with_the_reason_and_acknowledged(channels, mcp_consumer):
    summarizer = {"profile": "productivity", "role": "summarizer"}
    cases = [
        ({"payload": {"input": "x"}}, "invalid", "profile: is required"),
        ({"profile": "productivity", "role": "nope", "payload": {"input": "x"}}, "not_found", "nope"),
        ({**summarizer, "payload": {"input": 5}}, "invalid", "payload.input"),
        ({**summarizer, "payload": {"input": "x"}, "bogus": 1}, "invalid", "bogus: unknown field"),
        ({**summarizer, "payload": {"input": "x"}, "task_id": "../../etc/passwd"}, "invalid", "task_id"),
    ]
    sent = [(add(channels, mcp_handler.INBOUND, mcp_handler.TASK, data), code, words) for data, code, words in cases]
    hostile = [
        ({"type": "task", "data": "{nope"}, "invalid", "data: is not valid JSON"),
        ({"type": "task", "data": "[1, 2]"}, "invalid", "data: must be a JSON object"),
        ({"type": "task"}, "invalid", "data: is required"),
        ({"type": "task", "data": "[" * 100_000}, "invalid", "nested"),  # a RecursionError in json.loads
        ({"type": "task", "data": b'{"profile": "\xff\xfe"}'}, "invalid", "data: is not UTF-8 text"),
        ({"type": "task", "data": '{"profile": NaN}'}, "invalid", "NaN is not a JSON number"),
        ({"type": "task", "data": '{"p": "' + "x" * 1_100_000 + '"}'}, "too_large", "the limit is"),
    ]
    sent += [(channels.xadd(mcp_handler.INBOUND, fields).decode(), code, words) for fields, code, words in hostile]
    wrong_type = add(channels, mcp_handler.INBOUND, "hello", {})
    sent.append((wrong_type, "invalid", "type: must be 'task'"))
    for message_id, code, words in sent:
        kind, answer = answer_to(channels, message_id)
        assert kind == "rejected", answer
        assert answer["code"] == code and words in answer["detail"], answer
        assert answer["channel"] == mcp_handler.INBOUND
    unknown_role = answer_to(channels, sent[1][0])[1]
    assert "summarizer" in unknown_role["valid_roles"]
    assert pending(channels, mcp_handler.INBOUND, *(message_id for message_id, _, _ in sent)) == []
    assert Task.objects.count() == 0


def test_a_consumer_killed_before_it_acknowledges_leaves_its_message_to_another(
    channels, celery_worker, script, tmp_path
):
    script([SUMMARY])
    name = f"doomed-{uuid.uuid4().hex[:6]}"
    doomed = subprocess.Popen(
        [sys.executable, "-m", "tests.orchestration.mcp_doomed", name],
        cwd=BASE_DIR,
        env=server_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert doomed.stdout.readline().strip() == "ready"
    packet = {"profile": "productivity", "role": "summarizer", "payload": {"input": "Reclaim me."}}
    message_id = add(channels, mcp_handler.INBOUND, mcp_handler.TASK, packet)
    assert doomed.stdout.readline().strip() == f"handled {message_id}"
    assert doomed.wait(timeout=10) == -9
    waiting = channels.xpending_range(mcp_handler.INBOUND, mcp_handler.GROUP, min="-", max="+", count=10)
    assert [(w["message_id"].decode(), w["consumer"].decode()) for w in waiting] == [(message_id, name)]

    rescuer = start_mcp_consume(tmp_path / "rescuer.log", "--claim-idle", "1")
    try:
        kind, answer = answer_to(channels, message_id)
        assert kind == "accepted"
        # The dead consumer had submitted the task: the second delivery finds it and makes no other.
        assert answer["created"] is False
        done = wait_for(answer["task_id"])
        assert done["status"] == "succeeded"
        assert Task.objects.count() == 1
        assert pending(channels, mcp_handler.INBOUND, message_id) == []
        answers = [
            d
            for _, k, d in feedback_messages(channels, since=message_id)
            if k in ("accepted", "rejected") and (d["channel"], d["message_id"]) == (mcp_handler.INBOUND, message_id)
        ]
        assert len(answers) == 1
    finally:
        _stop(rescuer)


def test_feedback_published_by_an_outside_agent_runs_a_new_round_once(
    channels, mcp_consumer, celery_worker, script, api
):
    script(
        [
            {"match": QA_REVIEW, "reply": {"passed": True, "findings": []}},
            {"match": f"{CODER}.*negative", "reply": code_reply("def add(a, b):\n    return a + b  # any sign\n")},
            {"match": CODER, "reply": code_reply("def add(a, b):\n    return a + b\n")},
        ]
    )
    response = api.post(
        "/api/v1/developer/fast_coder",
        data=json.dumps({"payload": {"instruction": "add(a, b) returns a + b", "tests": TESTS}}),
        content_type="application/json",
    )
    task_id = response.json()["task_id"]
    assert wait_for(task_id, timeout=60)["status"] == "succeeded"

    message = {"task_id": task_id, "feedback": "It must handle negative numbers too.", "route": "coder"}
    message_id = add(channels, mcp_handler.FEEDBACK, mcp_handler.FEEDBACK_MESSAGE, message)
    kind, answer = answer_to(channels, message_id, channel=mcp_handler.FEEDBACK)
    assert kind == "accepted" and answer["task_id"] == task_id
    time.sleep(0.5)
    done = wait_for(task_id, timeout=60)
    assert done["status"] == "succeeded" and done["iteration"] == 2
    assert "any sign" in done["result"]["files"][0]["content"]
    feedback = [e for e in done["history"] if e["event"] == "feedback"]
    assert [e["detail"]["message_id"] for e in feedback] == [message_id]

    # The same message delivered again (its consumer died before acknowledging it) is taken once.
    entry = mcp_handler.decode(mcp_handler.FEEDBACK, *channels.xrange(mcp_handler.FEEDBACK, message_id, message_id)[0])
    consumer = mcp_handler.Consumer({mcp_handler.FEEDBACK: mcp_handler.handle_feedback}, name="replayer")
    assert consumer.handle(entry) == 1
    again = wait_for(task_id)
    assert again["version"] == done["version"]

    # Refused feedback is answered with the reason.
    summary = api.post(
        "/api/v1/productivity/summarizer",
        data=json.dumps({"payload": {"input": "x"}}),
        content_type="application/json",
    ).json()
    refused = [
        ({"task_id": summary["task_id"], "feedback": "more"}, "no_feedback_loop"),
        ({"feedback": "more"}, "invalid"),
        ({"task_id": task_id, "feedback": "more", "colour": "red"}, "invalid"),
        ({"task_id": str(uuid.uuid4()), "feedback": "more"}, "not_found"),
    ]
    for data, code in refused:
        message_id = add(channels, mcp_handler.FEEDBACK, mcp_handler.FEEDBACK_MESSAGE, data)
        kind, answer = answer_to(channels, message_id, channel=mcp_handler.FEEDBACK)
        assert (kind, answer["code"]) == ("rejected", code), answer


def test_a_message_that_keeps_failing_is_rejected_after_the_delivery_limit(channels, settings):
    """In-process consumer: the handler fails on the test's message as if the database were down."""
    settings.MCP_MAX_DELIVERIES = 2
    marker = uuid.uuid4().hex
    attempts = []

    def broken(entry, pipe):
        if (entry.data or {}).get("marker") == marker:
            attempts.append(entry.deliveries)
            raise RuntimeError("the database is down")

    consumer = mcp_handler.Consumer({mcp_handler.INBOUND: broken}, name="broken", claim_idle_s=0.001)
    consumer.ensure_groups()
    data = {"profile": "p", "role": "r", "payload": {}, "marker": marker}
    message_id = add(channels, mcp_handler.INBOUND, mcp_handler.TASK, data)
    for _ in range(6):
        consumer._next_claim = 0
        consumer.poll(block_ms=10)
        time.sleep(0.01)
    assert attempts == [1, 2]
    kind, answer = answer_to(channels, message_id, timeout=1)
    assert kind == "rejected" and answer["code"] == "undeliverable"
    assert pending(channels, mcp_handler.INBOUND, message_id) == []


def test_a_message_that_kills_its_consumer_does_not_use_up_the_deliveries_of_those_after_it(channels):
    """A reclaim claimed up to 100 messages at once, counting a delivery for each, and then handled them in
    turn: a consumer killed by the first (out of memory, say) counted one for the others too, so that
    after a few such deaths they were rejected as undeliverable without ever being handled."""
    stream = f"test-stream-{uuid.uuid4().hex[:8]}"

    class Killed(BaseException):  # not an Exception: the consumer's process dies with it
        pass

    def deadly(entry, writes):
        if entry.data.get("deadly"):
            raise Killed()
        seen.append(entry.id)

    seen: list[str] = []
    mcp_handler.Consumer({stream: deadly}, name="first").ensure_groups()
    ids = [channels.xadd(stream, mcp_handler.encode("x", {"deadly": n == 0})).decode() for n in range(4)]
    channels.xreadgroup(mcp_handler.GROUP, "first", {stream: ">"}, count=10)  # read, then its process died
    for n in range(3):
        time.sleep(0.01)
        with pytest.raises(Killed):
            mcp_handler.Consumer({stream: deadly}, name=f"next-{n}", claim_idle_s=0.001).reclaim()
    time.sleep(0.01)
    survivor = mcp_handler.Consumer({stream: lambda entry, writes: seen.append(entry.id)}, name="last",
                                    claim_idle_s=0.001, max_deliveries=3)  # fmt: skip
    assert survivor.reclaim() == 4
    assert seen == ids[1:]  # handled, not rejected
    deliveries = {p["message_id"].decode(): p["times_delivered"] for p in channels.xpending_range(
        stream, mcp_handler.GROUP, min="-", max="+", count=10)}  # fmt: skip
    assert deliveries == {}
    channels.delete(stream)


def test_a_consumer_makes_its_group_again_when_redis_lost_it(channels):
    stream = f"test-stream-{uuid.uuid4().hex[:8]}"
    seen = []
    consumer = mcp_handler.Consumer({stream: lambda entry, writes: seen.append(entry.id)}, name="c")
    consumer.ensure_groups()
    channels.xgroup_destroy(stream, mcp_handler.GROUP)  # Redis restarted without its data, say
    assert consumer.poll(block_ms=10) == 0  # NOGROUP: the group is made again
    message_id = channels.xadd(stream, mcp_handler.encode("x", {})).decode()
    assert consumer.poll(block_ms=10) == 1
    assert seen == [message_id]
    channels.delete(stream)


def test_a_consumer_whose_stream_is_deleted_while_it_waits_makes_it_again(channels):
    """Redis 7.0 answers a read blocked on a stream that is deleted with UNBLOCKED, not NOGROUP: it was taken
    for Redis being away (logged, and two seconds lost) before the group was made again."""
    import threading

    stream = f"test-stream-{uuid.uuid4().hex[:8]}"
    consumer = mcp_handler.Consumer({stream: lambda entry, writes: None}, name="c")
    consumer.ensure_groups()
    consumer._next_claim = float("inf")
    threading.Timer(0.3, channels.delete, args=[stream]).start()
    assert consumer.poll(block_ms=1500) == 0
    assert channels.xinfo_groups(stream)[0]["name"] == mcp_handler.GROUP.encode()
    channels.delete(stream)


def test_a_message_handled_by_two_consumers_has_its_writes_made_once(channels):
    """Consumer A reads a message and stalls past the claim time; B takes it over and handles it;
    then A handles it too. Only the handling whose acknowledgement takes writes anything."""
    stream, counter = f"test-stream-{uuid.uuid4().hex[:8]}", f"test-counter-{uuid.uuid4().hex[:8]}"

    def count(entry, writes):
        writes.hincrby(counter, "n", 1)

    slow = mcp_handler.Consumer({stream: count}, name="slow")
    slow.ensure_groups()
    message_id = channels.xadd(stream, mcp_handler.encode("x", {})).decode()
    (_, [(entry_id, fields)]), *_ = channels.xreadgroup(mcp_handler.GROUP, "slow", {stream: ">"}, count=1)
    time.sleep(0.01)
    quick = mcp_handler.Consumer({stream: count}, name="quick", claim_idle_s=0.001)
    assert quick.reclaim() == 1
    assert slow.handle(mcp_handler.decode(stream, entry_id, fields)) == 1
    assert channels.hget(counter, "n") == b"1"
    assert entry_id.decode() == message_id
    channels.delete(stream, counter)


def test_feedback_undone_by_a_failed_enqueue_is_taken_again_when_its_message_comes_back():
    from orchestration.packets import history_event
    from orchestration.services import _feedback_taken

    taken = history_event("feedback", status="running", detail={"message_id": "1-0"})
    undone = history_event("enqueue_failed", status="succeeded", detail={"message_id": "1-0", "error": "down"})
    assert _feedback_taken([taken], "1-0")
    assert not _feedback_taken([taken, undone], "1-0")
    assert _feedback_taken([taken, undone, taken], "1-0")
    assert not _feedback_taken([taken], "2-0")


@pytest.mark.django_db(transaction=True)
def test_an_inbound_task_stored_while_the_broker_was_away_is_answered_accepted_not_rejected(channels, monkeypatch):
    """Found by review: its deliveries used up (each stored or found the task, and could not queue its job), the
    message was answered rejected/undeliverable, without a task_id, while the task was stored and the recovery
    sweep ran it: a producer that sent it again got a second task."""
    from kombu.exceptions import OperationalError

    from orchestration import orchestration_engine
    from orchestration.runtime import task_store

    def broker_away(*args, **kwargs):
        # Injected: the broker's publish fails as with Redis away; the channel's own Redis must stay up.
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(orchestration_engine, "queue_job", broker_away)
    stream = f"test-inbound-{uuid.uuid4().hex[:8]}"
    consumer = mcp_handler.Consumer(
        {stream: mcp_handler.handle_inbound}, undeliverable={stream: mcp_handler.inbound_stored},
        name="c", claim_idle_s=0.001, max_deliveries=2,
    )  # fmt: skip
    consumer.ensure_groups()
    task = {"profile": "productivity", "role": "summarizer", "payload": {"input": "Some text."}}
    message_id = add(channels, stream, mcp_handler.TASK, task)
    for _ in range(4):
        consumer._next_claim = 0
        consumer.poll(block_ms=10)
        time.sleep(0.01)
    kind, answer = answer_to(channels, message_id, timeout=1, channel=stream)
    assert (kind, answer["status"], answer["created"]) == ("accepted", "queued", True), answer
    assert "recovery sweep" in answer["detail"]
    events = [event["event"] for event in task_store().read(answer["task_id"])["history"]]
    assert events == ["submitted", "enqueue_failed", "enqueued", "enqueue_failed"]
    # A message that names its own task_id (maybe another submission's) is rejected, naming it.
    named = add(channels, stream, mcp_handler.TASK, {**task, "task_id": answer["task_id"]})
    channels.xreadgroup(mcp_handler.GROUP, "c", {stream: ">"}, count=1)
    entry = mcp_handler.Entry(channel=stream, id=named, type=mcp_handler.TASK,
                              data={**task, "task_id": answer["task_id"]}, deliveries=3)  # fmt: skip
    assert consumer.handle(entry) == 1
    kind, rejected = answer_to(channels, named, timeout=1, channel=stream)
    assert (kind, rejected["code"], rejected["task_id"]) == ("rejected", "undeliverable", answer["task_id"])
    # A message whose task was never stored (the database was away, say) is still rejected.
    other = add(channels, stream, mcp_handler.TASK, task)
    channels.xreadgroup(mcp_handler.GROUP, "c", {stream: ">"}, count=1)  # delivered, and not handled
    unstored = mcp_handler.Entry(channel=stream, id=other, type=mcp_handler.TASK, data=task, deliveries=3)
    assert consumer.handle(unstored) == 1
    kind, answer = answer_to(channels, other, timeout=1, channel=stream)
    assert (kind, answer["code"]) == ("rejected", "undeliverable")
    channels.delete(stream)


def test_only_consumers_with_nothing_pending_are_forgotten_and_a_stopping_one_leaves(channels):
    """Redis 7.0 counts a consumer's idle time from its last delivery, so a live consumer of a quiet channel
    looks dead; it was checked and deleted in two round trips, and a message delivered to it in between was
    dropped from the pending list with it (its answer lost)."""
    stream = f"test-stream-{uuid.uuid4().hex[:8]}"
    newcomer = mcp_handler.Consumer({stream: lambda entry, writes: None}, name="newcomer")
    newcomer.ensure_groups()
    channels.xadd(stream, mcp_handler.encode("x", {}))
    channels.xreadgroup(mcp_handler.GROUP, "busy", {stream: ">"}, count=1)  # holds a message
    channels.xgroup_createconsumer(stream, mcp_handler.GROUP, "quiet")  # it has read nothing yet
    assert newcomer.forget_dead_consumers(idle_s=0) == ["quiet"]
    names = {mcp_handler.text(c["name"]) for c in channels.xinfo_consumers(stream, mcp_handler.GROUP)}
    assert names == {"busy"}
    # Checked in the script that deletes: one whose message came after the listing is kept.
    assert newcomer._forget_if_idle(keys=[stream], args=[mcp_handler.GROUP, "busy"]) == 0
    busy = mcp_handler.Consumer({stream: lambda entry, writes: None}, name="busy")
    busy.leave()  # its message stays pending, for another consumer to take over
    channels.xgroup_createconsumer(stream, mcp_handler.GROUP, "newcomer")
    newcomer.leave()
    names = {mcp_handler.text(c["name"]) for c in channels.xinfo_consumers(stream, mcp_handler.GROUP)}
    assert names == {"busy"}
    channels.delete(stream)
