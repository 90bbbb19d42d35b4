"""configuration.json: the LLMs, the profiles and their roles, loaded and validated.

Validation collects every problem with the exact path of the field
(``profiles.developer.roles.planner.preferred_llms[0]``) and its reason, so one
run of ``check_config`` shows all of them. A loaded configuration is immutable;
``ConfigurationSource`` reloads it when the file changes and keeps the last good
one when the new file is broken.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from llm_engines.registry import UnknownName, engine_class

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")  # \Z: $ would take a trailing newline
LLM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
# Path segments under /api/v1/ that name API routes, not profiles.
RESERVED_PROFILE_NAMES = frozenset({"tasks", "config", "llms", "metrics"})
# "tools": the LLM calls functions (OpenAI's tools); only on an engine that passes them on.
CAPABILITIES = frozenset({"chat", "code", "vision", "json", "tools"})
SOURCES = frozenset({"local", "api"})
# Keys that would hold a secret: the file names an environment variable instead.
SECRET_KEY_RE = re.compile(r"(api_?key|secret|password|token)$", re.IGNORECASE)


class ConfigurationError(ValueError):
    """The configuration is invalid; ``problems`` lists (field path, reason)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {path}: {reason}" if path else f"  {reason}" for path, reason in problems)
        super().__init__(f"{source} is invalid:\n{lines}")


@dataclass(frozen=True)
class LLMConfig:
    id: str
    engine: str
    source: str
    model: str
    toggle: bool = True
    locked: bool = False
    capabilities: frozenset[str] = frozenset({"chat"})
    context_length: int = 2048
    max_concurrency: int = 1
    base_url: str | None = None
    api_key_env: str | None = None
    # Price in the API's currency per 1,000 tokens: {"prompt": ..., "completion": ...}.
    cost_per_1k_tokens: Mapping[str, float] = field(default_factory=dict)
    weight: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)

    def engine_settings(self) -> dict[str, Any]:
        """What the engine is constructed with: the model, its context, where and how to reach it, and
        the engine's own options."""
        settings = {"model": self.model, "context_length": self.context_length, **self.options}
        for key in ENGINE_FIELDS:
            if getattr(self, key) is not None:
                settings[key] = getattr(self, key)
        return settings


@dataclass(frozen=True)
class RoleConfig:
    profile: str
    name: str
    agent: str
    system_prompt: str
    capabilities: frozenset[str] = frozenset({"chat"})
    preferred_llms: tuple[str, ...] = ()
    max_tokens: int = 256
    temperature: float = 0.7
    time_limit_s: float = 300.0
    max_iterations: int = 3

    @property
    def queue(self) -> str:
        return f"{self.profile}.{self.name}"


@dataclass(frozen=True)
class ProfileConfig:
    name: str
    roles: Mapping[str, RoleConfig]
    default_llms: tuple[str, ...] = ()
    # What api LLMs with a cost may spend for this profile per UTC day; None: no limit.
    daily_budget: float | None = None


@dataclass(frozen=True)
class Configuration:
    llms: Mapping[str, LLMConfig]
    profiles: Mapping[str, ProfileConfig]

    def role(self, profile: str, role: str) -> RoleConfig:
        """The role, or ``LookupError`` naming what exists."""
        if profile not in self.profiles:
            raise LookupError(f"unknown profile {profile!r}; valid profiles: {', '.join(self.profiles)}")
        roles = self.profiles[profile].roles
        if role not in roles:
            raise LookupError(f"unknown role {role!r} in profile {profile!r}; valid roles: {', '.join(roles)}")
        return roles[role]

    def queues(self) -> list[str]:
        return [role.queue for profile in self.profiles.values() for role in profile.roles.values()]

    def as_dict(self) -> dict[str, Any]:
        """The configuration in force, in the file's shape. It holds no secret: the file never does."""
        return {
            "llms": [llm_as_dict(llm) for llm in self.llms.values()],
            "profiles": {
                profile.name: {
                    "default_llms": list(profile.default_llms),
                    "daily_budget": profile.daily_budget,
                    "roles": {role.name: role_as_dict(role) for role in profile.roles.values()},
                }
                for profile in self.profiles.values()
            },
        }


def role_as_dict(role: RoleConfig) -> dict[str, Any]:
    return {
        "agent": role.agent, "system_prompt": role.system_prompt, "capabilities": sorted(role.capabilities),
        "preferred_llms": list(role.preferred_llms), "max_tokens": role.max_tokens, "temperature": role.temperature,
        "time_limit_s": role.time_limit_s, "max_iterations": role.max_iterations, "queue": role.queue,
    }  # fmt: skip


def llm_as_dict(llm: LLMConfig) -> dict[str, Any]:
    return {
        "id": llm.id, "engine": llm.engine, "source": llm.source, "model": llm.model, "toggle": llm.toggle,
        "locked": llm.locked, "capabilities": sorted(llm.capabilities), "context_length": llm.context_length,
        "max_concurrency": llm.max_concurrency, "base_url": llm.base_url, "api_key_env": llm.api_key_env,
        "cost_per_1k_tokens": dict(llm.cost_per_1k_tokens), "weight": llm.weight, "options": dict(llm.options),
    }  # fmt: skip


class _Checker:
    """Collects problems with their field paths while reading the raw JSON."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def fail(self, path: str, reason: str) -> None:
        """Record a problem; the first one found for a field is the one reported."""
        if all(path != known for known, _ in self.problems):
            self.problems.append((path, reason))

    def mapping(self, value: Any, path: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.fail(path, f"must be an object, not {_kind(value)}")
            return None
        return value

    def keys(self, value: dict[str, Any], path: str, *, required: set[str], allowed: set[str]) -> None:
        for key in sorted(required - value.keys()):
            self.fail(_join(path, key), "is required")
        for key in sorted(value.keys() - allowed):
            if SECRET_KEY_RE.search(key):
                self.fail(_join(path, key), "secrets never go in this file: name an environment variable instead")
            else:
                self.fail(_join(path, key), f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def string(
        self,
        value: Any,
        path: str,
        *,
        pattern: re.Pattern[str] | None = None,
        empty: bool = False,
        max_length: int | None = None,
    ) -> str:
        if not isinstance(value, str):
            self.fail(path, f"must be a string, not {_kind(value)}")
            return ""
        if not empty and not value.strip():
            self.fail(path, "must not be empty")
        elif max_length is not None and len(value) > max_length:
            self.fail(path, f"must be at most {max_length} characters, not {len(value)}")
        elif pattern is not None and not pattern.match(value):
            self.fail(path, f"{value!r} does not match {pattern.pattern}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, not {_kind(value)}")
            return False
        return value

    def integer(self, value: Any, path: str, *, minimum: int, maximum: int = 10_000_000) -> int:
        """An integer from ``minimum`` to ``maximum`` (by default ten million: more than any context, token
        count or concurrency, and within what every database column and Redis takes)."""
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(path, f"must be an integer, not {_kind(value)}")
            return minimum
        if value < minimum:
            self.fail(path, f"must be at least {minimum}, not {value}")
        elif value > maximum:
            self.fail(path, f"must be at most {maximum}, not {value}")
            return maximum
        return value

    def number(self, value: Any, path: str, *, minimum: float, maximum: float) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.fail(path, f"must be a number, not {_kind(value)}")
            return minimum
        if not minimum <= value <= maximum:
            self.fail(path, f"must be between {minimum} and {maximum}, not {value}")
            return minimum  # float() of an integer of 309 digits or more would raise OverflowError
        return float(value)

    def capabilities(self, value: Any, path: str) -> frozenset[str]:
        if not isinstance(value, list):
            self.fail(path, f"must be a list, not {_kind(value)}")
            return frozenset()
        for index, item in enumerate(value):
            if not isinstance(item, str) or item not in CAPABILITIES:
                self.fail(f"{path}[{index}]", f"unknown capability {item!r} (known: {', '.join(sorted(CAPABILITIES))})")
        return frozenset(item for item in value if isinstance(item, str))

    def llm_ids(self, value: Any, path: str, known: Collection[str]) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail(path, f"must be a list of LLM ids, not {_kind(value)}")
            return ()
        for index, item in enumerate(value):
            if not isinstance(item, str) or item not in known:
                self.fail(f"{path}[{index}]", f"no LLM has the id {item!r} (known: {', '.join(known) or 'none'})")
        return tuple(item for item in value if isinstance(item, str))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# LLM fields that are passed to the engine besides ``model``, ``context_length`` and ``options``.
ENGINE_FIELDS = ("base_url", "api_key_env")
# The longest text each field may hold: what the admin's columns hold (balancer/models.py), so that every
# valid file can be copied into them and saved from the admin unchanged.
MAX_LENGTHS = {"id": 128, "engine": 64, "model": 256, "base_url": 512, "api_key_env": 128, "agent": 64}
# An API key's variable: a name that says it holds a key or token, and none of the server's own (at most
# 128 characters with its longest ending).
ENV_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,119}_(API_KEY|KEY|TOKEN)\Z")
SERVER_VARIABLES = frozenset({"SECRET_KEY", "DATABASE_URL", "REDIS_URL"})
_LLM_FIELDS = {
    "id", "engine", "source", "model", "toggle", "locked", "capabilities", "context_length",
    "max_concurrency", "base_url", "api_key_env", "cost_per_1k_tokens", "weight", "options",
}  # fmt: skip
_ROLE_FIELDS = {
    "agent", "system_prompt", "capabilities", "preferred_llms", "max_tokens", "temperature", "time_limit_s",
    "max_iterations",
}  # fmt: skip


def _parse_llm(check: _Checker, raw: Any, path: str) -> LLMConfig | None:
    data = check.mapping(raw, path)
    if data is None:
        return None
    check.keys(data, path, required={"id", "engine", "source", "model"}, allowed=_LLM_FIELDS)
    engine_name = check.string(data.get("engine", ""), f"{path}.engine", max_length=MAX_LENGTHS["engine"])
    options = check.mapping(data.get("options", {}), f"{path}.options") or {}
    for key in options:
        if SECRET_KEY_RE.search(key):
            check.fail(f"{path}.options.{key}", "secrets never go in this file: name an environment variable instead")
        elif key in ("model", "context_length", *ENGINE_FIELDS):
            # It would override the LLM's own field, which the balancer and the admin read.
            check.fail(f"{path}.options.{key}", f"is a field of the LLM itself: set {path}.{key}, not in options")
    llm = LLMConfig(
        id=check.string(data.get("id", ""), f"{path}.id", pattern=LLM_ID_RE, max_length=MAX_LENGTHS["id"]),
        engine=engine_name,
        source=check.string(data.get("source", ""), f"{path}.source"),
        model=check.string(data.get("model", ""), f"{path}.model", max_length=MAX_LENGTHS["model"]),
        toggle=check.boolean(data.get("toggle", True), f"{path}.toggle"),
        locked=check.boolean(data.get("locked", False), f"{path}.locked"),
        capabilities=check.capabilities(data.get("capabilities", ["chat"]), f"{path}.capabilities"),
        context_length=check.integer(data.get("context_length", 2048), f"{path}.context_length", minimum=128),
        max_concurrency=check.integer(
            data.get("max_concurrency", 1), f"{path}.max_concurrency", minimum=1, maximum=1024
        ),
        base_url=(
            check.string(data["base_url"], f"{path}.base_url", max_length=MAX_LENGTHS["base_url"])
            if "base_url" in data
            else None
        ),
        api_key_env=_api_key_env(check, data, path),
        cost_per_1k_tokens=_costs(check, data, path),
        weight=check.number(data.get("weight", 1.0), f"{path}.weight", minimum=0.0, maximum=1000.0),
        options=MappingProxyType(dict(options)),
    )
    if llm.source and llm.source not in SOURCES:
        check.fail(f"{path}.source", f"must be one of {', '.join(sorted(SOURCES))}, not {llm.source!r}")
    if llm.cost_per_1k_tokens and llm.source != "api":
        check.fail(f"{path}.cost_per_1k_tokens", "only api LLMs have a cost")
    if engine_name:
        try:
            cls = engine_class(engine_name)
        except UnknownName as exc:
            check.fail(f"{path}.engine", str(exc))
        else:
            if "tools" in llm.capabilities and not cls.supports_tools:
                check.fail(f"{path}.capabilities", f"the {engine_name} engine cannot call tools: drop 'tools'")
            top_level = {"model", "context_length", *ENGINE_FIELDS}
            for key, reason in cls.validate_settings(llm.engine_settings()).items():
                check.fail(f"{path}.{key}" if key in top_level else f"{path}.options.{key}", reason)
    return llm


def _api_key_env(check: _Checker, data: dict[str, Any], path: str) -> str | None:
    if "api_key_env" not in data:
        return None
    name = check.string(data["api_key_env"], f"{path}.api_key_env", max_length=MAX_LENGTHS["api_key_env"])
    if name in SERVER_VARIABLES:
        check.fail(f"{path}.api_key_env", f"{name} is the server's own setting, not an API key")
    elif name and not ENV_NAME_RE.match(name):
        check.fail(
            f"{path}.api_key_env",
            "must name an environment variable ending in _API_KEY, _KEY or _TOKEN (like OPENAI_API_KEY) "
            "that holds the key, never the key itself",
        )
    return name


def _costs(check: _Checker, data: dict[str, Any], path: str) -> Mapping[str, float]:
    raw = check.mapping(data.get("cost_per_1k_tokens", {}), f"{path}.cost_per_1k_tokens") or {}
    check.keys(raw, f"{path}.cost_per_1k_tokens", required=set(), allowed={"prompt", "completion"})
    return MappingProxyType(
        {
            key: check.number(value, f"{path}.cost_per_1k_tokens.{key}", minimum=0.0, maximum=1e6)
            for key, value in raw.items()
            if key in ("prompt", "completion")
        }
    )


def _parse_role(
    check: _Checker, raw: Any, path: str, *, profile: str, name: str, llm_ids: Collection[str],
    known_agents: Collection[str] | None, time_limit_below_s: float | None,
) -> RoleConfig | None:  # fmt: skip
    data = check.mapping(raw, path)
    if data is None:
        return None
    check.keys(data, path, required={"agent", "system_prompt"}, allowed=_ROLE_FIELDS)
    agent = check.string(data.get("agent", ""), f"{path}.agent", max_length=MAX_LENGTHS["agent"])
    if agent and known_agents is not None and agent not in known_agents:
        check.fail(f"{path}.agent", f"unknown agent {agent!r} (known: {', '.join(sorted(known_agents))})")
    time_limit_s = check.number(data.get("time_limit_s", 300), f"{path}.time_limit_s", minimum=1, maximum=86400)
    if time_limit_below_s is not None and time_limit_s >= time_limit_below_s:
        check.fail(
            f"{path}.time_limit_s",
            f"must be under {time_limit_below_s:g}: a step that long would outlive its job's visibility timeout "
            "(CELERY_VISIBILITY_TIMEOUT, less the 30 s by which the hard time limit follows), and its job would "
            "come back from Redis as one whose worker died",
        )
    return RoleConfig(
        profile=profile,
        name=name,
        agent=agent,
        system_prompt=check.string(data.get("system_prompt", ""), f"{path}.system_prompt"),
        capabilities=check.capabilities(data.get("capabilities", ["chat"]), f"{path}.capabilities"),
        preferred_llms=check.llm_ids(data.get("preferred_llms", []), f"{path}.preferred_llms", llm_ids),
        max_tokens=check.integer(data.get("max_tokens", 256), f"{path}.max_tokens", minimum=1),
        temperature=check.number(data.get("temperature", 0.7), f"{path}.temperature", minimum=0.0, maximum=2.0),
        time_limit_s=time_limit_s,
        max_iterations=check.integer(data.get("max_iterations", 3), f"{path}.max_iterations", minimum=1, maximum=100),
    )


def _check_reply_fits(check: _Checker, role: RoleConfig, path: str, llms: Mapping[str, LLMConfig]) -> None:
    """The balancer's rule 1 for the role's reply alone: a ``max_tokens`` that no LLM able to serve the role
    holds would make every call of the role fail. Toggles are left out (an operator's switch, not a
    mistake in the file: turning an LLM off is never refused here), and so is a role that no LLM has the
    capabilities for (the submit's 422 says so)."""
    able = [
        llm
        for llm in llms.values()
        if role.capabilities <= llm.capabilities and (not llm.locked or llm.id in role.preferred_llms)
    ]
    if able and all(role.max_tokens > llm.context_length for llm in able):
        largest = max(able, key=lambda llm: llm.context_length)
        check.fail(
            path,
            f"a reply of {role.max_tokens} tokens fits in the context of no LLM that can serve the role "
            f"(the largest: {largest.context_length} tokens, {largest.id})",
        )


def parse_configuration(
    raw: Any,
    *,
    source: str = "configuration",
    known_agents: Collection[str] | None = None,
    time_limit_below_s: float | None = None,
) -> Configuration:
    """Validate the decoded JSON and build the configuration, or raise ``ConfigurationError`` listing every problem.

    ``known_agents`` and ``time_limit_below_s`` (the bound of a role's ``time_limit_s``) are passed in by the
    caller: the balancer knows neither the agents nor the broker.
    """
    check = _Checker()
    top = check.mapping(raw, "")
    if top is None:
        raise ConfigurationError(source, check.problems)
    check.keys(top, "", required={"llms", "profiles"}, allowed={"llms", "profiles"})

    llms: dict[str, LLMConfig] = {}
    raw_llms = top.get("llms", [])
    if not isinstance(raw_llms, list):
        check.fail("llms", f"must be a list, not {_kind(raw_llms)}")
        raw_llms = []
    for index, raw_llm in enumerate(raw_llms):
        llm = _parse_llm(check, raw_llm, f"llms[{index}]")
        if llm is None or not llm.id:
            continue
        if llm.id in llms:
            check.fail(f"llms[{index}].id", f"duplicate id {llm.id!r}")
        llms[llm.id] = llm

    profiles: dict[str, ProfileConfig] = {}
    raw_profiles = check.mapping(top.get("profiles", {}), "profiles") or {}
    for profile_name, raw_profile in raw_profiles.items():
        path = f"profiles.{profile_name}"
        if not NAME_RE.match(profile_name):
            check.fail(path, f"profile names must match {NAME_RE.pattern}")
        elif profile_name in RESERVED_PROFILE_NAMES:
            check.fail(path, f"{profile_name!r} is reserved for the API's own routes")
        data = check.mapping(raw_profile, path)
        if data is None:
            continue
        check.keys(data, path, required={"roles"}, allowed={"roles", "default_llms", "daily_budget"})
        roles: dict[str, RoleConfig] = {}
        for role_name, raw_role in (check.mapping(data.get("roles", {}), f"{path}.roles") or {}).items():
            role_path = f"{path}.roles.{role_name}"
            if not NAME_RE.match(role_name):
                check.fail(role_path, f"role names must match {NAME_RE.pattern}")
            role = _parse_role(
                check, raw_role, role_path, profile=profile_name, name=role_name, llm_ids=llms,
                known_agents=known_agents, time_limit_below_s=time_limit_below_s,
            )  # fmt: skip
            if role is not None:
                roles[role_name] = role
                _check_reply_fits(check, role, f"{role_path}.max_tokens", llms)
        profiles[profile_name] = ProfileConfig(
            name=profile_name,
            roles=MappingProxyType(roles),
            default_llms=check.llm_ids(data.get("default_llms", []), f"{path}.default_llms", llms),
            daily_budget=(
                check.number(data["daily_budget"], f"{path}.daily_budget", minimum=0.0, maximum=1e9)
                if data.get("daily_budget") is not None
                else None
            ),
        )
    if not profiles:
        check.fail("profiles", "at least one profile is required")
    if check.problems:
        raise ConfigurationError(source, check.problems)
    return Configuration(llms=MappingProxyType(llms), profiles=MappingProxyType(profiles))


def load_configuration(
    path: Path, *, known_agents: Collection[str] | None = None, time_limit_below_s: float | None = None
) -> Configuration:
    """Read and validate ``path`` (``parse_configuration`` says what the keywords are)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(str(path), [("", f"cannot be read: {exc.strerror}")]) from None
    try:
        text = data.decode("utf-8-sig")  # an editor's byte order mark is no error
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigurationError(
            str(path), [("", f"is not UTF-8: byte 0x{data[exc.start]:02x} at line {line} (save it as UTF-8)")]
        ) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            str(path), [("", f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}")]
        ) from None
    except ValueError as exc:  # an integer longer than Python converts (4,300 digits)
        raise ConfigurationError(str(path), [("", f"is not valid JSON: {exc}")]) from None
    except RecursionError:
        raise ConfigurationError(str(path), [("", "is not valid JSON: nested too deeply")]) from None
    return parse_configuration(raw, source=str(path), known_agents=known_agents, time_limit_below_s=time_limit_below_s)


def file_stamp(path: Path) -> str:
    """Changes whenever the file is replaced or written; empty when there is no file."""
    try:
        stat = path.stat()
    except OSError:
        return ""
    return f"{stat.st_mtime_ns}:{stat.st_size}:{stat.st_ino}"


class ConfigurationSource:
    """The current configuration of one file, reloaded when the file changes.

    A process asks for ``current()`` at each use; that costs one ``stat``. When
    the file changes and no longer validates, the last good configuration stays
    in force, the error is logged, and ``last_error`` holds it. Only when there
    has never been a good one does ``current()`` raise.
    """

    def __init__(
        self, path: Path, *, known_agents: Collection[str] | None = None, time_limit_below_s: float | None = None
    ) -> None:
        self.path = path
        self.known_agents = known_agents
        self.time_limit_below_s = time_limit_below_s
        self.last_error: ConfigurationError | None = None
        self._config: Configuration | None = None
        self._stamp: str | None = None
        self._lock = threading.Lock()
        _sources.add(self)

    def current(self) -> Configuration:
        stamp = file_stamp(self.path)
        if stamp and stamp == self._stamp and self._config is not None:
            return self._config
        with self._lock:
            if stamp != self._stamp or self._config is None:
                try:
                    self._config = load_configuration(
                        self.path, known_agents=self.known_agents, time_limit_below_s=self.time_limit_below_s
                    )
                    self.last_error = None
                except ConfigurationError as exc:
                    if self._config is None:
                        raise
                    if self.last_error is None or str(self.last_error) != str(exc):
                        logger.error("keeping the previous configuration: %s", exc)
                    self.last_error = exc
                self._stamp = stamp
            return self._config


# A worker's pool child is forked from a process whose threads (the LLMs' health checks, the recovery sweep)
# read the configuration: a child forked while one of them held a source's lock, reloading the file, would
# inherit it held by a thread it does not have, and wait for it at its first reload for ever (every task it
# took hung until the hard time limit). Each child gets its sources' locks anew.
_sources: weakref.WeakSet[ConfigurationSource] = weakref.WeakSet()


def _new_locks_in_child() -> None:
    for source in list(_sources):
        source._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks_in_child)
