"""bench/humaneval.py: the scoring runs each problem's real test in the real sandbox, and the whole
harness, run against a real server and worker whose model is the scripted engine, reports exactly
the passes and failures that the hidden tests saw."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from rest_framework.authtoken.models import Token

from bench import humaneval
from tests.conftest import BASE_DIR
from tests.orchestration.scripted import CODER, DEBUG, QA_REVIEW, QA_TESTS, code_reply, use_script
from tests.reliability.test_load import web  # noqa: F401  (the fixture: a real gunicorn server)

PROBLEMS = {p["task_id"]: p for p in humaneval.load_problems()}


def files(content: str) -> list[dict[str, str]]:
    return [{"path": "solution.py", "content": content}]


def canonical(task_id: str) -> str:
    return humaneval.canonical_files(PROBLEMS[task_id])[0]["content"]


# HumanEval/32 and /38 test with helpers of the prompt (poly, encode_cyclic); /33's test calls the
# entry point by its own name as well as through the candidate.
@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/32", "HumanEval/33", "HumanEval/38"])
def test_the_canonical_solution_passes_its_own_test_in_the_sandbox(task_id):
    scored = humaneval.score(PROBLEMS[task_id], files(canonical(task_id)))
    assert scored["passed"], scored["output"]
    assert scored["output"].startswith("1 of 1 tests passed")


@pytest.mark.parametrize(
    ("task_id", "content", "said"),
    [
        ("HumanEval/0", PROBLEMS["HumanEval/0"]["prompt"] + "    return False\n", "AssertionError"),
        ("HumanEval/33", PROBLEMS["HumanEval/33"]["prompt"] + "    return sorted(l)\n", "AssertionError"),
        # Its own encode_cyclic in place of the prompt's: the test then encodes with the wrong one.
        ("HumanEval/38", canonical("HumanEval/38").replace("group[1:] + group[0]", "group"), "AssertionError"),
        ("HumanEval/0", "def other():\n    return 1\n", "does not define has_close_elements()"),
        ("HumanEval/0", "import os\nos._exit(0)\n", "ended without a report (exit code 0)"),
        ("HumanEval/0", "import sys\nsys.exit(0)\n", "SystemExit"),
        ("HumanEval/0", "def has_close_elements(\n", "SyntaxError"),
    ],
    ids=["wrong-result", "wrong-by-name", "wrong-helper", "no-entry-point", "exit-before-tests", "exit", "syntax"],
)
def test_broken_code_fails_its_test(task_id, content, said):
    scored = humaneval.score(PROBLEMS[task_id], files(content))
    assert not scored["passed"]
    assert said in scored["output"]


def test_code_that_never_ends_fails_at_the_sandboxs_limit(settings):
    settings.SANDBOX_WALL_SECONDS = 2
    scored = humaneval.score(PROBLEMS["HumanEval/0"], files("while True:\n    pass\n"))
    assert not scored["passed"]
    assert "timeout" in scored["output"]


def test_no_code_or_no_solution_py_fails_without_running():
    assert humaneval.score(PROBLEMS["HumanEval/0"], None) == {"passed": False, "output": "the coder gave no code"}
    elsewhere = [{"path": "main.py", "content": canonical("HumanEval/0")}]
    assert humaneval.score(PROBLEMS["HumanEval/0"], elsewhere)["output"] == "no solution.py among the files (main.py)"


def test_the_instruction_holds_the_prompt_and_never_the_test():
    for problem in PROBLEMS.values():
        asked = humaneval.instruction(problem)
        assert problem["prompt"] in asked
        assert "def check(" not in asked
        assert problem["canonical_solution"].strip() not in asked


def test_the_subset_is_the_first_n_or_drawn_by_the_seed_or_named():
    first = [p["task_id"] for p in humaneval.load_problems(limit=3)]
    assert first == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    drawn = [p["task_id"] for p in humaneval.load_problems(limit=5, seed=7)]
    assert drawn == [p["task_id"] for p in humaneval.load_problems(limit=5, seed=7)]
    assert drawn != [p["task_id"] for p in humaneval.load_problems(limit=5, seed=8)]
    assert len(humaneval.load_problems()) == 164
    named = humaneval.load_problems(ids=["12", "HumanEval/3"])
    assert [p["task_id"] for p in named] == ["HumanEval/12", "HumanEval/3"]
    with pytest.raises(humaneval.BenchError, match="no problem '164'"):
        humaneval.load_problems(ids=["164"])
    with pytest.raises(humaneval.BenchError, match="named twice"):
        humaneval.load_problems(ids=["3", "HumanEval/3"])


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--limit", "0"], "--limit: 0 must be above 0"),
        (["--limit", "165"], "--limit: 165 must be above 0 and at most 164"),
        (["--limit", "ten"], "'ten' is not a whole number"),
        (["--problems", "0,x"], "not a comma-separated list"),
        (["--problems", "1", "--seed", "3"], "--problems names the problems"),
        (["--url", "ftp://host"], "is not a server URL"),
        (["--max-iterations", "1"], "invalid choice: 1"),
        (["--concurrency", "-2"], "must be above 0"),
        (["--coder-llm", "x", "--config-file", "/nonexistent.json"], "is not a file"),
    ],
)
def test_bad_options_are_refused_with_the_reason(argv, said, capsys):
    with pytest.raises(SystemExit) as exited:
        humaneval.parse_args(["--token", "t", *argv])
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def test_a_token_is_required(capsys, monkeypatch):
    monkeypatch.delenv("AIAGENT_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        humaneval.parse_args([])
    assert "give --token or set AIAGENT_TOKEN" in capsys.readouterr().err


# -- the whole harness against a real server ------------------------------------------------------

RIGHT, WRONG, FIXED = "HumanEval/0", "HumanEval/2", "HumanEval/4"


def scripted_rules() -> list[dict]:
    """The coder answers HumanEval/0 right at once, HumanEval/2 wrong always (and QA's own tests,
    which check nothing, approve it), HumanEval/4 wrong until Debug's fix reaches it (QA's tests for
    it use the docstring's example)."""
    fixed = PROBLEMS[FIXED]
    return [
        {"match": QA_REVIEW, "reply": {"passed": True, "findings": []}},
        {
            "match": f"{QA_TESTS}.*def {fixed['entry_point']}",
            "reply": {
                "tests": "from solution import mean_absolute_deviation\n\n"
                "def test_example():\n    assert abs(mean_absolute_deviation([1.0, 2.0, 3.0, 4.0]) - 1.0) < 1e-9\n"
            },
        },
        {"match": QA_TESTS, "reply": {"tests": "def test_imports():\n    import solution\n"}},
        {"match": DEBUG, "reply": {"cause": "a wrong result", "wrong": "code", "fix": "FIX-MARKER: the mean"}},
        {"match": f"{CODER}.*def {fixed['entry_point']}.*FIX-MARKER", "reply": code_reply(canonical(FIXED))},
        {"match": f"{CODER}.*def {fixed['entry_point']}", "reply": code_reply(fixed["prompt"] + "    return 0.0\n")},
        {"match": f"{CODER}.*def has_close_elements", "reply": code_reply(canonical(RIGHT))},
        {"match": f"{CODER}.*def truncate_number", "reply": code_reply(PROBLEMS[WRONG]["prompt"] + "    return 1.0\n")},
    ]


@pytest.fixture
def harness(web, celery_worker, edit_config, django_user_model, tmp_path):  # noqa: F811
    """The command that runs bench/humaneval.py against a real gunicorn and Celery worker whose model
    is the scripted engine, answering from ``rules`` (by default ``scripted_rules()``)."""
    token = Token.objects.create(user=django_user_model.objects.create_user(username="humaneval")).key

    def command(*options: str, rules: list[dict] | None = None) -> list[str]:
        use_script(edit_config, tmp_path / "script.json", rules or scripted_rules())
        return [sys.executable, "bench/humaneval.py", "--url", web, "--token", token, *options]

    return command


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_the_harness_reports_the_passes_the_hidden_tests_saw(harness, config_file, tmp_path):
    out = tmp_path / "humaneval.json"
    command = harness(
        "--problems", f"{RIGHT},{WRONG},{FIXED}", "--concurrency", "3", "--poll", "0.2", "--timeout", "120",
        "--coder-llm", "scripted", "--config-file", str(config_file), "--json", str(out),
    )  # fmt: skip
    before = config_file.read_bytes()
    run = subprocess.run(command, cwd=BASE_DIR, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert config_file.read_bytes() == before  # the coder roles' preference was put back

    report = json.loads(out.read_text())
    records = {(r["problem"], r["mode"]): r for r in report["records"]}
    passed = {key: record["passed"] for key, record in records.items()}
    assert passed == {
        (RIGHT, "single-shot"): True,
        (RIGHT, "loop"): True,
        (WRONG, "single-shot"): False,
        (WRONG, "loop"): False,  # the loop's own checks approved it: the hidden test did not
        (FIXED, "single-shot"): False,  # one answer only, whatever the task did after it
        (FIXED, "loop"): True,
    }
    assert records[(WRONG, "loop")]["status"] == "succeeded"
    assert records[(WRONG, "loop")]["server_passed"] is True
    assert "AssertionError" in records[(WRONG, "loop")]["output"]
    assert records[(FIXED, "loop")]["iterations"] == 2
    assert {records[(p, "single-shot")]["iterations"] for p in (RIGHT, WRONG, FIXED)} == {1}
    assert all(record["tokens"] > 0 for record in records.values())
    assert set(records[(FIXED, "single-shot")]["llms"]) == {"fast_coder scripted"}
    assert set(records[(FIXED, "loop")]["llms"]) == {"fast_coder scripted", "qa scripted", "debug scripted"}

    summary = report["summary"]
    assert (summary["single-shot"]["passed"], summary["loop"]["passed"]) == (1, 2)
    assert summary["difference"]["gained"] == [FIXED]
    assert summary["difference"]["lost"] == []
    assert summary["loop"]["server_passed_but_failed"] == 1
    assert summary["loop"]["mean_iterations"] == pytest.approx(4 / 3)
    assert "single-shot    0.333    1/3" in run.stdout
    assert "loop           0.667    2/3" in run.stdout
    assert "difference (loop - single-shot): +0.333 pass@1; gained 1 (HumanEval/4), lost 0 (-)" in run.stdout
    assert "preferred for the run: fast_coder scripted, deep_coder scripted" in run.stdout


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_a_config_file_the_server_does_not_read_is_refused_and_left_as_it_was(harness, tmp_path):
    other = tmp_path / "configuration.json"
    other.write_text((BASE_DIR / "balancer" / "configuration.json").read_text())
    before = other.read_bytes()
    command = harness("--problems", RIGHT, "--coder-llm", "scripted", "--config-file", str(other))
    run = subprocess.run(command, cwd=BASE_DIR, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2
    assert "did not take the change" in run.stderr
    assert other.read_bytes() == before


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_an_interrupted_run_cancels_its_task_and_sums_up_the_problems_done(harness, state_dir, tmp_path):
    slow = [{**rule, "delay_s": 8} if "truncate_number" in rule["match"] else rule for rule in scripted_rules()]
    out = tmp_path / "humaneval.json"
    command = harness("--problems", f"{RIGHT},{WRONG}", "--poll", "0.2", "--json", str(out), rules=slow)
    since = time.time()
    running = subprocess.Popen(command, cwd=BASE_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    while len([line for line in lines if line.startswith(RIGHT)]) < 2:  # both modes of the first problem
        line = running.stdout.readline()
        assert line, running.stderr.read()
        lines.append(line)
    deadline = time.monotonic() + 30
    while not second_problem_tasks(state_dir, since):  # its coder answers in 8 s
        assert time.monotonic() < deadline, "the second problem was not posted"
        time.sleep(0.1)
    running.send_signal(signal.SIGINT)
    stdout, _ = running.communicate(timeout=60)
    assert running.returncode == 130
    assert "INTERRUPTED: the 1 problems done in every mode count" in stdout
    assert "single-shot    1.000    1/1" in stdout
    report = json.loads(out.read_text())
    assert [(r["problem"], r["mode"]) for r in report["records"]] == [(RIGHT, "single-shot"), (RIGHT, "loop")]
    assert [packet["status"] for packet in second_problem_tasks(state_dir, since)] == ["cancelled"]


def second_problem_tasks(state_dir, since: float) -> list[dict]:
    """The tasks of the second problem (HumanEval/2) posted since ``since``, as their state files say."""
    packets = [json.loads(path.read_text()) for path in state_dir.glob("*.json")]
    return [
        p for p in packets
        if humaneval._at(p["created_at"]) >= since and "truncate_number" in p["payload"].get("instruction", "")
    ]  # fmt: skip
