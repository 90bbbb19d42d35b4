"""Memory of a Celery worker with the default model, against a bare process that loads the same model.

- worker: a real Celery worker as ``make run`` starts it (prefork, concurrency 2, or
  ``--concurrency``) on a temporary configuration whose one role (the generic agent) runs on the
  default LLM of balancer/configuration.json. Tasks are submitted two at a time until every child
  process has loaded the model, then more (one of them with a prompt of about 2,700 tokens, two
  thirds of the context), so that what a long task touches is counted.
- baseline: a bare Python process that loads the same model with llama-cpp-python, ``Llama``
  constructed with the arguments the llama_cpp engine gives it, and answers the same prompts.

For the worker's main process, each child and the baseline it prints, from /proc: RSS now and at
its peak (VmHWM), PSS and USS (smaps_rollup: a page shared by n processes counts 1/n in PSS and
not at all in USS), the anonymous and file-backed parts of the RSS, and how many times the GGUF
file is mapped (llama.cpp maps the file once per model it loads). Then the ratio of each child's
RSS to the baseline's.

    .venv/bin/python bench/worker_memory.py --redis-url redis://127.0.0.1:6379/13
    .venv/bin/python bench/worker_memory.py --option kv_cache_type=q8_0   # an engine option, both sides
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench.common import redis_option, server_environment  # noqa: E402
from bench.engine_passthrough import bare_llama_kwargs, default_llm, option_argument  # noqa: E402

PROFILE = f"bench_{uuid.uuid4().hex[:8]}"
SYSTEM_PROMPT = "You are a helpful assistant."
PROMPTS = [
    "Explain how a hash table works.",
    "Describe the water cycle, step by step.",
    "What are the differences between a process and a thread?",
]
# About 2,700 tokens (of the 4,096 of the context; the balancer estimates 3,450): a long task's
# prompt, evaluated in full batches.
LONG_PROMPT = "Summarise this report.\n\n" + " ".join(
    f"Item {number}: the pump in building {number % 7} was checked and its pressure was normal."
    for number in range(140)
)
MB = 1024 * 1024


def proc_fields(path: Path) -> dict[str, int]:
    """``Name: value kB`` lines of a /proc file, in bytes."""
    fields = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return fields


def memory(pid: int, model: Path) -> dict[str, float]:
    status = proc_fields(Path(f"/proc/{pid}/status"))
    figures = {
        "rss": status["VmRSS"] / MB,
        "peak": status["VmHWM"] / MB,
        "anon": status["RssAnon"] / MB,
        "file": status["RssFile"] / MB,
        "pss": float("nan"),
        "uss": float("nan"),
    }
    try:
        rollup = proc_fields(Path(f"/proc/{pid}/smaps_rollup"))
    except OSError:
        pass
    else:
        figures["pss"] = rollup["Pss"] / MB
        figures["uss"] = (rollup["Private_Clean"] + rollup["Private_Dirty"]) / MB
    figures["model_maps"] = model_mappings(pid, model)
    return figures


def model_mappings(pid: int, model: Path) -> int:
    """How many times ``model`` is mapped. llama.cpp maps the file once per model it loads (and then
    unmaps the parts it does not use); a mapping may show as several adjacent lines whose offsets
    follow on, which count once."""
    count = 0
    previous_end = previous_offset_end = None
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[5] != str(model):
            continue
        start, end = (int(address, 16) for address in parts[0].split("-"))
        offset = int(parts[2], 16)
        if start != previous_end or offset != previous_offset_end:
            count += 1
        previous_end, previous_offset_end = end, offset + end - start
    return count


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the parent pid follows the state.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


BARE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from llama_cpp import Llama
    kwargs, system, prompts, max_tokens = json.loads(sys.argv[1])
    llama = Llama(**kwargs)
    for prompt in prompts:
        llama.create_chat_completion(
            messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            max_tokens=max_tokens, temperature=0.0,
        )
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=2, help="the worker's child processes (make run: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of tasks after every child has the model")
    parser.add_argument("--max-tokens", type=int, default=64, help="the role's max_tokens, and the baseline's")
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
    from aiagentserver.celery import app
    from orchestration.services import task_submit

    llama_kwargs = bare_llama_kwargs(config, llm["id"])
    model = Path(llama_kwargs["model_path"]).resolve()

    subprocess.run([sys.executable, str(BASE_DIR / "manage.py"), "migrate", "-v", "0"], check=True, cwd=BASE_DIR)
    worker_name = f"bench-{uuid.uuid4().hex[:6]}@localhost"
    worker = subprocess.Popen(
        [sys.executable, "-m", "aiagentserver.worker", "-n", worker_name, "-Q", f"{PROFILE}.chat",
         "--concurrency", str(args.concurrency), "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
        cwd=BASE_DIR,
    )  # fmt: skip
    state_dir = work / "state"

    def run_tasks(prompts: list[str]) -> list[str]:
        """Submit ``prompts`` at once and wait until they succeed; the workers (``host:pid``) that claimed them."""
        ids = [task_submit(profile=PROFILE, role="chat", payload={"input": prompt})[0]["task_id"] for prompt in prompts]
        claimed = []
        give_up = time.monotonic() + 900
        for task_id in ids:
            while True:
                packet = json.loads((state_dir / f"{task_id}.json").read_bytes())
                if packet["status"] == "succeeded":
                    break
                if packet["status"] not in ("queued", "running") or time.monotonic() > give_up:
                    sys.exit(f"task {task_id} ended as {packet['status']}: {packet['history'][-1]}")
                time.sleep(0.2)
            claimed += [event["detail"]["worker"] for event in packet["history"] if event["event"] == "claimed"]
        return claimed

    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[worker_name], timeout=0.5):
            if time.monotonic() > deadline:
                sys.exit("the worker did not start")
        pool = children(worker.pid)
        tasks = 0
        loading_rounds = 0
        while not all(model_mappings(pid, model) for pid in pool):
            loading_rounds += 1
            if loading_rounds > 10:
                sys.exit(f"after 10 rounds not every child of the worker had loaded the model: {pool}")
            run_tasks(PROMPTS[: args.concurrency])
            tasks += args.concurrency
        for number in range(args.rounds):
            prompts = [PROMPTS[(number + offset) % len(PROMPTS)] for offset in range(args.concurrency)]
            if number == 0:
                prompts[-1] = LONG_PROMPT
            run_tasks(prompts)
            tasks += len(prompts)
        if children(worker.pid) != pool:
            sys.exit(f"the worker's children changed during the run: {pool} then {children(worker.pid)}")
        rows = [("worker main process", worker.pid, memory(worker.pid, model))]
        rows += [(f"worker child {pid}", pid, memory(pid, model)) for pid in pool]
    finally:
        worker.terminate()
        worker.wait(timeout=60)

    bare = subprocess.Popen(
        [sys.executable, "-c", BARE_SCRIPT,
         json.dumps([llama_kwargs, SYSTEM_PROMPT, [*PROMPTS, LONG_PROMPT], args.max_tokens])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        if bare.stdout.readline().strip() != "ready":
            sys.exit("the bare process did not load the model")
        bare_figures = memory(bare.pid, model)
    finally:
        bare.stdin.close()
        bare.wait(timeout=60)

    settings = ", ".join(
        f"{key} {value}" for key, value in llama_kwargs.items() if key not in ("model_path", "verbose")
    )
    print(
        f"{llm['model']} ({model.name}, {model.stat().st_size / MB:.0f} MB; {settings}), "
        f"worker concurrency {args.concurrency} (prefork), {tasks} tasks ({loading_rounds} round(s) until every child "
        f"had the model, then {args.rounds}, one with a prompt of about 2,700 tokens)"
    )
    print(f"{'MB':28}{'RSS':>8}{'peak':>8}{'PSS':>8}{'USS':>8}{'anon':>8}{'file':>8}{'model maps':>12}")

    def line(name: str, figures: dict) -> None:
        print(
            f"{name:28}{figures['rss']:8.1f}{figures['peak']:8.1f}{figures['pss']:8.1f}{figures['uss']:8.1f}"
            f"{figures['anon']:8.1f}{figures['file']:8.1f}{figures['model_maps']:12d}"
        )

    line("bare llama-cpp-python", bare_figures)
    for name, _, figures in rows:
        line(name, figures)
    total = {key: sum(figures[key] for _, _, figures in rows) for key in bare_figures}
    line("whole worker (sum)", total)
    for name, _, figures in rows[1:]:
        print(
            f"{name}: RSS {figures['rss'] / bare_figures['rss']:.2f}x the bare process's, "
            f"peak {figures['peak'] / bare_figures['peak']:.2f}x"
        )


if __name__ == "__main__":
    main()
