"""Engine passthrough: tokens per second of a task SmolLM2 answers through the server, against the same
generation in a bare llama-cpp-python loop.

Both in the same run, interleaved (which side goes first alternates), the same prompts in the same
order on both sides:

- baseline: ``Llama.create_chat_completion`` in this process, on the default LLM of
  balancer/configuration.json, ``Llama`` constructed with exactly the arguments the llama_cpp
  engine gives it (``LlamaCppEngine.llama_kwargs``: model file, n_ctx, threads, flash attention, KV
  cache type), with the same messages, max_tokens and temperature as the task's call and no grammar
  (the generic agent answers in free text, so the server's call has none either). Tokens per
  second = completion tokens / the call's time.
- server: POST /api/v1/bench_<run>/chat to a real gunicorn, a role of the generic agent on that
  LLM, run by a real Celery worker (prefork, one child, so that one loaded model sees the same
  sequence of prompts as the baseline's and its prompt cache is in the same state); the client
  waits on the feedback channel until the task has succeeded. Two figures: completion tokens / the
  LLM time the step's history event records (the engine's call), and completion tokens / the
  task's wall time (POST to succeeded).

Temperature 0 (greedy): both sides generate the same tokens, which the run checks. The ratio is
the median of the pairs' ratios (a pair's two generations run one after the other, so a change
in the machine's load falls on both); the ratio of the medians is printed beside it.

    .venv/bin/python bench/engine_passthrough.py -n 20 --redis-url redis://127.0.0.1:6379/13
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench.common import free_port, redis_option, server_environment, wait_for_web, wait_for_worker  # noqa: E402

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


def default_llm(options: list[str]) -> dict:
    """The first llama_cpp LLM of the shipped configuration (the model a fresh install answers with),
    with ``options`` (``key=value``, the value JSON or a string) added to its engine options."""
    shipped = json.loads((BASE_DIR / "balancer" / "configuration.json").read_text())
    llm = next(llm for llm in shipped["llms"] if llm["engine"] == "llama_cpp")
    for option in options:
        key, _, value = option.partition("=")
        try:
            llm["options"][key] = json.loads(value)
        except ValueError:
            llm["options"][key] = value
    return llm


def option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an engine option for the default LLM, on both sides (kv_cache_type=q8_0, flash_attn=false)",
    )


def bare_llama_kwargs(config: dict, llm_id: str) -> dict:
    """The arguments of ``llama_cpp.Llama`` for the LLM: the llama_cpp engine's own."""
    from balancer.configuration import parse_configuration
    from llm_engines.registry import engine_class

    llm = parse_configuration(config).llms[llm_id]
    return engine_class(llm.engine)(**llm.engine_settings()).llama_kwargs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=10, help="generations measured on each side")
    parser.add_argument("--warmup", type=int, default=1, help="generations run first on each side and not measured")
    parser.add_argument("--max-tokens", type=int, default=200, help="the role's max_tokens, and the baseline's")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every pair")
    option_argument(parser)
    redis_option(parser)
    args = parser.parse_args()

    llm = default_llm(args.option)
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
    os.environ.update(server_environment(work, config, args.redis_url))
    import django

    django.setup()
    from llama_cpp import Llama

    from aiagentserver.celery import app
    from orchestration import mcp_handler

    llama_kwargs = bare_llama_kwargs(config, llm["id"])
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
            [sys.executable, "-m", "aiagentserver.worker", "-n", worker_name,
             "-Q", f"{PROFILE}.chat", "--concurrency", "1", "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle"],
            cwd=BASE_DIR,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "aiagentserver.wsgi", "--bind", f"127.0.0.1:{port}",
             "--no-control-socket", "--workers", "2", "--log-level", "warning"],
            cwd=BASE_DIR,
        ),
    ]  # fmt: skip
    state_dir = work / "state"
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def bare(prompt: str) -> tuple[int, float, str]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        started = time.perf_counter()
        response = bare_llama.create_chat_completion(messages=messages, max_tokens=args.max_tokens, temperature=0.0)
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
        wait_for_worker(app, worker_name, deadline)
        connection = wait_for_web(port, deadline)

        load_before = os.getloadavg()
        bare_rates: list[float] = []
        llm_rates: list[float] = []
        wall_rates: list[float] = []
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

    settings = ", ".join(
        f"{key} {value}" for key, value in llama_kwargs.items() if key not in ("model_path", "verbose")
    )
    print(
        f"{llm['model']} ({llm['id']}: {settings}), n={args.n} pairs (after {args.warmup} warm-up), "
        f"max_tokens {args.max_tokens}, temperature 0"
    )
    print(
        f"completion tokens per generation: median {statistics.median(tokens):.0f} "
        f"(min {min(tokens)}, max {max(tokens)})"
    )
    print(f"same tokens and text on both sides: {same} of {args.n}")
    print(f"load average: {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end")
    print(f"{'tokens per second':40}{'median':>10}{'min':>10}{'max':>10}")
    for name, rates in (
        ("bare llama-cpp-python", bare_rates),
        ("server, the step's LLM time", llm_rates),
        ("server, the task's wall time", wall_rates),
    ):
        print(f"{name:40}{statistics.median(rates):10.1f}{min(rates):10.1f}{max(rates):10.1f}")

    def ratios(rates: list[float]) -> str:
        of_pairs = statistics.median(rate / bare for rate, bare in zip(rates, bare_rates, strict=True))
        return f"{of_pairs:.3f}x (ratio of the medians {statistics.median(rates) / statistics.median(bare_rates):.3f}x)"

    print(f"ratio server/bare, median of the pairs: LLM time {ratios(llm_rates)}, wall time {ratios(wall_rates)}")


if __name__ == "__main__":
    main()
