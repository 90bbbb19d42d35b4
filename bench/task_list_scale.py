"""Listing and filtering tasks as the store grows: 1,000 tasks against 100,000, through the real API.

For each size, in a database and state directory of its own, the run writes that many task state
files (realistic packets: a spread of profiles, roles, statuses, iterations, delegated children and
creation times over 90 days) and builds the database mirror from them with ``manage.py
sync_tasks``, the recovery path, whose time it prints. Then it starts a real gunicorn for each
size (2 gthread workers, ``DEBUG`` off), moves the state directories away (so that a request that
read a state file would fail), and measures, interleaved across listings and sizes:

- GET /api/v1/tasks/, the first page: unfiltered, by status, by profile, by role, all three;
- a deep page: the middle of the table (page 1000 of 50 at 100,000 tasks, page 10 at 1,000);
- the admin's task changelist, unfiltered and filtered by status (a staff session);
- GET /api/v1/metrics and GET /metrics, which count the tasks by role and status, those finished in
  the last 5 minutes and the feedback loop's rounds from the mirror on every read (no floor: they
  read Redis and make several queries);
- the floor: the bare SQL query of each page (the same rows, columns, filter, order and offset)
  on a DB-API connection in this process.

It prints p50 and p99 of each, the growth ratio (largest size / smallest), and the floor. With
strace available, one request of each listing is traced on the largest size's server: a file
syscall naming the state directory would be counted.

    .venv/bin/python bench/task_list_scale.py                 # SQLite, 1,000 and 100,000 tasks
    .venv/bin/python bench/task_list_scale.py --postgres postgres://127.0.0.1:5432/postgres

``--postgres`` names a server where the run may create (and drop) databases of its own.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench.common import free_port, percentile, server_environment  # noqa: E402

# (profile, role, weight): the developer roles carry most of the work, the feedback loop's most.
ROLES = [
    ("developer", "planner", 10), ("developer", "architect", 4), ("developer", "fast_coder", 18),
    ("developer", "deep_coder", 6), ("developer", "qa", 18), ("developer", "debug", 10),
    ("developer", "diagnosis", 4), ("productivity", "summarizer", 12), ("productivity", "writer", 8),
    ("productivity", "translator", 7), ("productivity", "vision", 3),
]  # fmt: skip
STATUS_WEIGHTS = {
    "succeeded": 72,
    "failed": 10,
    "cancelled": 5,
    "queued": 6,
    "running": 4,
    "awaiting_feedback": 3,
}
LOOP_ROLES = {"fast_coder", "deep_coder", "qa", "debug"}
SPAN = timedelta(days=90)
DEEP_PAGE_SIZE = 50
ADMIN = "/admin/orchestration/task/"
SUMMARY = "task_id, profile, role, status, version, iteration, parent_id, created_at, updated_at"


def listings(size: int) -> list[tuple[str, str, str | None, list[str]]]:
    """(name, URL, the WHERE of its floor query or None for no floor, that query's parameters)."""
    deep = size // (2 * DEEP_PAGE_SIZE)
    return [
        ("API first page", "/api/v1/tasks/", "", []),
        ("API status=failed", "/api/v1/tasks/?status=failed", "status = %s", ["failed"]),
        ("API profile=productivity", "/api/v1/tasks/?profile=productivity", "profile = %s", ["productivity"]),
        ("API role=debug", "/api/v1/tasks/?role=debug", "role = %s", ["debug"]),
        (
            "API developer+debug+failed",
            "/api/v1/tasks/?profile=developer&role=debug&status=failed",
            "profile = %s AND role = %s AND status = %s",
            ["developer", "debug", "failed"],
        ),
        (f"API deep page (page {deep})", f"/api/v1/tasks/?page={deep}&page_size={DEEP_PAGE_SIZE}", "", []),
        ("admin changelist", ADMIN, "", []),
        ("admin status=failed", f"{ADMIN}?status__exact=failed", "status = %s", ["failed"]),
        ("API metrics", "/api/v1/metrics", None, []),
        ("Prometheus /metrics", "/metrics", None, []),
    ]


def floor_sql(name: str, where: str, size: int) -> tuple[str, int, int]:
    """The SQL that fetches the same page as the listing: (query, limit, offset). A deep page finds
    its ids in the index first (a plain OFFSET reads every row before the page)."""
    order = " ORDER BY created_at DESC, task_id DESC"
    where = f" WHERE {where}" if where else ""
    if name.startswith("API deep"):
        ids = f"SELECT task_id FROM orchestration_task{where}{order} LIMIT %s OFFSET %s"
        sql = f"SELECT {SUMMARY} FROM orchestration_task WHERE task_id IN ({ids}){order}"
        return sql, DEEP_PAGE_SIZE, (size // (2 * DEEP_PAGE_SIZE) - 1) * DEEP_PAGE_SIZE
    return f"SELECT {SUMMARY} FROM orchestration_task{where}{order} LIMIT %s OFFSET %s", 50, 0


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def make_packets(size: int, seed: int, now: datetime):
    """``size`` task packets as the server writes them, oldest first."""
    rng = random.Random(seed)
    offsets = sorted(rng.random() for _ in range(size))
    statuses, status_weights = zip(*STATUS_WEIGHTS.items(), strict=True)
    recent: list[str] = []  # candidate parents: developer tasks that came shortly before
    for fraction in offsets:
        created = now - SPAN + SPAN * fraction
        profile, role, _ = rng.choices(ROLES, weights=[r[2] for r in ROLES])[0]
        status = rng.choices(statuses, weights=status_weights)[0]
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        job_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        at = created
        history = [
            {"at": iso(at), "event": "submitted", "agent": None, "status": "queued", "llm": None,
             "detail": {"queue": f"{profile}.{role}", "job_id": job_id}},
        ]  # fmt: skip
        if status != "queued":
            at += timedelta(milliseconds=rng.uniform(5, 400))
            history.append(
                {"at": iso(at), "event": "claimed", "agent": None, "status": "running", "llm": None,
                 "detail": {"worker": f"celery@worker{rng.randint(1, 4)}:{rng.randint(1000, 9999)}", "job_id": job_id}}
            )  # fmt: skip
        iteration = rng.choice((0, 0, 1, 2, 3)) if role in LOOP_ROLES else 0
        result = None
        if status in ("succeeded", "failed", "awaiting_feedback"):
            for _ in range(1 + iteration):
                at += timedelta(seconds=rng.uniform(0.5, 30))
                prompt, completion = rng.randint(80, 3000), rng.randint(20, 800)
                history.append(
                    {"at": iso(at), "event": "step", "agent": role, "status": "running", "llm": "smollm2-135m",
                     "detail": {"step": "main", "model": "SmolLM2-135M-Instruct",
                                "tokens": {"prompt": prompt, "completion": completion},
                                "latency_ms": round(rng.uniform(300, 30000), 1), "finish_reason": "stop",
                                "balancer": {"chosen": "smollm2-135m", "candidates": ["smollm2-135m"],
                                             "excluded": {}, "waited_ms": round(rng.uniform(0, 20), 1)}}}
                )  # fmt: skip
            result = {"summary": " ".join(rng.choices(WORDS, k=rng.randint(20, 80)))}
        if status in ("succeeded", "failed", "cancelled", "awaiting_feedback"):
            at += timedelta(milliseconds=rng.uniform(1, 50))
            event = {"succeeded": "finished", "failed": "failed", "cancelled": "cancelled"}.get(status, "awaiting")
            detail = {"error": "the QA checks failed 3 times"} if status == "failed" else {}
            history.append(
                {"at": iso(at), "event": event, "agent": None, "status": status, "llm": None, "detail": detail}
            )
        parent_id = rng.choice(recent) if recent and role in LOOP_ROLES and rng.random() < 0.6 else None
        if profile == "developer" and role in ("planner", "architect", "fast_coder"):
            recent = [*recent[-19:], task_id]
        yield {
            "task_id": task_id,
            "profile": profile,
            "role": role,
            "status": status,
            "result": result,
            "history": history,
            "version": len(history),
            "iteration": iteration,
            "parent_id": parent_id,
            "children": [],
            "payload": {"input": " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))},
            "created_at": iso(created),
            "updated_at": iso(at),
        }


TEXT = (
    "the server stores each task queues it for its role and records every step of the work while "
    "an agent asks the balancer for a model and the engine answers with tokens plan code test fix review"
)
WORDS = TEXT.split()


class Server:
    """One size's data set and the gunicorn that serves it."""

    def __init__(self, size: int, work: Path, args: argparse.Namespace) -> None:
        self.size = size
        self.work = work / f"n{size}"
        self.state = self.work / "state"
        self.state.mkdir(parents=True)
        (self.work / "static").mkdir()
        self.args = args
        self.pg_name = f"bench_list_{uuid.uuid4().hex[:8]}_{size}" if args.postgres else None
        config = json.loads((BASE_DIR / "balancer" / "configuration.json").read_text())
        database = {"DATABASE_URL": self.database_url()}
        if self.pg_name:
            database["DB_CONN_MAX_AGE"] = "60"  # as doc/operations.md advises for PostgreSQL
        self.env = server_environment(self.work, config, args.redis_url, **database)
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.headers: dict[str, str] = {}
        self.cookie = ""

    def database_url(self) -> str:
        if not self.pg_name:
            return f"sqlite:///{self.work / 'db.sqlite3'}"
        return urllib.parse.urlunsplit(urllib.parse.urlsplit(self.args.postgres)._replace(path=f"/{self.pg_name}"))

    def manage(self, *command: str, **options) -> subprocess.CompletedProcess:
        options.setdefault("env", self.env)
        return subprocess.run(
            [sys.executable, str(BASE_DIR / "manage.py"), *command], check=True, cwd=BASE_DIR, **options
        )

    def build(self, seed: int, now: datetime) -> float:
        """Write the state files and the mirror (through sync_tasks); returns sync_tasks' wall time."""
        if self.pg_name:
            with admin_connection(self.args.postgres) as db:
                db.execute(f'CREATE DATABASE "{self.pg_name}"')
        self.manage("migrate", "-v", "0")
        for packet in make_packets(self.size, seed, now):
            path = self.state / f"{packet['task_id']}.json"
            path.write_bytes(json.dumps(packet, ensure_ascii=False, indent=1).encode("utf-8"))
        started = time.perf_counter()
        out = self.manage("sync_tasks", capture_output=True, text=True).stdout.strip()
        took = time.perf_counter() - started
        print(f"  {self.size:>7,} tasks: sync_tasks {took:.1f} s ({out})", flush=True)
        if self.pg_name:
            # What autovacuum does by itself after a load this size; done now so that every run plans alike.
            with self.connect() as db:
                db.execute("VACUUM ANALYZE orchestration_task")
        return took

    def connect(self):
        if self.pg_name:
            import psycopg

            return psycopg.connect(self.env["DATABASE_URL"].replace("postgres://", "postgresql://", 1), autocommit=True)
        return sqlite3.connect(self.work / "db.sqlite3")

    def start(self) -> None:
        self.token = self.manage("create_token", "bench", capture_output=True, text=True).stdout.strip()
        self.headers = {"Authorization": f"Token {self.token}"}
        password = uuid.uuid4().hex
        self.manage(
            "createsuperuser", "--noinput", "--username", "operator", "--email", "operator@bench.invalid",
            env={**self.env, "DJANGO_SUPERUSER_PASSWORD": password}, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "aiagentserver.wsgi", "--bind", f"127.0.0.1:{self.port}",
             "--workers", "2", "--worker-class", "gthread", "--threads", "4", "--keep-alive", "30",
             "--log-level", "warning", "--no-control-socket"],
            cwd=BASE_DIR, env=self.env,
        )  # fmt: skip
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.connection.request("GET", "/healthz")
                self.connection.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("the web server did not start")
                self.connection.close()
                time.sleep(0.2)
        self.login(password)

    def login(self, password: str) -> None:
        status, body, cookies = self.request("GET", "/admin/login/")
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body).group(1).decode()
        form = urllib.parse.urlencode(
            {"username": "operator", "password": password, "csrfmiddlewaretoken": token, "next": "/admin/"}
        )
        status, _, cookies = self.request(
            "POST",
            "/admin/login/",
            body=form,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Cookie": f"csrftoken={cookies['csrftoken']}",
            },
        )
        if status != 302 or "sessionid" not in cookies:
            sys.exit(f"the admin login answered {status}")
        self.cookie = f"sessionid={cookies['sessionid']}"

    def request(self, method: str, url: str, body: str | None = None, headers: dict | None = None):
        self.connection.request(method, url, body=body, headers=headers or {})
        response = self.connection.getresponse()
        data = response.read()
        cookies = {}
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                cookies[key] = rest.split(";", 1)[0]
        return response.status, data, cookies

    def get(self, url: str) -> float:
        headers = {"Cookie": self.cookie} if url.startswith("/admin/") else self.headers
        started = time.perf_counter()
        status, body, _ = self.request("GET", url, headers=headers)
        took = time.perf_counter() - started
        if status != 200:
            sys.exit(f"GET {url} answered {status} at {self.size} tasks: {body[:300]!r}")
        return took

    def worker_threads(self) -> list[int]:
        """The thread ids of the gunicorn master and its workers."""
        pids = [self.process.pid]
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return [int(t.name) for pid in pids for t in Path(f"/proc/{pid}/task").iterdir()]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
        if self.pg_name:
            with admin_connection(self.args.postgres) as db:
                db.execute(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')


def admin_connection(url: str):
    import psycopg

    return psycopg.connect(url.replace("postgres://", "postgresql://", 1), autocommit=True)


def floor_timer(server: Server, db, name: str, where: str, params: list[str]):
    sql, limit, offset = floor_sql(name, where, server.size)
    if not server.pg_name:
        sql = sql.replace("%s", "?")
    values = [*params, limit, offset]

    def run() -> float:
        started = time.perf_counter()
        rows = db.execute(sql, values).fetchall()
        took = time.perf_counter() - started
        if not rows:
            sys.exit(f"the floor query of {name} found nothing at {server.size} tasks")
        return took

    return run


def trace_state_access(server: Server) -> tuple[int, int]:
    """One request of each listing under strace: (file syscalls traced, those naming the state directory)."""
    log = server.work / "strace.log"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(log)]
        + [arg for tid in server.worker_threads() for arg in ("-p", str(tid))],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # strace attaches
    for _, url, _, _ in listings(server.size):
        for _ in range(2):  # both workers, probably
            server.get(url)
    tracer.terminate()
    tracer.wait(timeout=30)
    lines = log.read_text(errors="replace").splitlines()
    return len(lines), sum(str(server.state) in line for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,100000", help="task counts, the baseline first (1000,100000)")
    parser.add_argument("-n", type=int, default=200, help="requests measured per listing and size")
    parser.add_argument("--warmup", type=int, default=10, help="requests per listing and size first, not measured")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--postgres", metavar="URL", help="a PostgreSQL server where the run may create databases")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
        help="the Redis for the throttles' counts (only their own keys are written)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="aiagent-list-"))
    now = datetime.now(UTC)
    servers = [Server(size, work, args) for size in sizes]
    sync_times: dict[int, float] = {}
    samples: dict[tuple[str, int], list[float]] = {}
    floors: dict[tuple[str, int], list[float]] = {}
    traced = None
    try:
        print(f"building: {'PostgreSQL' if args.postgres else 'SQLite'}, state files in {work}", flush=True)
        for server in servers:
            sync_times[server.size] = server.build(args.seed, now)
        for server in servers:
            server.start()
            # Every listing is served with the state files out of reach.
            server.state.rename(server.state.with_name("state.away"))
        dbs = [server.connect() for server in servers]
        plan = [
            (
                (name.split(" (")[0], server.size),
                server.get,
                url,
                None if where is None else floor_timer(server, db, name, where, params),
            )
            for server, db in zip(servers, dbs, strict=True)
            for name, url, where, params in listings(server.size)
        ]
        for round_ in range(args.warmup + args.n):
            for key, get, url, floor in plan:
                took = get(url)
                floor_took = floor() if floor else None
                if round_ >= args.warmup:
                    samples.setdefault(key, []).append(took)
                    if floor_took is not None:
                        floors.setdefault(key, []).append(floor_took)
        for db in dbs:
            db.close()
        if shutil.which("strace"):
            traced = trace_state_access(servers[-1])
        for server in servers:
            server.state.with_name("state.away").rename(server.state)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    small, large = sizes[0], sizes[-1]
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print(
        f"\n{backend}; n={args.n} requests per listing and size (after {args.warmup}), sequential, interleaved; "
        f"gunicorn 2 gthread workers x 4 threads; {os.cpu_count()} CPUs; state files moved away while listing"
    )
    print(
        f"sync_tasks (mirror rebuilt from the files): {small:,} tasks {sync_times[small]:.1f} s, "
        f"{large:,} tasks {sync_times[large]:.1f} s ({sync_times[large] / sync_times[small]:.0f}x)"
    )
    head = f"{'':28}{f'{small:,}: p50':>11}{'p99':>7}{f'{large:,}: p50':>13}{'p99':>7}"
    print(head + f"{'ratio p50':>11}{'p99':>7}{'floor p50':>11}{'p99':>7}   ms")
    labels = list(dict.fromkeys(label for label, _ in samples))
    for label in labels:
        a, b, floor = samples[(label, small)], samples[(label, large)], floors.get((label, large))
        floor_text = f"{'-':>11}{'-':>7}"
        if floor:
            floor_text = f"{percentile(floor, 0.5) * 1000:11.2f}{percentile(floor, 0.99) * 1000:7.2f}"
        print(
            f"{label:28}{percentile(a, 0.5) * 1000:11.1f}{percentile(a, 0.99) * 1000:7.1f}"
            f"{percentile(b, 0.5) * 1000:13.1f}{percentile(b, 0.99) * 1000:7.1f}"
            f"{percentile(b, 0.5) / percentile(a, 0.5):10.2f}x{percentile(b, 0.99) / percentile(a, 0.99):6.2f}x"
            f"{floor_text}"
        )
    print(f"(floor: the bare SQL query of the same page at {large:,} tasks, on a DB-API connection in this process)")
    if traced is not None:
        calls, on_state = traced
        print(
            f"strace, one round of every listing at {large:,} tasks: {calls} file syscalls, {on_state} on state files"
        )


if __name__ == "__main__":
    main()
