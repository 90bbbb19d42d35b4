"""The load balancer's rules, each test named by the rule in balancer/load_balancer_rules.md it checks.

Real Redis (the shared state), a fake clock (no sleeps: a wait advances the clock), a seeded
random generator. LLM ids start with "t-" so that the cleanup touches nothing else.
"""

import random
import subprocess
import sys

import pytest
import redis

from balancer.configuration import parse_configuration
from balancer.load_balancer import (
    CallStopped,
    Decision,
    LoadBalancer,
    NoCandidate,
    NoCapacity,
    Policy,
    Wait,
    candidates,
)
from llm_engines.base import ChatResult
from llm_engines.errors import ContextTooLong, EngineBadRequest, EngineRateLimited, EngineTimeout, EngineUnavailable
from tests.conftest import free_port

START = 1_800_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url)
    patterns = ("aiagent:lb:*:t-*", "aiagent:lb:spend*:tp:*", "aiagent:lb:waiting:tp.*", "aiagent:lb:held*:tp")
    for pattern in patterns:
        for key in client.scan_iter(pattern):
            client.delete(key)
    return client


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def lb(client, clock):
    return LoadBalancer(client, clock=clock, sleep=clock.sleep, rng=random.Random(7))


def config_with(llms, role=None, default_llms=(), daily_budget=None):
    profile = {
        "default_llms": list(default_llms),
        "roles": {"r": {"agent": "generic", "system_prompt": "s", **(role or {})}},
    }
    if daily_budget is not None:
        profile["daily_budget"] = daily_budget
    return parse_configuration(
        {
            "llms": [{"engine": "instant", "source": "local", "model": "m", **llm} for llm in llms],
            "profiles": {"tp": profile},
        }
    )


def reply(latency=1.0, ttft=0.1, tokens=10, prompt=5):
    return ChatResult(text="ok", model="m", prompt_tokens=prompt, completion_tokens=tokens, latency_s=latency,
                      time_to_first_token_s=ttft)  # fmt: skip


def take(lb, config, **kwargs) -> Decision:
    decision = lb.select(config, config.role("tp", "r"), **kwargs)
    assert isinstance(decision, Decision), decision
    return decision


def fail(lb, decision, error=None):
    lb.record(decision, error=error or EngineUnavailable("down"))


# --- rule 1 -----------------------------------------------------------------------------------


def test_rule_1_toggled_off_and_locked_llms_are_not_candidates(lb):
    config = config_with([{"id": "t-off", "toggle": False}, {"id": "t-locked", "locked": True}, {"id": "t-on"}])
    decision = take(lb, config)
    assert decision.llm.id == "t-on"
    assert decision.excluded["t-off"] == "rule 1: toggled off"
    assert decision.excluded["t-locked"] == "rule 1: locked to the roles that name it"
    named = config_with([{"id": "t-locked", "locked": True}], {"preferred_llms": ["t-locked"]})
    assert take(lb, named).llm.id == "t-locked"


def test_rule_1_a_role_whose_reply_alone_no_context_holds_cannot_be_served(lb):
    from balancer.load_balancer import check_servable

    config = config_with([{"id": "t-small", "context_length": 4096}, {"id": "t-big", "context_length": 16384}],
                         {"max_tokens": 8000})  # fmt: skip
    role = config.role("tp", "r")
    assert take(lb, config).llm.id == "t-big"
    assert candidates(config, role)[1]["t-small"] == "rule 1: context of 4096 tokens is too small for 8000"
    small = config_with([{"id": "t-small", "context_length": 4096}, {"id": "t-off", "context_length": 16384,
                         "toggle": False}], {"max_tokens": 8000})  # fmt: skip
    with pytest.raises(NoCandidate, match="t-small: rule 1: context of 4096 tokens is too small for 8000"):
        check_servable(small, small.role("tp", "r"))


def test_rule_1_capabilities_and_context_length(lb):
    config = config_with(
        [{"id": "t-text", "capabilities": ["chat"]}, {"id": "t-small", "capabilities": ["chat", "vision"]},
         {"id": "t-big", "capabilities": ["chat", "vision"], "context_length": 8192}],
        {"capabilities": ["vision"], "max_tokens": 256},
    )  # fmt: skip
    decision = take(lb, config, prompt_tokens=3000)
    assert decision.llm.id == "t-big"
    assert decision.excluded["t-text"] == "rule 1: lacks capabilities vision"
    assert decision.excluded["t-small"] == "rule 1: context of 2048 tokens is too small for 3256"


# --- rule 2 -----------------------------------------------------------------------------------


def test_rule_2_role_preferences_then_profile_defaults_then_the_rest(lb):
    llms = [{"id": "t-a"}, {"id": "t-b"}, {"id": "t-c"}]
    config = config_with(llms, {"preferred_llms": ["t-b"]}, default_llms=["t-c"])
    assert [llm.id for llm in candidates(config, config.role("tp", "r"))[0]] == ["t-b", "t-c", "t-a"]
    assert take(lb, config).llm.id == "t-b"


def test_rule_2_a_full_preferred_llm_spills_over_to_the_next_tier(lb):
    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a"]})
    assert take(lb, config).llm.id == "t-a"
    second = take(lb, config)
    assert second.llm.id == "t-b"
    assert second.excluded["t-a"] == "rule 4: all 1 slots in use"


# --- rule 3 -----------------------------------------------------------------------------------


def test_rule_3_consecutive_failures_trip_the_breaker(lb, clock):
    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a"]})
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config))
    decision = take(lb, config)
    assert decision.llm.id == "t-b"
    assert decision.excluded["t-a"].startswith("rule 3: cooling down until")
    assert lb.states(config)["t-a"]["breaker"] == "open"


def test_rule_3_a_failure_share_trips_after_the_minimum_of_calls(lb):
    config = config_with([{"id": "t-a", "max_concurrency": 5}, {"id": "t-b", "max_concurrency": 5}],
                         {"preferred_llms": ["t-a"]})  # fmt: skip
    for ok in (False, False, True, False):  # never three failures in a row
        decision = take(lb, config)
        assert decision.llm.id == "t-a"
        lb.record(decision, result=reply()) if ok else fail(lb, decision)
    assert lb.states(config)["t-a"]["breaker"] == "closed"  # 3 of 4: under the minimum of 5 calls
    fail(lb, take(lb, config))  # 4 of 5 failed, over the share of 75 %
    assert lb.states(config)["t-a"]["breaker"] == "open"
    assert take(lb, config).llm.id == "t-b"


def test_rule_3_failed_health_checks_cool_an_llm_down(lb, clock):
    from balancer.health import HealthChecker

    config = parse_configuration(
        {
            "llms": [
                {
                    "id": "t-gone",
                    "engine": "openai",
                    "source": "local",
                    "model": "m",
                    "base_url": "http://127.0.0.1:9/v1",
                },
                {"id": "t-ok", "engine": "instant", "source": "local", "model": "m"},
            ],
            "profiles": {
                "tp": {"roles": {"r": {"agent": "generic", "system_prompt": "s", "preferred_llms": ["t-gone"]}}}
            },
        }
    )
    checker = HealthChecker(ttl_s=0)
    for round_ in range(lb.policy.consecutive_failures):
        clock.now += 30 if round_ else 0
        checker.check(config, on_failure=lb.health_failed)
        checker.check(config, on_failure=lb.health_failed)  # another process, the same interval: not counted
    decision = take(lb, config)
    assert decision.llm.id == "t-ok"
    assert decision.excluded["t-gone"].startswith("rule 3: cooling down")


def test_rule_3_a_bad_request_does_not_count(lb):
    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a"]})
    for _ in range(6):
        fail(lb, take(lb, config), EngineBadRequest("your prompt is wrong"))
    assert take(lb, config).llm.id == "t-a"


@pytest.mark.parametrize(
    "error",
    [EngineRateLimited("slow down", retry_after=42), EngineUnavailable("503: loading the model", retry_after=42)],
    ids=["429", "503"],
)
def test_rule_3_retry_after_is_honoured(lb, clock, error):
    """A 503's Retry-After (a server loading its model) was not: the LLM was tried again at once."""
    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a"]})
    fail(lb, take(lb, config), error)
    clock.now += 41
    assert take(lb, config).llm.id == "t-b"
    clock.now += 2
    assert take(lb, config).llm.id == "t-a"


def test_rule_3_half_open_lets_one_probe_through_and_a_repeated_trip_lasts_longer(lb, clock):
    config = config_with([{"id": "t-a", "max_concurrency": 5}, {"id": "t-b", "max_concurrency": 5}],
                         {"preferred_llms": ["t-a"]})  # fmt: skip
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config))
    clock.now += 10  # the first cooldown
    probe = take(lb, config)
    assert probe.llm.id == "t-a"
    assert probe.probe
    other = take(lb, config)
    assert other.llm.id == "t-b"
    assert other.excluded["t-a"] == "rule 3: a probe call is testing it"
    fail(lb, probe)  # the probe fails: open again, for twice as long
    clock.now += 19
    assert take(lb, config).llm.id == "t-b"
    clock.now += 2
    probe = take(lb, config)
    assert probe.probe
    lb.record(probe, result=reply())  # the probe succeeds: closed
    assert lb.states(config)["t-a"]["breaker"] == "closed"
    assert not take(lb, config).probe


def test_rule_3_the_only_candidate_is_never_cooled_down_the_call_waits(lb, clock):
    config = config_with([{"id": "t-only"}])
    role = config.role("tp", "r")
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config))
    waiting = lb.select(config, role)
    assert isinstance(waiting, Wait)
    assert waiting.until == pytest.approx(clock.now + 10)
    _, decision = lb.run(config, role, lambda llm: reply(), deadline=clock.now + 60)
    assert decision.llm.id == "t-only"
    assert decision.waited_s == pytest.approx(10, abs=0.1)


def test_rule_3_a_closed_breakers_window_starts_at_the_probe(lb, clock):
    """Failures counted while the breaker was open (health checks, calls begun before the trip) do not
    trip it again at the first failure after the recovery."""
    config = config_with([{"id": "t-a", "max_concurrency": 5}, {"id": "t-b", "max_concurrency": 5}],
                         {"preferred_llms": ["t-a"]})  # fmt: skip
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config))
    for _ in range(4):  # the outage goes on: failed health checks, one an interval
        clock.now += 30
        lb.health_failed(config.llms["t-a"])
    probe = take(lb, config)
    assert probe.probe
    assert lb.record(probe, result=reply()) == "closed"
    assert lb.redis.lrange(lb._key("calls", "t-a"), 0, -1) == [b"1"]
    fail(lb, take(lb, config))  # one transient error after the recovery
    assert lb.states(config)["t-a"]["breaker"] == "closed"
    assert take(lb, config).llm.id == "t-a"


def test_rule_3_the_only_candidate_with_a_probe_in_flight_waits_for_its_answer(lb, clock):
    config = config_with([{"id": "t-only", "max_concurrency": 4}])
    role = config.role("tp", "r")
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config))
    clock.now += 10
    probe = take(lb, config)
    assert probe.probe
    answers_at = clock.now + 2  # long before the probe's lease (60 s) ends

    def sleep(seconds):
        clock.sleep(seconds)
        if clock.now >= answers_at and lb.states(config)["t-only"]["breaker"] != "closed":
            lb.record(probe, result=reply())

    waiting = LoadBalancer(lb.redis, clock=clock, sleep=sleep, rng=random.Random(7))
    _, decision = waiting.run(config, role, lambda llm: reply(), deadline=clock.now + 30)
    assert decision.llm.id == "t-only" and not decision.probe
    assert decision.waited_s == pytest.approx(2, abs=0.1)


def test_rule_3_a_call_that_outwaits_a_probe_fails_at_its_deadline_naming_the_probe(lb, clock):
    config = config_with([{"id": "t-only", "max_concurrency": 4}])
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config))
    clock.now += 10
    assert take(lb, config).probe  # it never answers within the call's deadline
    started = clock.now
    with pytest.raises(NoCapacity, match="t-only: rule 3: a probe call is testing it"):
        lb.run(config, config.role("tp", "r"), lambda llm: reply(), deadline=clock.now + 30)
    assert clock.now == pytest.approx(started + 30, abs=0.1)


# --- rule 4 -----------------------------------------------------------------------------------


def test_rule_4_slots_are_reserved_and_released_never_below_zero(lb, client):
    config = config_with([{"id": "t-a", "max_concurrency": 2}])
    first, second = take(lb, config), take(lb, config)
    assert isinstance(lb.select(config, config.role("tp", "r")), Wait)
    assert lb.states(config)["t-a"]["in_flight"] == 2
    lb.record(first, result=reply())
    lb.record(first, result=reply())  # a second release of the same slot frees nothing more
    assert lb.states(config)["t-a"]["in_flight"] == 1
    lb.record(second, error=EngineUnavailable("x"))
    assert lb.states(config)["t-a"]["in_flight"] == 0


def test_outcomes_are_recorded_after_redis_lost_its_scripts(lb, client):
    """record() calls its scripts by hash in one pipeline; a Redis that restarted (and so forgot them)
    gets them again, and each outcome is counted once."""
    config = config_with([{"id": "t-a"}])
    decision = take(lb, config)
    client.script_flush()
    assert lb.record(decision, result=reply(latency=2.0)) == "closed"
    state = lb.states(config)["t-a"]
    assert state["in_flight"] == 0
    assert client.lrange("aiagent:lb:calls:t-a", 0, -1) == [b"1"]
    assert int(client.hget("aiagent:lb:stats:t-a", "samples")) == 1


def test_rule_4_a_call_that_gets_its_slot_no_longer_counts_as_waiting(lb, client):
    config = config_with([{"id": "t-a"}])
    role = config.role("tp", "r")
    held = take(lb, config)
    assert isinstance(lb.select(config, role, waiter="w0"), Wait)
    assert client.zscore("aiagent:lb:waiting:tp.r", "w0") is not None
    lb.record(held, result=reply())
    assert take(lb, config, waiter="w0").llm.id == "t-a"
    assert client.zscore("aiagent:lb:waiting:tp.r", "w0") is None


def test_rule_4_a_cancelled_call_gives_its_slot_back(lb):
    config = config_with([{"id": "t-a"}])

    def interrupted(llm):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lb.run(config, config.role("tp", "r"), interrupted)
    assert lb.states(config)["t-a"]["in_flight"] == 0


def test_rule_4_a_stopped_call_is_counted_cancelled_with_its_cost_and_lets_its_probe_go(client, clock):
    """A call its caller stopped (a client that left its stream) only gave its slot back: its tokens were
    not added to the day's spending, no sample reached the metrics, and a probe it was held the LLM's
    half-open breaker for a minute."""
    samples = []
    lb = LoadBalancer(client, clock=clock, sleep=clock.sleep, rng=random.Random(7),
                      on_call=lambda sample, pipe: samples.append(sample))  # fmt: skip
    config = config_with(
        [{"id": "t-api", "source": "api", "cost_per_1k_tokens": {"prompt": 1.0, "completion": 2.0}}], daily_budget=10.0
    )
    role = config.role("tp", "r")
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config))
    clock.now += 10  # cooled down: the next call is the probe

    def left(llm):
        clock.now += 3
        raise CallStopped("the client left", partial=reply(latency=3.0, ttft=0.5, tokens=20, prompt=100))

    with pytest.raises(CallStopped):
        lb.run(config, role, left, budget=10.0)
    assert float(client.get(lb._spend_key("tp"))) == pytest.approx(0.14)  # 100 x 1.0 + 20 x 2.0 per 1k
    [sample] = samples
    assert (sample.llm, sample.outcome) == ("t-api", "cancelled")
    assert (sample.prompt_tokens, sample.completion_tokens) == (100, 20)
    assert (sample.cost, sample.latency_s) == (pytest.approx(0.14), 3.0)
    state = lb.states(config)["t-api"]
    assert (state["in_flight"], state["breaker"]) == (0, "half_open")
    assert take(lb, config, budget=10.0).probe  # the next call probes at once, not a minute later

    def interrupted(llm):  # a signal or a time limit: nothing is known of what the LLM produced
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lb.run(config, role, interrupted, budget=10.0)
    assert samples[-1].outcome == "cancelled" and samples[-1].completion_tokens == 0


def test_rule_4_only_a_caller_stopping_the_call_counts_as_cancelled_anything_else_as_an_error(client, clock):
    """Any exception but an engine's was counted as a stopped call: an engine's bug or a stream that ended
    without its result left the error counts, and let a failing probe go as if it told nothing."""

    class TimeLimit(Exception):
        pass

    samples = []
    lb = LoadBalancer(client, clock=clock, sleep=clock.sleep, rng=random.Random(7), stopped_by=(TimeLimit,),
                      on_call=lambda sample, pipe: samples.append(sample))  # fmt: skip
    config = config_with([{"id": "t-a", "max_concurrency": 4}])
    role = config.role("tp", "r")
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config))
    clock.now += 10

    def broken(llm):
        raise RuntimeError("the stream ended without a result")

    with pytest.raises(RuntimeError):
        lb.run(config, role, broken)  # the probe, failed
    assert samples[-1].outcome == "error"
    assert lb.states(config)["t-a"]["breaker"] == "open"  # opened again, not let go

    def out_of_time(llm):
        raise TimeLimit()

    clock.now += 25
    with pytest.raises(TimeLimit):
        lb.run(config, role, out_of_time)
    assert samples[-1].outcome == "cancelled"


def test_rule_3_a_probe_that_lost_its_lease_does_not_let_the_next_probe_go(lb, clock):
    config = config_with([{"id": "t-a", "max_concurrency": 4}, {"id": "t-b", "max_concurrency": 4}],
                         {"preferred_llms": ["t-a"]})  # fmt: skip
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config))
    clock.now += 10
    slow = take(lb, config)
    assert slow.probe
    clock.now += lb.policy.probe_lease_s + 1  # the slow probe runs on; another call probes
    second = take(lb, config)
    assert second.probe and second.llm.id == "t-a"
    lb.record(slow, stopped=True)
    assert take(lb, config).llm.id == "t-b"  # the second probe still tests t-a alone


def test_rule_4_a_stopped_call_that_cannot_be_recorded_still_raises_what_stopped_it(lb, client, monkeypatch):
    config = config_with([{"id": "t-a"}])

    def gone(*args, **kwargs):
        raise redis.ConnectionError("Redis went away")

    def interrupted(llm):
        monkeypatch.setattr(lb, "_in_one_round_trip", gone)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lb.run(config, config.role("tp", "r"), interrupted)


def test_rule_4_when_every_candidate_is_full_the_call_waits_up_to_the_deadline(lb, clock):
    config = config_with([{"id": "t-a"}])
    take(lb, config)
    with pytest.raises(NoCapacity, match="before the step's deadline"):
        lb.run(config, config.role("tp", "r"), lambda llm: reply(), deadline=clock.now + 5)
    assert clock.now >= START + 5 - 0.1


def test_rule_4_waiters_that_died_are_forgotten_and_the_waiting_set_expires(lb, client, clock):
    config = config_with([{"id": "t-a"}])
    role = config.role("tp", "r")
    key = "aiagent:lb:waiting:tp.r"
    take(lb, config)
    for index in range(100):  # waiters whose processes were killed: they never come back
        assert isinstance(lb.select(config, role, waiter=f"dead-{index}"), Wait)
    clock.now += 3600
    take(lb, config)  # the slot's lease ran out long ago: another call holds it now
    assert isinstance(lb.select(config, role, waiter="alive"), Wait)
    assert client.zrange(key, 0, -1) == [b"alive"]
    assert 0 < client.ttl(key) <= 300


def test_rule_4_counters_are_shared_by_processes_and_a_killed_holders_slot_returns(lb, clock, redis_url):
    config = config_with([{"id": "t-shared"}])
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.balancer.slot_holder", redis_url, "t-shared", str(clock.now), "5"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lb.states(config)["t-shared"]["in_flight"] == 1
        assert isinstance(lb.select(config, config.role("tp", "r")), Wait)
    finally:
        holder.kill()
        holder.wait()
    clock.now += 6  # past the dead holder's lease
    assert take(lb, config).llm.id == "t-shared"


# --- rule 5 -----------------------------------------------------------------------------------


def test_rule_5_the_lowest_expected_completion_time_wins_and_averages_are_shared(lb, client, clock):
    config = config_with([{"id": "t-slow"}, {"id": "t-fast"}])
    for llm_id, latency in (("t-slow", 5.0), ("t-fast", 1.0)):
        decision = take(lb, config, sticky=llm_id)
        lb.record(decision, result=reply(latency=latency))
    other_process = LoadBalancer(client, clock=clock, rng=random.Random(1))
    for _ in range(20):
        decision = take(other_process, config)
        assert decision.llm.id == "t-fast"
        other_process.record(decision, result=reply(latency=1.0))


def test_rule_5_llms_without_recent_samples_are_explored(lb):
    config = config_with([{"id": "t-known"}, {"id": "t-new"}])
    lb.record(take(lb, config, sticky="t-known"), result=reply(latency=0.1))
    chosen = []
    for _ in range(200):
        decision = take(lb, config)
        chosen.append(decision.llm.id)
        lb.redis.zrem(lb._key("slots", decision.llm.id), decision.slot)  # free it, keep no sample
    assert 5 < chosen.count("t-new") < 60  # about the exploration share of 10 %


def measured(lb, clock, times):
    """Give each LLM recent samples whose expected time is ``times[llm_id]`` seconds."""
    for llm_id, seconds in times.items():
        lb.redis.hset(lb._key("stats", llm_id), mapping={
            "ttft_ms": seconds * 1000, "tpot_ms": 0, "samples": 10, "last_at": clock.now, "fail_rate": 0,
        })  # fmt: skip


def test_rule_5_times_within_10_percent_of_the_fastest_count_as_equal_and_the_least_busy_wins(lb, clock):
    config = config_with([{"id": "t-a", "max_concurrency": 2}, {"id": "t-b", "max_concurrency": 2}])
    role = config.role("tp", "r")
    lb.redis.zadd(lb._key("slots", "t-a"), {"someone-else": clock.now + 30})  # t-a: 1 of its 2 slots in use

    def winners(times):
        measured(lb, clock, times)
        chosen = set()
        for _ in range(20):
            decision = lb.select(config, role)
            chosen.add(decision.llm.id)
            lb.redis.zrem(lb._key("slots", decision.llm.id), decision.slot)
        return chosen

    assert winners({"t-a": 1.04, "t-b": 1.06}) == {"t-b"}  # 2 % slower: equal, and idle
    assert winners({"t-a": 1.0, "t-b": 1.099}) == {"t-b"}
    assert winners({"t-a": 1.0, "t-b": 1.12}) == {"t-a"}  # 12 % slower: not equal


def test_rule_5_the_slower_candidates_are_equal_within_10_percent_of_the_fastest_of_them(lb, clock):
    config = config_with([{"id": "t-a"}, {"id": "t-b", "max_concurrency": 2}, {"id": "t-c", "max_concurrency": 2}])
    measured(lb, clock, {"t-a": 1.5, "t-b": 2.15, "t-c": 2.0})
    lb.redis.zadd(lb._key("slots", "t-a"), {"someone-else": clock.now + 30})  # the fastest is full
    lb.redis.zadd(lb._key("slots", "t-c"), {"someone-else": clock.now + 30})  # t-c: 1 of its 2 slots in use
    decision = take(lb, config)
    assert decision.llm.id == "t-b"  # 7.5 % slower than t-c: equal to it, and idle
    assert decision.candidates == ("t-a", "t-b", "t-c")


def test_rule_5_ties_are_broken_at_random(lb):
    config = config_with([{"id": "t-a"}, {"id": "t-b"}])
    chosen = set()
    for _ in range(40):
        decision = take(lb, config)
        chosen.add(decision.llm.id)
        lb.redis.zrem(lb._key("slots", decision.llm.id), decision.slot)
    assert chosen == {"t-a", "t-b"}


# --- rule 6 -----------------------------------------------------------------------------------


def test_rule_6_a_transient_error_fails_over_to_the_next_candidate(lb):
    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a", "t-b"]})
    calls = []

    def call(llm):
        calls.append(llm.id)
        if llm.id == "t-a":
            raise EngineUnavailable("connection refused")
        return reply()

    _, decision = lb.run(config, config.role("tp", "r"), call)
    assert calls == ["t-a", "t-b"]
    assert decision.llm.id == "t-b"
    assert decision.as_detail()["failed_over"] == [{"llm": "t-a", "error": "connection refused"}]
    assert decision.excluded["t-a"] == "rule 6: failed in this step: connection refused"


def test_rule_6_a_request_too_large_for_an_llms_rate_fails_over_without_counting_against_it(lb):
    """OpenAI's 429 "Request too large … tokens per min" was a rate limit: its Retry-After held the LLM for
    every caller, though only this request can never be sent there (and another LLM may take it)."""
    from llm_engines.errors import RequestTooLarge

    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a", "t-b"]})

    def call(llm):
        if llm.id == "t-a":
            raise RequestTooLarge("Request too large for gpt-4o on tokens per min (TPM): Limit 30000")
        return reply()

    _, decision = lb.run(config, config.role("tp", "r"), call)
    assert decision.llm.id == "t-b"
    state = lb.states(config)["t-a"]
    assert (state["breaker"], state["failure_rate"]) == ("closed", 0)
    assert take(lb, config).llm.id == "t-a"  # the next call, a smaller one, goes there again


def test_rule_6_the_time_a_failed_attempt_took_is_not_counted_as_waiting(lb, clock):
    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a"]})

    def call(llm):
        clock.now += 40  # each call takes 40 s
        if llm.id == "t-a":
            raise EngineUnavailable("connection reset after 40 s")
        return reply(latency=40)

    _, decision = lb.run(config, config.role("tp", "r"), call, deadline=clock.now + 300)
    assert decision.llm.id == "t-b"
    assert decision.waited_s == 0
    assert "waited_ms" not in decision.as_detail()


def test_rule_6_a_permanent_error_fails_the_step_and_attempts_are_bounded(lb):
    config = config_with([{"id": "t-a"}, {"id": "t-b"}, {"id": "t-c"}])
    calls = []

    def bad(llm):
        calls.append(llm.id)
        raise EngineBadRequest("the prompt is malformed")

    with pytest.raises(EngineBadRequest, match="malformed"):
        lb.run(config, config.role("tp", "r"), bad)
    assert len(calls) == 1

    bounded = LoadBalancer(lb.redis, clock=lb.clock, sleep=lb.sleep, policy=Policy(max_attempts=2))
    calls.clear()

    def down(llm):
        calls.append(llm.id)
        raise EngineUnavailable(f"{llm.id} down")

    with pytest.raises(EngineUnavailable):
        bounded.run(config, config.role("tp", "r"), down)
    assert len(calls) == 2


def test_rule_6_no_failover_attempt_starts_when_the_deadline_leaves_no_time_for_it(lb, clock):
    """After an engine timeout at the step's deadline, a free candidate got a new attempt (its timeout
    raised to a second by the caller, a llama.cpp model loaded first, outside any timeout)."""
    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a", "t-b"]})
    role = config.role("tp", "r")
    calls = []

    def first_times_out(left_s, deadline):
        def call(llm):
            calls.append(llm.id)
            if len(calls) == 1:
                clock.now = deadline - left_s
                raise EngineTimeout("no reply in time")
            return reply()

        return call

    for left_s in (0.0, 0.5):
        calls.clear()
        deadline = clock.now + 60
        with pytest.raises(EngineTimeout, match="no reply in time"):
            lb.run(config, role, first_times_out(left_s, deadline), deadline=deadline)
        assert len(calls) == 1
    calls.clear()
    deadline = clock.now + 60
    _, decision = lb.run(config, role, first_times_out(5.0, deadline), deadline=deadline)  # time enough: failover
    assert len(calls) == 2
    assert decision.llm.id == calls[1] != calls[0]


def test_rule_6_a_failover_waits_for_a_slot_only_while_an_attempt_still_has_time(lb, clock):
    """Its wait ran to the deadline itself and ended in NoCapacity, not the LLM's own error."""
    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a", "t-b"]})
    role = config.role("tp", "r")
    take(lb, config, exclude={"t-a": "taken by the test"})  # t-b's one slot is held past the deadline (its lease)
    deadline = clock.now + 20

    def call(llm):
        clock.now = deadline - 5
        raise EngineUnavailable(f"{llm.id} is down")

    with pytest.raises(EngineUnavailable, match="t-a is down") as error:
        lb.run(config, role, call, deadline=deadline)
    assert not isinstance(error.value, NoCapacity)
    assert deadline - lb.policy.min_attempt_s - 0.1 <= clock.now <= deadline - lb.policy.min_attempt_s


def test_rule_6_a_prompt_over_the_context_fails_over_to_a_larger_context_only(lb):
    """A prompt that rule 1's estimate undercounted (text it counts badly, images) failed the step on the
    first LLM, though a candidate with a larger context could take it."""
    config = config_with(
        [{"id": "t-small", "context_length": 2048}, {"id": "t-same", "context_length": 2048},
         {"id": "t-big", "context_length": 8192}],
        {"preferred_llms": ["t-small", "t-same", "t-big"]},
    )  # fmt: skip
    role = config.role("tp", "r")
    calls = []

    def call(llm):
        calls.append(llm.id)
        if llm.context_length < 8192:
            raise ContextTooLong(f"the prompt does not fit {llm.context_length} tokens")
        return reply()

    _, decision = lb.run(config, role, call)
    assert calls == ["t-small", "t-big"]
    assert decision.excluded["t-same"] == (
        "rule 6: context of 2048 tokens, no larger than that of t-small, which the prompt did not fit"
    )
    assert lb.states(config)["t-small"]["failure_rate"] == 0  # the request's fault, not the LLM's (rule 3)

    calls.clear()
    only_small = config_with([{"id": "t-small"}, {"id": "t-same"}], {"preferred_llms": ["t-small", "t-same"]})
    with pytest.raises(ContextTooLong):
        lb.run(only_small, only_small.role("tp", "r"), call)
    assert calls == ["t-small"]


# --- rule 7 -----------------------------------------------------------------------------------


def test_rule_7_past_the_daily_budget_only_local_llms_are_candidates(lb, clock):
    config = config_with(
        [{"id": "t-api", "source": "api", "cost_per_1k_tokens": {"prompt": 1.0, "completion": 2.0}}, {"id": "t-local"}],
        {"preferred_llms": ["t-api"], "max_tokens": 10},
        daily_budget=0.05,
    )
    role = config.role("tp", "r")
    _, decision = lb.run(config, role, lambda llm: reply(prompt=10, tokens=10), budget=0.05)
    assert decision.llm.id == "t-api"  # spent 0.03
    # Its worst cost (no prompt counted, 10 completion tokens: 0.02) still fits; it costs 0.03: spent 0.06.
    lb.run(config, role, lambda llm: reply(prompt=10, tokens=10), budget=0.05)
    _, decision = lb.run(config, role, lambda llm: reply(), budget=0.05)
    assert decision.llm.id == "t-local"
    assert decision.excluded["t-api"] == "rule 7: the daily budget of 0.05 for tp is spent"
    clock.now += 86400  # a new day
    assert take(lb, config, budget=0.05).llm.id == "t-api"


def paid_config():
    """One api LLM at 1 (prompt) and 2 (completion) a thousand tokens, 4 calls at once, for a role of 10 tokens
    at most in a profile with a daily budget of 1."""
    return config_with(
        [{"id": "t-api", "source": "api", "cost_per_1k_tokens": {"prompt": 1.0, "completion": 2.0},
          "max_concurrency": 4}],
        {"max_tokens": 10}, daily_budget=1.0,
    )  # fmt: skip


class MemoryLedger:
    """``SpendingLedger`` in memory: the database's (balancer/spending.py) is tested in test_spending.py."""

    def __init__(self, *, down: bool = False) -> None:
        self.days: dict[tuple[str, str], float] = {}
        self.down = down
        self.reads = self.writes = 0

    def total(self, profile: str, day: str) -> float:
        self.reads += 1
        if self.down:
            raise OSError("the database is down")
        return self.days.get((profile, day), 0.0)

    def add(self, profile: str, day: str, amount: float) -> None:
        self.writes += 1
        if self.down:
            raise OSError("the database is down")
        self.days[profile, day] = self.days.get((profile, day), 0.0) + amount


def test_rule_7_the_days_spending_outlives_a_redis_that_lost_its_data(client, clock):
    """Found by review: the spending was kept only in Redis (DESIGN: nothing only there that a user would
    miss); a Redis restarted without its data let the budget be spent again the same day."""
    ledger = MemoryLedger()
    lb = LoadBalancer(client, clock=clock, sleep=clock.sleep, rng=random.Random(7), ledger=ledger)
    config = config_with(
        [{"id": "t-api", "source": "api", "cost_per_1k_tokens": {"prompt": 1.0, "completion": 2.0}}, {"id": "t-local"}],
        {"preferred_llms": ["t-api"], "max_tokens": 10},
        daily_budget=0.05,
    )
    role = config.role("tp", "r")
    for _ in range(2):
        lb.run(config, role, lambda llm: reply(prompt=10, tokens=10), budget=0.05)  # 0.03 each
    day = lb._day()
    assert ledger.total("tp", day) == pytest.approx(0.06)
    for key in client.scan_iter("aiagent:lb:spend*:tp:*"):  # Redis restarted without its data
        client.delete(key)
    decision = take(lb, config, budget=0.05)
    assert decision.llm.id == "t-local"
    assert decision.excluded["t-api"] == "rule 7: the daily budget of 0.05 for tp is spent"
    assert float(client.get(lb._spend_key("tp"))) == pytest.approx(0.06)
    lb.record(decision, result=reply())  # its slot back (a local LLM's call costs nothing)
    # A call recorded in Redis after the loss and before the seeding is kept: the larger count stands.
    client.delete(lb._seeded_key("tp", day))
    client.set(lb._spend_key("tp"), 0.5)
    take(lb, config, budget=0.05)
    assert float(client.get(lb._spend_key("tp"))) == pytest.approx(0.5)
    clock.now += 86400  # a new day: nothing spent, in Redis or the ledger
    assert take(lb, config, budget=0.05).llm.id == "t-api"


def test_rule_7_the_ledger_is_read_every_few_minutes_only_with_a_budget_and_a_down_one_fails_no_call(
    client, clock, caplog
):
    from balancer import load_balancer

    paid = [{"id": "t-api", "source": "api", "cost_per_1k_tokens": {"prompt": 1.0, "completion": 2.0}}]
    config = config_with(paid, {"preferred_llms": ["t-api"], "max_tokens": 10}, daily_budget=1.0)
    role = config.role("tp", "r")
    ledger = MemoryLedger()
    lb = LoadBalancer(client, clock=clock, sleep=clock.sleep, rng=random.Random(7), ledger=ledger)
    for _ in range(3):  # without a budget: neither read nor written
        lb.run(config, role, lambda llm: reply(prompt=10, tokens=10))
    assert (ledger.reads, ledger.writes) == (0, 0)
    for _ in range(3):  # with one: read once (the mark lasts LEDGER_RECHECK_S), each call's cost written
        lb.run(config, role, lambda llm: reply(prompt=10, tokens=10), budget=1.0)
    assert (ledger.reads, ledger.writes) == (1, 3)
    client.delete(lb._seeded_key("tp", lb._day()))  # the mark's few minutes are over
    lb.run(config, role, lambda llm: reply(prompt=10, tokens=10), budget=1.0)
    assert ledger.reads == 2

    down = MemoryLedger(down=True)
    lb = LoadBalancer(client, clock=clock, sleep=clock.sleep, rng=random.Random(7), ledger=down)
    client.delete(lb._seeded_key("tp", lb._day()))
    for _ in range(3):  # Redis's count stands; the ledger is not asked again for LEDGER_RETRY_S
        _, decision = lb.run(config, role, lambda llm: reply(prompt=10, tokens=10), budget=1.0)
        assert decision.llm.id == "t-api"
    assert (down.reads, down.writes) == (1, 3)
    assert "could not be read from the ledger" in caplog.text and "was not added to the ledger" in caplog.text
    assert load_balancer.LEDGER_RETRY_S < load_balancer.LEDGER_RECHECK_S


def test_rule_7_each_call_holds_its_worst_cost_so_calls_in_flight_cannot_overrun_the_budget(lb, client, clock):
    """The spending was checked when a call was placed and added when it ended: calls placed together
    could each see the budget unspent, and the day ended over it by what they cost."""
    config = config_with(
        [{"id": "t-api", "source": "api", "cost_per_1k_tokens": {"prompt": 1.0, "completion": 2.0},
          "max_concurrency": 8}, {"id": "t-local", "max_concurrency": 8}],
        {"preferred_llms": ["t-api"], "max_tokens": 10},
        daily_budget=0.11,
    )  # fmt: skip
    role = config.role("tp", "r")
    # A call of 20 prompt tokens may cost 0.02 + 10 x 0.002 = 0.04: two fit in 0.11, a third does not.
    first, second = take(lb, config, prompt_tokens=20, budget=0.11), take(lb, config, prompt_tokens=20, budget=0.11)
    assert (first.llm.id, second.llm.id) == ("t-api", "t-api")
    third = take(lb, config, prompt_tokens=20, budget=0.11)
    assert third.llm.id == "t-local"
    assert third.excluded["t-api"] == "rule 7: the calls in flight hold what is left of the daily budget of 0.11 for tp"
    lb.record(first, result=reply(prompt=20, tokens=2), role=role)  # cost 0.024: its hold gives back 0.016
    assert float(client.get(lb._spend_key("tp"))) == pytest.approx(0.024)
    assert take(lb, config, prompt_tokens=20, budget=0.11).llm.id == "t-api"  # 0.024 + 0.04 + 0.04 <= 0.11
    # A call whose worst cost is more than is left goes elsewhere at once, whatever is in flight.
    big = take(lb, config, prompt_tokens=100, budget=0.11)
    assert big.llm.id == "t-local"
    assert big.excluded["t-api"] == (
        "rule 7: the call may cost up to 0.12, more than is left of the daily budget of 0.11 for tp (0.086)"
    )


def test_rule_7_a_profiles_budget_reads_what_is_spent_held_and_left(client, clock):
    """What the metrics show of a budget: today's spending as a decision reads it (the ledger's when Redis
    lost it), the worst cost of the calls in flight, and what is left; with Redis away, the ledger's."""
    ledger = MemoryLedger()
    lb = LoadBalancer(client, clock=clock, sleep=clock.sleep, rng=random.Random(7), ledger=ledger)
    config = paid_config()
    role = config.role("tp", "r")
    day = lb._day()
    assert lb.budget("tp", 1.0) == {"day": day, "daily_budget": 1.0, "spent": 0.0, "held": 0.0, "left": 1.0}
    lb.run(config, role, lambda llm: reply(prompt=10, tokens=10), budget=1.0)  # costs 0.03
    first = take(lb, config, prompt_tokens=20, budget=1.0)  # holds 0.04 while it runs
    take(lb, config, prompt_tokens=20, budget=1.0)  # holds 0.04, and its caller dies: the hold expires
    assert lb.budget("tp", 1.0) == {"day": day, "daily_budget": 1.0, "spent": 0.03, "held": 0.08, "left": 0.89}
    clock.now += lb.policy.slot_lease_s / 2
    assert lb.renew_slot(first)
    clock.now += lb.policy.slot_lease_s / 2 + 1  # the second's lease is over, the first's renewed
    assert lb.budget("tp", 1.0)["held"] == pytest.approx(0.04)
    lb.record(first, result=reply(prompt=20, tokens=5), role=role)  # costs 0.03
    assert lb.budget("tp", 1.0) == {"day": day, "daily_budget": 1.0, "spent": 0.06, "held": 0.0, "left": 0.94}
    for key in client.scan_iter("aiagent:lb:spend*:tp:*"):  # Redis restarted without its data
        client.delete(key)
    assert lb.budget("tp", 1.0)["spent"] == pytest.approx(0.06)
    ledger.days["tp", day] = 2.5  # over the budget: nothing left
    away = LoadBalancer(redis.Redis(port=free_port()), clock=clock, ledger=ledger)
    assert away.budget("tp", 1.0) == {"day": day, "daily_budget": 1.0, "spent": 2.5, "held": None, "left": None}
    with pytest.raises(redis.RedisError):
        LoadBalancer(redis.Redis(port=free_port()), clock=clock).budget("tp", 1.0)


def test_rule_7_a_call_that_timed_out_or_was_stopped_unseen_is_charged_its_worst_cost(lb, client):
    """It gave its hold back and cost nothing, though its provider may have generated, and billed, the whole
    answer: every such call could go past the budget by its worst cost."""
    from llm_engines.errors import EngineTimeout

    config = paid_config()
    role = config.role("tp", "r")
    lb.record(take(lb, config, prompt_tokens=20, budget=1.0), error=EngineTimeout("no answer in 30s"), role=role)
    assert float(client.get(lb._spend_key("tp"))) == pytest.approx(0.04)
    lb.record(take(lb, config, prompt_tokens=20, budget=1.0), stopped=True, role=role)
    assert float(client.get(lb._spend_key("tp"))) == pytest.approx(0.08)
    lb.record(take(lb, config, prompt_tokens=20, budget=1.0), error=EngineUnavailable("refused"), role=role)
    assert float(client.get(lb._spend_key("tp"))) == pytest.approx(0.08)  # nothing was generated
    held, _ = lb._hold_keys("tp")
    assert client.hlen(held) == 0


def test_rule_7_a_dead_callers_hold_expires_with_its_slot_and_a_live_one_is_renewed(lb, client, clock):
    config = config_with(
        [{"id": "t-api", "source": "api", "cost_per_1k_tokens": {"completion": 1.0}, "max_concurrency": 8},
         {"id": "t-local"}],
        {"preferred_llms": ["t-api"], "max_tokens": 100},
    )  # fmt: skip
    live = take(lb, config, budget=0.2)  # holds 0.1
    take(lb, config, budget=0.2)  # holds 0.1: its caller dies
    assert take(lb, config, budget=0.2).llm.id == "t-local"
    clock.now += lb.policy.slot_lease_s * 0.6
    assert lb.renew_slot(live)
    clock.now += lb.policy.slot_lease_s * 0.6  # the dead caller's lease has run out, the live one's not
    assert take(lb, config, budget=0.2).llm.id == "t-api"
    assert take(lb, config, budget=0.2).llm.id == "t-local"  # the live call still holds its 0.1
    held, _ = lb._hold_keys("tp")
    assert client.hlen(held) == 2


# --- rule 8 -----------------------------------------------------------------------------------


def test_rule_8_a_sticky_llm_is_kept(lb):
    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a"]})
    assert take(lb, config, sticky="t-b").llm.id == "t-b"


def test_decisions_record_the_choice_the_candidates_and_the_exclusions(lb):
    config = config_with([{"id": "t-a"}, {"id": "t-off", "toggle": False}])
    detail = take(lb, config).as_detail()
    assert detail == {"chosen": "t-a", "candidates": ["t-a"], "excluded": {"t-off": "rule 1: toggled off"}}


def test_no_candidate_says_why(lb):
    config = config_with([{"id": "t-off", "toggle": False}], {"capabilities": ["vision"]})
    with pytest.raises(NoCandidate, match="t-off: rule 1: toggled off"):
        lb.select(config, config.role("tp", "r"))


def test_rule_5_a_full_faster_llm_is_worth_waiting_for_unless_many_wait(lb):
    config = config_with([{"id": "t-fast"}, {"id": "t-slow", "max_concurrency": 5}])
    role = config.role("tp", "r")
    for llm_id, latency in (("t-fast", 1.0), ("t-slow", 10.0)):
        lb.record(take(lb, config, sticky=llm_id), result=reply(latency=latency))
    take(lb, config)  # the fast one is now full
    assert isinstance(lb.select(config, role, waiter="w0"), Wait)  # one fast call's wait beats 10x the time
    for index in range(1, 30):
        outcome = lb.select(config, role, waiter=f"w{index}")
        if isinstance(outcome, Decision):
            break
    assert outcome.llm.id == "t-slow"
    assert 5 < index < 15  # once about ten calls wait for the fast one, the slow one is sooner


def test_rule_4_a_live_holder_renews_its_lease(lb, clock):
    config = config_with([{"id": "t-a"}])
    held = take(lb, config)
    clock.now += lb.policy.slot_lease_s * 0.6
    lb.renew_slot(held)  # what the holder's renewal thread does while the call runs
    clock.now += lb.policy.slot_lease_s * 0.6  # past the first lease, inside the renewed one
    assert isinstance(lb.select(config, config.role("tp", "r")), Wait)
    clock.now += lb.policy.slot_lease_s  # the holder stopped renewing (it died)
    assert take(lb, config).llm.id == "t-a"


# --- rule 3 and rule 5: an LLM that fails some of its calls --------------------------------------


def answer_then_trip(lb, config, clock, llm_id):
    """``llm_id`` answers one call, then fails (each time after 0.05 s) until its breaker trips.
    Returns how many calls failed in a row."""
    lb.record(take(lb, config, sticky=llm_id), result=reply(latency=1.0))
    failures = 0
    while lb.states(config)[llm_id]["breaker"] == "closed":
        decision = take(lb, config, sticky=llm_id)
        assert decision.llm.id == llm_id
        clock.now += 0.05
        fail(lb, decision)
        failures += 1
    return failures


def test_rule_3_a_tripped_llm_that_still_answers_is_a_last_resort_when_the_others_are_full(lb, clock):
    config = config_with([{"id": "t-flaky"}, {"id": "t-ok"}], {"max_tokens": 10})
    lb.record(take(lb, config, sticky="t-ok"), result=reply(latency=1.0))
    answer_then_trip(lb, config, clock, "t-flaky")  # 4 of 5 calls failed
    healthy = take(lb, config)
    assert healthy.llm.id == "t-ok"  # a healthy LLM with a free slot comes first
    assert healthy.excluded["t-flaky"].startswith("rule 3: cooling down until")
    resort = take(lb, config, waiter="w0")  # t-ok is full: rather than wait, try t-flaky
    assert resort.llm.id == "t-flaky"
    assert resort.candidates == ("t-ok", "t-flaky")
    assert resort.excluded["t-ok"] == "rule 4: all 1 slots in use"
    assert resort.as_detail()["last_resort"].startswith("rule 3: cooling down")
    assert not resort.probe
    lb.record(resort, result=reply(latency=1.0))
    assert lb.states(config)["t-flaky"]["breaker"] == "open"  # only the probe closes it


def test_rule_3_a_dead_llm_is_no_last_resort(lb, clock):
    config = config_with([{"id": "t-dying"}, {"id": "t-ok"}], {"max_tokens": 10})
    role = config.role("tp", "r")
    lb.record(take(lb, config, sticky="t-ok"), result=reply(latency=1.0))
    in_a_row = answer_then_trip(lb, config, clock, "t-dying")
    cooling_until = lb.states(config)["t-dying"]["cooling_until"]
    take(lb, config)  # t-ok is now full
    while in_a_row < lb.policy.dead_after:
        resort = take(lb, config, waiter="w0")
        assert resort.llm.id == "t-dying"
        fail(lb, resort)
        in_a_row += 1
    # Failed calls of last resort do not lengthen the cooldown, but ten failures in a row mean dead.
    assert lb.states(config)["t-dying"]["cooling_until"] == cooling_until
    waiting = lb.select(config, role, waiter="w0")
    assert isinstance(waiting, Wait)
    assert waiting.excluded["t-dying"].startswith("rule 3: cooling down until")


def test_rule_3_an_llm_that_never_answered_is_no_last_resort(lb, clock):
    config = config_with([{"id": "t-never"}, {"id": "t-ok"}], {"max_tokens": 10})
    lb.record(take(lb, config, sticky="t-ok"), result=reply(latency=1.0))
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config, sticky="t-never"))
    take(lb, config)
    assert isinstance(lb.select(config, config.role("tp", "r"), waiter="w0"), Wait)


def test_rule_3_retry_after_holds_even_a_last_resort(lb, clock):
    config = config_with([{"id": "t-limited"}, {"id": "t-ok"}], {"max_tokens": 10})
    role = config.role("tp", "r")
    for llm_id in ("t-ok", "t-limited"):
        lb.record(take(lb, config, sticky=llm_id), result=reply(latency=1.0))
    fail(lb, take(lb, config, sticky="t-limited"), EngineRateLimited("slow down", retry_after=30))
    take(lb, config)  # t-ok is now full
    clock.now += 29
    assert isinstance(lb.select(config, role, waiter="w0"), Wait)
    clock.now += 2
    assert take(lb, config, waiter="w0").llm.id == "t-limited"


def test_rule_3_only_the_probe_reopens_a_tripped_breaker(lb, clock):
    config = config_with([{"id": "t-a", "max_concurrency": 10}, {"id": "t-b"}], {"preferred_llms": ["t-a"]})
    in_flight = [take(lb, config) for _ in range(3)]  # calls that began before the trip
    for _ in range(lb.policy.consecutive_failures):
        fail(lb, take(lb, config))
    cooling_until = lb.states(config)["t-a"]["cooling_until"]
    for decision in in_flight:
        fail(lb, decision)  # they end after it: the cooldown is not lengthened
    assert lb.states(config)["t-a"]["cooling_until"] == cooling_until
    assert lb.states(config)["t-a"]["trips"] == 1
    clock.now += lb.policy.base_cooldown_s
    probe = take(lb, config)
    assert probe.probe
    fail(lb, probe)  # the probe's failure does: twice as long
    assert lb.states(config)["t-a"]["trips"] == 2


def test_rule_5_failures_cost_the_time_they_take(lb, clock):
    llms = [{"id": "t-fails-slowly"}, {"id": "t-fails-fast"}, {"id": "t-steady"}]
    config = config_with([{**llm, "max_concurrency": 5} for llm in llms], {"max_tokens": 10})
    lb.record(take(lb, config, sticky="t-steady"), result=reply(latency=1.0))
    for llm_id, failed_after in (("t-fails-fast", 0.05), ("t-fails-slowly", 3.0)):
        for _ in range(4):  # every other call fails: under the breaker's share, never five in a row
            lb.record(take(lb, config, sticky=llm_id), result=reply(latency=1.0))
            decision = take(lb, config, sticky=llm_id)
            clock.now += failed_after
            fail(lb, decision)
    assert lb.states(config)["t-fails-slowly"]["breaker"] == "closed"
    # The same time when they answer, the same failure rate: the failures that take longer cost more
    # (a failure after 0.05 s adds about 5 %, within rule 5's 10 % of the steady one).
    for _ in range(20):
        decision = take(lb, config)
        assert decision.candidates[-1] == "t-fails-slowly"
        lb.redis.zrem(lb._key("slots", decision.llm.id), decision.slot)


def test_rule_5_a_free_llm_that_fails_quickly_is_tried_rather_than_wait(lb, client, clock):
    def pool(failed_after):
        """t-fast answers in 1 s; t-flaky too, but fails every other call after ``failed_after`` s."""
        for key in client.scan_iter("aiagent:lb:*:t-*"):
            client.delete(key)
        config = config_with([{"id": "t-fast"}, {"id": "t-flaky"}], {"max_tokens": 10})
        lb.record(take(lb, config, sticky="t-fast"), result=reply(latency=1.0))
        for _ in range(4):
            lb.record(take(lb, config, sticky="t-flaky"), result=reply(latency=1.0))
            decision = take(lb, config, sticky="t-flaky")
            clock.now += failed_after
            fail(lb, decision)
        take(lb, config, sticky="t-fast")  # t-fast is now full
        return config

    # A failure after 0.05 s ends well before a slot on t-fast would come (in about 1 s): trying
    # t-flaky costs next to nothing and wins about half of the time.
    assert take(lb, pool(failed_after=0.05), waiter="w0").llm.id == "t-flaky"
    # A failure after 3 s costs more than the wait that trying could save.
    config = pool(failed_after=3.0)
    assert isinstance(lb.select(config, config.role("tp", "r"), waiter="w0"), Wait)


def test_every_call_run_makes_is_told_to_the_observer_and_an_observer_failure_fails_no_call(client, clock):
    samples = []
    lb = LoadBalancer(client, clock=clock, sleep=clock.sleep, rng=random.Random(7),
                      on_call=lambda sample, pipe: samples.append(sample))  # fmt: skip
    config = config_with([{"id": "t-a"}, {"id": "t-b"}], {"preferred_llms": ["t-a", "t-b"]})

    def call(llm):
        if llm.id == "t-a":
            clock.now += 0.5
            raise EngineUnavailable("connection refused")
        return reply(latency=2.0, ttft=0.25, tokens=12, prompt=7)

    lb.run(config, config.role("tp", "r"), call)
    assert [(s.llm, s.profile, s.role, s.outcome) for s in samples] == [
        ("t-a", "tp", "r", "unavailable"),
        ("t-b", "tp", "r", "ok"),
    ]
    assert (samples[0].latency_s, samples[0].completion_tokens, samples[0].time_to_first_token_s) == (0.5, 0, None)
    assert (samples[1].latency_s, samples[1].time_to_first_token_s) == (2.0, 0.25)
    assert (samples[1].prompt_tokens, samples[1].completion_tokens, samples[1].at) == (7, 12, clock.now)

    def broken(sample, pipe):
        raise RuntimeError("the channel is down")

    lb.on_call = broken
    result, _ = lb.run(config, config.role("tp", "r"), lambda llm: reply())
    assert result.text == "ok"


class CountingRedis(redis.Redis):
    """A client that counts its round trips to Redis: commands, scripts and pipelines."""

    trips = 0

    def execute_command(self, *args, **options):
        self.trips += 1
        return super().execute_command(*args, **options)

    def pipeline(self, *args, **kwargs):
        pipe = super().pipeline(*args, **kwargs)
        execute = pipe.execute

        def counted(*a, **k):
            self.trips += 1
            return execute(*a, **k)

        pipe.execute = counted
        return pipe


def test_a_call_is_recorded_spent_and_observed_in_one_round_trip_and_a_failing_observer_command_fails_no_call(
    client, clock, redis_url, caplog
):
    stream = "aiagent:lb:samples:t-observed"
    client.delete(stream)
    counting = CountingRedis.from_url(redis_url)

    def observe(sample, pipe):
        pipe.xadd(stream, {"llm": sample.llm, "outcome": sample.outcome, "cost": sample.cost})

    lb = LoadBalancer(counting, clock=clock, sleep=clock.sleep, rng=random.Random(7), on_call=observe)
    config = config_with(
        [{"id": "t-paid", "source": "api", "cost_per_1k_tokens": {"prompt": 1.0, "completion": 2.0}}], daily_budget=5
    )
    role = config.role("tp", "r")
    lb.run(config, role, lambda llm: reply(prompt=10, tokens=10))  # warm: the scripts are loaded
    counting.trips = 0
    lb.run(config, role, lambda llm: reply(prompt=10, tokens=10))
    # The snapshot, the slot, then the slot's release, the outcome, the averages, the day's spending
    # (INCRBYFLOAT and EXPIRE) and the observer's XADD together.
    assert counting.trips == 3
    assert float(client.get(lb._spend_key("tp"))) == pytest.approx(0.06)
    assert 0 < client.ttl(lb._spend_key("tp")) <= 3 * 86400
    assert [fields[b"cost"] for _, fields in client.xrange(stream)] == [b"0.03", b"0.03"]

    client.delete(stream)
    client.set(stream, "not a stream")  # the observer's XADD now fails (WRONGTYPE)
    result, _ = lb.run(config, role, lambda llm: reply(prompt=10, tokens=10))
    assert result.text == "ok"
    assert "the call observer's command failed on a sample of t-paid: WRONGTYPE" in caplog.text
    assert client.zcard(lb._key("slots", "t-paid")) == 0  # the slot was released all the same
    assert float(client.get(lb._spend_key("tp"))) == pytest.approx(0.09)
    client.delete(stream)

    # An argument redis-py cannot send would fail the whole pipeline: the observer's commands are
    # dropped, the call's record is sent.
    lb.on_call = lambda sample, pipe: pipe.xadd(stream, {"cost": None})
    caplog.clear()
    result, _ = lb.run(config, role, lambda llm: reply(prompt=10, tokens=10))
    assert result.text == "ok"
    assert "the call observer failed on a sample of t-paid" in caplog.text
    assert client.zcard(lb._key("slots", "t-paid")) == 0
    assert float(client.get(lb._spend_key("tp"))) == pytest.approx(0.12)
    assert not client.exists(stream)
    # The spending's commands come before the outcome's: record still answers with the breaker's state.
    decision = take(lb, config)
    assert lb.record(decision, result=reply(prompt=10, tokens=10), role=role) == "closed"


def test_a_cooldown_past_what_a_date_can_hold_is_written_not_raised():
    """A breaker opened by a Retry-After of 1e12 s before it was capped: selections and the LLM list
    write its cooldown's date, which must not raise."""
    from balancer.load_balancer import _iso

    assert _iso(1e12).startswith("9999-12-31")
    assert _iso(0) == "1970-01-01T00:00:00Z"
