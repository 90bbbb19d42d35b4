"""The typed environment readers fail loudly, naming the variable."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from aiagentserver.env import env_bool, env_choice, env_int, env_list, env_path, env_rate, env_redis_url


def test_env_bool(monkeypatch):
    monkeypatch.setenv("FLAG", "yes")
    assert env_bool("FLAG", False) is True
    monkeypatch.setenv("FLAG", "0")
    assert env_bool("FLAG", True) is False
    monkeypatch.setenv("FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="FLAG='maybe'"):
        env_bool("FLAG", False)


def test_env_int(monkeypatch):
    monkeypatch.delenv("SIZE", raising=False)
    assert env_int("SIZE", 5) == 5
    monkeypatch.setenv("SIZE", "12k")
    with pytest.raises(ImproperlyConfigured, match="SIZE='12k' is not an integer"):
        env_int("SIZE", 5)
    monkeypatch.setenv("SIZE", "3")
    with pytest.raises(ImproperlyConfigured, match="minimum of 10"):
        env_int("SIZE", 50, minimum=10)


def test_env_list_and_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HOSTS", "a.example, b.example,,")
    assert env_list("HOSTS", []) == ["a.example", "b.example"]
    monkeypatch.setenv("DIR", "relative/dir")
    assert env_path("DIR", tmp_path, base=tmp_path) == tmp_path / "relative/dir"


def test_env_rate(monkeypatch):
    monkeypatch.delenv("RATE", raising=False)
    assert env_rate("RATE", "1200/min") == "1200/min"
    for value, expected in (("20/s", "20/s"), (" 300 / Hour ", "300/hour"), ("off", None), ("None", None)):
        monkeypatch.setenv("RATE", value)
        assert env_rate("RATE", "1200/min") == expected
    for bad in ("1200", "0/min", "5/fortnight", "-1/s", ""):
        monkeypatch.setenv("RATE", bad)
        with pytest.raises(ImproperlyConfigured, match="is not a rate"):
            env_rate("RATE", "1200/min")


def test_env_choice_takes_any_case_and_names_the_choices(monkeypatch):
    """LOG_LEVEL=debug stopped every process with "Unable to configure root logger", naming no variable."""
    levels = ("DEBUG", "INFO", "WARNING")
    monkeypatch.setenv("LOG_LEVEL", " debug ")
    assert env_choice("LOG_LEVEL", "INFO", levels) == "DEBUG"
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    with pytest.raises(ImproperlyConfigured, match="LOG_LEVEL='verbose' is not one of DEBUG, INFO, WARNING"):
        env_choice("LOG_LEVEL", "INFO", levels)


def test_env_redis_url_refuses_what_celery_would_take_for_amqp(monkeypatch):
    """REDIS_URL= (empty) was kept, and Celery then waited for ever for an AMQP broker on localhost."""
    for good in ("redis://127.0.0.1:6379/0", "rediss://h:6380/1"):
        monkeypatch.setenv("REDIS_URL", good)
        assert env_redis_url("REDIS_URL", "redis://x") == good
    for bad in ("", "localhost:6379", "amqp://guest@localhost//", "unix:///run/redis.sock"):  # no unix:// broker
        monkeypatch.setenv("REDIS_URL", bad)
        with pytest.raises(ImproperlyConfigured, match="is not a Redis URL"):
            env_redis_url("REDIS_URL", "redis://x")


def test_secret_key_is_required_without_debug(tmp_path):
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "DEBUG": "0", "VAR_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", "import aiagentserver.settings"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in result.stderr


@pytest.mark.parametrize(("value", "expected"), [(None, "True True"), ("0", "False False"), ("on", "True True")])
def test_celery_task_events_are_on_unless_turned_off(tmp_path, value, expected):
    """CELERY_TASK_EVENTS governs both the workers' task events and the publishers' task-sent event."""
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "DEBUG": "1", "VAR_DIR": str(tmp_path)}
    if value is not None:
        env["CELERY_TASK_EVENTS"] = value
    code = (
        "from aiagentserver import settings as s; "
        "print(s.CELERY_WORKER_SEND_TASK_EVENTS, s.CELERY_TASK_SEND_SENT_EVENT)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
