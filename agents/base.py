"""The agent base class: payload schema, prompt, structured reply, result.

An agent declares the JSON schema of the payload it accepts (checked when the
task is submitted, and again before the step runs), builds the prompt, and
asks the engine for JSON that follows its output schema. A reply that does not
parse or does not follow the schema is asked again once, with the error; a
second bad reply fails the step with ``ReplyError``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match, relevance

from balancer.configuration import Configuration, LLMConfig, RoleConfig
from balancer.load_balancer import LoadBalancer, StepTakenOver, estimate_tokens
from balancer.safe_json import UnsafeJSON, check_json
from llm_engines.base import ChatOptions, ChatResult, Message, work_cancel
from llm_engines.errors import EngineError
from llm_engines.registry import get_engine

# The flows the orchestration engine runs after an agent's step (orchestration/orchestration_engine.py).
SINGLE = "single"  # the step's result finishes the task
PLAN = "plan"  # the plan may be executed by child tasks
LOOP = "loop"  # the QA -> Debug -> Coder feedback loop
CHECKS = "checks"  # QA's checks on code given in the payload


class PayloadError(ValueError):
    """A payload that the agent cannot accept; ``field`` is its path inside the payload."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ReplyError(Exception):
    """The model's reply did not follow the agent's output schema, even after a retry with the error."""

    def __init__(self, message: str, *, balancer: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.balancer = balancer


class ReplyProblem(ValueError):
    """What is wrong with one reply; the model is told, once."""


@dataclass(frozen=True)
class AgentOutcome:
    """What one step produced: the result for the packet, and what the history records of the call."""

    result: dict[str, Any]
    llm: str
    model: str
    decision: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    time_to_first_token_ms: float | None
    finish_reason: str | None
    # 2 when the first reply was refused and asked again with its error.
    calls: int = 1
    reply_problem: str | None = None

    def step_detail(self) -> dict[str, Any]:
        detail = {
            "model": self.model,
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "latency_ms": round(self.latency_ms, 1),
            "time_to_first_token_ms": None
            if self.time_to_first_token_ms is None
            else round(self.time_to_first_token_ms, 1),
            "finish_reason": self.finish_reason,
            "balancer": self.decision,
        }
        if self.calls > 1:
            detail["calls"] = self.calls
            detail["first_reply_problem"] = self.reply_problem
        return detail


# Schema builders. Every string and list an engine fills is bounded: a grammar-constrained small
# model otherwise loops in a free-text field until max_tokens and the JSON never closes.


def text(max_length: int, *, min_length: int = 1) -> dict[str, Any]:
    return {"type": "string", "minLength": min_length, "maxLength": max_length}


def array(items: dict[str, Any], *, max_items: int, min_items: int = 0) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


def obj(properties: dict[str, Any], *, required: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
        "additionalProperties": False,
    }


# A payload's text fields: large enough for real work, bounded (the request body limit bounds them too).
PAYLOAD_TEXT = text(100_000)
FILE_PATH = {"type": "string", "pattern": r"^(?!/)(?!.*\.\.)[A-Za-z0-9_./-]{1,100}$"}
FILES = array(obj({"path": FILE_PATH, "content": text(200_000, min_length=0)}), max_items=20)
# The files QA writes beside the project's in the sandbox (agents/developer/qa_agent.py).
QA_OWN_FILES = frozenset({"test_qa.py", "_qa_runner.py"})


# What Python would import for QA's own modules instead of them: a package or another file of that name.
QA_OWN_MODULES = frozenset(name.removesuffix(".py") for name in QA_OWN_FILES)


def path_problem(paths: list[str], others: tuple[str, ...] = ()) -> tuple[int, str] | None:
    """The index in ``paths`` and the problem of the first file path that the sandbox or the static check
    could not write, which the schema's pattern lets through: an empty, "." or ".." part ("./x.py",
    "a//b.py", "a/"), a trailing newline, a name QA gives its own files or that Python would import in
    their place (``test_qa/__init__.py``, ``test_qa.so``), or a path that is another file's directory or
    inside another file ("solution.py" and "solution.py/x.py", among ``paths`` and ``others``)."""
    every = [*paths, *others]
    for index, path in enumerate(paths):
        if path != path.strip() or any(part in ("", ".", "..") for part in path.split("/")):
            return index, "must be a relative path of named parts: no empty, '.' or '..' part, no spaces around it"
        if path.split("/")[0].split(".")[0] in QA_OWN_MODULES:
            return index, f"is a name QA gives its own files ({', '.join(sorted(QA_OWN_FILES))})"
        if any(other.startswith(path + "/") for other in every):
            return index, "is a file, and another file's directory too"
        if any(path.startswith(other + "/") for other in every):
            return index, "is inside a path that is another file"
    return None


# Characters a reply token is counted as, low: a grammar-driven model that repeats itself fills a
# field with short tokens. A role's max_tokens must hold its agent's longest reply at this rate
# (tests/agents/test_agents.py checks every shipped role), or the reply is cut before the JSON closes.
CHARS_PER_TOKEN = 2


# Characters a word takes in a text, its space and punctuation included (English averages under six):
# what a payload's count of words asks of a reply's main text (``Agent.check_reply_room``).
WORD_CHARS = 6


class LongText(dict):
    """A reply's main text field (``long_text``). Its bound is for the engines that constrain the reply with
    a grammar (so that a model repeating itself closes the JSON); a reply is not refused for going past it,
    since ``max_tokens`` bounds the whole reply anyway: an engine that takes the schema only as guidance
    (OpenAI's without ``strict``), or llama.cpp for a bound past what its grammar holds (which it drops),
    may write more, and a summary of the words asked for must not fail for it."""


def long_text(role: RoleConfig, share: float) -> dict[str, Any]:
    """The bound of a reply's main text field: ``share`` of what the role's max_tokens holds."""
    return LongText(text(max(100, int(role.max_tokens * CHARS_PER_TOKEN * share))))


def reply_schema(schema: Any) -> Any:
    """``schema`` as replies are validated against it: the ``LongText`` fields without their bound."""
    if isinstance(schema, LongText):
        return {key: value for key, value in schema.items() if key != "maxLength"}
    if isinstance(schema, dict):
        return {key: reply_schema(value) for key, value in schema.items()}
    if isinstance(schema, list):
        return [reply_schema(item) for item in schema]
    return schema


def max_json_chars(schema: Mapping[str, Any]) -> float:
    """The longest JSON text that follows ``schema`` (of the kinds the agents use), with one space
    between tokens as llama.cpp's grammars allow; infinite when something is unbounded."""
    if "const" in schema:
        return len(json.dumps(schema["const"]))
    if "enum" in schema:
        return max(len(json.dumps(value)) for value in schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return schema.get("maxLength", math.inf) + 2
    if kind == "boolean":
        return 5
    if kind in ("integer", "number"):
        return 20
    if kind == "array":
        if "prefixItems" in schema:
            return 2 + sum(max_json_chars(item) + 2 for item in schema["prefixItems"])
        count = schema.get("maxItems", math.inf)
        return 2 if count == 0 else 2 + count * (max_json_chars(schema["items"]) + 2)
    if kind == "object":
        properties = schema.get("properties", {})
        return 2 + sum(len(name) + 6 + max_json_chars(value) for name, value in properties.items())
    return math.inf


def _unknown_fields_first(error: ValidationError) -> tuple:
    """``best_match``'s ordering, except that an unknown field is named before a missing one: a
    payload with a misspelt field is missing the right one too, and the misspelling is the news."""
    return (error.validator == "additionalProperties", *relevance(error))


def first_problem(schema: dict[str, Any], instance: Any) -> ValidationError | None:
    return best_match(Draft202012Validator(schema).iter_errors(instance), key=_unknown_fields_first)


def field_path(error: ValidationError, root: str = "payload") -> str:
    """The JSON path of the field an error is about, such as ``payload.files[0].path``."""
    path = root
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    if error.validator == "required":
        missing = next((name for name in error.validator_value if name not in error.instance), None)
        if missing:
            path += f".{missing}"
    elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(key for key in error.instance if key not in allowed)
        if extra:
            path += f".{extra[0]}"
    return path


def schema_problem(error: ValidationError, root: str) -> tuple[str, str]:
    """The field and a reason a person can act on."""
    field = field_path(error, root)
    if error.validator == "required":
        return field, "is required"
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        return field, f"unknown field (allowed: {allowed})"
    if error.validator == "maxLength":
        return field, f"is longer than {error.validator_value} characters"
    if error.validator == "minLength" and error.validator_value == 1:
        return field, "must not be empty"
    return field, error.message


# A string of a reply format's example that describes what the model must write: "<the whole file>". Not
# "...", which a small model fills some fields of an answer with and others not (a diagnosis's evidence):
# the answer is then thin, not empty.
_PLACEHOLDER = re.compile(r'"(<[^"<>\n]{1,80}>)"')
# What models wrap an answer in: a reasoning block before it (Qwen3, DeepSeek-R1 and others think in
# <think>…</think> unless their server takes it out), and a Markdown code fence around a JSON reply (models
# whose server does not enforce the schema).
_REASONING = re.compile(r"\A\s*<(think|thinking|reasoning)>.*?</\1>\s*", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"\A\s*```(?:json|JSON)?[ \t]*\n(.*?)\n?```\s*\Z", re.DOTALL)


def without_reasoning(text: str) -> str:
    """``text`` without a reasoning block that it starts with."""
    return _REASONING.sub("", text, count=1)


def unwrapped_json(text: str) -> str:
    """A reply's JSON without what models wrap it in: a reasoning block before it, a code fence around it."""
    text = without_reasoning(text)
    fenced = _FENCE.match(text)
    return fenced.group(1) if fenced else text


def format_placeholders(messages: Iterable[Message]) -> frozenset[str]:
    """The placeholders of the reply formats ("Reply with JSON: …") in ``messages``, as ``_placeholder_key``
    gives them."""
    found: set[str] = set()
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and "Reply with JSON" in content:
            found.update(_placeholder_key(match) for match in _PLACEHOLDER.findall(content))
    return frozenset(found)


def _placeholder_key(text: str) -> str:
    """A placeholder as a small model copies it: with or without its brackets, in any case ("The whole file")."""
    return " ".join(text.strip().strip("<>").split()).lower()


def placeholder_problem(
    data: Any, placeholders: frozenset[str], fields: frozenset[str], path: str = "reply", key: Any = None
) -> str | None:
    """The first string of a reply under one of ``fields`` (keys, at any depth) that is one of its format's
    placeholders, named by its path; or None. A small model copies the format's example as it stands
    (SmolLM2-135M, doc/performance.md's HumanEval): such a reply follows the schema and holds no work."""
    if isinstance(data, str):
        if key in fields and data.strip() and _placeholder_key(data) in placeholders:
            return f"{path} is {data.strip()[:80]!r}, the reply format's placeholder: write the real value"
        return None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for name, value in items:
        at = f"{path}[{name}]" if isinstance(name, int) else f"{path}.{name}"
        # A list's items are under the list's key: a plan's `"input"` strings, a file's `"content"`.
        problem = placeholder_problem(value, placeholders, fields, at, key if isinstance(name, int) else name)
        if problem is not None:
            return problem
    return None


class Agent:
    """An agent: the payload it accepts, its prompt, and the JSON it answers with."""

    name: ClassVar[str]
    # The payload's JSON schema; ``text_field`` is the field that ``{"input": "<text>"}`` fills (and a
    # planner's step input), or None when the agent needs more than text (files, an image).
    input_schema: ClassVar[dict[str, Any]]
    text_field: ClassVar[str | None] = None
    defaults: ClassVar[dict[str, Any]] = {}
    flow: ClassVar[str] = SINGLE
    # Whether a planner's step may name a role of this agent.
    plannable: ClassVar[bool] = True
    # How the reply's JSON is described to the model, after the role's system prompt.
    reply_format: ClassVar[str] = ""
    # The reply's fields (by key, at any depth) that hold the work itself and so must not be a placeholder of
    # the format ("<the whole file>"): a copied placeholder in a field that is only stored (a coder's "run" or
    # "notes") leaves the work whole, and is let through.
    placeholder_fields: ClassVar[frozenset[str]] = frozenset()
    # Whether its work runs generated code in the sandbox (agents/sandbox.py): a worker consuming the queue
    # of such a role reports at its start whether that code can run on its host.
    runs_code: ClassVar[bool] = False

    @classmethod
    def validate_payload(cls, payload: Any) -> dict[str, Any]:
        """The payload, checked, with its defaults; ``PayloadError`` naming the field otherwise."""
        if isinstance(payload, dict) and cls.text_field and cls.text_field != "input" and set(payload) == {"input"}:
            text_value = payload["input"]
            if not isinstance(text_value, str) or not text_value.strip():
                raise PayloadError("payload.input", "must be a non-empty string")
            payload = {cls.text_field: text_value}
        if not isinstance(payload, dict):
            raise PayloadError("payload", f"must be a JSON object with the fields of the {cls.name} agent")
        error = first_problem(cls.input_schema, payload)
        if error is not None:
            raise PayloadError(*schema_problem(error, "payload"))
        if cls.text_field and not payload[cls.text_field].strip():
            raise PayloadError(f"payload.{cls.text_field}", "must not be blank")
        # JSON Schema takes 100.0 for the integer 100; it is stored, and put in prompts, as 100.
        properties = cls.input_schema.get("properties", {})
        payload = {
            key: int(value) if isinstance(value, float) and properties.get(key, {}).get("type") == "integer" else value
            for key, value in payload.items()
        }
        payload = {**cls.defaults, **payload}
        cls.check_payload(payload)
        return payload

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        """Checks the schema cannot state; ``PayloadError`` naming the field. The base checks the paths of
        a payload's ``files`` (``path_problem``); an agent that adds checks calls it too."""
        files = payload.get("files")
        if isinstance(files, list) and (found := path_problem([item["path"] for item in files])):
            index, problem = found
            raise PayloadError(f"payload.files[{index}].path", problem)

    def check_reply_room(self, payload: Mapping[str, Any], role: RoleConfig, config: Configuration) -> None:
        """``PayloadError`` naming the field when the payload (validated) asks for a longer main text than the
        role's replies hold: more words than its bound (``long_text``) holds, or a text to translate longer
        than it. Checked when a task is submitted, since a grammar engine would cut the text at the bound.
        The base asks nothing of a reply's length."""

    def reply_room(self, role: RoleConfig, config: Configuration, field: str) -> int:
        """The characters the reply's main text ``field`` holds for the role (its ``long_text`` bound)."""
        return self.output_schema(role, config)["properties"][field]["maxLength"]

    @staticmethod
    def room_error(field: str, asked: str, room: str, role: RoleConfig) -> PayloadError:
        return PayloadError(
            f"payload.{field}",
            f"{asked}, more than the {role.profile}/{role.name} role's replies hold ({room}, by its max_tokens "
            f"{role.max_tokens} at {CHARS_PER_TOKEN} characters a token); ask for less, or use a role with a larger "
            "max_tokens",
        )

    @classmethod
    def payload_from_text(cls, text_value: str) -> dict[str, Any]:
        """The payload for a text request (a planner's step); ``PayloadError`` when the agent needs more."""
        if not cls.text_field:
            raise PayloadError("payload", f"the {cls.name} agent needs more than text")
        return cls.validate_payload({cls.text_field: text_value})

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        """The chat messages for this payload; ``context`` is what the orchestration adds (a loop's round)."""
        raise NotImplementedError

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any] | None:
        """The reply's JSON schema; None for free text."""
        return None

    def parse_result(
        self, data: dict[str, Any], payload: Mapping[str, Any], context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The task's result from the reply's JSON (already checked against the schema); ``ReplyProblem``
        for what the schema cannot state. ``context`` is the one the prompt was built with."""
        return data

    def system_message(self, role: RoleConfig) -> Message:
        content = role.system_prompt
        if self.reply_format:
            content += "\n\n" + self.reply_format
        return {"role": "system", "content": content}

    def run(
        self,
        *,
        payload: Mapping[str, Any],
        role: RoleConfig,
        config: Configuration,
        balancer: LoadBalancer,
        deadline: float | None = None,
        sticky: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> AgentOutcome:
        """One step: the prompt, an LLM from the balancer (which waits, fails over and records), the
        result. ``deadline`` is on the balancer's clock."""
        messages = self.build_messages(payload, role, context)
        schema = self.output_schema(role, config)
        return self.ask(
            messages,
            schema,
            parse=lambda data: self.parse_result(data, payload, context),
            role=role,
            config=config,
            balancer=balancer,
            deadline=deadline,
            sticky=sticky,
        )

    def ask(
        self,
        messages: list[Message],
        schema: dict[str, Any] | None,
        *,
        parse: Any,
        role: RoleConfig,
        config: Configuration,
        balancer: LoadBalancer,
        deadline: float | None,
        sticky: str | None = None,
    ) -> AgentOutcome:
        """Ask for JSON that follows ``schema`` (free text when None), once more with the error if the
        first reply does not, and turn it into a result with ``parse``."""
        placeholders = format_placeholders(messages) if self.placeholder_fields else frozenset()
        reply, decision = self._call(messages, schema, role, config, balancer, deadline, sticky)
        try:
            return self._outcome(
                self._parse(reply.text, schema, parse, placeholders, self.placeholder_fields), reply, decision
            )
        except ReplyProblem as problem:
            first, first_problem = reply, str(problem)
        retry = [
            *messages,
            # What cannot be stored cannot be sent either (a lone surrogate does not encode as UTF-8).
            {
                "role": "assistant",
                "content": first.text[:4000].replace("\x00", "?").encode("utf-8", "replace").decode(),
            },
            {
                "role": "user",
                "content": f"That reply is not usable: {first_problem}. "
                + (
                    "Answer again."
                    if schema is None
                    else "Answer again with only the JSON object that the instructions describe."
                ),
            },
        ]
        reply, decision = self._call(retry, schema, role, config, balancer, deadline, decision.llm.id)
        try:
            result = self._parse(reply.text, schema, parse, placeholders, self.placeholder_fields)
        except ReplyProblem as problem:
            raise ReplyError(
                f"the model's reply did not follow the {self.name} agent's output format, even after a retry "
                f"with the error: {problem}",
                balancer=decision.as_detail(),
            ) from None
        return replace(self._outcome(result, reply, decision, first=first), reply_problem=first_problem)

    def _call(self, messages, schema, role, config, balancer, deadline, sticky):
        stop = work_cancel()  # the step's: cancelled when its lease goes to another worker

        def call(llm: LLMConfig) -> ChatResult:
            timeout = None if deadline is None else max(deadline - balancer.clock(), 1.0)
            options = ChatOptions(
                max_tokens=role.max_tokens, temperature=role.temperature, timeout=timeout, json_schema=schema,
                cancel=stop,
            )  # fmt: skip
            taken = "the step's lease went to another worker, which runs it now"
            if stop is not None and stop.cancelled:  # while it waited for a slot: the LLM is not called
                raise StepTakenOver(taken)
            try:
                return get_engine(llm.engine, llm.engine_settings(), key=llm.id).chat(messages, options)
            except EngineError as exc:
                if stop is not None and stop.cancelled:
                    raise StepTakenOver(f"{taken}: {exc}") from exc
                raise

        return balancer.run(
            config,
            role,
            call,
            prompt_tokens=estimate_tokens(messages),
            deadline=deadline,
            sticky=sticky,
            budget=config.profiles[role.profile].daily_budget,
        )

    @staticmethod
    def _parse(
        reply_text: str,
        schema: dict[str, Any] | None,
        parse: Any,
        placeholders: frozenset[str] = frozenset(),
        fields: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        if schema is None:  # free text
            reply_text = without_reasoning(reply_text)
            try:
                check_json(reply_text)
            except UnsafeJSON as exc:
                raise ReplyProblem(f"it is not text the server can store: {exc}") from None
            return {"output": reply_text.strip()}
        reply_text = unwrapped_json(reply_text)
        try:
            # strict=False: grammar-driven engines put raw newlines and tabs inside strings.
            data = json.loads(reply_text, strict=False)
        except json.JSONDecodeError as exc:
            cut = " (the reply was cut off: it reached max_tokens)" if exc.pos >= len(reply_text) - 1 else ""
            raise ReplyProblem(f"it is not valid JSON: {exc.msg} at character {exc.pos}{cut}") from None
        except (ValueError, RecursionError) as exc:
            # An integer past Python's digit limit, or arrays nested past its recursion limit: not a crash
            # of the step, a reply to ask again for.
            raise ReplyProblem(f"it is not JSON the server can read: {type(exc).__name__}: {str(exc)[:100]}") from None
        try:
            # Text that cannot be stored (an unpaired surrogate does not encode as UTF-8 in the state file;
            # a NUL breaks the PostgreSQL mirror), or nesting deeper than any result needs.
            check_json(data)
        except UnsafeJSON as exc:
            raise ReplyProblem(f"it is not JSON the server can store: {exc}") from None
        error = first_problem(reply_schema(schema), data)
        if error is not None:
            raise ReplyProblem(" ".join(schema_problem(error, "reply")))
        problem = placeholder_problem(data, placeholders, fields)
        if problem is not None:
            raise ReplyProblem(problem)
        return parse(data)

    @staticmethod
    def _outcome(
        result: dict[str, Any], reply: ChatResult, decision: Any, *, first: ChatResult | None = None
    ) -> AgentOutcome:
        prompt, completion = reply.prompt_tokens, reply.completion_tokens
        latency = reply.latency_s
        if first is not None:
            prompt, completion = prompt + first.prompt_tokens, completion + first.completion_tokens
            latency += first.latency_s
        return AgentOutcome(
            result=result,
            llm=decision.llm.id,
            model=reply.model,
            decision=decision.as_detail(),
            prompt_tokens=prompt,
            completion_tokens=completion,
            latency_ms=latency * 1000,
            time_to_first_token_ms=None if reply.time_to_first_token_s is None else reply.time_to_first_token_s * 1000,
            finish_reason=reply.finish_reason,
            calls=1 if first is None else 2,
        )


def render_files(files: list[Mapping[str, str]]) -> str:
    """Files as a prompt shows them."""
    return "\n\n".join(f"--- {item['path']} ---\n{item['content']}" for item in files)
