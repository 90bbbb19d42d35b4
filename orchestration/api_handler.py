"""The REST API: thin views, each validating its input and calling one service or selector.

The endpoints are documented in doc/api_endpoints.md, and in the OpenAPI schema at /api/schema/: each
view's ``extend_schema`` gives its parameters, its request and every response it can give, its errors
through ``errors()`` and ``error()``. The serializers of the first section describe answers that the
selectors build as dicts: they document, nothing serializes with them.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.paginator import Page, Paginator
from django.core.validators import RegexValidator
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import get_script_prefix, reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.defaults import page_not_found, server_error
from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_serializer,
    inline_serializer,
)
from prometheus_client import CONTENT_TYPE_LATEST
from rest_framework import serializers, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orchestration.exceptions import ApplicationError
from orchestration.metrics import metrics_get
from orchestration.models import Task
from orchestration.packets import SERVER_OWNED_INITIAL, STATUSES, parse_task_id
from orchestration.prometheus import prometheus_text
from orchestration.selectors import config_get, llm_list, role_get, task_events, task_get, task_list
from orchestration.services import task_cancel, task_feedback, task_submit

# --- The schema's shared parts ------------------------------------------------------------------


class ErrorSerializer(serializers.Serializer):
    """The body of every error answer (orchestration/exceptions.py): `code` and `detail`, `field` when one
    field is at fault, and some errors add facts that help."""

    code = serializers.CharField(help_text="A short machine-readable word: `invalid`, `not_found`, `conflict`…")
    detail = serializers.CharField(help_text="What is wrong, in words.")
    field = serializers.CharField(required=False, help_text="The path of the field at fault (`payload.input`).")
    valid_profiles = serializers.ListField(
        child=serializers.CharField(), required=False, help_text="With an unknown profile or role."
    )
    valid_roles = serializers.ListField(
        child=serializers.CharField(), required=False, help_text="With an unknown role of a known profile."
    )
    task_id = serializers.UUIDField(required=False, help_text="The task concerned (`conflict`, `queue_unavailable`).")


def error(description: str) -> OpenApiResponse:
    """An error response of an operation: the ``Error`` body, with what the status means there."""
    return OpenApiResponse(ErrorSerializer, description=description)


# What each error status means wherever it can happen; an operation where it means more says so with error().
_ERRORS = {
    400: "`invalid`: the body, one of its fields or the task_id in the path is wrong; `field` names it.",
    401: "`not_authenticated` or `authentication_failed`: no token, or an unknown one.",
    403: "`permission_denied`: a request with an admin session but without its CSRF token.",
    404: "`not_found`: there is no such task.",
    412: "`precondition_failed`: the task is no longer at the version `If-Match` names; nothing changed.",
    413: "`too_large`: the body is over `API_MAX_BODY_BYTES` (1 MiB by default).",
    500: "`corrupt_state`: the task's state file is not a task packet; the detail says how to recover.",
    507: "`insufficient_storage`: the task state directory is full; nothing is stored.",
}


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """The error responses an operation can give, with their usual meaning: ``**errors(401, 404)``."""
    return {code: error(_ERRORS[code]) for code in statuses}


TASK_ID = OpenApiParameter(
    "task_id",
    OpenApiTypes.UUID,
    OpenApiParameter.PATH,
    description="The task's id: a UUID in its canonical 8-4-4-4-12 form (anything else is a 400).",
)


def _located_header(*statuses: int) -> OpenApiParameter:
    return OpenApiParameter(
        "Location",
        OpenApiTypes.URI,
        OpenApiParameter.HEADER,
        description="The task's URL: GET /api/v1/tasks/{task_id}.",
        response=list(statuses),
    )


ETAG = OpenApiParameter(
    "ETag",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description='The task\'s version as an entity tag (`"3"`): send it back in `If-Match` or `If-None-Match`.',
    response=[200, 202],
)
IF_MATCH = OpenApiParameter(
    "If-Match",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description='Optional: act only if the task is still at this version (its `ETag`, `"3"`; several may be listed, '
    "comma-separated); otherwise a 412 and nothing changes.",
)
IF_NONE_MATCH = OpenApiParameter(
    "If-None-Match",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description='Optional: the `ETag` of the version the client holds (`"3"`); a 304 without a body while the task '
    "is still at it.",
)
# RFC 9110: an entity tag, and a list of them (empty elements are ignored; an opaque tag may hold a comma).
_ENTITY_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"'
_ENTITY_TAGS = re.compile(rf"[ \t]*(?:,[ \t]*)*{_ENTITY_TAG}(?:[ \t]*,(?:[ \t]*,)*[ \t]*(?:{_ENTITY_TAG})?)*[ \t]*")
_TAG = re.compile(r'(W/)?"([^"]*)"')


def _versions(request: Request, header: str) -> frozenset[str] | None:
    """The opaque tags a conditional header names (the strong ones only for If-Match, where HTTP compares
    strongly), to compare with a task's version as text; None when it is absent or `*`; a 400 naming the
    header when it is not a list of entity tags."""
    raw = request.headers.get(header)
    if raw is None or raw.strip() == "*":
        return None
    if not _ENTITY_TAGS.fullmatch(raw):
        raise ApplicationError(
            f'{header}: must be entity tags such as "3" (a task\'s ETag), not {raw[:60]!r}', field=header
        )
    return frozenset(tag for weak, tag in _TAG.findall(raw) if not (weak and header == "If-Match"))


def _etag(packet: dict[str, Any]) -> str:
    return f'"{packet["version"]}"'


@extend_schema_field({"type": "object", "additionalProperties": {}})
class PayloadField(serializers.JSONField):
    """Any JSON on input (the role's agent validates it, with its own messages), documented as an object."""


class TextField(serializers.CharField):
    """A string field that takes strings only: DRF's CharField turns a number into its text, so that
    `{"feedback": 12345}` was taken as the feedback "12345"."""

    default_error_messages = {"invalid": "must be a string"}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


@extend_schema_field(OpenApiTypes.UUID)
class TaskIdField(TextField):
    """Text on input (the view checks the UUID form, with its own message), documented as a UUID. Not
    trimmed: " <uuid> " is not a task id, and a trimmed one would give one task two names."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)


_PAYLOAD_HELP = (
    "The role's input, a JSON object whose schema depends on the role's agent: GET /api/v1/config names "
    "each role's `agent`, and doc/agents.md gives each agent's payload. Every role whose work can start "
    'from text takes `{"input": "<text>"}`.'
)


@functools.cache  # called with declared fields only, which live as long as their serializer class
def _holds_fields(field: serializers.Field) -> bool:
    """Whether a declared field is a nested serializer or holds another field bound to it."""
    return isinstance(field, serializers.BaseSerializer) or any(
        isinstance(value, serializers.Field) for value in vars(field).values()
    )


class ClosedInputSerializer(serializers.Serializer):
    """A request body that refuses the fields it does not declare (400, `unknown field`); its schema says
    so with `additionalProperties: false` (ClosedInputSchema)."""

    # Fields that a subclass checks itself in to_internal_value, outside the schema.
    undeclared_fields: frozenset[str] = frozenset()

    def get_fields(self) -> dict[str, serializers.Field]:
        """Each instance's copies of the declared fields. DRF deep-copies them, which rebuilds every field
        from its arguments: a quarter of validating a submitted task. A plain field holds nothing that
        validation changes, so a shallow copy is enough (the instance binds its own copy, never the
        declared field); a nested serializer, or a field that holds another field bound to it (a list's
        or a dict's child, a relation's), is deep-copied as DRF does."""
        return {
            name: copy.deepcopy(field) if _holds_fields(field) else copy.copy(field)
            for name, field in self._declared_fields.items()
        }

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if isinstance(data, dict):
            unknown = sorted(data.keys() - set(self.fields) - self.undeclared_fields)
            if unknown:
                raise serializers.ValidationError({unknown[0]: ["unknown field"]})
        return super().to_internal_value(data)


class ClosedInputSchema(OpenApiSerializerExtension):
    """drf-spectacular: the schema of a ClosedInputSerializer admits no other property."""

    target_class = ClosedInputSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema, direction):
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        return {**schema, "additionalProperties": False}


class HistoryEventSerializer(serializers.Serializer):
    """One event of a task's history, which is append-only."""

    at = serializers.DateTimeField(help_text="When, in ISO 8601 UTC.")
    event = serializers.CharField(
        help_text="`submitted`, `claimed`, `step`, `check`, `verdict`, `feedback`, `delegated`, `finished`, "
        "`failed`, `cancelled`…: doc/api_endpoints.md lists every event with its detail."
    )
    agent = serializers.CharField(allow_null=True, help_text="The agent that did the step, if one did.")
    status = serializers.ChoiceField(choices=STATUSES, help_text="The task's status after the event.")
    llm = serializers.CharField(allow_null=True, help_text="The LLM that answered, for a step that asked one.")
    detail = serializers.DictField(help_text="The event's facts; which ones depends on the event.")


class TaskPacketSerializer(serializers.Serializer):
    """A task: one JSON document, the same in every answer and in its state file."""

    task_id = serializers.UUIDField()
    profile = serializers.CharField()
    role = serializers.CharField()
    status = serializers.ChoiceField(choices=STATUSES)
    payload = serializers.DictField(help_text=_PAYLOAD_HELP)
    result = serializers.DictField(allow_null=True, help_text="The role's output once there is one (doc/agents.md).")
    history = HistoryEventSerializer(many=True)
    iteration = serializers.IntegerField(min_value=0, help_text="The feedback loop's round; 0 outside the loop.")
    parent_id = serializers.UUIDField(allow_null=True, help_text="The planner task that delegated this one.")
    children = serializers.ListField(child=serializers.UUIDField(), help_text="The tasks this one delegated to.")
    version = serializers.IntegerField(min_value=1, help_text="1 on creation, +1 on every write.")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class LLMSerializer(serializers.Serializer):
    """A configured LLM, as in configuration.json. No secret: `api_key_env` only names a variable."""

    id = serializers.CharField()
    engine = serializers.CharField(help_text="`llama_cpp`, `ollama` or `openai`.")
    source = serializers.ChoiceField(choices=["local", "api"])
    model = serializers.CharField()
    toggle = serializers.BooleanField(help_text="Whether the LLM is enabled.")
    locked = serializers.BooleanField(help_text="Whether only the roles that prefer it may use it.")
    capabilities = serializers.ListField(child=serializers.CharField())
    context_length = serializers.IntegerField()
    max_concurrency = serializers.IntegerField()
    base_url = serializers.CharField(allow_null=True)
    api_key_env = serializers.CharField(allow_null=True, help_text="The environment variable holding the key.")
    cost_per_1k_tokens = serializers.DictField(child=serializers.FloatField())
    weight = serializers.FloatField()
    options = serializers.DictField(help_text="The engine's own options.")


class RoleSerializer(serializers.Serializer):
    """A role of a profile, as in configuration.json, with the Celery queue its tasks go to."""

    agent = serializers.CharField(help_text="The agent that does the role's work; it decides the payload's schema.")
    system_prompt = serializers.CharField()
    capabilities = serializers.ListField(child=serializers.CharField(), help_text="What the role needs of an LLM.")
    preferred_llms = serializers.ListField(child=serializers.CharField())
    max_tokens = serializers.IntegerField()
    temperature = serializers.FloatField()
    time_limit_s = serializers.FloatField()
    max_iterations = serializers.IntegerField(help_text="The feedback loop's bound.")
    queue = serializers.CharField(help_text="`<profile>.<role>`.")


class ProfileSerializer(serializers.Serializer):
    """A profile: its roles, keyed by name."""

    default_llms = serializers.ListField(child=serializers.CharField())
    daily_budget = serializers.FloatField(
        allow_null=True, help_text="What api LLMs may spend per UTC day; null: no limit."
    )
    roles = serializers.DictField(child=RoleSerializer())


class LLMHealthSerializer(serializers.Serializer):
    """The engine's cheap check, reused for 10 seconds."""

    ok = serializers.BooleanField()
    detail = serializers.CharField()
    latency_ms = serializers.FloatField()
    checked_at = serializers.DateTimeField()


class LLMStateSerializer(serializers.Serializer):
    """The load balancer's state of an LLM, shared by every process (balancer/load_balancer_rules.md)."""

    breaker = serializers.ChoiceField(
        choices=["closed", "open", "half_open"], help_text="`half_open`: the next call is a probe."
    )
    cooling_until = serializers.DateTimeField(allow_null=True, help_text="Until when an open breaker cools down.")
    trips = serializers.IntegerField()
    in_flight = serializers.IntegerField(help_text="Slots in use.")
    max_concurrency = serializers.IntegerField()
    ttft_ms = serializers.FloatField(allow_null=True, help_text="Rolling average time to first token.")
    ms_per_token = serializers.FloatField(allow_null=True, help_text="Rolling average per output token.")
    samples = serializers.IntegerField(help_text="The calls the averages are over.")
    failure_rate = serializers.FloatField()


class LLMStatusSerializer(LLMSerializer):
    """A configured LLM with its health and its load balancer state."""

    health = LLMHealthSerializer()
    state = LLMStateSerializer()


_ID_MARKER = "00000000-0000-0000-0000-000000000000"


@functools.lru_cache(maxsize=16)
def _task_path_prefix(script_prefix: str) -> str:
    """The path of a task's URL without its id, under ``script_prefix`` (which reverse() reads itself; it is
    the key of the cache). A task id is a canonical UUID, which a URL takes as it is, so a task's path is
    this prefix and its id: reverse() for every answer took 0.1 M instructions of a submission's 8.4 M."""
    path = reverse("task-detail", args=[_ID_MARKER])
    if not path.endswith(_ID_MARKER):
        raise ImproperlyConfigured(f"the task-detail URL must end with the task id: {path}")
    return path.removesuffix(_ID_MARKER)


def _located(request: Request, packet: dict[str, Any], status_code: int) -> Response:
    location = request.build_absolute_uri(_task_path_prefix(get_script_prefix()) + packet["task_id"])
    return Response(packet, status=status_code, headers={"Location": location, "ETag": _etag(packet)})


_PLAIN_FIELDS = frozenset({"payload", "task_id"})


class TaskSubmitApi(APIView):
    """POST /api/v1/{profile}/{role}: submit a task packet."""

    @extend_schema_serializer(component_name="TaskSubmit")
    class InputSerializer(ClosedInputSerializer):
        """A new task. The fields the server owns (`status`, `result`, `history`, `version`, `iteration`,
        `parent_id`, `children`) may be sent only with their initial values: `"queued"`, `null`, `[]`,
        `0`, `0`, `null`, `[]`."""

        # Refused in to_internal_value, outside the schema: the fields the server sets, whatever their value.
        server_set_fields = ("created_at", "updated_at")
        undeclared_fields = frozenset(SERVER_OWNED_INITIAL) | frozenset(server_set_fields)

        task_id = TaskIdField(
            required=False,
            max_length=64,
            help_text="Optional: the client's own id, for idempotent retries (the same payload gives the "
            "stored task back, another payload a 409).",
        )
        profile = TextField(required=False, trim_whitespace=False, help_text="Optional; must be the URL's.")
        role = TextField(required=False, trim_whitespace=False, help_text="Optional; must be the URL's.")
        payload = PayloadField(help_text=_PAYLOAD_HELP)

        def to_internal_value(self, data: Any) -> dict[str, Any]:
            if isinstance(data, dict):
                for field in self.server_set_fields:
                    if field in data:
                        raise serializers.ValidationError({field: ["is set by the server"]})
                for field, initial in SERVER_OWNED_INITIAL.items():
                    # Compared as JSON, so that false is not taken for 0.
                    if field in data and json.dumps(data[field]) != json.dumps(initial):
                        raise serializers.ValidationError(
                            {field: [f"is set by the server; a new task may only send {initial!r}"]}
                        )
            return super().to_internal_value(data)

        @staticmethod
        def plain(data: Any) -> dict[str, Any] | None:
            """The validated data of the usual body, a ``payload`` object and perhaps a canonical ``task_id``,
            which this serializer gives back as it is; None for any other body, which the serializer
            validates, with its messages. Building the serializer took 0.45 M instructions of a
            submission's 8.3 M (tests/orchestration/test_submit_api.py checks that the two agree)."""
            if type(data) is not dict or type(data.get("payload")) is not dict or not data.keys() <= _PLAIN_FIELDS:
                return None
            if "task_id" not in data:
                return {"payload": data["payload"]}
            if type(data["task_id"]) is not str:
                return None
            try:
                return {"payload": data["payload"], "task_id": parse_task_id(data["task_id"])}
            except ValueError:
                return None

        def validate_task_id(self, value: str) -> str:
            try:
                return parse_task_id(value)
            except ValueError as exc:
                raise serializers.ValidationError(str(exc)) from None

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            for field in ("profile", "role"):
                if field in attrs and attrs[field] != self.context[field]:
                    raise serializers.ValidationError({field: [f"must match the URL ({self.context[field]!r})"]})
            return attrs

    @extend_schema(
        operation_id="task_submit",
        summary="Submit a task to a role",
        description="Validates the packet, stores it as `queued` and queues it on the role's queue. The "
        "payload's schema depends on the role: see GET /api/v1/config for each role's agent.",
        tags=["tasks"],
        parameters=[
            OpenApiParameter(
                "profile",
                str,
                OpenApiParameter.PATH,
                description="A profile of the configuration (GET /api/v1/config), e.g. `developer`.",
            ),
            OpenApiParameter(
                "role", str, OpenApiParameter.PATH, description="One of the profile's roles, e.g. `planner`."
            ),
            _located_header(200, 202),
            ETAG,
        ],
        request=InputSerializer,
        responses={
            202: OpenApiResponse(TaskPacketSerializer, description="Stored as `queued`, and put on the role's queue."),
            200: OpenApiResponse(
                TaskPacketSerializer,
                description="The same `task_id` was submitted before with the same profile, role and payload: "
                "the stored task as it is now (an idempotent retry).",
            ),
            **errors(400, 401, 403),
            404: error("`not_found`: an unknown profile or role, whatever the body; the body lists the valid ones."),
            409: error("`conflict`: the `task_id` is taken by a task with another profile, role or payload."),
            **errors(413),
            422: error("`no_llm`: no enabled LLM can serve the role; the detail gives each LLM's reason."),
            **errors(500),
            503: error(
                "`queue_unavailable`: the task is stored as queued but Redis did not take the job; submit it again "
                "with the same `task_id`. Or `storage_unavailable`: the task state directory cannot be "
                "written; nothing is stored."
            ),
            **errors(507),
        },
        examples=[
            OpenApiExample(
                "A planner task",
                value={"payload": {"input": "Plan a release of version 2.0"}},
                request_only=True,
            )
        ],
    )
    def post(self, request: Request, profile: str, role: str) -> Response:
        # An unknown profile or role is a 404 whatever the body, one that does not parse included: looked
        # up before request.data parses it.
        role_get(profile=profile, role=role)
        packet, created = self._accept_for_role(request.data, profile=profile, role=role)
        return _located(request, packet, status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK)

    @classmethod
    def accept(cls, data: Any, *, profile: str, role: str) -> tuple[dict[str, Any], bool]:
        """Validate a packet and submit it; the inbound MCP channel comes through here too."""
        role_get(profile=profile, role=role)  # an unknown profile or role is a 404 whatever the body
        return cls._accept_for_role(data, profile=profile, role=role)

    @classmethod
    def _accept_for_role(cls, data: Any, *, profile: str, role: str) -> tuple[dict[str, Any], bool]:
        validated = cls.InputSerializer.plain(data)
        if validated is None:
            serializer = cls.InputSerializer(data=data, context={"profile": profile, "role": role})
            serializer.is_valid(raise_exception=True)
            validated = serializer.validated_data
        return task_submit(profile=profile, role=role, payload=validated["payload"], task_id=validated.get("task_id"))


class TaskDetailApi(APIView):
    """GET /api/v1/tasks/{task_id}: the whole packet, from its state file."""

    @extend_schema(
        operation_id="task_get",
        summary="Get a task",
        description="The whole task packet, read from its state file (always current), with its version as its "
        "`ETag`: a client that polls sends it back in `If-None-Match` and gets a 304 until the task changes.",
        tags=["tasks"],
        parameters=[TASK_ID, IF_NONE_MATCH, ETAG],
        responses={
            200: OpenApiResponse(TaskPacketSerializer, description="The task."),
            304: OpenApiResponse(description="The task is still at the version `If-None-Match` names; no body."),
            **errors(400, 401, 404, 500),
        },
    )
    def get(self, request: Request, task_id: str) -> Response:
        held = _versions(request, "If-None-Match")
        packet = task_get(task_id=task_id)
        if "If-None-Match" in request.headers and (held is None or str(packet["version"]) in held):  # None: "*"
            return Response(status=status.HTTP_304_NOT_MODIFIED, headers={"ETag": _etag(packet)})
        return Response(packet, headers={"ETag": _etag(packet)})


class TaskCancelApi(APIView):
    """POST /api/v1/tasks/{task_id}/cancel."""

    @extend_schema(
        operation_id="task_cancel",
        summary="Cancel a task",
        description="Cancels a task that has not finished, and its unfinished children. Its queued jobs are "
        "revoked; a running step's answer is discarded. No body.",
        tags=["tasks"],
        parameters=[TASK_ID, IF_MATCH, _located_header(200), ETAG],
        request=None,
        responses={
            200: OpenApiResponse(TaskPacketSerializer, description="The task, now cancelled."),
            **errors(400, 401, 403, 404),
            409: error("`finished`: the task has already finished."),
            **errors(412, 413, 500),
            503: error("`storage_unavailable`: the task state directory cannot be written; nothing changed."),
            **errors(507),
        },
    )
    def post(self, request: Request, task_id: str) -> Response:
        return _located(
            request, task_cancel(task_id=task_id, versions=_versions(request, "If-Match")), status.HTTP_200_OK
        )


class TaskFeedbackApi(APIView):
    """POST /api/v1/tasks/{task_id}/feedback: feedback on a coder task that awaits it or has finished."""

    @extend_schema_serializer(component_name="TaskFeedback")
    class InputSerializer(ClosedInputSerializer):
        """Feedback from a person or an outside agent on a task of a coder role."""

        feedback = TextField(max_length=20_000, trim_whitespace=True)
        route = serializers.ChoiceField(
            choices=["debug", "coder"],
            default="debug",
            help_text="`debug`: Debug diagnoses with the feedback, then the coder fixes; `coder`: the coder gets "
            "the feedback directly.",
        )
        tests = TextField(
            required=False, max_length=200_000, trim_whitespace=False, help_text="Test code that replaces the tests."
        )

    @extend_schema(
        operation_id="task_feedback",
        summary="Give feedback to a coder task",
        description="For a task of a coder role (the feedback loop) that is `awaiting_feedback`, `succeeded` or "
        "`failed`: the task goes back to `running` at the next iteration and the loop carries on.",
        tags=["tasks"],
        parameters=[TASK_ID, IF_MATCH, _located_header(202), ETAG],
        request=InputSerializer,
        responses={
            202: OpenApiResponse(TaskPacketSerializer, description="The task, running the next iteration."),
            **errors(400, 401, 403),
            404: error("`not_found`: there is no such task, or its profile or role is no longer configured."),
            409: error(
                "`no_feedback_loop`: the task's role is not a coder role; `not_awaiting_feedback`: the task is "
                "queued, running or cancelled; `plan_running`: the task is a finished step of a plan that still runs."
            ),
            **errors(412, 413, 500),
            503: error(
                "`queue_unavailable`: Redis did not take the round; the task is as it was, post the feedback "
                "again. Or `storage_unavailable`: the task state directory cannot be written."
            ),
            **errors(507),
        },
    )
    def post(self, request: Request, task_id: str) -> Response:
        accepted = self.accept(request.data, task_id=task_id, versions=_versions(request, "If-Match"))
        return _located(request, accepted, status.HTTP_202_ACCEPTED)

    @classmethod
    def accept(
        cls, data: Any, *, task_id: str, message_id: str | None = None, versions: frozenset[str] | None = None
    ) -> dict[str, Any]:
        """Validate feedback and give it to the task; the MCP feedback channel comes through here too."""
        serializer = cls.InputSerializer(data=data)
        serializer.is_valid(raise_exception=True)
        return task_feedback(task_id=task_id, message_id=message_id, versions=versions, **serializer.validated_data)


class TaskPaginator(Paginator):
    """Finds a page's ids in the index that serves its filter and order (the ids and the order are
    all in it), then reads those rows by primary key alone. With OFFSET on the rows themselves, a
    deep page read every row before it: page 1,000 of 50 took 30 ms on PostgreSQL with 100,000 tasks,
    4 ms this way. The filter is not repeated on the rows: with it, SQLite read every matching task
    through the filter's index to pick out the page's (8 ms for 30,000 tasks)."""

    def page(self, number: Any) -> Page:
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        top = bottom + self.per_page
        if top + self.orphans >= self.count:
            top = self.count
        ids = list(self.object_list.values_list("pk", flat=True)[bottom:top])
        rows = self.object_list.model._default_manager.filter(pk__in=ids).order_by()
        rows.query.deferred_loading = self.object_list.query.deferred_loading  # the same columns
        by_id = {row.pk: row for row in rows}
        # A task whose row was removed meanwhile (sync_tasks drops orphans) is left out.
        return self._get_page([by_id[pk] for pk in ids if pk in by_id], number, self)


class TaskPagination(PageNumberPagination):
    """The page and its size as the view validated them, rather than read again from the query."""

    django_paginator_class = TaskPaginator
    max_page_size = 500

    def __init__(self, *, page: int = 1, page_size: int | None = None) -> None:
        self.number = page
        self.size = page_size

    def get_page_number(self, request: Request, paginator: Paginator) -> int:
        return self.number

    def get_page_size(self, request: Request) -> int:
        return self.page_size if self.size is None else min(self.size, self.max_page_size)


class QueryParameter(serializers.CharField):
    """A query parameter that may be left out, and is refused when sent empty (`?status=`): DRF takes the
    empty value of a query (as of a form) for a parameter not sent, and an empty filter listed every task."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(required=False, **kwargs)

    def get_value(self, dictionary: Any) -> Any:
        return dictionary.get(self.field_name, serializers.empty)  # of a query, its last value, as DRF's


class FilterField(QueryParameter):
    default_error_messages = {"blank": "must not be empty: leave the parameter out to list every task"}


# A page number or size of more digits than this one is taken as this one: past any page, and over the
# largest page size (Python's int() refuses a number of over 4,300 digits).
PAGE_NUMBER_MAX = 10**18


class PageNumberField(QueryParameter):
    """`page` or `page_size`: a whole number from 1, in digits, else a 400 naming it. DRF's IntegerField took
    "1.0" (and "" for not sent), which the paginator, reading the query itself, then answered with a 404
    (`page`) or ignored (`page_size`): the paginator is handed the number validated here."""

    default_error_messages = {
        "invalid": "must be a whole number from 1, in digits",
        "blank": "must be a whole number from 1, in digits",
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(trim_whitespace=False, **kwargs)

    def run_validation(self, data: Any = serializers.empty) -> Any:
        value = super().run_validation(data)
        if not re.fullmatch(r"[1-9][0-9]*", value):
            self.fail("invalid")
        return int(value) if len(value) < len(str(PAGE_NUMBER_MAX)) else PAGE_NUMBER_MAX


class TaskListApi(APIView):
    """GET /api/v1/tasks/: summaries from the database mirror, filtered and paginated."""

    class FilterSerializer(ClosedInputSerializer):
        """The query: a parameter it does not know (a misspelled filter, which would list every task) is a
        400 naming it, as is an empty filter, or a page or page size that is not a whole number from 1."""

        status = FilterField()
        profile = FilterField(max_length=64, help_text="Only the tasks of this profile.")
        role = FilterField(max_length=64, help_text="Only the tasks of this role.")
        page = PageNumberField()
        page_size = PageNumberField()

    @extend_schema_serializer(component_name="TaskSummary")
    class OutputSerializer(serializers.ModelSerializer):
        """A task's summary, from the database mirror; GET /api/v1/tasks/{task_id} has the whole packet."""

        class Meta:
            model = Task
            fields = [
                "task_id",
                "profile",
                "role",
                "status",
                "version",
                "iteration",
                "parent_id",
                "created_at",
                "updated_at",
            ]

    @extend_schema(
        operation_id="task_list",
        summary="List tasks",
        description="Task summaries from the database mirror, newest first, filtered by exact matches and paginated.",
        tags=["tasks"],
        parameters=[
            FilterSerializer,
            # The filter takes any text (an unknown status is a 400 from the selector); the schema lists the valid ones.
            OpenApiParameter("status", str, enum=STATUSES, description="Only the tasks with this status."),
            OpenApiParameter("page", int, description="The page, from 1; a page after the last is a 404."),
            OpenApiParameter(
                "page_size",
                int,
                description=f"Tasks per page: `API_PAGE_SIZE` (50) by default, at most {TaskPagination.max_page_size}.",
            ),
        ],
        responses={
            200: OpenApiResponse(
                inline_serializer(
                    "TaskPage",
                    {
                        "count": serializers.IntegerField(help_text="How many tasks match, over all the pages."),
                        "next": serializers.URLField(allow_null=True),
                        "previous": serializers.URLField(allow_null=True),
                        "results": OutputSerializer(many=True),
                    },
                ),
                description="One page of task summaries.",
            ),
            400: error(
                "`invalid`: an unknown status, an empty filter, a query parameter the list does not take (`unknown "
                "field`), or a page or page size that is not a whole number from 1; `field` names the parameter."
            ),
            **errors(401),
            404: error("`not_found`: the page is after the last one."),
        },
    )
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        selection = dict(filters.validated_data)
        paginator = TaskPagination(page=selection.pop("page", 1), page_size=selection.pop("page_size", None))
        page = paginator.paginate_queryset(task_list(**selection), request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


@extend_schema(exclude=True)
class TaskListNoSlashApi(TaskListApi):
    """GET /api/v1/tasks: the same list, served rather than redirected to the path with the slash (which
    the schema lists)."""


class ApiRootApi(APIView):
    """GET /api/v1/: where the API's endpoints are, as absolute URLs (`make run` prints this address)."""

    @extend_schema_serializer(component_name="ApiRoot")
    class OutputSerializer(serializers.Serializer):
        """The API's endpoints; `submit` is a template with the profile and the role to fill in."""

        submit = serializers.CharField(help_text="POST a task: `…/api/v1/{profile}/{role}`.")
        tasks = serializers.URLField(help_text="GET the tasks, filtered and paged.")
        task = serializers.CharField(
            help_text="GET a task: `…/api/v1/tasks/{task_id}`, with `/cancel`, `/feedback`, `/events`."
        )
        config = serializers.URLField(help_text="GET the configuration in force: the profiles and their roles.")
        llms = serializers.URLField(help_text="GET the LLMs with their health.")
        metrics = serializers.URLField(help_text="GET the counts, queues and engine figures.")
        schema = serializers.URLField(help_text="GET the OpenAPI schema.")
        docs = serializers.URLField(help_text="The schema in Swagger UI.")

    @extend_schema(
        operation_id="api_root",
        summary="The API's endpoints",
        tags=["configuration"],
        responses={200: OpenApiResponse(OutputSerializer, description="The endpoints."), **errors(401)},
    )
    def get(self, request: Request) -> Response:
        url = request.build_absolute_uri
        return Response(
            {
                "submit": url(reverse("task-submit", args=["PROFILE", "ROLE"])).replace(
                    "PROFILE/ROLE", "{profile}/{role}"
                ),
                "tasks": url(reverse("task-list")),
                "task": url(reverse("task-detail", args=["TASK_ID"])).replace("TASK_ID", "{task_id}"),
                "config": url(reverse("config")),
                "llms": url(reverse("llm-list")),
                "metrics": url(reverse("metrics")),
                "schema": url(reverse("schema")),
                "docs": url(reverse("docs")),
            }
        )


class ConfigApi(APIView):
    """GET /api/v1/config: the configuration in force (it holds no secrets)."""

    @extend_schema_serializer(component_name="Configuration")
    class OutputSerializer(serializers.Serializer):
        """The configuration in force in the answering process, in the shape of configuration.json."""

        llms = LLMSerializer(many=True)
        profiles = serializers.DictField(child=ProfileSerializer(), help_text="The profiles, keyed by name.")
        error = serializers.CharField(
            allow_null=True,
            help_text="Why the file on disk is not the configuration in force (a broken edit), or null.",
        )

    @extend_schema(
        operation_id="config_get",
        summary="The configuration in force",
        description="The LLMs, profiles and roles in force, each role with its agent (which decides the "
        "payload's schema) and its queue. It holds no secret.",
        tags=["configuration"],
        responses={200: OpenApiResponse(OutputSerializer, description="The configuration."), **errors(401)},
    )
    def get(self, request: Request) -> Response:
        return Response(config_get())


class LLMListApi(APIView):
    """GET /api/v1/llms: every configured LLM with its health."""

    @extend_schema_serializer(component_name="LLMList")
    class OutputSerializer(serializers.Serializer):
        results = LLMStatusSerializer(many=True)

    @extend_schema(
        operation_id="llm_list",
        summary="The LLMs with their health",
        description="Every configured LLM, enabled or not, with its health and its load balancer state.",
        tags=["configuration"],
        responses={200: OpenApiResponse(OutputSerializer, description="Every LLM."), **errors(401)},
    )
    def get(self, request: Request) -> Response:
        return Response({"results": llm_list()})


class HealthzApi(APIView):
    """GET /healthz: whether this process reaches its database and Redis. No token needed."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema_serializer(component_name="Health")
    class OutputSerializer(serializers.Serializer):
        status = serializers.ChoiceField(choices=["ok", "unavailable"])
        database = serializers.CharField(help_text="`ok`, or `error: <kind>`.")
        redis = serializers.CharField(help_text="`ok`, or `error: <kind>`.")

    @extend_schema(
        operation_id="healthz",
        summary="Health check",
        description="Whether this process reaches its database and Redis. No token needed.",
        tags=["health"],
        responses={
            200: OpenApiResponse(OutputSerializer, description="Both reached."),
            503: OpenApiResponse(
                OutputSerializer, description="`status` is `unavailable`; the failing check says why."
            ),
        },
    )
    def get(self, request: Request) -> Response:
        checks = {"database": _check_database(), "redis": _check_redis()}
        healthy = all(value == "ok" for value in checks.values())
        return Response(
            {"status": "ok" if healthy else "unavailable", **checks},
            status=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE,
        )


class ServerSentEventSerializer(serializers.Serializer):
    """One event of a task's event stream, as an EventSource reads it. For `text/event-stream` the schema
    describes each event, as OpenAPI 3.2 (`itemSchema`) and tools such as schemathesis read it."""

    event = serializers.ChoiceField(
        choices=["message", "end"],
        help_text="`message` (sent without an `event:` line): a history event; `end`: the task has finished, "
        "and the stream closes.",
    )
    id = serializers.CharField(
        required=False,
        validators=[RegexValidator(r"^[0-9]+$")],
        help_text="The history event's position in the history, from 1: a reconnecting client sends the last "
        "one as `Last-Event-ID`.",
    )
    data = serializers.CharField(
        help_text="JSON. With `message`, the history event (the `HistoryEvent` component); with `end`, "
        '`{"task_id": ..., "status": ...}`, the task\'s final status.'
    )


class TaskEventsApi(APIView):
    """GET /api/v1/tasks/{task_id}/events: the task's history as Server-Sent Events, live."""

    # Streamed as text/event-stream whatever the Accept header; errors (before the stream) are JSON.
    def perform_content_negotiation(self, request: Request, force: bool = False):
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        operation_id="task_events",
        summary="Follow a task's events (Server-Sent Events)",
        description="Streams the task's history events, then each new one as it is recorded. Each event's `id` "
        "is its position in the history (from 1) and its `data` the history event (JSON). The stream ends with "
        "an `end` event (`data`: the task's id and final status) once the task has finished. A reconnecting "
        "client sends `Last-Event-ID` (EventSource does) and gets only the later events. A comment is sent "
        "every 15 s while nothing happens; a connection is closed after 5 minutes without an `end`, and the "
        "client resumes with `Last-Event-ID`.",
        tags=["tasks"],
        parameters=[
            TASK_ID,
            OpenApiParameter(
                "Last-Event-ID",
                int,
                OpenApiParameter.HEADER,
                description="Replay from after this event (its `id`); 0 or absent: from the first.",
            ),
            OpenApiParameter(
                "last_event_id", int, description="The same as the header, for clients that cannot set headers."
            ),
        ],
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                ServerSentEventSerializer,
                description='Each event: `id: 3`, `data: {"at": ..., "event": "step", ...}`; at the end '
                '`event: end`, `data: {"task_id": ..., "status": "succeeded"}`.',
            ),
            204: OpenApiResponse(
                description="The task has finished and `Last-Event-ID` is its last event: nothing more will "
                "come (EventSource stops reconnecting)."
            ),
            400: error(
                "`invalid`: the task_id is not a UUID, `Last-Event-ID` is not an event of the task, or a query "
                "parameter other than `last_event_id` is sent."
            ),
            **errors(401, 404, 500),
            503: error(
                "`too_many_streams`: this web process already streams `EVENTS_MAX_STREAMS` tasks; `Retry-After` "
                "says when to try again."
            ),
        },
    )
    def get(self, request: Request, task_id: str) -> HttpResponse:
        events = task_events(task_id=task_id, after=_last_event_id(request))
        if events is None:
            # Finished and every event seen: 204 tells EventSource not to reconnect.
            return HttpResponse(status=status.HTTP_204_NO_CONTENT)
        if not _STREAMS.acquire(blocking=False):
            return Response(
                {
                    "code": "too_many_streams",
                    "detail": f"this server process already streams {settings.EVENTS_MAX_STREAMS} tasks' events "
                    "(EVENTS_MAX_STREAMS); try again shortly, or read GET /api/v1/tasks/{task_id}",
                },
                status=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "5"},
            )
        response = StreamingHttpResponse(_EventStream(events), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response


# Each open stream holds a web thread: a process streams at most this many at once, so that the
# other requests always find a thread.
_STREAMS = threading.BoundedSemaphore(settings.EVENTS_MAX_STREAMS)


class _EventStream:
    """The response's body: the events as Server-Sent Events. Django closes it when the response
    ends (the client went away, or the stream did), which gives the stream's slot back."""

    def __init__(self, events: Iterator[tuple[str, int, dict[str, Any]]]) -> None:
        self._lines = _server_sent(events)
        self._open = True

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._lines)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._lines.close()
            _STREAMS.release()


def _last_event_id(request: Request) -> int:
    # A misspelt last_event_id would replay every event, as an unknown filter listed every task.
    unknown = sorted(set(request.query_params) - {"last_event_id"})
    if unknown:
        raise ApplicationError(f"{unknown[0]}: unknown field", field=unknown[0])
    raw = request.headers.get("Last-Event-ID", request.query_params.get("last_event_id", "0")).strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise ApplicationError(
            f"Last-Event-ID: must be an event's id (a whole number), not {raw[:40]!r}", field="Last-Event-ID"
        )
    return int(raw)


def _server_sent(events) -> Iterator[str]:
    yield "retry: 3000\n\n"
    for kind, number, data in events:
        if kind == "event":
            yield f"id: {number}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
        elif kind == "keepalive":
            yield ": keepalive\n\n"
        else:
            yield f"event: end\ndata: {json.dumps({'task_id': data['task_id'], 'status': data['status']})}\n\n"


class PercentilesSerializer(serializers.Serializer):
    p50 = serializers.FloatField(allow_null=True)
    p95 = serializers.FloatField(allow_null=True)
    mean = serializers.FloatField(allow_null=True)


class CallFiguresSerializer(serializers.Serializer):
    """Engine calls counted over a period. Percentiles are estimated from histogram buckets (each √2 wide)."""

    requests = serializers.IntegerField()
    errors = serializers.IntegerField(help_text="Calls that neither succeeded nor were cancelled.")
    error_rate = serializers.FloatField(allow_null=True, help_text="errors / requests; null without requests.")
    outcomes = serializers.DictField(
        child=serializers.IntegerField(),
        help_text="Calls by outcome: `ok`, `unavailable`, `timeout`, `rate_limited`, `bad_request`, `auth`, "
        "`configuration`, `error`, `cancelled` (stopped by their caller: a client that left its stream, a step "
        "out of time, a worker stopping).",
    )
    latency_ms = PercentilesSerializer(help_text="Of the successful calls, from request to last token.")
    time_to_first_token_ms = PercentilesSerializer()
    tokens_per_second = serializers.FloatField(
        allow_null=True, help_text="Completion tokens per second of successful call time."
    )
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    estimated_cost = serializers.FloatField(help_text="From the LLM's `cost_per_1k_tokens`; 0 for local LLMs.")


class CallWindowsSerializer(serializers.Serializer):
    last_5_minutes = CallFiguresSerializer()
    since_start = CallFiguresSerializer(help_text="Since the first call counted (`performance.since`).")


class ReachSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok", "unavailable"])
    latency_ms = serializers.FloatField(required=False)
    error = serializers.CharField(required=False)


class MetricsStatusSerializer(serializers.Serializer):
    web = inline_serializer(
        "WebStatus",
        {"status": serializers.CharField(), "host": serializers.CharField(), "pid": serializers.IntegerField()},
    )
    redis = ReachSerializer()
    database = inline_serializer(
        "DatabaseStatus",
        {
            "status": serializers.ChoiceField(choices=["ok", "unavailable"]),
            "latency_ms": serializers.FloatField(required=False),
            "error": serializers.CharField(required=False),
            "vendor": serializers.CharField(help_text="`sqlite`, `postgresql`…"),
        },
    )
    workers = inline_serializer(
        "WorkerStatus",
        {
            "name": serializers.CharField(),
            "queues": serializers.ListField(child=serializers.CharField()),
            "concurrency": serializers.IntegerField(allow_null=True),
            "pid": serializers.IntegerField(),
            "seen_at": serializers.DateTimeField(help_text="Its last heartbeat (every 10 s)."),
        },
        many=True,
    )
    queues = serializers.DictField(
        child=inline_serializer(
            "QueueStatus",
            {
                "depth": serializers.IntegerField(help_text="Jobs waiting."),
                "workers": serializers.ListField(child=serializers.CharField(), help_text="Workers consuming it."),
            },
        ),
        help_text="Each role's queue, `<profile>.<role>`.",
    )
    llms = serializers.DictField(
        child=inline_serializer(
            "LLMStatusBrief",
            {
                "toggle": serializers.BooleanField(),
                "healthy": serializers.BooleanField(),
                "health_detail": serializers.CharField(),
                "breaker": serializers.ChoiceField(choices=["closed", "open", "half_open"]),
                "cooling_until": serializers.DateTimeField(allow_null=True),
                "in_flight": serializers.IntegerField(),
                "max_concurrency": serializers.IntegerField(),
            },
        ),
    )
    channels = serializers.DictField(
        child=inline_serializer(
            "ChannelStatus",
            {
                "length": serializers.IntegerField(),
                "consumers": serializers.IntegerField(help_text="Of the server's consumer group."),
                "pending": serializers.IntegerField(help_text="Read and not yet acknowledged."),
                "lag": serializers.IntegerField(allow_null=True, help_text="Not yet read by the group."),
            },
        ),
        help_text="The MCP channels (Redis Streams).",
    )


class MetricsUsageSerializer(serializers.Serializer):
    tasks = inline_serializer(
        "TaskCounts",
        {
            "total": serializers.IntegerField(),
            "by_status": serializers.DictField(child=serializers.IntegerField()),
            "by_profile": serializers.DictField(child=serializers.IntegerField()),
            "by_role": serializers.DictField(
                child=serializers.DictField(child=serializers.IntegerField()),
                help_text="`<profile>/<role>`: tasks by status.",
            ),
            "finished_last_5_minutes": serializers.DictField(
                child=serializers.IntegerField(), help_text="Tasks that finished in the last 5 minutes, by status."
            ),
        },
        allow_null=True,
        help_text="From the database mirror; null when the database does not answer.",
    )
    llms = serializers.DictField(
        child=inline_serializer(
            "LLMUsage",
            {
                "requests": serializers.IntegerField(),
                "prompt_tokens": serializers.IntegerField(),
                "completion_tokens": serializers.IntegerField(),
            },
        ),
        help_text="Since the first call counted.",
    )
    loop_iterations = inline_serializer(
        "LoopIterations",
        {
            "total": serializers.IntegerField(help_text="Rounds over the stored tasks."),
            "tasks": serializers.IntegerField(help_text="Tasks that ran a round."),
            "mean_per_task": serializers.FloatField(allow_null=True),
            "by_role": serializers.DictField(
                child=inline_serializer(
                    "RoleIterations", {"tasks": serializers.IntegerField(), "iterations": serializers.IntegerField()}
                )
            ),
        },
        allow_null=True,
        help_text="From the database mirror; null when the database does not answer.",
    )
    estimated_cost = inline_serializer(
        "EstimatedCost",
        {"total": serializers.FloatField(), "by_llm": serializers.DictField(child=serializers.FloatField())},
        help_text="Of the `api` LLMs, since the first call counted.",
    )


class MetricsApi(APIView):
    """GET /api/v1/metrics: status, performance and usage at once."""

    @extend_schema_serializer(component_name="Metrics")
    class OutputSerializer(serializers.Serializer):
        generated_at = serializers.DateTimeField()
        status = MetricsStatusSerializer()
        performance = inline_serializer(
            "Performance",
            {
                "window_seconds": serializers.IntegerField(),
                "since": serializers.DateTimeField(allow_null=True, help_text="When counting started."),
                "llms": serializers.DictField(child=CallWindowsSerializer()),
                "roles": serializers.DictField(child=CallWindowsSerializer(), help_text="`<profile>/<role>`."),
            },
        )
        usage = MetricsUsageSerializer()

    @extend_schema(
        operation_id="metrics_get",
        summary="Metrics: status, performance, usage",
        description="The server at a glance: whether its parts answer, its workers and queues, each LLM's "
        "health; latency, time to first token, speed and errors per LLM and per role (last 5 minutes and since "
        "the start); tasks, tokens, loop rounds and estimated cost. Engine calls are counted by "
        "`manage.py mcp_consume` from the metrics channel. doc/api_endpoints.md explains each figure.",
        tags=["metrics"],
        responses={200: OpenApiResponse(OutputSerializer, description="The metrics."), **errors(401)},
    )
    def get(self, request: Request) -> Response:
        return Response(metrics_get())


class PrometheusMetricsApi(APIView):
    """GET /metrics: the same counters in Prometheus' text format."""

    def perform_content_negotiation(self, request: Request, force: bool = False):
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        operation_id="metrics_prometheus",
        summary="Metrics in Prometheus' format",
        description="The counters of GET /api/v1/metrics as Prometheus text (names start with `aiagent_`), the "
        "same from every process. Scrape it with `authorization: {type: Token, credentials: <key>}`.",
        tags=["metrics"],
        responses={
            (200, "text/plain; version=0.0.4"): OpenApiResponse(OpenApiTypes.STR, description="The metrics."),
            **errors(401),
        },
    )
    def get(self, request: Request) -> HttpResponse:
        return HttpResponse(prometheus_text(), content_type=CONTENT_TYPE_LATEST)


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's 404 handler: JSON under /api/, the usual page elsewhere."""
    if request.path_info.startswith("/api/"):  # under any script prefix
        return unknown_endpoint(request)
    return page_not_found(request, exception)


@csrf_exempt  # as the API's views are: a POST with a token but no CSRF cookie got Django's HTML 403
def unknown_endpoint(request: HttpRequest, *_args: Any, **_kwargs: Any) -> HttpResponse:
    """Any other path under /api/ (the last URL pattern there): the JSON 404, with DEBUG on too (Django's
    page for it is HTML), and never a redirect to the path with a slash appended, which Django answers
    a POST with a 500 under DEBUG and a 301 otherwise (a client follows it as a GET)."""
    return JsonResponse({"code": "not_found", "detail": f"no such endpoint: {request.path}"}, status=404)


def internal_error(request: HttpRequest) -> HttpResponse:
    """Django's 500 handler (an exception no handler of the API turned into an answer): the API's error
    body under /api/, Django's page elsewhere (the admin). Not used with DEBUG on, which shows the traceback."""
    if request.path_info.startswith("/api/"):  # under any script prefix
        detail = "the server failed to answer the request; its log has the error"
        return JsonResponse({"code": "server_error", "detail": detail}, status=500)
    return server_error(request)


def _check_database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # any driver error means "not reachable" here
        return f"error: {type(exc).__name__}"
    return "ok"


def _check_redis() -> str:
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"error: {type(exc).__name__}"
    finally:
        client.close()
    return "ok"
