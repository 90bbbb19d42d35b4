"""The per-process handles on the configuration and the state store, built from the settings."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from django.conf import settings

from agents.registry import AGENTS
from balancer.configuration import Configuration, ConfigurationError, ConfigurationSource
from orchestration.state_store import TaskStore


@cache
def _configuration_source(path: Path) -> ConfigurationSource:
    return ConfigurationSource(path, known_agents=AGENTS.names())


def configuration() -> Configuration:
    """The configuration in force, reloaded when configuration.json changes."""
    return _configuration_source(Path(settings.AIAGENT_CONFIG)).current()


def configuration_error() -> ConfigurationError | None:
    """Why the file on disk is not the configuration in force (it is broken), or None."""
    source = _configuration_source(Path(settings.AIAGENT_CONFIG))
    source.current()
    return source.last_error


@cache
def _store(path: Path) -> TaskStore:
    return TaskStore(path)


def task_store() -> TaskStore:
    return _store(Path(settings.TASKS_STATE_DIR))
