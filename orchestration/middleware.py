"""Refuse a request body over ``API_MAX_BODY_BYTES`` before anything reads it."""

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
            return JsonResponse(
                {"code": "invalid", "detail": f"Content-Length {declared!r} is not a number"}, status=400
            )
        limit = settings.API_MAX_BODY_BYTES
        if length > limit:
            return JsonResponse(
                {"code": "too_large", "detail": f"the request body is {length} bytes; the limit is {limit} bytes"},
                status=413,
            )
        return self.get_response(request)
