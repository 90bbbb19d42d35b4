"""Soak: tasks through Celery workers that are killed at random (SIGKILL), none may be lost.

Three workers consume the run's queue, one process each. The tasks' LLM is the scripted engine
with a delay, so that kills land in the middle of steps. Two phases over the same workers:

- baseline: N tasks, no kills;
- chaos: N tasks while, every 1 to 4 seconds, a random worker is killed, either whole (its main
  process and its children: the host died, its jobs stay unacknowledged in Redis for the
  visibility timeout) or only its child (the job goes back to the queue at once), and restarted
  2 seconds later.

Recovery comes from the server itself: a returning job takes over a step whose lease expired
(``reclaimed``), and the workers' recovery sweeper queues again the jobs a dead worker held
(``recovered``). Prints, per phase, the tasks succeeded, failed and lost (not finished when the
time is up), how many were reclaimed or recovered, the tasks whose step was recorded more than
once, the wall time, and the chaos phase's time against the baseline's. Exit status 1 if a task
was lost, failed, or recorded twice.

    .venv/bin/python bench/kill_soak.py -n 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench.common import redis_option, server_environment  # noqa: E402

PROFILE = f"soak_{uuid.uuid4().hex[:8]}"
QUEUE = f"{PROFILE}.echo"


class Workers:
    def __init__(self, count: int, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.processes: list[subprocess.Popen | None] = [None] * count
        self.kills = {"whole": 0, "child": 0}
        for index in range(count):
            self.start(index)

    def start(self, index: int) -> None:
        command = [
            sys.executable, "-m", "aiagentserver.worker", "-n", f"{PROFILE}-{index}@%h",
            "-Q", QUEUE, "--concurrency", "1", "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        with open(self.logs / f"worker-{index}.log", "ab") as log:
            self.processes[index] = subprocess.Popen(
                command, cwd=BASE_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill_one(self, rng: random.Random) -> None:
        index = rng.randrange(len(self.processes))
        process = self.processes[index]
        if process is None or process.poll() is not None:
            return
        children = _children(process.pid)
        if children and rng.random() < 0.5:
            os.kill(rng.choice(children), signal.SIGKILL)  # the pool replaces it; its job comes back
            self.kills["child"] += 1
            return
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.kills["whole"] += 1
        time.sleep(2)
        self.start(index)

    def stop(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            if process is not None:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_phase(name: str, count: int, workers: Workers, chaos: bool, timeout: float, seed: int) -> bool:
    from orchestration.runtime import task_store
    from orchestration.services import task_submit

    rng = random.Random(seed)
    started = time.monotonic()
    ids = [
        task_submit(profile=PROFILE, role="echo", payload={"input": f"task {n}"})[0]["task_id"] for n in range(count)
    ]
    stop = threading.Event()

    def chaos_loop() -> None:
        while not stop.wait(rng.uniform(1, 4)):
            workers.kill_one(rng)

    killer = threading.Thread(target=chaos_loop, daemon=True)
    if chaos:
        killer.start()
    deadline = started + timeout
    packets: dict[str, dict] = {}
    while time.monotonic() < deadline:
        packets = {task_id: task_store().read(task_id) for task_id in ids}
        if all(p["status"] in ("succeeded", "failed", "cancelled") for p in packets.values()):
            break
        time.sleep(0.5)
    stop.set()
    if chaos:
        killer.join()
    elapsed = time.monotonic() - started
    succeeded = sum(p["status"] == "succeeded" for p in packets.values())
    failed = sum(p["status"] == "failed" for p in packets.values())
    lost = count - succeeded - failed
    twice = sum(sum(e["event"] == "step" for e in p["history"]) > 1 for p in packets.values())
    reclaimed = sum(any(e["event"] == "reclaimed" for e in p["history"]) for p in packets.values())
    recovered = sum(any(e["event"] == "recovered" for e in p["history"]) for p in packets.values())
    kills = f"; kills: {workers.kills['whole']} whole workers, {workers.kills['child']} child processes"
    print(
        f"{name:>8}: {count} tasks in {elapsed:6.1f}s: {succeeded} succeeded, {failed} failed, {lost} lost, "
        f"{twice} recorded twice; {reclaimed} reclaimed, {recovered} recovered" + (kills if chaos else ""),
        flush=True,
    )
    for packet in packets.values():
        if packet["status"] != "succeeded":
            print(f"          {packet['task_id']} {packet['status']}: {[e['event'] for e in packet['history']]}")
    run_phase.elapsed[name] = elapsed
    return lost == 0 and failed == 0 and twice == 0


run_phase.elapsed = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=100, help="tasks per phase")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds the scripted LLM takes per call")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a phase may take")
    parser.add_argument("--seed", type=int, default=1)
    redis_option(parser)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aiagent-soak-"))
    rules = {"rules": [{"match": ".", "reply": "done", "delay_s": args.delay}]}
    (work / "script.json").write_text(json.dumps(rules))
    config = {
        "llms": [
            {"id": f"{PROFILE}-llm", "engine": "scripted", "source": "local", "model": "scripted",
             "max_concurrency": args.workers, "options": {"script": str(work / "script.json")}},
        ],
        "profiles": {
            PROFILE: {"roles": {"echo": {"agent": "generic", "system_prompt": "Repeat.", "time_limit_s": 60}}}
        },
    }  # fmt: skip
    # Fast recovery, so that the soak takes minutes: leases, sweeps and their grace in seconds.
    env = server_environment(
        work, config, args.redis_url, TASK_LEASE_SECONDS="3", LLM_SLOT_LEASE_SECONDS="3",
        RECOVERY_SWEEP_SECONDS="5", RECOVERY_GRACE_SECONDS="10", RECOVERY_RETRIES="20",
    )  # fmt: skip
    os.environ.update(env)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=BASE_DIR, env=env, check=True)

    import django

    django.setup()

    workers = Workers(args.workers, env, work)
    try:
        time.sleep(8)  # the workers start
        print(f"{args.workers} workers, {args.delay:g}s per LLM call; files in {work}", flush=True)
        ok = run_phase("baseline", args.n, workers, chaos=False, timeout=args.timeout, seed=args.seed)
        ok = run_phase("chaos", args.n, workers, chaos=True, timeout=args.timeout, seed=args.seed) and ok
        base, chaos = run_phase.elapsed["baseline"], run_phase.elapsed["chaos"]
        print(f"   ratio: chaos {chaos:.1f}s / baseline {base:.1f}s = {chaos / base:.2f}x", flush=True)
    finally:
        workers.stop()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
