"""Engine names mapped to their classes, imported lazily, and the per-process engine cache."""

from __future__ import annotations

import difflib
import json
import os
import threading
from collections.abc import Mapping
from importlib import import_module
from typing import Any

from llm_engines.base import Engine


class UnknownName(LookupError):
    """A name that no registry entry has; the message lists the known ones and the closest match."""


class Registry:
    """Short names mapped to dotted paths of classes, imported only when first asked for.

    Used for engines here and for agents in ``agents.registry``.
    """

    def __init__(self, kind: str, entries: Mapping[str, str]) -> None:
        self.kind = kind
        self.entries = dict(entries)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def load(self, name: str) -> Any:
        try:
            dotted = self.entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(self.names())
            raise UnknownName(f"unknown {self.kind} {name!r}{hint}; known {self.kind}s: {known}") from None
        module_name, _, attribute = dotted.rpartition(".")
        return getattr(import_module(module_name), attribute)


ENGINES = Registry(
    "engine",
    {
        "llama_cpp": "llm_engines.local.llama_cpp_engine.LlamaCppEngine",
        "ollama": "llm_engines.local.ollama_engine.OllamaEngine",
        "openai": "llm_engines.api.openai_engine.OpenAIEngine",
        # Answers at once without a model: for tests and benchmarks only, never a default.
        "instant": "llm_engines.testing.InstantEngine",
        "scripted": "llm_engines.testing.ScriptedEngine",
    },
)


def engine_class(name: str) -> type[Engine]:
    return ENGINES.load(name)


_cache: dict[str, tuple[str, Engine]] = {}
_cache_lock = threading.Lock()


_inherited: list[dict[str, tuple[str, Engine]]] = []


def _forget_in_child() -> None:
    """A forked child (a worker's pool child) builds its own engines: those its parent built (its health checks
    do) hold the parent's locks, held by a thread the child does not have if the fork came while one was
    taken, and the parent's HTTP connections. They are kept, not finalized here: what closing them would close
    is the parent's. And ``_cache_lock`` anew, for the same reason."""
    global _cache, _cache_lock
    _inherited.append(_cache)
    _cache = {}
    _cache_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def get_engine(name: str, settings: Mapping[str, Any], *, key: str | None = None) -> Engine:
    """The engine for ``settings``, created once per process (a model is loaded once, not per task).

    ``key`` names the configured LLM: when its settings change, the new engine
    replaces the old one, whose model is then released.
    """
    fingerprint = json.dumps([name, settings], sort_keys=True, default=str)
    key = key or fingerprint
    cached = _cache.get(key)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    with _cache_lock:
        cached = _cache.get(key)
        if cached is None or cached[0] != fingerprint:
            cached = (fingerprint, engine_class(name)(**settings))
            _cache[key] = cached
    return cached[1]
