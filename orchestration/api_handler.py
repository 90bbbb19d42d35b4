"""The REST API: thin views, each validating its input and calling one service or selector.

The endpoints are documented in doc/api_endpoints.md.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse
from django.views.defaults import page_not_found
from rest_framework import serializers, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orchestration.models import Task
from orchestration.packets import SERVER_OWNED_INITIAL, parse_task_id
from orchestration.selectors import config_get, llm_list, role_get, task_get, task_list
from orchestration.services import task_cancel, task_feedback, task_submit


def _located(request: Request, packet: dict[str, Any], status_code: int) -> Response:
    location = request.build_absolute_uri(reverse("task-detail", args=[packet["task_id"]]))
    return Response(packet, status=status_code, headers={"Location": location})


class TaskSubmitApi(APIView):
    """POST /api/v1/{profile}/{role}: submit a task packet."""

    class InputSerializer(serializers.Serializer):
        task_id = serializers.CharField(required=False, max_length=64)
        profile = serializers.CharField(required=False)
        role = serializers.CharField(required=False)
        payload = serializers.JSONField()
        created_at = serializers.JSONField(required=False)
        updated_at = serializers.JSONField(required=False)

        def to_internal_value(self, data: Any) -> dict[str, Any]:
            if isinstance(data, dict):
                known = set(self.fields) | set(SERVER_OWNED_INITIAL)
                unknown = sorted(data.keys() - known)
                if unknown:
                    raise serializers.ValidationError({unknown[0]: ["unknown field"]})
                for field, initial in SERVER_OWNED_INITIAL.items():
                    # Compared as JSON, so that false is not taken for 0.
                    if field in data and json.dumps(data[field]) != json.dumps(initial):
                        raise serializers.ValidationError(
                            {field: [f"is set by the server; a new task may only send {initial!r}"]}
                        )
            return super().to_internal_value(data)

        def validate_task_id(self, value: str) -> str:
            try:
                return parse_task_id(value)
            except ValueError as exc:
                raise serializers.ValidationError(str(exc)) from None

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            for field in ("profile", "role"):
                if field in attrs and attrs[field] != self.context[field]:
                    raise serializers.ValidationError({field: [f"must match the URL ({self.context[field]!r})"]})
            for field in ("created_at", "updated_at"):
                if field in attrs:
                    raise serializers.ValidationError({field: ["is set by the server"]})
            return attrs

    def post(self, request: Request, profile: str, role: str) -> Response:
        role_get(profile=profile, role=role)  # an unknown profile or role is a 404 whatever the body
        serializer = self.InputSerializer(data=request.data, context={"profile": profile, "role": role})
        serializer.is_valid(raise_exception=True)
        packet, created = task_submit(
            profile=profile,
            role=role,
            payload=serializer.validated_data["payload"],
            task_id=serializer.validated_data.get("task_id"),
        )
        return _located(request, packet, status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK)


class TaskDetailApi(APIView):
    """GET /api/v1/tasks/{task_id}: the whole packet, from its state file."""

    def get(self, request: Request, task_id: str) -> Response:
        return Response(task_get(task_id=task_id))


class TaskCancelApi(APIView):
    """POST /api/v1/tasks/{task_id}/cancel."""

    def post(self, request: Request, task_id: str) -> Response:
        return _located(request, task_cancel(task_id=task_id), status.HTTP_200_OK)


class TaskFeedbackApi(APIView):
    """POST /api/v1/tasks/{task_id}/feedback: feedback on a coder task that awaits it or has finished."""

    class InputSerializer(serializers.Serializer):
        feedback = serializers.CharField(max_length=20_000, trim_whitespace=True)
        route = serializers.ChoiceField(choices=["debug", "coder"], default="debug")
        tests = serializers.CharField(required=False, max_length=200_000, trim_whitespace=False)

        def to_internal_value(self, data: Any) -> dict[str, Any]:
            if isinstance(data, dict):
                unknown = sorted(data.keys() - set(self.fields))
                if unknown:
                    raise serializers.ValidationError({unknown[0]: ["unknown field"]})
            return super().to_internal_value(data)

    def post(self, request: Request, task_id: str) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        packet = task_feedback(task_id=task_id, **serializer.validated_data)
        return _located(request, packet, status.HTTP_202_ACCEPTED)


class TaskPagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500


class TaskListApi(APIView):
    """GET /api/v1/tasks/: summaries from the database mirror, filtered and paginated."""

    class FilterSerializer(serializers.Serializer):
        status = serializers.CharField(required=False)
        profile = serializers.CharField(required=False, max_length=64)
        role = serializers.CharField(required=False, max_length=64)

    class OutputSerializer(serializers.ModelSerializer):
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

    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        paginator = TaskPagination()
        page = paginator.paginate_queryset(task_list(**filters.validated_data), request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


class ConfigApi(APIView):
    """GET /api/v1/config: the configuration in force (it holds no secrets)."""

    def get(self, request: Request) -> Response:
        return Response(config_get())


class LLMListApi(APIView):
    """GET /api/v1/llms: every configured LLM with its health."""

    def get(self, request: Request) -> Response:
        return Response({"results": llm_list()})


class HealthzApi(APIView):
    """GET /healthz: whether this process reaches its database and Redis. No token needed."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    def get(self, request: Request) -> Response:
        checks = {"database": _check_database(), "redis": _check_redis()}
        healthy = all(value == "ok" for value in checks.values())
        return Response(
            {"status": "ok" if healthy else "unavailable", **checks},
            status=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE,
        )


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's 404 handler: JSON under /api/, the usual page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"code": "not_found", "detail": f"no such endpoint: {request.path}"}, status=404)
    return page_not_found(request, exception)


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
