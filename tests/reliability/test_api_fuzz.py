"""Fuzzing the REST API with schemathesis against the server's own OpenAPI schema (issue 7).

The schema is the one the server serves at /api/schema/ (drf-spectacular's generator, rendered as JSON),
and every request goes through the whole WSGI application (middleware, authentication, the views) with a
real token. For every operation schemathesis sends the schema's examples, its boundary cases and a
bounded number of generated requests, valid and invalid, and checks that no answer is a 5xx and that
every answer is one the schema documents: its status code, its content type and its body.

So that the fuzzing reaches more than 404s, a generated path names, some of the time, a configured
profile and role, or a task that exists, and a generated task body is, some of the time, one that the
serializer takes. Every role is served by an ``instant`` LLM during the test, and the tasks it created
are cancelled at its end, so that a worker of the session never runs them on the real model.

The event stream (GET /api/v1/tasks/{task_id}/events) is fuzzed with unknown tasks and a cancelled one:
the stream of a task that has not finished stays open until it does, which
tests/orchestration/test_task_events.py follows live.

``API_FUZZ_EXAMPLES`` sets the number of generated requests per operation (20 by default, for CI) and
``API_FUZZ_SEED`` the seed (fixed, so that CI is deterministic).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import schemathesis
from django.conf import settings
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from aiagentserver.wsgi import application
from orchestration.exceptions import ApplicationError
from orchestration.packets import FINISHED
from orchestration.runtime import configuration
from orchestration.services import task_cancel, task_submit

# Committed, not rolled back: a worker of the session that runs a fuzzed task writes to the database too,
# and must not wait for a transaction that lasts the whole test.
pytestmark = pytest.mark.django_db(transaction=True)

EXAMPLES = int(os.environ.get("API_FUZZ_EXAMPLES", "20"))
SEED = int(os.environ.get("API_FUZZ_SEED", "7"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
INSTANT_LLM = "fuzz-instant"

TASK_IDS = uuid.UUID("9a3c1f6e-0b7d-4c55-8e2a-6f0d3b1c7e00")


def _task_ids(operation: str) -> dict[str, str]:
    """The tasks that the generated paths of one operation name besides random ids: fresh ones for each
    operation (the fuzzing of another may have cancelled its own), the same from run to run."""
    return {kind: str(uuid.uuid5(TASK_IDS, f"{operation} {kind}")) for kind in ("planner", "coder", "cancelled")}


def _served_schema() -> dict:
    """The schema as GET /api/schema/?format=json serves it."""
    return json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))


schema = schemathesis.openapi.from_dict(
    _served_schema(),
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True, "database": "none"},
            # An event stream that has not ended is read for at most this long.
            "request-timeout": 5,
        }
    ),
)
schema.app = application


@schema.hook
def before_generate_path_parameters(context: schemathesis.HookContext, strategy: st.SearchStrategy):
    """Mix the generated path parameters with real ones: a configured role, a task that exists."""
    path = context.operation.path
    if path == "/api/v1/{profile}/{role}":
        routes = [
            {"profile": profile.name, "role": role}
            for profile in configuration().profiles.values()
            for role in profile.roles
        ]
        return st.one_of(strategy, st.sampled_from(routes))
    if "{task_id}" in path:
        tasks = _task_ids(context.operation.label)
        # A stream stays open until its task finishes: only the cancelled task, which nothing can run again.
        names = [tasks["cancelled"]] if path.endswith("/events") else list(tasks.values())
        return st.one_of(strategy, st.sampled_from(names).map(lambda task_id: {"task_id": task_id}))
    return strategy


@schema.hook
def before_generate_body(context: schemathesis.HookContext, strategy: st.SearchStrategy):
    """Mix in task bodies that pass the serializer, so that arbitrary text reaches the agents' payload
    checks, the state store and the queue."""
    if context.operation.path == "/api/v1/{profile}/{role}":
        return st.one_of(
            strategy, st.fixed_dictionaries({"payload": st.fixed_dictionaries({"input": st.text(min_size=1)})})
        )
    return strategy


@pytest.fixture
def instant_llms(edit_config: Callable[[Callable[[dict], None]], None]) -> None:
    """Every role served by an LLM that answers at once: the real model never runs a fuzzed task."""

    def change(raw: dict) -> None:
        for llm in raw["llms"]:
            llm["toggle"] = False
        raw["llms"].append(
            {
                "id": INSTANT_LLM,
                "engine": "instant",
                "source": "local",
                "model": "instant",
                "capabilities": ["chat", "code", "vision"],
                "max_concurrency": 8,
            }
        )
        for profile in raw["profiles"].values():
            profile["default_llms"] = [INSTANT_LLM]
            for role in profile["roles"].values():
                role["preferred_llms"] = []

    edit_config(change)


@pytest.fixture
def fuzzed_tasks_cancelled(instant_llms: None) -> Iterator[None]:
    """At the end, cancel the tasks created meanwhile that have not finished, before the real
    configuration comes back: their jobs, left in Redis, find them cancelled. A worker of the session
    may run them meanwhile: a planner that delegates as it is scanned adds children, hence a few passes."""
    state_dir = Path(settings.TASKS_STATE_DIR)
    before = {path.name for path in state_dir.glob("*.json")}
    yield
    for _ in range(5):
        unfinished = [
            path.stem
            for path in sorted(state_dir.glob("*.json"))
            if path.name not in before and json.loads(path.read_bytes())["status"] not in FINISHED
        ]
        if not unfinished:
            break
        for task_id in unfinished:
            with contextlib.suppress(ApplicationError):  # it finished meanwhile, or was cancelled with its parent
                task_cancel(task_id=task_id, reason="created by the API fuzz test")


@pytest.fixture
def known_tasks(request: pytest.FixtureRequest, fuzzed_tasks_cancelled: None) -> None:
    """The tasks that the generated paths of this test's operation name: two queued, one cancelled."""
    operation = request.node.name.partition("[")[2].removesuffix("]")  # schemathesis names it test[GET /path]
    assert operation in {result.ok().label for result in schema.get_all_operations()}, request.node.name
    tasks = _task_ids(operation)
    task_submit(profile="developer", role="planner", payload={"input": "Plan a release"}, task_id=tasks["planner"])
    task_submit(profile="developer", role="fast_coder", payload={"input": "def add(a, b):"}, task_id=tasks["coder"])
    _, created = task_submit(
        profile="productivity", role="summarizer", payload={"input": "Some text."}, task_id=tasks["cancelled"]
    )
    if created:
        task_cancel(task_id=tasks["cancelled"])


@pytest.fixture
def authorization(api_user, known_tasks: None) -> dict[str, str]:
    return {"Authorization": f"Token {Token.objects.create(user=api_user).key}"}


@schema.parametrize()
@hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_answer_is_documented_and_none_is_a_server_error(
    case: schemathesis.Case, authorization: dict[str, str]
) -> None:
    case.call_and_validate(headers=authorization, checks=CHECKS)
