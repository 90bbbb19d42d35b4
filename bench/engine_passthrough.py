"""Engine passthrough: tokens per second of a task SmolLM2 answers through the server, against the same
generation in a bare llama-cpp-python loop.

Both in the same run, interleaved (which side goes first alternates), the same prompts in the same
order on both sides:

- baseline: ``Llama.create_chat_completion`` in this process, on the default LLM of
  balancer/configuration.json loaded with the settings the llama_cpp engine gives it (model file,
  n_ctx, n_threads, n_threads_batch), with the same messages, max_tokens and temperature as the
  task's call and no grammar (the generic agent answers in free text, so the server's call has
  none either). Tokens per second = completion tokens / the call's time.
- server: POST /api/v1/bench_<run>/chat to a real gunicorn, a role of the generic agent on that
  LLM, run by a real Celery worker (prefork, one child, so that one loaded model sees the same
  sequence of prompts as the baseline's and its prompt cache is in the same state); the client
  waits on the feedback channel until the task has succeeded. Two figures: completion tokens / the
  LLM time the step's history event records (the engine's call), and completion tokens / the
  task's wall time (POST to succeeded).

Temperature 0 (greedy): both sides generate the same tokens, which the run checks (an answer that
differs is reported; its tokens per second still count, as a rate). Prints the medians and the
ratios.

    .venv/bin/python bench/engine_passthrough.py -n 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

PROFILE = f"bench_{uuid.uuid4().hex[:8]}"
SYSTEM_PROMPT = "You are a helpful assistant. Answer in detail."
PROMPTS = [
    "Explain how a hash table works and what happens when two keys collide.",
    "Describe the water cycle, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the differences between a process and a thread?",
    "Explain why the sky is blue.",
    "Give advice to someone who is learning to cook.",
]


def default_llm() -> dict:
    """The first llama_cpp LLM of the shipped configuration: the model a fresh install answers with."""
    shipped = json.loads((BASE_DIR / "balancer" / "configuration.json").read_text())
    return next(llm for llm in shipped["llms"] if llm["engine"] == "llama_cpp")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=10, help="generations measured on each side")
    parser.add_argument("--warmup", type=int, default=1, help="generations run first on each side and not measured")
    parser.add_argument("--max-tokens", type=int, default=200, help="the role's max_tokens, and the baseline's")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every pair")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
        help="the Redis to use (nothing in it is flushed; this run's queue has a name of its own)",
    )
    args = parser.parse_args()

    llm = default_llm()
    config = {
        "llms": [llm],
        "profiles": {
            PROFILE: {
                "default_llms": [llm["id"]],
                "roles": {
                    "chat": {
                        "agent": "generic",
                        "system_prompt": SYSTEM_PROMPT,
                        "max_tokens": args.max_tokens,
                        "temperature": 0,
                    }
                },
            }
        },
    }
    work = Path(tempfile.mkdtemp(prefix="aiagent-bench-"))
    (work / "configuration.json").write_text(json.dumps(config))
    os.environ.update(
        {
            "DEBUG": "0",
            "SECRET_KEY": uuid.uuid4().hex * 2,
            "ALLOWED_HOSTS": "127.0.0.1",
            "VAR_DIR": str(work),
            "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
            "TASKS_STATE_DIR": str(work / "state"),
            "AIAGENT_CONFIG": str(work / "configuration.json"),
            "REDIS_URL": args.redis_url,
            "LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "aiagentserver.settings",
        }
    )
    import django

    django.setup()
    from llama_cpp import Llama

    from aiagentserver.celery import app
    from llm_engines.local.llama_cpp_engine import resolve_model_path
    from orchestration import mcp_handler

    # The baseline's model, loaded as LlamaCppEngine._load loads it, written out here so that the
    # baseline owes nothing to the server's code.
    options = llm.get("options", {})
    llama_kwargs: dict = {
        "model_path": str(resolve_model_path(options["model_path"])),
        "n_ctx": llm.get("context_length", 2048),
        "verbose": False,
    }
    if options.get("n_threads"):
        llama_kwargs["n_threads"] = llama_kwargs["n_threads_batch"] = options["n_threads"]
    if options.get("seed") is not None:
        llama_kwargs["seed"] = options["seed"]
    bare_llama = Llama(**llama_kwargs)

    manage = [sys.executable, str(BASE_DIR / "manage.py")]
    subprocess.run([*manage, "migrate", "-v", "0"], check=True, cwd=BASE_DIR)
    token = subprocess.run(
        [*manage, "create_token", "bench"], check=True, cwd=BASE_DIR, capture_output=True, text=True
    ).stdout.strip()
    port = free_port()
    worker_name = f"bench-{uuid.uuid4().hex[:6]}@localhost"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "aiagentserver", "worker", "-n", worker_name,
             "-Q", f"{PROFILE}.chat", "--concurrency", "1", "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle"],
            cwd=BASE_DIR,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "aiagentserver.wsgi", "--bind", f"127.0.0.1:{port}",
             "--workers", "2", "--log-level", "warning"],
            cwd=BASE_DIR,
        ),
    ]  # fmt: skip
    state_dir = work / "state"
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def bare(prompt: str) -> tuple[int, float, str]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        started = time.perf_counter()
        response = bare_llama.create_chat_completion(
            messages=messages, max_tokens=args.max_tokens, temperature=0.0
        )
        elapsed = time.perf_counter() - started
        answer = (response["choices"][0]["message"]["content"] or "").strip()
        return response["usage"]["completion_tokens"], elapsed, answer

    def server(prompt: str) -> tuple[int, float, float, str]:
        cursor = mcp_handler.feedback_cursor()
        body = json.dumps({"payload": {"input": prompt}})
        started = time.perf_counter()
        connection.request("POST", f"/api/v1/{PROFILE}/chat", body=body, headers=headers)
        response = connection.getresponse()
        packet = json.loads(response.read())
        if response.status != 202:
            sys.exit(f"POST answered {response.status}: {packet}")
        path = state_dir / f"{packet['task_id']}.json"
        give_up = started + 600
        while True:
            packet = json.loads(path.read_bytes())
            if packet["status"] == "succeeded":
                wall = time.perf_counter() - started
                break
            if packet["status"] not in ("queued", "running") or time.perf_counter() > give_up:
                sys.exit(f"task {packet['task_id']} ended as {packet['status']}: {packet['history'][-1]}")
            cursor, _ = mcp_handler.wait_for_task(packet["task_id"], cursor, 1.0)
        step = next(event for event in packet["history"] if event["event"] == "step")
        return (
            step["detail"]["tokens"]["completion"],
            step["detail"]["latency_ms"] / 1000,
            wall,
            packet["result"]["output"],
        )

    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[worker_name], timeout=0.5):
            if time.monotonic() > deadline:
                sys.exit("the worker did not start")
        connection = http.client.HTTPConnection("127.0.0.1", port)
        while True:
            try:
                connection.request("GET", "/healthz")
                connection.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("the web server did not start")
                connection.close()
                time.sleep(0.2)

        load_before = os.getloadavg()
        bare_rates: list[float] = []
        llm_rates: list[float] = []
        wall_rates: list[float] = []
        pair_ratios: list[float] = []
        tokens: list[int] = []
        same = 0
        for index in range(args.warmup + args.n):
            prompt = PROMPTS[index % len(PROMPTS)]
            # Which side goes first alternates, so that a drift in the machine's load falls on both.
            if index % 2 == 0:
                bare_tokens, bare_s, bare_text = bare(prompt)
                server_tokens, llm_s, wall_s, server_text = server(prompt)
            else:
                server_tokens, llm_s, wall_s, server_text = server(prompt)
                bare_tokens, bare_s, bare_text = bare(prompt)
            if index < args.warmup:
                continue
            bare_rates.append(bare_tokens / bare_s)
            llm_rates.append(server_tokens / llm_s)
            wall_rates.append(server_tokens / wall_s)
            pair_ratios.append(llm_rates[-1] / bare_rates[-1])
            tokens.append(bare_tokens)
            same += bare_tokens == server_tokens and bare_text == server_text
            if args.verbose:
                print(
                    f"pair {index - args.warmup + 1}: bare {bare_tokens} tokens in {bare_s:.2f} s "
                    f"({bare_rates[-1]:.1f}/s), server {server_tokens} tokens, LLM {llm_s:.2f} s "
                    f"({llm_rates[-1]:.1f}/s), wall {wall_s:.2f} s ({wall_rates[-1]:.1f}/s)",
                    flush=True,
                )
        load_after = os.getloadavg()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)

    print(
        f"{llm['model']} ({llm['id']}), n={args.n} pairs (after {args.warmup} warm-up), max_tokens "
        f"{args.max_tokens}, temperature 0, n_ctx {llama_kwargs['n_ctx']}, n_threads {options.get('n_threads')}"
    )
    print(f"completion tokens per generation: median {statistics.median(tokens):.0f} (min {min(tokens)}, max {max(tokens)})")
    print(f"same tokens and text on both sides: {same} of {args.n}")
    print(f"load average: {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end")
    print(f"{'tokens per second':40}{'median':>10}{'min':>10}{'max':>10}")
    for name, rates in (
        ("bare llama-cpp-python", bare_rates),
        ("server, the step's LLM time", llm_rates),
        ("server, the task's wall time", wall_rates),
    ):
        print(f"{name:40}{statistics.median(rates):10.1f}{min(rates):10.1f}{max(rates):10.1f}")
    bare_median = statistics.median(bare_rates)
    print(
        f"ratio server/bare: LLM time {statistics.median(llm_rates) / bare_median:.3f}x, "
        f"wall time {statistics.median(wall_rates) / bare_median:.3f}x "
        f"(median of the pairs' LLM-time ratios {statistics.median(pair_ratios):.3f}x)"
    )


if __name__ == "__main__":
    main()
