"""Management commands a user runs: create_token, role_queues, recover_tasks; and /healthz."""

import io

import pytest
from django.core.management import CommandError, call_command
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue().strip()


def test_create_token_prints_only_a_key_that_authenticates():
    key = run("create_token", "ci-bot")
    assert key == Token.objects.get(user__username="ci-bot").key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/v1/tasks/").status_code == 200
    with pytest.raises(CommandError, match="--rotate"):
        run("create_token", "ci-bot")
    rotated = run("create_token", "ci-bot", "--rotate")
    assert rotated != key
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/v1/tasks/").status_code == 401


def test_create_token_refuses_a_bad_name():
    with pytest.raises(CommandError, match="not a valid client name"):
        run("create_token", "no spaces/allowed!")


@pytest.mark.parametrize("grace", ["0", "9.5", "nan", "-1"])
def test_recover_tasks_refuses_a_grace_that_would_recover_tasks_in_transit(grace):
    """Found by review: --grace 0 queued again the jobs of tasks just submitted, or on their way to a worker."""
    with pytest.raises(CommandError, match="--grace must be at least 10 seconds"):
        run("recover_tasks", "--grace", grace)


def test_role_queues_lists_every_role_queue():
    queues = run("role_queues").split(",")
    assert "developer.planner" in queues and "productivity.translator" in queues
    assert len(queues) == 11


def test_healthz_reports_database_and_redis(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "redis": "ok"}
