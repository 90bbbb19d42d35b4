"""Throttling per API client: 429 with Retry-After over the rate, counts shared through Redis by every
process, submissions counted apart, /healthz never counted, and no 500 when Redis is away."""

import json
import logging
import subprocess
import sys
import uuid

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orchestration.throttling import ClientRateThrottle
from tests.conftest import BASE_DIR, free_port, server_env

pytestmark = pytest.mark.django_db

TASKS = "/api/v1/tasks/"


class Clock:
    """The throttles' timer, moved by hand: no test waits for a window to pass."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(ClientRateThrottle, "timer", clock)
    return clock


def client_for(django_user_model) -> APIClient:
    user = django_user_model.objects.create_user(username=f"client-{uuid.uuid4().hex[:8]}")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def submit(api) -> object:
    body = {"payload": {"input": "Plan a release"}}
    return api.post("/api/v1/developer/planner", data=json.dumps(body), content_type="application/json")


def test_a_client_over_its_rate_gets_429_with_retry_after_until_the_window_passes(api, settings, clock):
    settings.API_THROTTLE_RATE = "3/min"
    assert [api.get(TASKS).status_code for _ in range(3)] == [200, 200, 200]
    refused = api.get(TASKS)
    assert refused.status_code == 429
    assert refused["Retry-After"] == "60"
    body = refused.json()
    assert body["code"] == "throttled"
    assert "60 seconds" in body["detail"]
    # Every endpoint counts, not only the one that was refused.
    assert api.get("/api/v1/config").status_code == 429
    clock.now += 45
    assert api.get(TASKS)["Retry-After"] == "15"
    clock.now += 16
    assert api.get(TASKS).status_code == 200


def test_each_client_has_its_own_count(api, django_user_model, settings, clock):
    settings.API_THROTTLE_RATE = "2/min"
    other = client_for(django_user_model)
    assert [api.get(TASKS).status_code for _ in range(3)] == [200, 200, 429]
    assert other.get(TASKS).status_code == 200


def test_a_rotated_token_keeps_its_clients_count(api, api_user, settings, clock):
    settings.API_THROTTLE_RATE = "2/min"
    assert [api.get(TASKS).status_code for _ in range(2)] == [200, 200]
    Token.objects.filter(user=api_user).delete()
    rotated = APIClient()
    rotated.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=api_user).key}")
    assert rotated.get(TASKS).status_code == 429


def test_submissions_and_feedback_have_their_own_lower_rate(api, settings, clock):
    settings.API_THROTTLE_RATE = "100/min"
    settings.API_SUBMIT_THROTTLE_RATE = "2/min"
    first, second = submit(api), submit(api)
    assert (first.status_code, second.status_code) == (202, 202)
    third = submit(api)
    assert third.status_code == 429 and third.json()["code"] == "throttled"
    feedback = api.post(
        f"{TASKS}{first.json()['task_id']}/feedback",
        data=json.dumps({"feedback": "more"}),
        content_type="application/json",
    )
    assert feedback.status_code == 429
    # Reads and cancels are not submissions.
    assert api.get(f"{TASKS}{first.json()['task_id']}").status_code == 200
    assert api.post(f"{TASKS}{first.json()['task_id']}/cancel").status_code == 200


def test_a_lowered_rate_still_says_when_to_come_back(api, settings, clock):
    settings.API_THROTTLE_RATE = "5/min"
    for _ in range(5):
        api.get(TASKS)
        clock.now += 1
    settings.API_THROTTLE_RATE = "2/min"
    refused = api.get(TASKS)
    assert refused.status_code == 429
    # Under 2/min the second newest request (made at +3 s) must leave the window first: at +63 s, 58 s from now.
    assert refused["Retry-After"] == "58"


def test_healthz_is_neither_authenticated_nor_throttled(client, settings, clock):
    settings.API_THROTTLE_RATE = "1/min"
    assert {client.get("/healthz").status_code for _ in range(5)} == {200}


def test_off_turns_a_throttle_off(api, settings, clock):
    settings.API_THROTTLE_RATE = None  # what API_THROTTLE_RATE=off gives
    assert {api.get(TASKS).status_code for _ in range(30)} == {200}


@pytest.mark.django_db(transaction=True)
def test_the_count_is_shared_by_every_process(api_user, settings, clock):
    """Another server process (as another gunicorn worker would) spends part of the client's rate."""
    settings.API_THROTTLE_RATE = "3/min"
    token = Token.objects.create(user=api_user).key
    script = (
        "import django; django.setup(); from django.test import Client; "
        f"c = Client(HTTP_AUTHORIZATION='Token {token}'); "
        f"print([c.get('{TASKS}').status_code for _ in range(2)])"
    )
    other = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR,
        env=server_env(
            API_THROTTLE_RATE="3/min", ALLOWED_HOSTS="testserver", DJANGO_SETTINGS_MODULE="aiagentserver.settings"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.stdout.strip() == "[200, 200]", other.stderr[-3000:]
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert [api.get(TASKS).status_code for _ in range(2)] == [200, 429]


def test_a_redis_outage_lets_requests_through_and_is_logged_once(api, settings, caplog):
    settings.API_THROTTLE_RATE = "2/min"
    redis_url = settings.REDIS_URL
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="orchestration.throttling"):
        assert [api.get(TASKS).status_code for _ in range(4)] == [200, 200, 200, 200]
        settings.REDIS_URL = redis_url
        assert api.get(TASKS).status_code == 200
    messages = [record.getMessage() for record in caplog.records if record.name == "orchestration.throttling"]
    assert len(messages) == 2, messages
    assert messages[0].startswith("throttling is off until Redis answers again (ConnectionError")
    assert messages[1] == "throttling is on again: Redis answers"
