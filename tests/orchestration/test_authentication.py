"""Token authentication: either keyword, each key's lookup cached for API_TOKEN_CACHE_SECONDS, and a
token deleted (or a user made inactive) in this process refused at once."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def _token_queries(client: APIClient) -> tuple[int, int]:
    with CaptureQueriesContext(connection) as queries:
        status = client.get("/api/v1/llms").status_code
    return status, sum("authtoken_token" in query["sql"] for query in queries.captured_queries)


@pytest.fixture
def user_and_key(django_user_model):
    user = django_user_model.objects.create_user(username="auth-client")
    return user, Token.objects.create(user=user).key


@pytest.mark.parametrize("keyword", ["Token", "Bearer", "bearer"])
def test_either_keyword_opens_the_api(user_and_key, keyword):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"{keyword} {user_and_key[1]}")
    assert client.get("/api/v1/llms").status_code == 200


def test_a_keys_lookup_is_cached_and_not_past_its_time(user_and_key, settings, monkeypatch):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {user_and_key[1]}")
    assert _token_queries(client) == (200, 1)
    assert _token_queries(client) == (200, 0)
    settings.API_TOKEN_CACHE_SECONDS = 0
    from orchestration import authentication

    clock = authentication.time.monotonic() + 3600
    monkeypatch.setattr(authentication.time, "monotonic", lambda: clock)
    assert _token_queries(client) == (200, 1)
    assert _token_queries(client) == (200, 1)


def test_a_deleted_token_and_an_inactive_user_are_refused_at_once(user_and_key):
    user, key = user_and_key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/v1/llms").status_code == 200
    user.is_active = False
    user.save()
    assert client.get("/api/v1/llms").status_code == 401
    user.is_active = True
    user.save()
    assert client.get("/api/v1/llms").status_code == 200
    Token.objects.filter(key=key).delete()
    assert client.get("/api/v1/llms").status_code == 401


def test_a_malformed_header_is_a_401(user_and_key):
    client = APIClient()
    for header in ("Bearer", "Bearer a b", "Token \xff\xfe"):
        client.credentials(HTTP_AUTHORIZATION=header)
        assert client.get("/api/v1/llms").status_code == 401, header
