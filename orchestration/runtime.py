"""The per-process handles on the configuration and the state store, built from the settings."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from agents.registry import AGENTS
from balancer.configuration import Configuration, ConfigurationError, ConfigurationSource
from balancer.load_balancer import LoadBalancer, Policy
from balancer.spending import DatabaseLedger
from orchestration import mcp_handler
from orchestration.state_store import TaskStore

# Celery's hard time limit follows a role's time limit by this much (orchestration_engine.job_options).
HARD_LIMIT_MARGIN_S = 30


def validation() -> dict[str, Any]:
    """What a configuration is validated against that the balancer does not know: the agents, and the bound
    of a role's time limit. A job comes back from Redis once its visibility timeout passes unacknowledged,
    and is then taken for one whose worker died: no step (with its hard limit's margin) may outlive it."""
    timeout = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    return {"known_agents": AGENTS.names(), "time_limit_below_s": timeout - HARD_LIMIT_MARGIN_S}


@cache
def _configuration_source(path: Path) -> ConfigurationSource:
    return ConfigurationSource(path, **validation())


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
    return TaskStore(path, on_write=mcp_handler.publish_task_change)


def task_store() -> TaskStore:
    return _store(Path(settings.TASKS_STATE_DIR))


@cache
def _balancer(url: str, slot_lease_s: float) -> LoadBalancer:
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return LoadBalancer(
        client,
        policy=Policy(slot_lease_s=slot_lease_s),
        on_call=mcp_handler.publish_llm_call,
        stopped_by=(SoftTimeLimitExceeded,),  # a step out of time stopped the call
        ledger=DatabaseLedger(),
    )


def load_balancer() -> LoadBalancer:
    """This process's load balancer; its shared state is in Redis."""
    return _balancer(settings.REDIS_URL, settings.LLM_SLOT_LEASE_SECONDS)
