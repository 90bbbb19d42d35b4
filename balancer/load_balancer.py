"""The load balancer: which configured LLM serves a role's next call, and why.

Rules are numbered as in balancer/load_balancer_rules.md; keep the two true to
each other, and name the rule in every exclusion reason. Everything that
several processes must agree on (in-flight slots, breaker states, latency
averages, spending) lives in Redis, under ``aiagent:lb:``; the spending is also
kept in a ledger (the database) that outlives Redis's data. Time comes from a
replaceable clock (wall-clock seconds), passed into every Redis script, so that
the tests and the simulation drive it.

``select`` is the non-blocking core: it reserves a slot on the best available
candidate or says how long to wait. ``run`` is what agents call: it waits (up
to the step's deadline), calls the engine through the caller's function,
records the outcome, and fails over on transient errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import redis

from balancer.configuration import Configuration, LLMConfig, ProfileConfig, RoleConfig
from balancer.renewal import renewer
from llm_engines.base import ChatResult
from llm_engines.base import estimate_tokens as estimate_tokens  # re-exported for the agents and the orchestration
from llm_engines.errors import (
    ContextTooLong,
    EngineAuthError,
    EngineBadRequest,
    EngineConfigurationError,
    EngineError,
    EngineRateLimited,
    EngineTimeout,
    EngineUnavailable,
    RequestTooLarge,
)

if TYPE_CHECKING:
    from redis.client import Pipeline

logger = logging.getLogger(__name__)


class NoCandidate(LookupError):
    """No configured LLM can serve the role; the message says why each was excluded, ``reasons`` maps
    each LLM to its reason."""

    def __init__(self, message: str, reasons: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = dict(reasons or {})


class CallStopped(Exception):
    """Raised by a call that its caller stopped before the LLM finished (a client that left its stream).
    ``partial`` is what the LLM had produced until then, as far as the caller knows it: the balancer
    counts its tokens and their cost (rule 7) and records the call as ``cancelled``."""

    def __init__(self, message: str = "the call was stopped by its caller", partial: ChatResult | None = None):
        super().__init__(message)
        self.partial = partial


class StepTakenOver(CallStopped):
    """The call's step lost its lease to another worker, which runs the step now: this run stops (its answer
    would be discarded), and nothing counts against the LLM."""


class NoCapacity(EngineUnavailable):
    """Every candidate stayed full or cooling down until the step's deadline (transient)."""


@dataclass(frozen=True)
class Policy:
    """The balancer's numbers. The rules document states them; the simulation and tests vary them."""

    window: int = 20  # rule 3: the recent calls a breaker looks at
    min_calls: int = 5  # rule 3: calls in the window before the failure share can trip it
    failure_share: float = 0.75  # rule 3
    consecutive_failures: int = 5  # rule 3
    base_cooldown_s: float = 10.0  # rule 3: the first trip's cooldown; each repeated trip doubles it
    max_cooldown_s: float = 300.0  # rule 3
    trips_forgotten_after_s: float = 600.0  # rule 3: a trip this long after the last one counts as a first
    probe_lease_s: float = 60.0  # rule 3: how long a half-open probe may take before another is let through
    dead_after: int = 10  # rule 3: failures in a row after which a tripped LLM is no longer a last resort
    slot_lease_s: float = 30.0  # rule 4: a slot's lease, renewed while the call runs
    poll_s: float = 0.05  # rule 4: how often a waiting call looks for a free slot
    ewma_alpha: float = 0.2  # rule 5
    explore_share: float = 0.1  # rule 5
    stale_after_s: float = 600.0  # rule 5: samples older than this do not count as recent
    max_attempts: int = 3  # rule 6
    min_attempt_s: float = 1.0  # rule 6: no failover attempt starts with less than this left before the deadline


DEFAULT_POLICY = Policy()
PREFIX = "aiagent:lb:"
# Rule 4: how long (in Redis's own seconds) a role's set of waiting calls outlives its last waiter's visit.
_WAITING_TTL_S = 300

# Rules 4 and 7. KEYS[1] the LLM's slots (token -> lease expiry), KEYS[2] the role's waiting calls; ARGV now,
# expiry, token, limit, and the call's waiter id or '' (a call that gets its slot no longer waits). With a
# budget, KEYS[3] the profile's spending today, KEYS[4] its calls' holds (token -> worst cost), KEYS[5]
# when each hold expires (with its slot's lease); ARGV[6] the call's worst cost, ARGV[7] the budget.
# Returns 1 (taken, with the hold), 0 (full), -1 (the worst cost does not fit in the budget beside
# what is spent and what the calls in flight hold).
_ACQUIRE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
if KEYS[3] then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', ARGV[1])
  for _, token in ipairs(expired) do
    redis.call('HDEL', KEYS[4], token)
    redis.call('ZREM', KEYS[5], token)
  end
  local held = 0
  for _, cost in ipairs(redis.call('HVALS', KEYS[4])) do
    held = held + tonumber(cost)
  end
  local spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent + held + tonumber(ARGV[6]) > tonumber(ARGV[7]) * (1 + 1e-9) then
    return -1
  end
  redis.call('HSET', KEYS[4], ARGV[3], ARGV[6])
  redis.call('ZADD', KEYS[5], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[4], 259200)
  redis.call('EXPIRE', KEYS[5], 259200)
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[5])
end
return 1
"""
# Everything a decision reads, in one round trip: for each LLM id (ARGV[3:]) the fields of its
# breaker and stats that a decision (or ``states``) uses and its live slots; then the profile's
# spending (KEYS[1]).
# Missing fields come back as false. The script names the per-LLM keys itself (ARGV[2] is the
# prefix) to keep the request small; this needs a single Redis, not a cluster.
_SNAPSHOT = """
local now, prefix = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local breaker = redis.call('HMGET', prefix .. 'breaker:' .. id, 'state', 'open_until', 'probe_until',
                             'hold_until', 'consecutive', 'trips')
  local stats = redis.call('HMGET', prefix .. 'stats:' .. id, 'ttft_ms', 'tpot_ms', 'samples', 'last_at',
                           'fail_rate', 'fail_ms')
  out[#out + 1] = {breaker, stats, redis.call('ZCOUNT', prefix .. 'slots:' .. id, now, '+inf')}
end
return cjson.encode({out, redis.call('GET', KEYS[1]), redis.call('EXISTS', KEYS[2])})
"""
# Rule 7: the day's spending as the ledger (the database) has it. KEYS[1] the spending, KEYS[2] the mark that
# it was compared with the ledger lately; ARGV the ledger's total, how long the mark lasts. Keeps the larger
# of the two (a call recorded in Redis and not yet in the ledger is not lost either) and returns it. The mark
# is short-lived, so that a Redis that lost its data, brought back an old snapshot or evicted the count
# takes the ledger's total again within minutes.
_SEED_SPENDING = """
local spent = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(ARGV[1]))
redis.call('SET', KEYS[1], tostring(spent), 'EX', 259200)
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[2]))
return tostring(spent)
"""
# How long the spending is taken from Redis alone before it is compared with the ledger again, and how long
# a ledger that could not be read is left alone.
LEDGER_RECHECK_S = 300
LEDGER_RETRY_S = 30
_BREAKER_FIELDS = ("state", "open_until", "probe_until", "hold_until", "consecutive", "trips")
_STATS_FIELDS = ("ttft_ms", "tpot_ms", "samples", "last_at", "fail_rate", "fail_ms")
# Rule 4. Renew a slot that is still held: KEYS[1] the slots, KEYS[2] (if any) its budget hold's expiries
# (rule 7); ARGV token, new expiry.
_RENEW_SLOT = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
  if KEYS[2] then
    redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
  end
  return 1
end
return 0
"""
# Rule 3. KEYS[1] the breaker hash; ARGV now, probe token, probe lease expiry.
# An open breaker whose cooldown has passed lets exactly one caller through (half-open).
_TRY_PROBE = """
local state = redis.call('HGET', KEYS[1], 'state')
local now = tonumber(ARGV[1])
if state == 'open' and now >= tonumber(redis.call('HGET', KEYS[1], 'open_until')) then
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe', ARGV[2], 'probe_until', ARGV[3])
  return 1
end
if state == 'half_open' and now >= tonumber(redis.call('HGET', KEYS[1], 'probe_until')) then
  redis.call('HSET', KEYS[1], 'probe', ARGV[2], 'probe_until', ARGV[3])
  return 1
end
return 0
"""
# Rule 3. A probe that ended telling nothing (a bad request, a call its caller stopped) lets the next call
# probe at once, if it is still the probe: KEYS[1] the breaker hash; ARGV the probe's token, now.
_LET_PROBE_GO = """
if redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'probe_until', ARGV[2])
end
return 0
"""
# Rules 3 and 5. KEYS[1] recent outcomes (list), KEYS[2] the breaker hash, KEYS[3] the stats hash.
# ARGV ok, now, window, min_calls, share, consecutive, base, max, forget_after, retry_after, alpha,
# whether the call was the half-open probe, how long a failed call took in ms ('' when not timed).
_RECORD = """
local ok = ARGV[1] == '1'
local now = tonumber(ARGV[2])
local alpha = tonumber(ARGV[11])
local probe = ARGV[12] == '1'
local failed = ok and 0 or 1
local rate = tonumber(redis.call('HGET', KEYS[3], 'fail_rate') or '0')
redis.call('HSET', KEYS[3], 'fail_rate', alpha * failed + (1 - alpha) * rate)
if not ok and ARGV[13] ~= '' then
  local took = tonumber(ARGV[13])
  local old = redis.call('HGET', KEYS[3], 'fail_ms')
  if old then took = alpha * took + (1 - alpha) * tonumber(old) end
  redis.call('HSET', KEYS[3], 'fail_ms', took)
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
local state = redis.call('HGET', KEYS[2], 'state') or 'closed'
if ok then
  redis.call('HSET', KEYS[2], 'consecutive', 0)
  -- Only the probe closes an open breaker: a call that began before the trip, or a call of last
  -- resort, proves nothing.
  if state ~= 'closed' and probe then
    redis.call('HSET', KEYS[2], 'state', 'closed')
    redis.call('HDEL', KEYS[2], 'probe', 'probe_until')
    -- The window starts again at the probe, as at a trip: the failures counted while the breaker was
    -- open (health checks, last resorts, calls begun before the trip) would trip it at the next failure.
    redis.call('DEL', KEYS[1])
    redis.call('LPUSH', KEYS[1], '1')
    return 'closed'
  end
  return state
end
local consecutive = redis.call('HINCRBY', KEYS[2], 'consecutive', 1)
local retry_after = tonumber(ARGV[10])
local trip
if state == 'closed' then
  local outcomes = redis.call('LRANGE', KEYS[1], 0, -1)
  local failures = 0
  for _, outcome in ipairs(outcomes) do
    if outcome == '0' then failures = failures + 1 end
  end
  trip = retry_after > 0 or consecutive >= tonumber(ARGV[6])
    or (#outcomes >= tonumber(ARGV[4]) and failures / #outcomes >= tonumber(ARGV[5]))
else
  -- Only the probe reopens a tripped breaker (with the longer cooldown), or a new Retry-After.
  trip = probe or retry_after > 0
end
if not trip then return state end
local last_trip = tonumber(redis.call('HGET', KEYS[2], 'last_trip') or '-1e18')
local trips = tonumber(redis.call('HGET', KEYS[2], 'trips') or '0')
if now - last_trip > tonumber(ARGV[9]) then trips = 0 end
trips = trips + 1
local cooldown = math.min(tonumber(ARGV[7]) * 2 ^ (trips - 1), tonumber(ARGV[8]))
if retry_after > cooldown then cooldown = retry_after end
redis.call('HSET', KEYS[2], 'state', 'open', 'open_until', now + cooldown, 'trips', trips,
  'last_trip', now, 'hold_until', now + retry_after)
redis.call('HDEL', KEYS[2], 'probe', 'probe_until')
redis.call('DEL', KEYS[1])
return 'open'
"""
# Rule 5. KEYS[1] the stats hash; ARGV alpha, ttft ms, per-token ms, now.
_SAMPLE = """
local alpha = tonumber(ARGV[1])
local samples = tonumber(redis.call('HGET', KEYS[1], 'samples') or '0')
for index, name in ipairs({'ttft_ms', 'tpot_ms'}) do
  local value = tonumber(ARGV[index + 1])
  local old = redis.call('HGET', KEYS[1], name)
  if samples > 0 and old then value = alpha * value + (1 - alpha) * tonumber(old) end
  redis.call('HSET', KEYS[1], name, value)
end
redis.call('HSET', KEYS[1], 'samples', samples + 1, 'last_at', ARGV[4])
return samples + 1
"""


@dataclass
class Decision:
    """One call's choice: the LLM, the candidates in order, why each other LLM was left out, the
    failover attempts before it, and the time spent waiting for a slot or a cooldown."""

    llm: LLMConfig
    candidates: tuple[str, ...]
    excluded: dict[str, str] = field(default_factory=dict)
    attempts: list[dict[str, str]] = field(default_factory=list)
    waited_s: float = 0.0
    slot: str = ""
    probe: bool = False
    last_resort: bool = False
    started: float = 0.0
    held_by: str = ""  # rule 7: the profile whose budget holds the call's worst cost, if one does
    held_cost: float = 0.0  # rule 7: that worst cost

    def as_detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "chosen": self.llm.id,
            "candidates": list(self.candidates),
            "excluded": dict(self.excluded),
        }
        if self.last_resort:
            detail["last_resort"] = "rule 3: cooling down, taken because every other candidate is full"
        if self.attempts:
            detail["failed_over"] = list(self.attempts)
        if self.waited_s:
            detail["waited_ms"] = round(self.waited_s * 1000, 1)
        return detail


# What a call's outcome is called in the metrics: a fixed set, so that metric labels stay bounded.
# "cancelled": the call was stopped by its caller (a client that left, a step out of time, a signal);
# neither the LLM's success nor its failure.
OUTCOMES = (
    "ok", "unavailable", "timeout", "rate_limited", "bad_request", "auth", "configuration", "error", "cancelled",
)  # fmt: skip


def outcome_of(error: EngineError | None) -> str:
    """The outcome label of a call that raised ``error`` (None: it succeeded)."""
    if error is None:
        return "ok"
    for kind, name in (
        (EngineRateLimited, "rate_limited"),
        (EngineTimeout, "timeout"),
        (EngineUnavailable, "unavailable"),
        (EngineBadRequest, "bad_request"),
        (EngineAuthError, "auth"),
        (EngineConfigurationError, "configuration"),
    ):
        if isinstance(error, kind):
            return name
    return "error"


@dataclass(frozen=True)
class CallSample:
    """One engine call as the metrics count it: handed to the balancer's ``on_call`` observer."""

    llm: str
    profile: str
    role: str
    outcome: str
    latency_s: float
    time_to_first_token_s: float | None
    prompt_tokens: int
    completion_tokens: int
    cost: float
    at: float


@dataclass(frozen=True)
class Wait:
    """Nothing can take the call now; look again at ``until`` (on the balancer's clock)."""

    until: float
    candidates: tuple[str, ...]
    excluded: dict[str, str]


def static_exclusion(llm: LLMConfig, role: RoleConfig, prompt_tokens: int = 0) -> str | None:
    """Rule 1: why ``llm`` can never serve this call, or None."""
    if not llm.toggle:
        return "rule 1: toggled off"
    if llm.locked and llm.id not in role.preferred_llms:
        return "rule 1: locked to the roles that name it"
    missing = role.capabilities - llm.capabilities
    if missing:
        return f"rule 1: lacks capabilities {', '.join(sorted(missing))}"
    # With no prompt yet (``check_servable`` of a role), the reply alone must fit.
    needed = prompt_tokens + role.max_tokens
    if needed > llm.context_length:
        return f"rule 1: context of {llm.context_length} tokens is too small for {needed}"
    return None


def tier(config: Configuration, role: RoleConfig, llm_id: str, sticky: str | None = None) -> int:
    """Rule 2 (and rule 8): 0 for the sticky LLM, then the role's preferences, the profile's defaults, the rest."""
    if sticky is not None and llm_id == sticky:
        return 0
    if llm_id in role.preferred_llms:
        return 1
    if llm_id in config.profiles[role.profile].default_llms:
        return 2
    return 3


def candidates(
    config: Configuration, role: RoleConfig, prompt_tokens: int = 0
) -> tuple[list[LLMConfig], dict[str, str]]:
    """The LLMs that rule 1 lets serve ``role``, in rule 2's order, and the reasons for the others."""
    excluded: dict[str, str] = {}
    eligible: list[LLMConfig] = []
    for llm in config.llms.values():
        reason = static_exclusion(llm, role, prompt_tokens)
        if reason:
            excluded[llm.id] = reason
        else:
            eligible.append(llm)
    order = {
        llm_id: index
        for index, llm_id in enumerate([*role.preferred_llms, *config.profiles[role.profile].default_llms])
    }
    eligible.sort(key=lambda llm: (tier(config, role, llm.id), order.get(llm.id, 0)))
    return eligible, excluded


def check_servable(config: Configuration, role: RoleConfig, prompt_tokens: int = 0) -> None:
    """``NoCandidate`` when no LLM could ever serve the role, or a prompt of ``prompt_tokens`` with it (the
    submit answers 422 with the reasons)."""
    ranked, excluded = candidates(config, role, prompt_tokens)
    if not ranked:
        reasons = "; ".join(f"{llm_id}: {reason}" for llm_id, reason in excluded.items()) or "no LLM is configured"
        raise NoCandidate(
            f"no enabled LLM can serve role {role.queue} (needs {', '.join(sorted(role.capabilities))}): {reasons}"
        )


def direct_call(
    config: Configuration,
    llm_id: str,
    *,
    capabilities: frozenset[str] = frozenset({"chat"}),
    max_tokens: int = 1,
    temperature: float = 0.7,
    time_limit_s: float = 300.0,
) -> tuple[Configuration, RoleConfig]:
    """The configuration and role under which ``run`` serves a call that names one LLM rather than a
    role (the OpenAI-compatible API's ``model``): that LLM is the only candidate, so rule 1 still
    applies to it (toggled off, locked, lacking a capability, too small a context) and rules 3 and 4
    (cooling down, slots) as for any call, but rule 6 has nowhere to fail over to. The call belongs to
    no profile and no role (both ``""``): no daily budget applies and its sample counts under its
    LLM alone. ``LookupError`` when no LLM has the id."""
    if llm_id not in config.llms:
        raise LookupError(f"no LLM has the id {llm_id!r}")
    role = RoleConfig(
        profile="",
        name="",
        agent="",
        system_prompt="",
        capabilities=capabilities,
        max_tokens=max_tokens,
        temperature=temperature,
        time_limit_s=time_limit_s,
    )
    profile = ProfileConfig(name="", roles={"": role})
    return Configuration(llms={llm_id: config.llms[llm_id]}, profiles={"": profile}), role


class SpendingLedger(Protocol):
    """Rule 7: each profile's spending by day, kept where a Redis restarted without its data does not take it
    (the server's database: ``balancer.spending``)."""

    def total(self, profile: str, day: str) -> float: ...

    def add(self, profile: str, day: str, amount: float) -> None: ...


class LoadBalancer:
    def __init__(
        self,
        client: redis.Redis,
        *,
        policy: Policy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        on_call: Callable[[CallSample, Pipeline], None] | None = None,
        stopped_by: tuple[type[BaseException], ...] = (),
        ledger: SpendingLedger | None = None,
    ) -> None:
        self.redis = client
        # Rule 7: where each profile's spending is kept besides Redis, which may restart without its data.
        self.ledger = ledger
        self._ledger_retry_at = 0.0  # time.monotonic(): a ledger that could not be read is not asked before it
        # What a call raises when its caller stopped it, besides ``CallStopped`` and what is not an
        # ``Exception`` (KeyboardInterrupt, SystemExit): a worker's soft time limit, say.
        self.stopped_by = stopped_by
        # Told of every engine call that ``run`` made, whatever its outcome (the metrics channel), with
        # the pipeline that records the call: what the observer adds to it is sent in the same round
        # trip, to the balancer's Redis, and a command of its that fails fails no call.
        self.on_call = on_call
        self.policy = policy
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self._read = client.register_script(_SNAPSHOT)
        self._seed_spending = client.register_script(_SEED_SPENDING)
        self._acquire_slot = client.register_script(_ACQUIRE_SLOT)
        self._renew_slot = client.register_script(_RENEW_SLOT)
        self._try_probe = client.register_script(_TRY_PROBE)
        self._let_probe_go = client.register_script(_LET_PROBE_GO)
        self._record = client.register_script(_RECORD)
        self._sample = client.register_script(_SAMPLE)

    # --- keys -------------------------------------------------------------------------------

    @staticmethod
    def _key(kind: str, llm_id: str) -> str:
        return f"{PREFIX}{kind}:{llm_id}"

    def _day(self) -> str:
        """Rule 7's day (UTC), which the spending is counted by."""
        return datetime.fromtimestamp(self.clock(), UTC).strftime("%Y-%m-%d")

    def _spend_key(self, profile: str, day: str | None = None) -> str:
        return f"{PREFIX}spend:{profile}:{day or self._day()}"

    def _seeded_key(self, profile: str, day: str) -> str:
        return f"{PREFIX}spend_seeded:{profile}:{day}"

    @staticmethod
    def _hold_keys(profile: str) -> list[str]:
        """Rule 7: the profile's holds on its budget (call token -> worst cost) and when each expires. Not
        by day: a call that ends after midnight spends on the day it ends."""
        return [f"{PREFIX}held:{profile}", f"{PREFIX}held_until:{profile}"]

    # --- reading the shared state -----------------------------------------------------------

    def _snapshot(
        self, llms: list[LLMConfig], profile: str, *, budget: float | None = None
    ) -> tuple[dict[str, dict], dict[str, dict], int, float]:
        """The breakers, latency stats and slots in use of ``llms``, and the profile's spending today (with a
        ``budget`` and a ledger, taken from the ledger when Redis lost it)."""
        args = [self.clock(), PREFIX, *(llm.id for llm in llms)]
        day = self._day()
        keys = [self._spend_key(profile, day), self._seeded_key(profile, day)]
        rows, spent, seeded = json.loads(self._read(keys=keys, args=args))
        if budget is not None and self.ledger is not None and not seeded and time.monotonic() >= self._ledger_retry_at:
            try:
                total = float(self.ledger.total(profile, day))
            except Exception:  # the database is away: Redis's count for now, and the ledger asked again later
                self._ledger_retry_at = time.monotonic() + LEDGER_RETRY_S
                logger.warning("the spending of %s could not be read from the ledger", profile, exc_info=True)
            else:
                spent = self._seed_spending(keys=keys, args=[repr(total), LEDGER_RECHECK_S])
        breakers, stats, in_flight = {}, {}, {}
        for llm, (breaker, sample, used) in zip(llms, rows, strict=True):
            breakers[llm.id] = {k: v for k, v in zip(_BREAKER_FIELDS, breaker, strict=True) if v is not False}
            stats[llm.id] = {k: v for k, v in zip(_STATS_FIELDS, sample, strict=True) if v is not False}
            in_flight[llm.id] = int(used)
        return breakers, stats, in_flight, float(spent or 0)

    def _times(self, stats: dict, role: RoleConfig, prior: float) -> tuple[float, float, float]:
        """Rule 5: an LLM's expected time for a call of this role if it succeeds, its failure rate, and
        the time a failed call takes (a whole call until a failure has been timed). ``prior`` stands in
        for an LLM with no recent samples."""
        if _recent(stats, self.clock(), self.policy.stale_after_s):
            succeeded = (float(stats["ttft_ms"]) + float(stats["tpot_ms"]) * role.max_tokens) / 1000
        else:
            succeeded = prior
        failure = min(float(stats.get("fail_rate", 0)), 0.999)
        failed = float(stats["fail_ms"]) / 1000 if "fail_ms" in stats else succeeded
        return succeeded, failure, failed

    def _expected_s(self, llm: LLMConfig, stats: dict, role: RoleConfig, prior: float) -> float:
        """Rule 5: the expected completion time of a call of this role on this LLM, with its retries:
        its time if it succeeds, plus the failed tries that its failure rate predicts (``f / (1 - f)``
        of them), each costing what its failed calls take; divided by its weight."""
        succeeded, failure, failed = self._times(stats, role, prior)
        return (succeeded + failure / (1 - failure) * failed) / max(llm.weight, 1e-6)

    # --- the decision -----------------------------------------------------------------------

    def select(
        self,
        config: Configuration,
        role: RoleConfig,
        *,
        prompt_tokens: int = 0,
        sticky: str | None = None,
        exclude: dict[str, str] | None = None,
        budget: float | None = None,
        waiter: str | None = None,
        waiting_since: float | None = None,
        deadline: float | None = None,
    ) -> Decision | Wait:
        """Reserve a slot on the best LLM that can take the call now, or say when to look again.

        ``exclude`` maps LLMs that already failed this step to the reason (rule 6). ``waiter``
        names a call that will come back after a ``Wait``: waiting calls are counted in Redis, so
        that each knows how many are ahead of it (rule 5); ``waiting_since`` and ``deadline`` bound
        how long it waits for a faster LLM rather than take a free slower one.
        """
        now = self.clock()
        policy = self.policy
        ranked, excluded = candidates(config, role, prompt_tokens)
        if not ranked:
            raise NoCandidate("; ".join(f"{k}: {v}" for k, v in excluded.items()) or "no LLM is configured", excluded)
        breakers, stats, in_flight, spent = self._snapshot(ranked, role.profile, budget=budget)
        worst: dict[str, float] = {}  # rule 7: the worst cost of the call on each LLM the budget applies to
        if budget is not None:
            for llm in ranked:
                if not (llm.source == "api" and llm.cost_per_1k_tokens):
                    continue
                worst[llm.id] = _worst_cost(llm, prompt_tokens, role.max_tokens)
                if spent >= budget:
                    excluded[llm.id] = f"rule 7: the daily budget of {budget:g} for {role.profile} is spent"
                elif spent + worst[llm.id] > budget * (1 + 1e-9):
                    excluded[llm.id] = (
                        f"rule 7: the call may cost up to {worst[llm.id]:g}, more than is left of the daily budget "
                        f"of {budget:g} for {role.profile} ({max(budget - spent, 0):g})"
                    )
        for llm_id, reason in (exclude or {}).items():
            excluded[llm_id] = reason
        live = [llm for llm in ranked if llm.id not in excluded]
        if not live:
            raise NoCandidate("; ".join(f"{k}: {v}" for k, v in excluded.items()), excluded)

        available: list[LLMConfig] = []
        last_resort: list[LLMConfig] = []
        probes: set[str] = set()
        wake = now + policy.poll_s
        for llm in live:
            breaker = breakers[llm.id]
            state = breaker.get("state", "closed")
            open_until = float(breaker.get("open_until", 0))
            if state == "open" and now < open_until:
                excluded[llm.id] = f"rule 3: cooling down until {_iso(open_until)}"
                if len(live) > 1:
                    if self._failing_not_dead(breaker, stats[llm.id], now):
                        last_resort.append(llm)
                    continue
                # The only candidate is never cooled down: the call waits for it.
                return Wait(until=open_until, candidates=(llm.id,), excluded=excluded)
            if state == "open" or (state == "half_open" and now >= float(breaker.get("probe_until", 0))):
                probes.add(llm.id)
            elif state == "half_open":
                excluded[llm.id] = "rule 3: a probe call is testing it"
                if len(live) > 1:
                    if self._failing_not_dead(breaker, stats[llm.id], now):
                        last_resort.append(llm)
                    continue
                # The only candidate: the call looks again until the probe answers. The probe's lease is
                # only how long it may take at most, most answer far sooner.
                return Wait(until=wake, candidates=(llm.id,), excluded=excluded)
            available.append(llm)
        ordered = self._order(config, role, available, stats, in_flight, sticky)
        waiting_key = f"{PREFIX}waiting:{role.queue}"
        worth_waiting = (
            ordered
            and ordered[0].id != sticky
            and self._worth_waiting(config, role, ordered, stats, in_flight, waiter, waiting_since, deadline)
        )
        if worth_waiting:
            names = tuple(llm.id for llm in ordered)
            return self._wait(waiting_key, waiter, Wait(until=wake, candidates=names, excluded=excluded))
        tries = list(ordered)
        resorted: set[str] = set()
        if last_resort and all(in_flight.get(llm.id, 0) >= llm.max_concurrency for llm in ordered):
            # Rule 3: every healthy candidate is full; a tripped LLM that still answers some of its calls
            # is tried rather than wait, when rule 5 expects it to be sooner.
            for llm in sorted(last_resort, key=lambda llm: self._expected_s(llm, stats[llm.id], role, 1.0)):
                if not self._sooner_to_wait(role, ordered, llm, stats, waiter, waiting_since, deadline):
                    tries.append(llm)
                    resorted.add(llm.id)
        names = tuple(llm.id for llm in tries)
        lease = now + policy.slot_lease_s
        held_back: dict[str, str] = {}
        for llm in tries:
            token = uuid.uuid4().hex
            keys = [self._key("slots", llm.id), waiting_key]
            args = [now, lease, token, llm.max_concurrency, waiter or ""]
            if llm.id in worst:
                keys += [self._spend_key(role.profile), *self._hold_keys(role.profile)]
                args += [worst[llm.id], budget]
            taken = self._acquire_slot(keys=keys, args=args)
            if taken == -1:
                rest = f"what is left of the daily budget of {budget:g} for {role.profile}"
                held_back[llm.id] = f"rule 7: the calls in flight hold {rest}"
            if taken != 1:
                continue
            held_by = role.profile if llm.id in worst else ""
            if llm.id in probes:
                probe_until = now + policy.probe_lease_s
                if not self._try_probe(keys=[self._key("breaker", llm.id)], args=[now, token, probe_until]):
                    self._release(llm.id, token, held_by)  # another caller won the probe
                    continue
            others = {k: v for k, v in {**excluded, **held_back}.items() if k != llm.id}
            for other in ordered:
                if (
                    other.id != llm.id
                    and other.id not in others
                    and in_flight.get(other.id, 0) >= other.max_concurrency
                ):
                    others[other.id] = f"rule 4: all {other.max_concurrency} slots in use"
            return Decision(
                llm=llm,
                candidates=names,
                excluded=others,
                slot=token,
                probe=llm.id in probes,
                last_resort=llm.id in resorted,
                started=now,
                held_by=held_by,
                held_cost=worst.get(llm.id, 0.0) if held_by else 0.0,
            )
        full = {llm.id: f"rule 4: all {llm.max_concurrency} slots in use" for llm in ordered}
        return self._wait(
            waiting_key, waiter, Wait(until=wake, candidates=names, excluded={**excluded, **full, **held_back})
        )

    def _failing_not_dead(self, breaker: dict, stats: dict, now: float) -> bool:
        """Rule 3: whether a tripped LLM is a candidate of last resort: it answered a call recently, it
        has not failed its last ``dead_after`` calls in a row, and no Retry-After holds it."""
        return (
            _recent(stats, now, self.policy.stale_after_s)
            and int(breaker.get("consecutive", 0)) < self.policy.dead_after
            and now >= float(breaker.get("hold_until", 0))
        )

    def _wait(self, key: str, waiter: str | None, wait: Wait) -> Wait:
        if waiter is not None:
            # Counted as waiting while it keeps coming back; forgotten soon after it stops. A waiter whose
            # process died is never removed by it: the expired are dropped here, and the key of a role that
            # nobody waits for any more expires.
            now = self.clock()
            counted_for = max(10 * self.policy.poll_s, 2.0)
            pipe = self.redis.pipeline(transaction=False)
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zadd(key, {waiter: now + counted_for})
            pipe.expire(key, max(_WAITING_TTL_S, math.ceil(2 * counted_for)))
            pipe.execute()
        return wait

    def forget_waiter(self, role: RoleConfig, waiter: str) -> None:
        self.redis.zrem(f"{PREFIX}waiting:{role.queue}", waiter)

    def _worth_waiting(
        self,
        config: Configuration,
        role: RoleConfig,
        ordered: list[LLMConfig],
        stats: dict[str, dict],
        in_flight: dict[str, int],
        waiter: str | None,
        waiting_since: float | None,
        deadline: float | None,
    ) -> bool:
        """Rule 5: whether the call would finish sooner by waiting for a slot on a full LLM of the best
        tier than by taking the best free one of that tier now."""
        now = self.clock()
        best_tier = min(tier(config, role, llm.id) for llm in ordered)
        known = [
            llm
            for llm in ordered
            if tier(config, role, llm.id) == best_tier and _recent(stats[llm.id], now, self.policy.stale_after_s)
        ]
        if not known or not _recent(stats[ordered[0].id], now, self.policy.stale_after_s):
            return False  # nothing measured to compare, or an unmeasured LLM is being explored
        full = [llm for llm in known if in_flight.get(llm.id, 0) >= llm.max_concurrency]
        free = [llm for llm in known if in_flight.get(llm.id, 0) < llm.max_concurrency]
        if not full or not free:
            return False
        best_free = min(free, key=lambda llm: self._expected_s(llm, stats[llm.id], role, 1.0))
        return self._sooner_to_wait(role, full, best_free, stats, waiter, waiting_since, deadline)

    def _sooner_to_wait(
        self,
        role: RoleConfig,
        full: list[LLMConfig],
        option: LLMConfig,
        stats: dict[str, dict],
        waiter: str | None,
        waiting_since: float | None,
        deadline: float | None,
    ) -> bool:
        """Rule 5: whether waiting for a slot on one of the ``full`` LLMs is expected to finish sooner
        than trying ``option`` now. The wait is estimated from how fast the full LLMs free their slots
        and how many calls already wait for them. A try on ``option`` succeeds with its success rate;
        when it fails, the call goes back to waiting, and loses only the part of the failed try that
        outlasts the wait it would have had anyway. A call that has already waited longer than a whole
        call on the fastest full LLM, or whose deadline leaves no more room, takes ``option``."""
        now = self.clock()
        measured = [llm for llm in full if _recent(stats[llm.id], now, self.policy.stale_after_s)]
        if not measured or not _recent(stats[option.id], now, self.policy.stale_after_s):
            return False
        expected = {llm.id: self._expected_s(llm, stats[llm.id], role, 1.0) for llm in measured}
        fastest_full = min(expected.values())
        if waiting_since is not None and now - waiting_since > fastest_full:
            return False  # the estimate was wrong: the full ones are slower to free than they looked
        if deadline is not None and deadline - now < 2 * self._expected_s(option, stats[option.id], role, 1.0):
            return False
        rate = sum(llm.max_concurrency / max(expected[llm.id], 1e-6) for llm in measured)
        key = f"{PREFIX}waiting:{role.queue}"
        ahead = self.redis.zcount(key, now, "+inf") - (1 if waiter and self.redis.zscore(key, waiter) else 0)
        wait = (max(ahead, 0) + 1) / rate
        succeeded, failure, failed = self._times(stats[option.id], role, 1.0)
        weight = max(option.weight, 1e-6)
        trying = (1 - failure) * succeeded / weight + failure * (max(failed / weight, wait) + fastest_full)
        return wait + fastest_full < trying

    def _order(
        self,
        config: Configuration,
        role: RoleConfig,
        llms: list[LLMConfig],
        stats: dict[str, dict],
        in_flight: dict[str, int],
        sticky: str | None,
    ) -> list[LLMConfig]:
        """Rules 2, 5 and 8: by tier, then within a tier by expected completion time, ties at random.
        LLMs with no recent samples come after those with some in their tier, except that now and
        then (the exploration share) one of them is tried first; when none has samples, all count
        alike."""
        now = self.clock()
        recent = {llm.id: _recent(stats[llm.id], now, self.policy.stale_after_s) for llm in llms}
        unexplored = [llm for llm in llms if not recent[llm.id]]
        any_known = len(unexplored) < len(llms)
        sticky_here = sticky is not None and any(llm.id == sticky for llm in llms)
        explore = bool(unexplored) and any_known and not sticky_here and self.rng.random() < self.policy.explore_share
        first = self.rng.choice(unexplored).id if explore else None

        listed = [*role.preferred_llms, *config.profiles[role.profile].default_llms]
        group = {
            llm.id: (tier(config, role, llm.id, sticky), llm.id != first, any_known and not recent[llm.id])
            for llm in llms
        }
        expected = {llm.id: self._expected_s(llm, stats[llm.id], role, 1.0) for llm in llms}
        # Times at most 10 % above the fastest's count as equal to it; the slower ones likewise from the
        # fastest of them. Among equals: the least busy, the order the role and the profile list them
        # in, and chance.
        band: dict[str, int] = {}
        anchor: dict[tuple, tuple[float, int]] = {}  # each group's band so far: its fastest time, its number
        for llm in sorted(llms, key=lambda llm: expected[llm.id]):
            fastest, number = anchor.get(group[llm.id], (-math.inf, -1))
            if expected[llm.id] > fastest * 1.1:
                fastest, number = expected[llm.id], number + 1
                anchor[group[llm.id]] = (fastest, number)
            band[llm.id] = number

        def key(llm: LLMConfig) -> tuple:
            listed_at = listed.index(llm.id) if llm.id in listed else len(listed)
            busy = in_flight.get(llm.id, 0) / llm.max_concurrency
            return (*group[llm.id], band[llm.id], busy, listed_at, self.rng.random())

        return sorted(llms, key=key)

    # --- after the call ---------------------------------------------------------------------

    def _release(self, llm_id: str, token: str, held_by: str = "") -> None:
        """Free the slot, and the budget's hold on the call's worst cost (rule 7) if ``held_by`` names a profile."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self._key("slots", llm_id), token)
        if held_by:
            held, until = self._hold_keys(held_by)
            pipe.hdel(held, token).zrem(until, token)
        pipe.execute()

    def _outcome_call(
        self, llm_id: str, *, ok: bool, retry_after: float = 0, probe: bool = False, took_s: float | None = None
    ) -> tuple[Any, list[str], list[Any]]:
        """Rules 3 and 5: the script, keys and arguments that count a call's outcome; the script returns
        the breaker's state after it."""
        policy = self.policy
        keys = [self._key("calls", llm_id), self._key("breaker", llm_id), self._key("stats", llm_id)]
        args = [
            "1" if ok else "0", self.clock(), policy.window, policy.min_calls, policy.failure_share,
            policy.consecutive_failures, policy.base_cooldown_s, policy.max_cooldown_s,
            policy.trips_forgotten_after_s, retry_after, policy.ewma_alpha, "1" if probe else "0",
            "" if took_s is None else took_s * 1000,
        ]  # fmt: skip
        return self._record, keys, args

    def _in_one_round_trip(
        self, commands: list[tuple[Any, list[str], list[Any]]], sample: CallSample | None = None
    ) -> list[Any]:
        """Run Redis commands in one pipeline and return their replies. A command is (a script registered
        on this client, keys, args), or (a command name, its arguments, None). Scripts are called by their
        hash: redis-py's own pipeline would first ask Redis whether they exist, a round trip more; one
        that Redis does not have (it restarted) is run again on its own, which loads it. With ``sample``,
        the ``on_call`` observer adds its own commands after them; their failures are logged, not raised."""
        pipe = self.redis.pipeline(transaction=False)
        for command, keys, args in commands:
            if args is None:
                pipe.execute_command(command, *keys)
            else:
                pipe.evalsha(command.sha, len(keys), *keys, *args)
        if sample is not None and self.on_call is not None:
            try:
                self.on_call(sample, pipe)
                # redis-py encodes a command's arguments only when the pipeline is sent, and one it cannot
                # encode fails the whole pipeline: the observer's are encoded here first.
                encoder = self.redis.get_encoder()
                for arguments, _ in pipe.command_stack[len(commands) :]:
                    for argument in arguments:
                        encoder.encode(argument)
            except Exception:
                del pipe.command_stack[len(commands) :]  # the call's record is sent without them
                logger.warning("the call observer failed on a sample of %s", sample.llm, exc_info=True)
        replies = pipe.execute(raise_on_error=False)
        for index, reply in enumerate(replies[: len(commands)]):
            if isinstance(reply, redis.exceptions.NoScriptError):
                script, keys, args = commands[index]
                replies[index] = script(keys=keys, args=args)
            elif isinstance(reply, Exception):
                raise reply
        for reply in replies[len(commands) :]:
            if isinstance(reply, Exception):
                logger.warning("the call observer's command failed on a sample of %s: %s", sample.llm, reply)
        return replies

    def health_failed(self, llm: LLMConfig, *, interval_s: float = 30.0) -> str | None:
        """Rule 3: a failed health check counts as a failed call, once per LLM per interval however
        many processes check it. Returns the breaker's state, or None when this one was not counted."""
        period = int(self.clock() // interval_s)
        key = f"{PREFIX}health:{llm.id}:{period}"
        if not self.redis.set(key, "1", nx=True, ex=max(int(interval_s * 2), 1)):
            return None
        script, keys, args = self._outcome_call(llm.id, ok=False)
        return _text(script(keys=keys, args=args))

    def record(
        self,
        decision: Decision,
        *,
        result: ChatResult | None = None,
        error: EngineError | None = None,
        role: RoleConfig | None = None,
        stopped: bool = False,
    ) -> str:
        """Free the slot and record the outcome (rules 3 and 5). With ``role``, the call was made for
        it by ``run``: its cost is added to the profile's spending today (rule 7) and its sample handed
        to ``on_call``. ``stopped``: its caller stopped it, and ``result`` (if any) is what it had
        produced by then. All of it goes to Redis in one round trip. Returns the breaker's state after it."""
        llm = decision.llm
        policy = self.policy
        now = self.clock()
        cost = _cost(llm, result) if result is not None else 0.0
        if decision.held_by and result is None and (stopped or isinstance(error, EngineTimeout)):
            # Rule 7: the LLM may have generated, and its provider billed, up to the call's worst cost.
            cost = decision.held_cost
        observed = role is not None and self.on_call is not None
        sample = (
            self._sample_of(role, decision, result=result, error=error, cost=cost, stopped=stopped)
            if observed
            else None
        )
        commands = [("ZREM", [self._key("slots", llm.id), decision.slot], None)]
        ledger: tuple[str, str, float] | None = None
        if cost and role is not None:
            day = self._day()
            key = self._spend_key(role.profile, day)
            commands += [("INCRBYFLOAT", [key, cost], None), ("EXPIRE", [key, 3 * 86400], None)]
            if self.ledger is not None and decision.held_by:  # a call a budget held: it is kept there too
                ledger = (role.profile, day, cost)
        if decision.held_by:  # after the spending: a placement in between counts both, never neither
            held, until = self._hold_keys(decision.held_by)
            commands += [("HDEL", [held, decision.slot], None), ("ZREM", [until, decision.slot], None)]
        outcome = None
        if stopped or isinstance(error, EngineBadRequest):
            # Neither the LLM's success nor its failure (the request was wrong, or its caller stopped the
            # call): nothing for rules 3 and 5 to learn from; a probe is let go.
            if decision.probe:
                commands.append((self._let_probe_go, [self._key("breaker", llm.id)], [decision.slot, now]))
        else:
            # A server that said how long it needs (a 429's or a 503's Retry-After) is held that long (rule 3).
            retry_after = getattr(error, "retry_after", None) or 0
            took = now - decision.started if decision.started else None
            outcome = len(commands)
            commands.append(
                self._outcome_call(llm.id, ok=error is None, retry_after=retry_after, probe=decision.probe, took_s=took)
            )
            if result is not None:
                ttft = result.time_to_first_token_s
                tokens = max(result.completion_tokens, 1)
                if ttft is None:
                    ttft = result.latency_s / (tokens + 1)
                per_token = max(result.latency_s - ttft, 0.0) / tokens
                averages = [policy.ewma_alpha, ttft * 1000, per_token * 1000, now]
                commands.append((self._sample, [self._key("stats", llm.id)], averages))
        try:
            replies = self._in_one_round_trip(commands, sample)
        finally:
            if ledger is not None:  # after Redis: the slot and the hold are not kept waiting on the database
                try:
                    self.ledger.add(*ledger)
                except Exception:  # the call is done and paid: its record in Redis still counts it today
                    logger.warning("the spending of %s (%g) was not added to the ledger", ledger[0], ledger[2],
                                   exc_info=True)  # fmt: skip
        return "closed" if outcome is None else _text(replies[outcome])

    # --- the whole call ---------------------------------------------------------------------

    def run(
        self,
        config: Configuration,
        role: RoleConfig,
        call: Callable[[LLMConfig], ChatResult],
        *,
        prompt_tokens: int = 0,
        deadline: float | None = None,
        sticky: str | None = None,
        budget: float | None = None,
    ) -> tuple[ChatResult, Decision]:
        """Choose, wait if need be, call, record; fail over on transient errors, errors of the LLM's own,
        and a prompt over the context to a larger context (rule 6).

        A permanent error fails at once with the engine's message; a transient one on the last
        attempt, or when the deadline leaves no time for another, raises the last error; no slot
        before ``deadline`` for the first attempt raises ``NoCapacity``.
        """
        waited = 0.0  # in ``_wait_for`` only: the failed attempts' own time is not waiting
        failed: dict[str, str] = {}
        attempts: list[dict[str, str]] = []
        last_error: EngineError | None = None
        for _ in range(self.policy.max_attempts):
            wait_until = deadline
            if last_error is not None and deadline is not None:
                # A failover attempt needs time to answer: one begun at the deadline would still be given a
                # second (the least timeout callers give an engine), and a model not yet loaded in this
                # process would first load, outside any timeout.
                wait_until = deadline - self.policy.min_attempt_s
                if self.clock() >= wait_until:
                    raise last_error
            began_waiting = self.clock()
            try:
                decision = self._wait_for(config, role, prompt_tokens, sticky, failed, budget, wait_until)
            except (NoCandidate, NoCapacity):
                if last_error is not None:
                    raise last_error from None
                raise
            waited += max(self.clock() - began_waiting, 0.0)
            decision.attempts = list(attempts)
            decision.waited_s = waited
            try:
                with self._holding(decision):
                    result = call(decision.llm)
            except EngineError as exc:
                self.record(decision, error=exc, role=role)
                decision.attempts = [*attempts, {"llm": decision.llm.id, "error": str(exc)}]
                exc.balancer = decision.as_detail()  # the step's history records what was tried
                if isinstance(exc, ContextTooLong):
                    # Rule 1's estimate of the prompt fell short (text it counts badly, images): an LLM with a
                    # larger context may take it, one with no larger a context would refuse it too.
                    for llm in candidates(config, role, prompt_tokens)[0]:
                        if llm.context_length <= decision.llm.context_length and llm.id != decision.llm.id:
                            failed[llm.id] = (
                                f"rule 6: context of {llm.context_length} tokens, no larger than that of "
                                f"{decision.llm.id}, which the prompt did not fit"
                            )
                elif not (exc.transient or exc.llm_at_fault or isinstance(exc, RequestTooLarge)):
                    raise
                last_error = exc
                failed[decision.llm.id] = f"rule 6: failed in this step: {exc}"
                attempts.append({"llm": decision.llm.id, "error": str(exc)})
                continue
            except BaseException as exc:
                # Stopped by its caller (a client that left, a time limit, a signal): the slot comes back and
                # the call is counted, with what it produced if the caller knows it. Anything else that the
                # call raised is the engine's failure, counted as an error.
                stopped = isinstance(exc, (CallStopped, *self.stopped_by)) or not isinstance(exc, Exception)
                try:
                    if stopped:
                        partial = exc.partial if isinstance(exc, CallStopped) else None
                        self.record(decision, result=partial, role=role, stopped=True)
                    else:
                        self.record(decision, error=EngineError(f"{type(exc).__name__}: {exc}"), role=role)
                except Exception:
                    logger.warning("could not record the call to %s", decision.llm.id, exc_info=True)
                raise
            self.record(decision, result=result, role=role)
            return result, decision
        assert last_error is not None
        raise last_error

    def _sample_of(
        self,
        role: RoleConfig,
        decision: Decision,
        *,
        result: ChatResult | None = None,
        error: EngineError | None = None,
        cost: float = 0.0,
        stopped: bool = False,
    ) -> CallSample:
        """The call as the metrics count it."""
        now = self.clock()
        return CallSample(
            llm=decision.llm.id,
            profile=role.profile,
            role=role.name,
            outcome="cancelled" if stopped else outcome_of(error),
            latency_s=result.latency_s if result is not None else max(now - (decision.started or now), 0.0),
            time_to_first_token_s=result.time_to_first_token_s if result is not None else None,
            prompt_tokens=result.prompt_tokens if result is not None else 0,
            completion_tokens=result.completion_tokens if result is not None else 0,
            cost=cost,
            at=now,
        )

    def renew_slot(self, decision: Decision) -> bool:
        """Extend a held slot's lease (rule 4); False when it was no longer held."""
        keys = [self._key("slots", decision.llm.id)]
        if decision.held_by:
            keys.append(self._hold_keys(decision.held_by)[1])
        return bool(self._renew_slot(keys=keys, args=[decision.slot, self.clock() + self.policy.slot_lease_s]))

    @contextlib.contextmanager
    def _holding(self, decision: Decision) -> Iterator[None]:
        """Renew the call's slot while it runs (the process's renewer thread), so that only a dead
        holder's slot expires (rule 4)."""

        def renew() -> None:
            # If Redis stays away the slot expires by itself.
            with contextlib.suppress(redis.RedisError):
                self.renew_slot(decision)

        handle = renewer.add(renew, self.policy.slot_lease_s / 3)
        try:
            yield
        finally:
            renewer.remove(handle)

    def _wait_for(self, config, role, prompt_tokens, sticky, failed, budget, deadline) -> Decision:
        waiter = uuid.uuid4().hex
        since = self.clock()
        try:
            while True:
                outcome = self.select(
                    config, role, prompt_tokens=prompt_tokens, sticky=sticky, exclude=failed, budget=budget,
                    waiter=waiter, waiting_since=since, deadline=deadline,
                )  # fmt: skip
                if isinstance(outcome, Decision):
                    return outcome
                now = self.clock()
                if deadline is not None and outcome.until > deadline:
                    reasons = "; ".join(f"{k}: {v}" for k, v in outcome.excluded.items())
                    raise NoCapacity(f"no LLM could take the call before the step's deadline ({reasons or 'all busy'})")
                self.sleep(max(min(outcome.until - now, 1.0), 0.001))
        except BaseException:
            self.forget_waiter(role, waiter)
            raise

    # --- what operators see -----------------------------------------------------------------

    def budget(self, profile: str, budget: float) -> dict[str, Any]:
        """Rule 7 as it stands for ``profile`` today: what is spent (as a decision reads it, compared with the
        ledger when a decision would be), what the calls in flight hold of their worst cost, and what is
        left of ``budget`` for new calls. With Redis away, what the ledger says is spent, and ``held`` and
        ``left`` unknown (None)."""
        day = self._day()
        try:
            spent = self._snapshot([], profile, budget=budget)[3]
            held_key, until_key = self._hold_keys(profile)
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(held_key)
            pipe.zrangebyscore(until_key, self.clock(), "+inf")  # holds whose lease has not expired
            costs, live = pipe.execute()
        except redis.RedisError:
            if self.ledger is None:
                raise
            spent, held = float(self.ledger.total(profile, day)), None
        else:
            held = round(sum((float(costs[token]) for token in live if token in costs), 0.0), 6)
        return {
            "day": day,
            "daily_budget": budget,
            "spent": round(spent, 6),
            "held": held,
            "left": None if held is None else round(max(budget - spent - held, 0.0), 6),
        }

    def states(self, config: Configuration) -> dict[str, dict[str, Any]]:
        """Each LLM's shared state: healthy or cooling down until when, in flight, average latency."""
        now = self.clock()
        llms = list(config.llms.values())
        if not llms:
            return {}
        breakers, stats, in_flight, _ = self._snapshot(llms, next(iter(config.profiles), ""))
        states = {}
        for llm in llms:
            breaker = breakers[llm.id]
            state = breaker.get("state", "closed")
            open_until = float(breaker.get("open_until", 0))
            if state == "open" and now >= open_until:
                state = "half_open"  # the next call is a probe
            sample = stats[llm.id]
            states[llm.id] = {
                "breaker": state,
                "cooling_until": _iso(open_until) if state == "open" else None,
                "trips": int(breaker.get("trips", 0)),
                "in_flight": in_flight[llm.id],
                "max_concurrency": llm.max_concurrency,
                "ttft_ms": round(float(sample["ttft_ms"]), 1) if sample.get("samples") else None,
                "ms_per_token": round(float(sample["tpot_ms"]), 2) if sample.get("samples") else None,
                "samples": int(sample.get("samples", 0)),
                "failure_rate": round(float(sample.get("fail_rate", 0)), 3),
            }
        return states


def _recent(stats: dict, now: float, stale_after_s: float) -> bool:
    return bool(stats) and int(stats.get("samples", 0)) > 0 and now - float(stats.get("last_at", 0)) < stale_after_s


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _iso(moment: float) -> str:
    try:
        when = datetime.fromtimestamp(moment, UTC)
    except (OverflowError, OSError, ValueError):  # a time past what Python can write (a bad Retry-After, before)
        when = datetime.max.replace(tzinfo=UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _worst_cost(llm: LLMConfig, prompt_tokens: int, max_tokens: int) -> float:
    """Rule 7: what a call may cost at most: its prompt (as estimated) and ``max_tokens`` at the LLM's prices."""
    prices = llm.cost_per_1k_tokens
    return (prompt_tokens * prices.get("prompt", 0.0) + max_tokens * prices.get("completion", 0.0)) / 1000


def _cost(llm: LLMConfig, result: ChatResult) -> float:
    prices = llm.cost_per_1k_tokens
    if not prices:
        return 0.0
    return (
        result.prompt_tokens * prices.get("prompt", 0.0) + result.completion_tokens * prices.get("completion", 0.0)
    ) / 1000
