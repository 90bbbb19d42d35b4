"""Refuse a request body over ``API_MAX_BODY_BYTES`` before anything reads it (in OpenAI's error shape
under /v1/)."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse


class BodySizeLimitMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        declared = request.META.get("CONTENT_LENGTH") or "0"
        try:
            length = int(declared)
        except ValueError:
            return _error(request, 400, "invalid", f"Content-Length {declared!r} is not a number")
        limit = settings.API_MAX_BODY_BYTES
        if length > limit:
            return _error(request, 413, "too_large", f"the request body is {length} bytes; the limit is {limit} bytes")
        return self.get_response(request)


def _error(request: HttpRequest, status: int, code: str, detail: str) -> JsonResponse:
    if request.path_info.startswith("/v1/"):  # under any script prefix
        from orchestration.chat import ChatError  # loaded with the settings: imported when first needed

        return JsonResponse(ChatError(detail, status=status, code=code).body(), status=status)
    return JsonResponse({"code": code, "detail": detail}, status=status)
