"""A Redis URL is taken only when redis-py and kombu (Celery's broker) read the same server and database
from it; the tests flush only a test database their URL names."""

import subprocess
import sys

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured
from kombu import Connection
from kombu.transport.redis import Channel

from aiagentserver.env import env_redis_url, parse_redis_url, redact_url
from tests.conftest import redis_url_to_flush

GOOD = [
    ("redis://127.0.0.1:6379/0", 0),
    ("redis://127.0.0.1:6379/13", 13),
    ("redis://127.0.0.1:6379", None),
    ("redis://127.0.0.1/", None),
    ("redis://:pw@redis.internal:6380/2", 2),
    ("redis://alice:pw@[::1]:6379/3", 3),
    ("rediss://h.example:6380/1?ssl_cert_reqs=required", 1),
    ("rediss://h.example:6380/4?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem", 4),
]
BAD = [
    ("redis://127.0.0.1:6379/9x", "database '9x' is not a number"),
    ("redis://127.0.0.1:6379/1/2", "database '1/2' is not a number"),
    ("redis://127.0.0.1:6379/ 1", "is not a number"),
    ("redis://127.0.0.1:notaport/9", "port 'notaport' is not a number"),
    ("redis://127.0.0.1:99999/0", "port '99999' is not a number from 1 to 65535"),
    ("redis://127.0.0.1:0/0", "port '0'"),
    ("redis://127.0.0.1:6379/0?db=3", "its query has db"),
    ("redis://127.0.0.1:6379/0?socket_timeout=5", "its query has socket_timeout"),  # kombu refuses it
    ("redis://127.0.0.1:6379/0?connect_timeout=5", "its query has connect_timeout"),  # redis-py refuses it
    ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "its query has ssl_cert_reqs"),  # redis-py: not with redis://
    ("localhost:6379", "does not start with redis://"),
    ("REDIS://127.0.0.1/0", "does not start with redis://"),
    ("redis:///0", "names no host"),
    ("redis://[::1/0", "host is not valid"),
]


def kombu_database(url: str) -> int:
    """The database Celery's broker (kombu) selects for ``url``, read as its Redis channel reads it."""
    return Channel._prepare_virtual_host(None, Connection(url).virtual_host)


@pytest.mark.parametrize(("url", "db"), GOOD)
def test_a_redis_url_is_read_alike_by_redis_py_and_kombu(monkeypatch, url, db):
    monkeypatch.setenv("REDIS_URL", f" {url} ")
    assert env_redis_url("REDIS_URL", "redis://x") == url
    assert parse_redis_url("REDIS_URL", url).db == db
    assert redis.Redis.from_url(url).connection_pool.connection_kwargs.get("db", 0) == (db or 0)
    assert kombu_database(url) == (db or 0)


@pytest.mark.parametrize(("url", "reason"), BAD)
def test_a_redis_url_the_clients_would_read_differently_is_refused_naming_the_variable(monkeypatch, url, reason):
    """REDIS_URL=redis://…/9x passed the settings: redis-py then used database 0, kombu refused it, and every
    enqueue failed at run time."""
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ImproperlyConfigured, match=rf"^REDIS_URL=.* is not a Redis URL .*{reason}"):
        env_redis_url("REDIS_URL", "redis://x")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/9x", "redis://127.0.0.1:6379/1/2"])
def test_the_clients_disagree_on_the_refused_databases(url):
    """Why they are refused: redis-py takes database 0 (or 12 for /1/2) where kombu refuses the URL."""
    assert redis.Redis.from_url(url).connection_pool.connection_kwargs.get("db", 0) in (0, 12)
    with pytest.raises(ValueError, match="Database is int"):
        kombu_database(url)


def test_the_settings_refuse_a_redis_url_with_a_bad_database(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DEBUG": "1", "VAR_DIR": str(tmp_path), "REDIS_URL": "redis://127.0.0.1:6379/9x"}
    result = subprocess.run(
        [sys.executable, "-c", "import aiagentserver.settings"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "REDIS_URL='redis://127.0.0.1:6379/9x' is not a Redis URL" in result.stderr


def test_a_refused_redis_url_does_not_show_its_password(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://alice:s3cret@127.0.0.1:6379/9x")
    with pytest.raises(ImproperlyConfigured) as refused:
        env_redis_url("REDIS_URL", "redis://x")
    assert "s3cret" not in str(refused.value)
    assert "redis://alice:***@127.0.0.1:6379/9x" in str(refused.value)
    assert redact_url("redis://:pa/ss@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_a_database_that_is_flushed_must_be_named(monkeypatch):
    monkeypatch.setenv("TEST_REDIS_URL", "redis://127.0.0.1:6379")
    with pytest.raises(ImproperlyConfigured, match="names no database"):
        parse_redis_url("TEST_REDIS_URL", "redis://127.0.0.1:6379", database_required=True)
    assert parse_redis_url("TEST_REDIS_URL", "redis://127.0.0.1:6379/0", database_required=True).db == 0


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/9x", "redis://127.0.0.1:6379", "redis://127.0.0.1:6379/"])
def test_the_tests_do_not_flush_a_database_their_url_does_not_name(monkeypatch, url):
    """TEST_REDIS_URL=redis://…/9x (a typo) or one with no database: the tests flushed database 0, the
    server's own data on a development machine. They stop instead, saying why."""
    monkeypatch.setenv("TEST_REDIS_URL", url)
    with pytest.raises(pytest.UsageError, match="TEST_REDIS_URL="):
        redis_url_to_flush(url)


def test_the_tests_flush_only_test_redis_url(monkeypatch):
    monkeypatch.setenv("TEST_REDIS_URL", " redis://127.0.0.1:6379/13 ")
    assert redis_url_to_flush("redis://127.0.0.1:6379/13") == "redis://127.0.0.1:6379/13"
    assert redis_url_to_flush("redis://127.0.0.1:6379/0") is None  # a REDIS_URL of its own: a server's
    monkeypatch.delenv("TEST_REDIS_URL")
    assert redis_url_to_flush("redis://127.0.0.1:6379/13") is None
