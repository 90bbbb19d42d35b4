"""Orchestration overhead: POST to succeeded for single-step tasks, against a bare Celery round trip.

Both run in the same run, against the same Redis and the same Celery worker:

- server: POST /api/v1/bench_<run>/echo to a real gunicorn served as `make run` serves it (2
  processes, `gthread`, 8 threads each, keep-alive), then wait until the
  task's state file says succeeded. The role's LLM is the instant engine, so
  the time is the server's own: validation, the state file and its mirror,
  the enqueue, the worker's claim, the agent, the record.
- baseline: a bare Celery task published on its own queue that pushes to a
  Redis list when it runs; the client waits on that list (BLPOP).

Latency: tasks go one at a time; prints p50 and p99 of both and their ratio.
Sustained throughput (``--burst``): that many tasks posted at once by 8 clients, and as many bare
jobs sent at once; the time until the last one is done gives tasks per second, and the ratio. For each
server burst it also prints when the POSTs were all answered and how fast the worker finished tasks
while they were served and after (from the tasks' `finished` events).

    .venv/bin/python bench/overhead.py -n 200 --burst 300
"""

from __future__ import annotations

import argparse
import http.client
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

from bench.common import free_port, percentile, redis_option, server_environment, wait_for_web, wait_for_worker  # noqa: E402

# A profile name of its own for each run, so that nothing left in Redis by an
# earlier run (nothing is flushed) reaches this one's queues.
PROFILE = f"bench_{uuid.uuid4().hex[:8]}"
CONFIG = {
    "llms": [{"id": "instant", "engine": "instant", "source": "local", "model": "instant"}],
    "profiles": {PROFILE: {"roles": {"echo": {"agent": "generic", "system_prompt": "Repeat the input."}}}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200, help="tasks measured on each side")
    parser.add_argument("--warmup", type=int, default=20, help="tasks run first on each side and not measured")
    parser.add_argument("--burst", type=int, default=300, help="tasks at once for the throughput phases (0: none)")
    redis_option(parser)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aiagent-bench-"))
    os.environ.update(server_environment(work, CONFIG, args.redis_url))
    import django

    django.setup()
    import redis

    from aiagentserver.celery import app

    client = redis.Redis.from_url(args.redis_url)
    manage = [sys.executable, str(BASE_DIR / "manage.py")]
    subprocess.run([*manage, "migrate", "-v", "0"], check=True, cwd=BASE_DIR)
    token = subprocess.run(
        [*manage, "create_token", "bench"], check=True, cwd=BASE_DIR, capture_output=True, text=True
    ).stdout.strip()
    port = free_port()
    worker_name = f"bench-{uuid.uuid4().hex[:6]}@localhost"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "aiagentserver.worker", "-n", worker_name,
             "-Q", f"{PROFILE}.echo,{PROFILE}.bare", "-I", "bench.bare_tasks", "--concurrency", "1",
             "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
            cwd=BASE_DIR,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "aiagentserver.wsgi", "--bind", f"127.0.0.1:{port}",
             "--workers", "2", "--worker-class", "gthread", "--threads", "8", "--log-level", "warning",
              "--no-control-socket"],
            cwd=BASE_DIR,
        ),
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        wait_for_worker(app, worker_name, deadline)
        connection = wait_for_web(port, deadline)

        def bare_round_trip() -> float:
            key = f"bench:done:{uuid.uuid4().hex}"
            started = time.perf_counter()
            app.send_task("bench.bare_echo", args=[key], queue=f"{PROFILE}.bare")
            if client.blpop([key], timeout=30) is None:
                sys.exit("a bare job did not run within 30 s")
            return time.perf_counter() - started

        state_dir = work / "state"
        headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

        def server_round_trip() -> float:
            body = json.dumps({"payload": {"input": "ping"}})
            started = time.perf_counter()
            connection.request("POST", f"/api/v1/{PROFILE}/echo", body=body, headers=headers)
            response = connection.getresponse()
            packet = json.loads(response.read())
            if response.status != 202:
                sys.exit(f"POST answered {response.status}: {packet}")
            path = state_dir / f"{packet['task_id']}.json"
            give_up = started + 30
            while True:
                status = json.loads(path.read_bytes())["status"]
                if status == "succeeded":
                    return time.perf_counter() - started
                if status not in ("queued", "running") or time.perf_counter() > give_up:
                    sys.exit(f"task {packet['task_id']} ended as {status}")
                time.sleep(0.0005)

        for _ in range(args.warmup):
            bare_round_trip()
            server_round_trip()
        bare: list[float] = []
        server: list[float] = []
        for _ in range(args.n):  # interleaved, so both see the same machine
            bare.append(bare_round_trip())
            server.append(server_round_trip())

        def bare_burst() -> float:
            keys = [f"bench:done:{uuid.uuid4().hex}" for _ in range(args.burst)]
            started = time.perf_counter()
            for key in keys:
                app.send_task("bench.bare_echo", args=[key], queue=f"{PROFILE}.bare")
            for key in keys:
                if client.blpop([key], timeout=120) is None:
                    sys.exit("a bare job did not run within 120 s")
            return args.burst / (time.perf_counter() - started)

        def server_burst() -> float:
            import threading
            from concurrent.futures import ThreadPoolExecutor

            clients_connections = threading.local()

            def post(_n: int) -> str:
                # Each client keeps its connection, as an HTTP client library's session does.
                if not hasattr(clients_connections, "connection"):
                    clients_connections.connection = http.client.HTTPConnection("127.0.0.1", port)
                connection = clients_connections.connection
                connection.request("POST", f"/api/v1/{PROFILE}/echo", body=json.dumps({"payload": {"input": "ping"}}),
                                   headers=headers)  # fmt: skip
                response = connection.getresponse()
                packet = json.loads(response.read())
                if response.status != 202:
                    sys.exit(f"POST answered {response.status}: {packet}")
                return packet["task_id"]

            started, started_at = time.perf_counter(), time.time()
            with ThreadPoolExecutor(max_workers=8) as clients:
                task_ids = list(clients.map(post, range(args.burst)))
            posted_at = time.time()
            give_up = time.perf_counter() + 300
            finished = []
            for task_id in task_ids:
                while (packet := json.loads((state_dir / f"{task_id}.json").read_bytes()))["status"] != "succeeded":
                    if time.perf_counter() > give_up:
                        sys.exit(f"task {task_id} did not succeed within 300 s")
                    time.sleep(0.005)
                finished.append(datetime.fromisoformat(packet["history"][-1]["at"].replace("Z", "+00:00")).timestamp())
            rate = args.burst / (time.perf_counter() - started)
            timelines.append(timeline(sorted(finished), started_at, posted_at))
            return rate

        rates: dict[str, list[float]] = {"bare": [], "server": []}
        timelines: list[str] = []
        for _ in range(2 if args.burst else 0):
            rates["bare"].append(bare_burst())
            rates["server"].append(server_burst())
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)

    print(f"single-step tasks, sequential, n={args.n} each (after {args.warmup} warm-up), Redis {args.redis_url}")
    print(f"{'':28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, samples in (("bare Celery round trip", bare), ("server POST -> succeeded", server)):
        print(
            f"{name:28}{percentile(samples, 0.5) * 1000:10.2f}{percentile(samples, 0.99) * 1000:10.2f}"
            f"{statistics.fmean(samples) * 1000:10.2f}"
        )
    print(
        f"ratio server/bare: p50 {percentile(server, 0.5) / percentile(bare, 0.5):.2f}x, "
        f"p99 {percentile(server, 0.99) / percentile(bare, 0.99):.2f}x"
    )
    if args.burst:
        best = {side: max(values) for side, values in rates.items()}
        print(f"sustained throughput, {args.burst} at once, best of 2 (tasks/s): bare {best['bare']:.1f}, "
              f"server {best['server']:.1f}; ratio server/bare {best['server'] / best['bare']:.2f}x")  # fmt: skip
        print(f"a bare job every {1000 / best['bare']:.2f} ms at best; each server burst:")
        for line in timelines:
            print(f"  {line}")


def timeline(finished: list[float], started: float, posted: float) -> str:
    """Where a server burst's time went, from its tasks' `finished` events (wall-clock times): when the last
    POST was answered, when the last task finished, and the worker's pace (the median time between two
    tasks finishing) while the POSTs were being served, and after them, when the worker had the machine to
    itself."""
    gaps = {"during": [], "after": []}
    for before, after in itertools.pairwise(finished):
        gaps["during" if after <= posted else "after"].append(after - before)
    pace = {side: f"{statistics.median(values) * 1000:.2f} ms" if values else "-" for side, values in gaps.items()}
    return (
        f"POSTs answered at {posted - started:.2f} s, {sum(at <= posted for at in finished)} tasks finished by then, "
        f"the last at {finished[-1] - started:.2f} s; a task finished every {pace['during']} during the POSTs, "
        f"every {pace['after']} after them"
    )


if __name__ == "__main__":
    main()
