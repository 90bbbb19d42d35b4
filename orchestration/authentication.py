"""Token authentication for the REST API and the OpenAI-compatible API, with lookups cached briefly.

A client sends its token (``manage.py create_token NAME``) as ``Authorization: Token <key>`` or, the
way every OpenAI client does, ``Authorization: Bearer <key>``; both work on every endpoint. A
token's lookup (a database query joining the user) is kept in this process for
``API_TOKEN_CACHE_SECONDS`` (5 by default; 0 turns the cache off): the accept path then pays no
query for a client that keeps sending requests. The cost is that a deleted token, or a user made
inactive, is still let in by another process that looked it up less than that long ago (the process
that deletes it forgets at once).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from django.conf import settings
from rest_framework import authentication, exceptions

# Entries kept at most; past that the cache starts again empty (the keys are secrets: the cache
# holds no more than it must, and nothing outside this process sees it).
_CACHE_MAX = 1024


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's token authentication, under either keyword, with each key's lookup cached for a few seconds."""

    keywords = ("Token", "Bearer")
    _cache: dict[str, tuple[float, Any, Any]] = {}
    _lock = threading.Lock()

    def authenticate(self, request: Any) -> tuple[Any, Any] | None:
        words = authentication.get_authorization_header(request).split()
        if not words or words[0].decode("latin-1").lower() not in {k.lower() for k in self.keywords}:
            return None
        if len(words) != 2:
            raise exceptions.AuthenticationFailed("Invalid token header: give the keyword, a space and the token.")
        try:
            key = words[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed("Invalid token header: the token has invalid characters.") from None
        return self.authenticate_credentials(key)

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        ttl = settings.API_TOKEN_CACHE_SECONDS
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        user, token = super().authenticate_credentials(key)
        if ttl > 0:
            with self._lock:
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache[key] = (now + ttl, user, token)
        return user, token

    @classmethod
    def forget(cls) -> None:
        """Drop every cached lookup (tests, and a process that has just revoked a token)."""
        with cls._lock:
            cls._cache.clear()


class BearerAuthentication(TokenAuthentication):
    """The same, answering a request without credentials with ``WWW-Authenticate: Bearer`` (OpenAI's scheme)."""

    keyword = "Bearer"


def forget_tokens(**_: Any) -> None:
    """A signal receiver (orchestration/apps.py): a token was deleted or a user changed."""
    TokenAuthentication.forget()
