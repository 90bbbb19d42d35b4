"""QA: checks code against tests (given in the payload, or written by the QA agent when none are given).

Three checks, which the orchestration runs in parallel (a Celery group, joined in the task's state):
``tests`` runs the tests in the sandbox (agents/sandbox.py), never in the
worker; ``static`` compiles the code and lints it for errors that are bugs
(syntax, undefined names), without running it; ``review`` asks the QA role's
LLM whether the code does what the instruction asks. Each reports pass or
fail with its output.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agents import sandbox
from agents.base import (
    CHECKS,
    FILES,
    PAYLOAD_TEXT,
    QA_OWN_FILES,
    Agent,
    AgentOutcome,
    array,
    long_text,
    obj,
    render_files,
    text,
)
from agents.developer.coder_agent import LANGUAGES
from balancer.configuration import Configuration, RoleConfig
from llm_engines.base import Message, work_cancel

CHECK_NAMES = ("tests", "static", "review")
TEST_MODULE = "test_qa.py"
RUNNER = "_qa_runner.py"
assert {TEST_MODULE, RUNNER} == QA_OWN_FILES  # the names a project's files may not take (agents/base.py)
REPORT_MARKER = "QA-REPORT"
OUTPUT_CHARS = 4000
# Lint only for what is a bug (the flake8 projects' own CI selection): syntax errors, undefined names,
# invalid comparisons. Style is not a reason to send code back.
LINT_RULES = "E9,F63,F7,F82"

# Runs inside the sandbox: imports the tests (module-level asserts run then) and runs every test_*
# function, every unittest.TestCase and every other Test* class's test* methods, with each one's output
# captured, then writes one report line tagged with the run's nonce. The report has stdout to itself: what
# the code under test writes to file descriptor 1 (os.write, a child process) goes to stderr, so that it
# cannot crowd the report out of the captured output; and the report is kept within the output that the
# sandbox captures (its argument), its tests' outputs cut shorter if need be.
# The nonce comes on stdin, read to its end before the tests are imported (in argv it was in
# /proc/self/cmdline for the code to read), and it, the results and the runner's functions are locals of
# main(), not globals of __main__ that the code could replace. That closes the cheap routes only: code in
# the same process can still find them (frames, the report's descriptor), so a pass is not proof against
# code written to fool it (doc/agents.md).
RUNNER_SOURCE = r"""
import sys

# The script's directory (the project's) comes off the path until the runner's own modules are imported: a
# project file named json.py or io.py would stand in for them and break the run.
sys.path.pop(0)
import ast, contextlib, importlib, io, json, os, traceback, unittest


def main():
    given = b""
    while chunk := os.read(0, 4096):
        given += chunk
    nonce, room = given.decode(), int(sys.argv[1])
    empty = os.open(os.devnull, os.O_RDONLY)
    os.dup2(empty, 0)  # the tests read end of file on stdin, as from the sandbox's /dev/null
    os.close(empty)
    del sys.argv[1:]
    report = os.dup(1)
    os.dup2(2, 1)
    sys.path.insert(0, os.getcwd())
    results = []
    dumps, write = json.dumps, os.write  # held before the code under test can replace them

    def outcome(name, run):
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                run()
        except BaseException:
            results.append({"name": name, "passed": False,
                            "output": (output.getvalue()[-1000:] + traceback.format_exc(limit=4))[-2000:]})
        else:
            results.append({"name": name, "passed": True, "output": output.getvalue()[-500:]})

    def case_test(test):
        def run():
            result = unittest.TestResult()
            test.run(result)
            problems = [text for _, text in result.errors + result.failures]
            problems += ["an expected failure passed"] * len(result.unexpectedSuccesses)
            problems += [f"skipped: {reason}" for _, reason in result.skipped]  # a skipped test checks nothing
            if problems:
                raise AssertionError("\n".join(problems))
        return run

    def method_test(cls, name):
        def run():
            instance = cls()
            for hook in ("setup_method", "setUp"):
                if callable(getattr(instance, hook, None)):
                    getattr(instance, hook)()
            getattr(instance, name)()
        return run

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            module = importlib.import_module("test_qa")
    except BaseException:
        results.append({"name": "import test_qa", "passed": False,
                        "output": (captured.getvalue()[-1000:] + traceback.format_exc(limit=4))[-2000:]})
    else:
        own = [(name, value) for name, value in vars(module).items() if getattr(value, "__module__", "") == "test_qa"]
        for name, value in own:
            if isinstance(value, type) and issubclass(value, unittest.TestCase):
                for test in unittest.defaultTestLoader.loadTestsFromTestCase(value):
                    outcome(f"{name}.{test._testMethodName}", case_test(test))
            elif isinstance(value, type) and name.startswith("Test"):
                for method in [m for m in dir(value) if m.startswith("test") and callable(getattr(value, m))]:
                    outcome(f"{name}.{method}", method_test(value, method))
            elif name.startswith("test") and callable(value):
                outcome(name, value)
        if not results:
            with open(module.__file__, encoding="utf-8") as source:
                tree = ast.parse(source.read())
            if any(isinstance(node, ast.Assert) for node in tree.body):
                results.append({"name": "module-level asserts", "passed": True, "output": captured.getvalue()[-1000:]})
            else:
                results.append({"name": "collecting tests", "passed": False,
                                "output": "no test was found: the tests define no test_* function, no "
                                          "unittest.TestCase and no Test* class with test* methods, and assert "
                                          "nothing at module level"})
    text = dumps(results)
    for keep in (300, 0):
        if len(text) <= room:
            break
        for item in results:
            item["output"] = item["output"][-keep:] if keep else ""
        text = dumps(results)
    line = (nonce + text + "\n").encode()
    while line:
        line = line[write(report, line):]


main()
"""


def check_result(name: str, passed: bool, output: str, **detail: Any) -> dict[str, Any]:
    """One check's outcome, as the history and the loop's decision read it."""
    if len(output) > OUTPUT_CHARS:
        output = output[: OUTPUT_CHARS // 2] + "\n[... cut ...]\n" + output[-OUTPUT_CHARS // 2 :]
    return {"check": name, "passed": passed, "output": output, **detail}


def run_tests(files: list[Mapping[str, str]], tests: str, *, limits: sandbox.Limits | None = None) -> dict[str, Any]:
    """Run ``tests`` against ``files`` in the sandbox; ``sandbox.SandboxUnavailable`` when it cannot run, and
    ``sandbox.RunCancelled`` when the thread's work is cancelled meanwhile (the check's lease went to another
    worker, which runs the tests itself): the run is stopped then, as an LLM call is."""
    nonce = f"{REPORT_MARKER}-{secrets.token_hex(8)}:"
    workdir = {item["path"]: item["content"] for item in files}
    workdir[TEST_MODULE] = tests
    workdir[RUNNER] = RUNNER_SOURCE
    limits = limits or sandbox.Limits()
    room = limits.output_bytes - len(nonce) - 1  # the report is ASCII JSON: a character a byte
    run = sandbox.run(workdir, ["python", RUNNER, str(room)], limits=limits, stdin=nonce.encode(), cancel=work_cancel())
    report = None
    for line in reversed(run.stdout.splitlines()):
        if line.startswith(nonce):
            try:
                report = json.loads(line[len(nonce) :])
            except json.JSONDecodeError:
                report = None
            break
    if report is None:
        why = run.limit or f"exit code {run.exit_code}"
        output = f"the test run ended without a report ({why})\n{run.stderr[-2000:]}{run.stdout[-1000:]}"
        return check_result("tests", False, output, sandbox=run.as_detail(), tests=[])
    failed = [item for item in report if not item["passed"]]
    lines = [f"{len(report) - len(failed)} of {len(report)} tests passed"]
    lines += [f"FAILED {item['name']}:\n{item['output']}" for item in failed]
    if run.limit:
        lines.append(f"the run was stopped: {run.limit}")
    passed = bool(report) and not failed and run.exit_code == 0
    return check_result("tests", passed, "\n".join(lines), sandbox=run.as_detail(), tests=report)


def _ruff() -> str | None:
    beside = Path(sys.executable).with_name("ruff")
    return str(beside) if beside.exists() else shutil.which("ruff")


def static_check(files: list[Mapping[str, str]]) -> dict[str, Any]:
    """Compile each Python file and lint it for bugs. Nothing is executed, so it runs in the worker."""
    python = [item for item in files if item["path"].endswith(".py")]
    if not python:
        return check_result("static", False, "no Python file to check")
    problems = []
    for item in python:
        try:
            compile(item["content"], item["path"], "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            line = getattr(exc, "lineno", None)
            problems.append(f"{item['path']}:{line}: {getattr(exc, 'msg', str(exc))}")
        except (RecursionError, MemoryError):
            # An expression nested past what the compiler takes ("1+" * 3000): the code's fault, not the check's.
            problems.append(f"{item['path']}: too deeply nested for Python's compiler")
    if problems:
        return check_result("static", False, "syntax errors:\n" + "\n".join(problems))
    ruff = _ruff()
    if ruff is None:
        return check_result("static", True, "compiled; ruff is not installed, so nothing was linted")
    with tempfile.TemporaryDirectory(prefix="aiagent-lint-") as directory:
        for item in python:
            target = Path(directory, item["path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(item["content"], encoding="utf-8")
        command = [ruff, "check", "--isolated", "--no-cache", "--select", LINT_RULES, "--output-format", "concise"]
        try:
            completed = subprocess.run(
                [*command, "."], cwd=directory, capture_output=True, text=True, timeout=60, check=False
            )
        except subprocess.TimeoutExpired:
            return check_result("static", False, "ruff did not finish within 60 s", error=True)
    if completed.returncode == 0:
        return check_result("static", True, f"compiled; ruff found no error ({LINT_RULES})")
    if completed.returncode == 1:
        return check_result("static", False, completed.stdout.strip())
    return check_result("static", False, f"ruff could not run: {completed.stderr.strip()[:500]}", error=True)


class QAAgent(Agent):
    name = "qa"
    placeholder_fields = frozenset({"tests"})
    input_schema = obj(
        {
            "files": {**FILES, "minItems": 1},
            "language": {"enum": list(LANGUAGES)},
            "tests": PAYLOAD_TEXT,
            "instruction": PAYLOAD_TEXT,
        },
        required=("files",),
    )
    defaults = {"language": "python"}
    flow = CHECKS
    runs_code = True  # the tests check runs the code and its tests

    def write_tests(
        self, *, files: list[Mapping[str, str]], instruction: str, notes: str | None, **call: Any
    ) -> AgentOutcome:
        """Tests for the code, from the instruction (and, on a later round, Debug's notes on the old tests)."""
        parts = [f"Instruction:\n{instruction}", f"The code:\n{render_files(files)}"]
        if notes:
            parts.append(f"The previous tests were wrong: {notes}")
        asks = (
            'Reply with JSON: {"tests": "<Python test code>"}. Write test functions named test_... that use plain '
            "assert statements; import the code under test with `from solution import ...`. Test what the "
            "instruction asks, including its examples."
        )
        return self._ask_qa(asks, parts, self.tests_schema(call["role"]), call)

    def review(
        self, *, files: list[Mapping[str, str]], instruction: str, tests: str | None, **call: Any
    ) -> AgentOutcome:
        """The LLM's review: does the code do what the instruction asks?"""
        parts = [f"Instruction:\n{instruction or '(none given)'}", f"The code:\n{render_files(files)}"]
        if tests:
            parts.append(f"Its tests:\n{tests}")
        asks = (
            'Reply with JSON: {"passed": true or false, "findings": ["..."]}: passed is false only for a real '
            "defect (wrong result, crash, missing feature); list each defect in findings."
        )
        return self._ask_qa(asks, parts, self.review_schema(), call)

    def _ask_qa(self, asks: str, parts: list[str], schema: dict[str, Any], call: dict[str, Any]) -> AgentOutcome:
        system = {"role": "system", "content": f"{call['role'].system_prompt}\n\n{asks}"}
        messages = [system, {"role": "user", "content": "\n\n".join(parts)}]
        return self.ask(messages, schema, parse=lambda data: data, **call)

    @staticmethod
    def tests_schema(role: RoleConfig) -> dict[str, Any]:
        return obj({"tests": long_text(role, 0.85)})

    @staticmethod
    def review_schema() -> dict[str, Any]:
        return obj({"passed": {"type": "boolean"}, "findings": array(text(120), max_items=3)})

    def build_messages(
        self, payload: Mapping[str, Any], role: RoleConfig, context: Mapping[str, Any] | None = None
    ) -> list[Message]:
        raise TypeError("QA runs as checks (write_tests, run_tests, static_check, review), not as one prompt")

    def output_schema(self, role: RoleConfig, config: Configuration) -> dict[str, Any] | None:
        return None
