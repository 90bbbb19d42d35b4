"""The accept path: POST /api/v1/{profile}/{role} under concurrent clients, against a bare DRF view.

Both are served as in production, in the same run: gunicorn (2 processes, `gthread`, 8 threads
each, `DEBUG` off), SQLite in WAL mode, the same Redis.

- server: the real endpoint: token authentication, per-client throttling (counted in Redis, with a
  rate high enough not to refuse), the packet's and the payload's validation, the state file
  (atomic write and fsync) and its database mirror, the state change published on the feedback
  channel, the Celery enqueue, the 202 with the packet;
- baseline: a bare DRF view (bench/accept_bare.py) that parses the JSON body, writes it atomically
  to a file of its own (the same helper, fsync included) and enqueues a Celery job: the floor of
  the same stack.

No worker runs: the jobs stay on their queues (the queues are removed at the end). Clients are
processes, each with one keep-alive connection, each client its own token; every phase runs for
`--seconds`, the two sides alternate, three rounds, and the best round of each side counts (the
least disturbed by anything else on the machine). Prints throughput, p50 and p99 at each client
count, and the ratios.

    .venv/bin/python bench/accept.py                 # 16 clients
    .venv/bin/python bench/accept.py --clients 1 4 16 64
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench.common import free_port, percentile, redis_option, server_environment, wait_for_web  # noqa: E402

PROFILE = f"bench_{uuid.uuid4().hex[:8]}"
CONFIG = {
    "llms": [{"id": "instant", "engine": "instant", "source": "local", "model": "instant"}],
    "profiles": {PROFILE: {"roles": {"echo": {"agent": "generic", "system_prompt": "Repeat the input."}}}},
}
BODY = json.dumps({"payload": {"input": "Summarize: the release moved to Friday because QA found a crash."}})


def client(port: int, path: str, token: str, until: float, results) -> None:
    """One client: POST as fast as the answers come, until ``until``; puts its latencies."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    latencies = []
    errors = 0
    while time.time() < until:
        started = time.perf_counter()
        try:
            connection.request("POST", path, body=BODY, headers=headers)
            response = connection.getresponse()
            response.read()
        except OSError:
            connection.close()
            errors += 1
            continue
        if response.status == 202:
            latencies.append(time.perf_counter() - started)
        else:
            errors += 1
    connection.close()
    results.put((latencies, errors))


def phase(port: int, path: str, tokens: list[str], clients: int, seconds: float) -> dict:
    results = multiprocessing.Queue()
    until = time.time() + seconds
    processes = [
        multiprocessing.Process(target=client, args=(port, path, tokens[n], until, results)) for n in range(clients)
    ]
    for process in processes:
        process.start()
    latencies: list[float] = []
    errors = 0
    for _ in processes:
        done, failed = results.get()
        latencies += done
        errors += failed
    for process in processes:
        process.join()
    return {
        "throughput": len(latencies) / seconds,
        "p50": percentile(latencies, 0.5) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[16], help="concurrent clients, one run each")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured phase")
    parser.add_argument("--rounds", type=int, default=3, help="phases per side at each client count")
    redis_option(parser)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aiagent-accept-"))
    env = server_environment(
        work, CONFIG, args.redis_url, BENCH_BARE_DIR=str(work / "bare"), BENCH_BARE_QUEUE=f"{PROFILE}.bare"
    )
    manage = [sys.executable, str(BASE_DIR / "manage.py")]
    subprocess.run([*manage, "migrate", "-v", "0"], check=True, cwd=BASE_DIR, env=env)
    most = max(args.clients)
    tokens = [
        subprocess.run(
            [*manage, "create_token", f"client{n}"], check=True, cwd=BASE_DIR, env=env, capture_output=True, text=True
        ).stdout.strip()
        for n in range(most)
    ]
    ports = {"server": free_port(), "bare": free_port()}
    gunicorn = [sys.executable, "-m", "gunicorn", "--workers", "2", "--worker-class", "gthread", "--threads", "8",
                "--no-control-socket", "--log-level", "warning", "--backlog", "2048"]  # fmt: skip
    servers = [
        subprocess.Popen(
            [*gunicorn, "aiagentserver.wsgi", "--bind", f"127.0.0.1:{ports['server']}"], cwd=BASE_DIR, env=env
        ),
        subprocess.Popen(
            [*gunicorn, "bench.accept_bare:application", "--bind", f"127.0.0.1:{ports['bare']}"], cwd=BASE_DIR, env=env
        ),
    ]
    paths = {"server": f"/api/v1/{PROFILE}/echo", "bare": "/bare"}
    table = []
    try:
        deadline = time.monotonic() + 60
        for port in ports.values():
            wait_for_web(port, deadline).close()
        for side in ("bare", "server"):  # warm up both: imports, connections, the first writes
            phase(ports[side], paths[side], tokens, min(4, most), 2)
        for clients in args.clients:
            rounds: dict[str, list[dict]] = {"bare": [], "server": []}
            for _ in range(args.rounds):
                for side in ("bare", "server"):
                    rounds[side].append(phase(ports[side], paths[side], tokens, clients, args.seconds))
            best = {side: max(results, key=lambda r: r["throughput"]) for side, results in rounds.items()}
            table.append((clients, best, rounds))
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)
        import redis

        redis.Redis.from_url(args.redis_url).delete(f"{PROFILE}.echo", f"{PROFILE}.bare")

    print(f"POST, {args.seconds:g} s phases, best of {args.rounds} per side; gunicorn 2 x 8 threads")
    print(f"{'clients':>7} {'side':>7} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}   all rounds req/s")
    for clients, best, rounds in table:
        for side in ("bare", "server"):
            r = best[side]
            every = " ".join(f"{x['throughput']:.0f}" for x in rounds[side])
            figures = f"{r['throughput']:9.0f} {r['p50'] * 1000:9.1f} {r['p99'] * 1000:9.1f} {r['errors']:>7}"
            print(f"{clients:>7} {side:>7} {figures}   {every}")
        ratio = best["server"]["throughput"] / best["bare"]["throughput"]
        mean_ratio = statistics.fmean(x["throughput"] for x in rounds["server"]) / statistics.fmean(
            x["throughput"] for x in rounds["bare"]
        )
        print(f"{clients:>7} {'ratio':>7} {ratio:9.2f}x (means {mean_ratio:.2f}x)")


if __name__ == "__main__":
    main()
