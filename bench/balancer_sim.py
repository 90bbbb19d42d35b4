"""The real load balancer against simulated engines on a simulated clock, beside the usual strategies.

Every strategy sees the same arrivals, the same engines and the same dice (which call fails on
which engine), in these scenarios: identical engines; one engine 5x slower; one engine failing
half of its calls; one engine dying mid-run; engines with concurrency caps under a burst.

Strategies:
- balancer: balancer/load_balancer.py itself (select and record, its state in a real Redis, its
  clock the simulation's). Calls wait centrally for a slot; transient failures fail over.
- random, round-robin, least-busy (fewest calls running or queued): each call is sent to an
  engine's queue when it arrives; a failed call is sent again elsewhere (at most 3 attempts).
- oracle: an omniscient scheduler. It knows every call's service time and whether it would fail,
  and sends each call to the engine where it finishes first.

It prints p50 and p99 of completion time (arrival to answer) and the success rate per scenario and
strategy, with the ratios to the oracle and to the best baseline; then the cost of one decision
with 50 configured LLMs against a bare Redis round trip measured in the same run.

    .venv/bin/python bench/balancer_sim.py [--requests 1000] [--redis-url redis://127.0.0.1:6379/13]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import random
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

import redis  # noqa: E402

from balancer.configuration import parse_configuration  # noqa: E402
from balancer.load_balancer import Decision, LoadBalancer  # noqa: E402
from llm_engines.base import ChatResult  # noqa: E402
from llm_engines.errors import EngineUnavailable  # noqa: E402

START = 1_900_000_000.0  # the simulation's epoch, on the balancer's clock
MAX_ATTEMPTS = 3
FAIL_FAST_S = 0.05  # a refused connection
TOKENS_PER_CALL = 100


@dataclass(frozen=True)
class EngineSpec:
    ttft: float = 0.2
    tpot: float = 0.02
    concurrency: int = 2
    fail_share: float = 0.0
    dies_at: float | None = None

    def service(self, tokens: int, jitter: float) -> float:
        return (self.ttft + tokens * self.tpot) * jitter


@dataclass(frozen=True)
class Request:
    id: int
    arrival: float
    tokens: int
    jitter: tuple[float, ...]  # per engine
    dice: tuple[float, ...]  # per engine: below the engine's fail share, the call fails


@dataclass
class Scenario:
    name: str
    engines: list[EngineSpec]
    requests: list[Request]


def make_requests(count: int, rate: float, engines: int, seed: int, burst: int = 0) -> list[Request]:
    rng = random.Random(seed)
    now = 0.0
    requests = []
    for index in range(count):
        if index >= burst:
            now += rng.expovariate(rate)
        tokens = max(10, int(rng.lognormvariate(0, 0.4) * TOKENS_PER_CALL))
        jitter = tuple(rng.uniform(0.9, 1.1) for _ in range(engines))
        dice = tuple(rng.random() for _ in range(engines))
        requests.append(Request(index, now, tokens, jitter, dice))
    return requests


def scenarios(count: int, seed: int) -> list[Scenario]:
    fast = EngineSpec()
    # One fast engine serves 2 calls of about 2.2 s at once: about 0.9 calls a second.
    return [
        Scenario("identical engines", [fast] * 4, make_requests(count, 2.7, 4, seed)),
        Scenario(
            "one engine 5x slower",
            [EngineSpec(ttft=1.0, tpot=0.1), fast, fast, fast],
            make_requests(count, 2.0, 4, seed),
        ),
        Scenario(
            "one engine failing half its calls",
            [EngineSpec(fail_share=0.5), fast, fast, fast],
            make_requests(count, 2.2, 4, seed),
        ),
        Scenario(
            "one engine dying mid-run",
            [EngineSpec(dies_at=count / 2.2 * 0.4), fast, fast, fast],
            make_requests(count, 2.2, 4, seed),
        ),
        Scenario(
            "concurrency caps under a burst",
            [
                EngineSpec(concurrency=1),
                EngineSpec(concurrency=1),
                EngineSpec(concurrency=2, tpot=0.04),
                EngineSpec(concurrency=4, tpot=0.06),
            ],
            make_requests(count, 1.5, 4, seed, burst=min(150, count // 4)),
        ),
    ]


@dataclass
class Outcome:
    done: dict[int, float] = field(default_factory=dict)  # request -> completion time
    failed: set[int] = field(default_factory=set)


class Simulation:
    """Engines with FIFO queues and ``concurrency`` servers each, driven by an event heap."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.now = 0.0
        self.events: list = []
        self.seq = itertools.count()
        self.busy = [0] * len(scenario.engines)
        self.queues: list[deque] = [deque() for _ in scenario.engines]
        self.outcome = Outcome()

    def at(self, moment: float, action, *args) -> None:
        heapq.heappush(self.events, (moment, next(self.seq), action, args))

    def run(self) -> Outcome:
        for request in self.scenario.requests:
            self.at(request.arrival, self.arrive, request)
        while self.events:
            self.now, _, action, args = heapq.heappop(self.events)
            action(*args)
        return self.outcome

    def call_outcome(self, request: Request, engine: int, start: float) -> tuple[bool, float]:
        """Whether the call succeeds, and when it ends."""
        spec = self.scenario.engines[engine]
        if spec.dies_at is not None and start >= spec.dies_at:
            return False, start + FAIL_FAST_S
        service = spec.service(request.tokens, request.jitter[engine])
        if request.dice[engine] < spec.fail_share:
            return False, start + 0.3 * service
        if spec.dies_at is not None and start + service > spec.dies_at:
            return False, spec.dies_at
        return True, start + service

    def start(self, request: Request, engine: int, attempt: int, token=None) -> None:
        self.busy[engine] += 1
        ok, end = self.call_outcome(request, engine, self.now)
        self.at(end, self.finish, request, engine, attempt, ok, end - self.now, token)

    def finish(self, request, engine, attempt, ok, took, token) -> None:
        self.busy[engine] -= 1
        self.finished(request, engine, attempt, ok, took, token)

    def succeed(self, request: Request) -> None:
        self.outcome.done[request.id] = self.now - request.arrival

    # Subclasses decide: arrive(request) and finished(...).


class EarlyBinding(Simulation):
    """Each call goes to one engine's queue on arrival (and again on a failure)."""

    def __init__(self, scenario: Scenario, choose) -> None:
        super().__init__(scenario)
        self.choose = choose
        self.tried: dict[int, set[int]] = {}

    def arrive(self, request: Request, attempt: int = 1) -> None:
        tried = self.tried.setdefault(request.id, set())
        options = [e for e in range(len(self.scenario.engines)) if e not in tried] or list(
            range(len(self.scenario.engines))
        )
        engine = self.choose(self, request, options)
        tried.add(engine)
        self.queues[engine].append((request, attempt))
        self.pump(engine)

    def pump(self, engine: int) -> None:
        while self.queues[engine] and self.busy[engine] < self.scenario.engines[engine].concurrency:
            request, attempt = self.queues[engine].popleft()
            self.start(request, engine, attempt)

    def finished(self, request, engine, attempt, ok, took, token) -> None:
        if ok:
            self.succeed(request)
        elif attempt < MAX_ATTEMPTS:
            self.arrive(request, attempt + 1)
        else:
            self.outcome.failed.add(request.id)
        self.pump(engine)


def random_choice(seed: int):
    rng = random.Random(seed)
    return lambda sim, request, options: rng.choice(options)


def round_robin():
    counter = itertools.count()
    return lambda sim, request, options: options[next(counter) % len(options)]


def least_busy(seed: int):
    rng = random.Random(seed)

    def choose(sim, request, options):
        load = {e: sim.busy[e] + len(sim.queues[e]) for e in options}
        low = min(load.values())
        return rng.choice([e for e in options if load[e] == low])

    return choose


class Oracle(EarlyBinding):
    """Knows every service time and every failure: sends each call where it finishes first."""

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario, self.pick)
        self.free_at = [[0.0] * spec.concurrency for spec in scenario.engines]

    def pick(self, sim, request, options) -> int:
        best, best_end = options[0], float("inf")
        for engine in range(len(self.scenario.engines)):
            start = max(self.now, min(self.free_at[engine]))
            ok, end = self.call_outcome(request, engine, start)
            if ok and end < best_end:
                best, best_end = engine, end
        if best_end < float("inf"):
            slots = self.free_at[best]
            slots[slots.index(min(slots))] = best_end
        return best


class BalancerSim(Simulation):
    """The real LoadBalancer, its clock the simulation's, its state in Redis."""

    def __init__(self, scenario: Scenario, client: redis.Redis, seed: int) -> None:
        super().__init__(scenario)
        self.prefix = f"sim{uuid.uuid4().hex[:8]}"
        self.ids = [f"{self.prefix}-e{index}" for index in range(len(scenario.engines))]
        self.config = parse_configuration(
            {
                "llms": [
                    {
                        "id": llm_id,
                        "engine": "instant",
                        "source": "local",
                        "model": llm_id,
                        "max_concurrency": spec.concurrency,
                    }
                    for llm_id, spec in zip(self.ids, scenario.engines, strict=True)
                ],
                "profiles": {
                    "sim": {"roles": {"r": {"agent": "generic", "system_prompt": "s", "max_tokens": TOKENS_PER_CALL}}}
                },
            }
        )
        self.role = self.config.role("sim", "r")
        self.balancer = LoadBalancer(client, clock=lambda: START + self.now, rng=random.Random(seed))
        self.client = client
        self.waiting: deque = deque()
        self.failed_on: dict[int, dict[str, str]] = {}
        self.attempts: dict[int, int] = {}
        self.wake_pending = False

    def cleanup(self) -> None:
        for key in self.client.scan_iter(f"aiagent:lb:*{self.prefix}*"):
            self.client.delete(key)
        self.client.delete(f"aiagent:lb:waiting:{self.role.queue}")

    def arrive(self, request: Request) -> None:
        if not self.try_start(request):
            self.waiting.append(request)
            self.schedule_wake()

    def try_start(self, request: Request) -> bool:
        outcome = self.balancer.select(
            self.config, self.role, exclude=self.failed_on.get(request.id), waiter=str(request.id)
        )
        if not isinstance(outcome, Decision):
            return False
        engine = self.ids.index(outcome.llm.id)
        self.attempts[request.id] = self.attempts.get(request.id, 0) + 1
        self.start(request, engine, self.attempts[request.id], outcome)
        return True

    def finished(self, request, engine, attempt, ok, took, decision) -> None:
        if ok:
            spec = self.scenario.engines[engine]
            result = ChatResult("", "m", 10, request.tokens, took, spec.ttft * request.jitter[engine])
            self.balancer.record(decision, result=result)
            self.succeed(request)
        else:
            self.balancer.record(decision, error=EngineUnavailable("simulated failure"))
            failed = self.failed_on.setdefault(request.id, {})
            failed[self.ids[engine]] = "rule 6: failed in this step"
            if attempt >= MAX_ATTEMPTS or len(failed) == len(self.ids):
                self.outcome.failed.add(request.id)
            elif not self.try_start(request):
                self.waiting.appendleft(request)
        self.pump()

    def pump(self) -> None:
        if self.waiting:
            # Real waiting calls each look again every 50 ms and so stay counted as waiting; here
            # only the first looks again, so the others are kept counted in one go.
            expiry = START + self.now + 2.0
            self.client.zadd(f"aiagent:lb:waiting:{self.role.queue}", {str(r.id): expiry for r in self.waiting})
        while self.waiting:
            if not self.try_start(self.waiting[0]):
                break
            self.waiting.popleft()
        if self.waiting:
            self.schedule_wake()

    def schedule_wake(self) -> None:
        # Cooldowns end and probes are let through with no call finishing: look again now and then.
        if not self.wake_pending:
            self.wake_pending = True
            self.at(self.now + 0.5, self.wake)

    def wake(self) -> None:
        self.wake_pending = False
        self.pump()


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] if ordered else float("nan")


def summarize(outcome: Outcome, total: int) -> tuple[float, float, float]:
    times = list(outcome.done.values())
    return percentile(times, 0.5), percentile(times, 0.99), len(outcome.done) / total


def decision_cost(client: redis.Redis, rounds: int) -> None:
    llms = [
        {"id": f"cost{index:02d}", "engine": "instant", "source": "local", "model": "m", "max_concurrency": 4}
        for index in range(50)
    ]
    config = parse_configuration(
        {"llms": llms, "profiles": {"cost": {"roles": {"r": {"agent": "generic", "system_prompt": "s"}}}}}
    )
    role = config.role("cost", "r")
    balancer = LoadBalancer(client)
    result = ChatResult("", "m", 10, 20, 0.5, 0.05)
    pings, decisions, records = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        client.ping()
        pings.append(time.perf_counter() - started)
        started = time.perf_counter()
        decision = balancer.select(config, role)
        decisions.append(time.perf_counter() - started)
        started = time.perf_counter()
        balancer.record(decision, result=result)
        records.append(time.perf_counter() - started)
    for key in client.scan_iter("aiagent:lb:*:cost*"):
        client.delete(key)
    print(f"\ndecision cost with 50 LLMs, {rounds} decisions, real Redis:")
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}")
    for name, samples in (("bare Redis PING", pings), ("select (decision)", decisions), ("record (outcome)", records)):
        print(f"{name:24}{percentile(samples, 0.5) * 1000:10.3f}{percentile(samples, 0.99) * 1000:10.3f}")
    print(
        f"ratio select/PING: p50 {percentile(decisions, 0.5) / percentile(pings, 0.5):.1f}x, "
        f"p99 {percentile(decisions, 0.99) / percentile(pings, 0.99):.1f}x; target p99 < 2 ms: "
        f"{'met' if percentile(decisions, 0.99) < 0.002 else 'NOT met'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="calls per scenario")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--decisions", type=int, default=3000, help="decisions timed for the cost")
    parser.add_argument("--only", default="", help="run only the scenarios whose name contains this")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
        help="the Redis for the balancer's state (only this run's keys are written, and removed after)",
    )
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    client.ping()
    verdicts = []
    for scenario in scenarios(args.requests, args.seed):
        if args.only not in scenario.name:
            continue
        total = len(scenario.requests)
        strategies = {
            "random": EarlyBinding(scenario, random_choice(args.seed)),
            "round-robin": EarlyBinding(scenario, round_robin()),
            "least-busy": EarlyBinding(scenario, least_busy(args.seed)),
            "oracle": Oracle(scenario),
        }
        balancer_sim = BalancerSim(scenario, client, args.seed)
        started = time.perf_counter()
        try:
            results = {"balancer": summarize(balancer_sim.run(), total)}
        finally:
            balancer_sim.cleanup()
        wall = time.perf_counter() - started
        for name, simulation in strategies.items():
            results[name] = summarize(simulation.run(), total)
        oracle_p99 = results["oracle"][1]
        baselines = {name: results[name] for name in ("random", "round-robin", "least-busy")}
        best_name = min(baselines, key=lambda name: (-baselines[name][2], baselines[name][1]))
        print(f"\n{scenario.name} ({total} calls; the balancer's run took {wall:.1f} s of real time)")
        print(f"{'':14}{'p50 s':>9}{'p99 s':>9}{'success':>9}{'p99/oracle':>12}")
        for name, (p50, p99, success) in results.items():
            print(f"{name:14}{p50:9.2f}{p99:9.2f}{success:9.1%}{p99 / oracle_p99:12.2f}")
        p50, p99, success = results["balancer"]
        best = results[best_name]
        healthy_left = any(spec.fail_share == 0 and spec.dies_at is None for spec in scenario.engines)
        checks = {
            f"not worse than the best baseline ({best_name}): p99 {p99 / best[1]:.2f}x, p50 {p50 / best[0]:.2f}x": (
                success >= best[2] and p99 <= best[1]
            ),
            f"p99 at most 1.25x the oracle's: {p99 / oracle_p99:.2f}x": p99 <= 1.25 * oracle_p99,
            f"no failed call with a healthy engine left: {total - len(balancer_sim.outcome.done)} failed": (
                not healthy_left or success == 1.0
            ),
        }
        for text, ok in checks.items():
            print(f"  {'met' if ok else 'NOT met'}: {text}")
            verdicts.append(ok)
    decision_cost(client, args.decisions)
    print(f"\n{sum(verdicts)} of {len(verdicts)} scenario goals met")


if __name__ == "__main__":
    main()
