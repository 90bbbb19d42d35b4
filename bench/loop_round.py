"""The feedback loop's own cost per round, without the LLM's time and the tests' time.

Coder tasks run the QA -> Debug -> Coder loop through a real Celery worker (prefork, concurrency
2, as `make run` starts it) with the scripted engine in place of the model (it answers at once):
the coder writes wrong code three times, then right code, so each task has four rounds. One
round, from a verdict to the next, is: Debug's step, the coder's step, QA's three checks (a
chord: the tests in the bubblewrap sandbox, the static check, the LLM review) and the verdict.
Its overhead is its wall time minus the work in it: the LLM calls of Debug and the coder, and the
time during which a check was running (the union of the three checks' intervals: they run side by
side as far as the worker's two processes allow; each check's event records its duration).

Baseline, in the same run and through the same worker: a bare Celery round of the same shape (a
debug job, a coder job, a chord of three checks and its callback), each job doing nothing.

Prints p50 and p99 of both and their ratio; the target is an overhead under 50 ms at p50.

    .venv/bin/python bench/loop_round.py -n 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench.common import percentile, redis_option, server_environment, wait_for_worker  # noqa: E402

PROFILE = f"loop_{uuid.uuid4().hex[:8]}"
TESTS = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"
CODER = r'Reply with JSON: \{"files"'


def code(body: str) -> dict:
    return {"files": [{"path": "solution.py", "content": body}], "run": "python solution.py", "notes": "scripted"}


def rules() -> list[dict]:
    wrong = [f"def add(a, b):\n    return a - b - {n}\n" for n in range(3)]
    return [
        {"match": r'Reply with JSON: \{"passed"', "reply": {"passed": True, "findings": []}},
        {"match": r"whether the code or the test is wrong",
         "reply": {"cause": "it subtracts", "wrong": "code", "fix": "add them"}},
        {"match": f"{CODER}.*a - b - 2\\n", "reply": code("def add(a, b):\n    return a + b\n")},
        {"match": f"{CODER}.*a - b - 1\\n", "reply": code(wrong[2])},
        {"match": f"{CODER}.*a - b - 0\\n", "reply": code(wrong[1])},
        {"match": CODER, "reply": code(wrong[0])},
    ]  # fmt: skip


def at(event: dict) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def checking_ms(events: list[dict]) -> float:
    """How long at least one check was running: the union of the checks' intervals (each ends when
    it is recorded and lasted its duration). They overlap as far as the worker's processes allow."""
    intervals = sorted(
        (at(e) * 1000 - e["detail"]["duration_ms"], at(e) * 1000) for e in events if e["event"] == "check"
    )
    total, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def round_overheads(packet: dict) -> list[tuple[float, float]]:
    """(wall ms, overhead ms) of each round after the first: from one verdict to the next."""
    history = packet["history"]
    verdicts = [i for i, e in enumerate(history) if e["event"] == "verdict"]
    rounds = []
    for start, end in itertools.pairwise(verdicts):
        events = history[start + 1 : end + 1]
        wall = (at(history[end]) - at(history[start])) * 1000
        llm = sum(e["detail"].get("latency_ms", 0) for e in events if e["event"] == "step")
        rounds.append((wall, wall - llm - checking_ms(events)))
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20, help="coder tasks (3 measured rounds each) and bare rounds x 3")
    redis_option(parser)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aiagent-loop-"))
    (work / "script.json").write_text(json.dumps({"rules": rules()}))
    roles = {
        name: {"agent": agent, "system_prompt": "You do your part.", "max_iterations": 6}
        for name, agent in (("fast_coder", "coder"), ("deep_coder", "coder"), ("qa", "qa"), ("debug", "debug"))
    }
    config = {
        "llms": [{"id": f"{PROFILE}-llm", "engine": "scripted", "source": "local", "model": "scripted",
                  "capabilities": ["chat", "code"], "context_length": 8192, "max_concurrency": 4,
                  "options": {"script": str(work / "script.json")}}],
        "profiles": {PROFILE: {"roles": roles}},
    }  # fmt: skip
    os.environ.update(server_environment(work, config, args.redis_url))
    subprocess.run([sys.executable, str(BASE_DIR / "manage.py"), "migrate", "-v", "0"], check=True, cwd=BASE_DIR)
    import django

    django.setup()
    import redis

    from aiagentserver.celery import app
    from orchestration.runtime import task_store
    from orchestration.services import task_submit

    client = redis.Redis.from_url(args.redis_url)
    bare_queue = f"{PROFILE}.bare"
    queues = ",".join([*(f"{PROFILE}.{role}" for role in roles), bare_queue])
    worker_name = f"loop-{uuid.uuid4().hex[:6]}@localhost"
    worker = subprocess.Popen(
        [sys.executable, "-m", "aiagentserver.worker", "-n", worker_name, "-Q", queues,
         "-I", "bench.bare_tasks", "--concurrency", "2", "--loglevel", "WARNING", "--without-gossip",
         "--without-mingle"],
        cwd=BASE_DIR,
    )  # fmt: skip
    server: list[tuple[float, float]] = []
    bare: list[float] = []
    try:
        wait_for_worker(app, worker_name, time.monotonic() + 60)

        def bare_round() -> float:
            key = f"bench:round:{uuid.uuid4().hex}"
            started = time.perf_counter()
            app.send_task("bench.bare_round_debug", args=[key, bare_queue], queue=bare_queue)
            if client.blpop([key], timeout=30) is None:
                sys.exit("a bare round did not finish within 30 s")
            return (time.perf_counter() - started) * 1000

        def coder_task() -> dict:
            payload = {"instruction": "add(a, b) returns a + b", "tests": TESTS}
            packet, _ = task_submit(profile=PROFILE, role="fast_coder", payload=payload)
            give_up = time.monotonic() + 120
            while True:
                done = task_store().read(packet["task_id"])
                if done["status"] in ("succeeded", "failed", "cancelled", "awaiting_feedback"):
                    if done["status"] != "succeeded":
                        sys.exit(f"task {done['task_id']} ended {done['status']}: {done['history'][-1]}")
                    return done
                if time.monotonic() > give_up:
                    sys.exit(f"task {done['task_id']} did not finish")
                time.sleep(0.02)

        coder_task()  # warm up: imports, the sandbox, the first writes
        for _ in range(3):
            bare_round()
        for _ in range(args.n):  # interleaved, so both see the same machine
            server += round_overheads(coder_task())
            bare += [bare_round() for _ in range(3)]
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        client.delete(*(f"{PROFILE}.{role}" for role in roles), bare_queue)

    walls, overheads = [w for w, _ in server], [o for _, o in server]
    print(f"feedback-loop rounds: {len(server)} server rounds ({args.n} tasks), {len(bare)} bare rounds")
    print(f"{'':40}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, samples in (
        ("bare Celery round (same shape)", bare),
        ("server round, wall", walls),
        ("server round, overhead (no LLM, tests)", overheads),
    ):
        p50, p99, mean = percentile(samples, 0.5), percentile(samples, 0.99), statistics.fmean(samples)
        print(f"{name:40}{p50:10.1f}{p99:10.1f}{mean:10.1f}")
    print(
        f"ratio overhead/bare: p50 {percentile(overheads, 0.5) / percentile(bare, 0.5):.2f}x; "
        f"target: overhead p50 under 50 ms: {'met' if percentile(overheads, 0.5) < 50 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
