"""Every agent: its payload schema's rejections (each naming the field), and one real step with SmolLM2.

The real steps check the structure of what comes back, not its wisdom: a
135M-parameter model answers, through llama.cpp's grammar for the agent's
output schema.
"""

import base64
import json
import re

import pytest

from agents.base import CHARS_PER_TOKEN, PayloadError, _placeholder_key, max_json_chars
from agents.developer import qa_agent
from agents.registry import AGENTS, agent_class
from orchestration.runtime import configuration, load_balancer

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
FILES = [{"path": "solution.py", "content": "def add(a, b):\n    return a + b\n"}]


@pytest.mark.parametrize(
    ("agent", "payload", "field"),
    [
        ("diagnosis", {}, "payload.problem"),
        ("diagnosis", {"problem": "x", "logs": 3}, "payload.logs"),
        ("diagnosis", {"problem": "x", "stack": "y"}, "payload.stack"),
        ("architect", {"requirements": "x", "constraints": "one"}, "payload.constraints"),
        ("architect", {"requirements": "x", "constraints": ["a", 1]}, "payload.constraints[1]"),
        ("planner", {"goal": "   "}, "payload.goal"),
        ("planner", {"goal": "x", "execute": "yes"}, "payload.execute"),
        ("coder", {"instruction": "x", "language": "cobol"}, "payload.language"),
        ("coder", {"instruction": "x", "files": [{"path": "/etc/passwd", "content": ""}]}, "payload.files[0].path"),
        ("coder", {"instruction": "x", "files": [{"path": "../up.py", "content": ""}]}, "payload.files[0].path"),
        ("coder", {"instruction": "x", "files": [{"path": "a.py"}]}, "payload.files[0].content"),
        ("coder", {"instruction": "x", "max_iterations": 0}, "payload.max_iterations"),
        ("coder", {"instruction": "x", "max_iterations": 11}, "payload.max_iterations"),
        ("qa", {"input": "check my code"}, "payload.input"),
        ("qa", {"tests": "assert True"}, "payload.files"),
        ("qa", {"files": []}, "payload.files"),
        ("qa", {"files": FILES, "tests": 5}, "payload.tests"),
        ("debug", {"code": "x"}, "payload.failure"),
        ("vision", {"question": "what?"}, "payload.image"),
        ("vision", {"image": "http://example.com/a.png", "question": "what?"}, "payload.image"),
        ("vision", {"image": PNG}, "payload.question"),
        # Found by review: each of these was accepted, and failed the task later (the sandbox or the
        # static check refused the path; the engine the image).
        ("coder", {"instruction": "x", "files": [{"path": "./x.py", "content": ""}]}, "payload.files[0].path"),
        ("coder", {"instruction": "x", "files": [{"path": "a//b.py", "content": ""}]}, "payload.files[0].path"),
        ("coder", {"instruction": "x", "files": [{"path": "a/", "content": ""}]}, "payload.files[0].path"),
        ("coder", {"instruction": "x", "files": [{"path": "x.py\n", "content": ""}]}, "payload.files[0].path"),
        ("coder", {"instruction": "x", "files": [{"path": "test_qa.py", "content": ""}]}, "payload.files[0].path"),
        ("qa", {"files": [*FILES, {"path": "solution.py/x.py", "content": ""}]}, "payload.files[0].path"),
        # Found by a later review: a package or another file of a QA module's name is imported in its place
        # (broken code passed); a file under a QA file's name could not be written.
        (
            "coder",
            {"instruction": "x", "files": [{"path": "test_qa/__init__.py", "content": ""}]},
            "payload.files[0].path",
        ),
        ("coder", {"instruction": "x", "files": [{"path": "test_qa.py/x.py", "content": ""}]}, "payload.files[0].path"),
        ("coder", {"instruction": "x", "files": [{"path": "_qa_runner.so", "content": ""}]}, "payload.files[0].path"),
        ("qa", {"files": [{"path": "solution.py/x.py", "content": ""}, *FILES]}, "payload.files[0].path"),
        ("vision", {"image": "data:image/png;base64,\n", "question": "what?"}, "payload.image"),
        ("vision", {"image": "data:image/png;base64,====", "question": "what?"}, "payload.image"),
        (
            "vision",
            {"image": "data:image/jpeg;base64," + base64.b64encode(b"not a jpeg").decode(), "question": "what?"},
            "payload.image",
        ),
        ("vision", {"image": PNG, "question": "   "}, "payload.question"),
        ("summarizer", {"text": "x", "max_words": 5}, "payload.max_words"),
        ("writer", {"brief": "x", "tone": ""}, "payload.tone"),
        ("translator", {"text": "x", "target_language": 7}, "payload.target_language"),
        ("translator", {"input": ""}, "payload.input"),
        ("generic", {"input": "x", "mode": "y"}, "payload.mode"),
        ("writer", "just text", "payload"),
    ],
)
def test_payload_rejections_name_the_field(agent, payload, field):
    with pytest.raises(PayloadError) as error:
        agent_class(agent).validate_payload(payload)
    assert error.value.field == field


def test_an_integer_sent_as_a_whole_float_is_stored_as_an_integer():
    """Found by a walk-through: `"max_words": 1e2` was stored, and put in the prompt, as 100.0."""
    payload = agent_class("summarizer").validate_payload({"text": "x", "max_words": 1e2})
    assert payload["max_words"] == 100 and isinstance(payload["max_words"], int)
    with pytest.raises(PayloadError):
        agent_class("summarizer").validate_payload({"text": "x", "max_words": 100.5})


def test_every_text_agent_takes_the_input_shorthand():
    for name in AGENTS.names():
        cls = agent_class(name)
        if cls.text_field:
            assert cls.validate_payload({"input": "hello"})[cls.text_field] == "hello"


def test_defaults_are_applied():
    assert agent_class("planner").validate_payload({"goal": "x"}) == {"goal": "x", "execute": False}
    assert agent_class("coder").validate_payload({"instruction": "x"})["language"] == "python"


def test_every_shipped_role_has_room_for_its_longest_reply():
    """A grammar-driven model may fill every field to its bound; max_tokens must hold that, or the reply
    is cut before its JSON closes."""
    config = configuration()
    schemas = []
    for profile in config.profiles.values():
        for role in profile.roles.values():
            schema = agent_class(role.agent)().output_schema(role, config)
            if schema is not None:
                schemas.append((role, schema))
    qa = config.role("developer", "qa")
    schemas += [(qa, qa_agent.QAAgent.tests_schema(qa)), (qa, qa_agent.QAAgent.review_schema())]
    for role, schema in schemas:
        assert max_json_chars(schema) <= role.max_tokens * CHARS_PER_TOKEN, role.queue


@pytest.mark.parametrize(
    ("role_name", "payload", "fits", "field", "words"),
    [
        (
            "summarizer",
            {"text": "x", "max_words": 116},
            {"text": "x", "max_words": 115},
            "payload.max_words",
            "at most 115 words",
        ),
        (
            "writer",
            {"brief": "x", "length_words": 146},
            {"brief": "x", "length_words": 145},
            "payload.length_words",
            "about 145 words",
        ),
        ("translator", {"text": "é" * 615}, {"text": "é" * 614}, "payload.text", "614 characters"),
    ],
)
def test_a_payload_asking_for_more_than_the_role_can_write_is_refused(role_name, payload, fits, field, words):
    """The summarizer was asked for 2,000 words with room for 115: a grammar engine cut the summary at its
    bound (and an engine that writes on ran out of max_tokens before the JSON closed)."""
    config = configuration()
    role = config.role("productivity", role_name)
    agent = agent_class(role.agent)()
    with pytest.raises(PayloadError) as error:
        agent.check_reply_room(agent.validate_payload(payload), role, config)
    assert error.value.field == field
    assert words in error.value.reason and f"max_tokens {role.max_tokens}" in error.value.reason
    agent.check_reply_room(agent.validate_payload(fits), role, config)


def test_a_payload_that_does_not_say_how_long_fits_any_role():
    config = configuration()
    for name, payload in [("writer", {"brief": "x" * 50_000}), ("summarizer", {"text": "x" * 50_000})]:
        role = config.role("productivity", name)
        agent = agent_class(role.agent)()
        agent.check_reply_room(agent.validate_payload(payload), role, config)


def _run(profile, role_name, payload):
    config = configuration()
    role = config.role(profile, role_name)
    agent = agent_class(role.agent)()
    outcome = agent.run(payload=agent.validate_payload(payload), role=role, config=config, balancer=load_balancer())
    assert outcome.llm == "smollm2-135m"
    assert outcome.step_detail()["tokens"]["completion"] > 0
    return outcome.result


@pytest.mark.parametrize(
    ("profile", "role", "payload", "keys"),
    [
        (
            "developer",
            "diagnosis",
            {"problem": "The web server returns 502 after a deploy."},
            {"causes", "next_checks"},
        ),
        ("developer", "architect", {"requirements": "A URL shortener with an API."}, {"components", "interfaces"}),
        ("developer", "planner", {"goal": "Add a login page to a web app."}, {"steps"}),
        ("developer", "debug", {"failure": "AssertionError: add(2, 3) == 6", "code": FILES[0]["content"]}, {"cause"}),
        ("productivity", "summarizer", {"text": "The sea is wide. Ships cross it. Storms are rare."}, {"summary"}),
        ("productivity", "writer", {"brief": "One sentence about the sea."}, {"title", "text"}),
        ("productivity", "translator", {"text": "Bonjour le monde", "target_language": "English"}, {"translation"}),
    ],
)
def test_a_real_step_with_the_default_model(profile, role, payload, keys):
    result = _run(profile, role, payload)
    assert keys <= result.keys()
    if role == "planner":
        roles = configuration().profiles["developer"].roles
        assert all(step["role"] in roles and step["role"] != "planner" for step in result["steps"])
    if role == "debug":
        assert result["wrong"] in ("code", "test")


def test_a_coder_step_with_the_default_model_writes_code_or_fails_naming_the_placeholder():
    """SmolLM2-135M copies the reply format's example ("<the whole file>") into its files: a step that
    looks done and holds no code. It is asked again with the error, and the step fails if the model
    copies it again (doc/performance.md's HumanEval: 56 of its 71 files were the placeholder)."""
    from agents.base import ReplyError

    try:
        result = _run("developer", "fast_coder", {"instruction": "A Python function add(a, b) returning a + b."})
    except ReplyError as exc:
        failed = str(exc)
    else:
        failed = None
    if failed is not None:
        assert "the reply format's placeholder" in failed
        return
    assert all(file["path"] and ".." not in file["path"] for file in result["files"])
    assert all(_placeholder_key(file["content"]) != "the whole file" for file in result["files"])


@pytest.mark.parametrize(
    ("replies", "outcome"),
    [
        (["<the whole file>", "def add(a, b):\n    return a + b\n"], "asked again"),
        (["The whole file", "def add(a, b):\n    return a + b\n"], "asked again"),
        (["<the whole file>", "  <The Whole File> "], "failed"),
        (["# <the whole file>\ndef add(a, b):\n    return a + b\n"], "taken"),
        (["def add(a, b):\n    return a + b\n"], "taken, its run and notes copied"),
    ],
    ids=["placeholder-then-code", "unbracketed", "placeholder-twice", "code-that-mentions-it", "run-copied"],
)
def test_a_reply_that_copies_the_formats_placeholder_is_asked_again(edit_config, tmp_path, replies, outcome):
    from agents.base import ReplyError
    from tests.orchestration.scripted import CODER, code_reply, use_script

    again = "the reply format's placeholder: write the real value"
    first = code_reply(replies[0])
    if outcome.endswith("copied"):  # only stored, and the work is whole: let through
        first.update(run="<the command that runs it>", notes="<one sentence>")
    rules = [{"match": again, "reply": code_reply(replies[-1])}, {"match": CODER, "reply": first}]
    use_script(edit_config, tmp_path / "script.json", rules)
    config = configuration()
    role = config.role("developer", "fast_coder")
    agent = agent_class(role.agent)()
    payload = agent.validate_payload({"instruction": "add(a, b)"})
    run = lambda: agent.run(payload=payload, role=role, config=config, balancer=load_balancer())  # noqa: E731
    if outcome == "failed":
        with pytest.raises(
            ReplyError, match=re.escape("reply.files[0].content is '<The Whole File>', the reply format's")
        ):
            run()
        return
    done = run()
    assert done.result["files"][0]["content"] == replies[-1]
    if outcome == "asked again":
        assert done.step_detail()["calls"] == 2
        assert again in done.step_detail()["first_reply_problem"]
    else:
        assert "calls" not in done.step_detail()


def test_qa_writes_tests_and_reviews_with_the_default_model():
    from agents.base import ReplyError

    config = configuration()
    role = config.role("developer", "qa")
    agent = qa_agent.QAAgent()
    call = {"role": role, "config": config, "balancer": load_balancer(), "deadline": None}
    try:  # the model may copy the format's placeholder ("<Python test code>"), as a coder does (above)
        written = agent.write_tests(files=FILES, instruction="add(a, b) returns a + b", notes=None, **call)
    except ReplyError as exc:
        failed = str(exc)
    else:
        failed = None
        assert isinstance(written.result["tests"], str)
        assert _placeholder_key(written.result["tests"]) != "python test code"
    assert failed is None or "the reply format's placeholder" in failed
    review = agent.review(files=FILES, instruction="add(a, b) returns a + b", tests=None, **call)
    assert isinstance(review.result["passed"], bool)
    assert isinstance(review.result["findings"], list)


def test_vision_without_a_vision_llm_is_refused_before_any_call():
    from balancer.load_balancer import NoCandidate, check_servable

    config = configuration()
    with pytest.raises(NoCandidate, match="vision"):
        check_servable(config, config.role("productivity", "vision"))


@pytest.mark.parametrize(
    "reply",
    [
        '{"summary": "a\\ud800", "key_points": []}',  # not text: the state file cannot encode it
        '{"summary": "a\\u0000", "key_points": []}',  # the PostgreSQL mirror cannot store it
        '{"summary": "a", "key_points": [], "n": ' + "1" * 5000 + "}",  # past Python's digit limit
        "[" * 100_000,  # past its recursion limit
    ],
)
def test_a_reply_the_server_cannot_read_or_store_is_asked_again_not_a_crash(reply):
    """A ReplyProblem (the step asks the model again), not a UnicodeEncodeError, ValueError or
    RecursionError that failed the task as an internal error."""
    from agents.base import Agent, ReplyProblem

    schema = {"type": "object"}
    with pytest.raises(ReplyProblem):
        Agent._parse(reply, schema, lambda data: data)


def test_a_plan_step_with_a_blank_input_is_asked_again():
    from agents.base import ReplyProblem

    planner = agent_class("planner")()
    reply = {"steps": [{"id": "s1", "role": "fast_coder", "input": "   ", "depends_on": []}]}
    with pytest.raises(ReplyProblem, match="blank"):
        planner.parse_result(reply, {"goal": "x"})


@pytest.mark.parametrize(
    "paths", [["a/./b.py"], ["a//b.py"], ["solution.py", "solution.py/x.py"], ["_qa_runner.py"], ["test_qa/x.py"]]
)
def test_a_coders_file_path_the_sandbox_cannot_write_is_asked_again(paths):
    from agents.base import ReplyProblem

    coder = agent_class("coder")()
    reply = {"files": [{"path": path, "content": "x = 1\n"} for path in paths], "run": "r", "notes": ""}
    with pytest.raises(ReplyProblem, match="path"):
        coder.parse_result(reply, {"instruction": "x"})


def test_a_coders_file_path_inside_a_given_or_earlier_file_is_asked_again():
    """Only a reply's path that was another's directory was refused: a reply's pkg.py/mod.py beside a given
    pkg.py, or beside a file of an earlier round, went on to fail the checks as an internal error."""
    from agents.base import ReplyProblem

    coder = agent_class("coder")()
    reply = {"files": [{"path": "pkg.py/mod.py", "content": "x = 1\n"}], "run": "r", "notes": ""}
    given = {"instruction": "x", "files": [{"path": "pkg.py", "content": ""}]}
    with pytest.raises(ReplyProblem, match="inside a path that is another file"):
        coder.parse_result(reply, given)
    with pytest.raises(ReplyProblem, match="inside a path that is another file"):
        coder.parse_result(reply, {"instruction": "x"}, {"previous_files": [{"path": "pkg.py", "content": ""}]})
    assert coder.parse_result(reply, {"instruction": "x"})["files"][0]["path"] == "pkg.py/mod.py"


def test_tests_from_the_context_replace_the_payloads_in_the_coders_prompt():
    from orchestration.runtime import configuration

    coder = agent_class("coder")()
    role = configuration().role("developer", "fast_coder")
    payload = {"instruction": "x", "language": "python", "tests": "OLD-TESTS"}
    prompt = coder.build_messages(payload, role, {"tests": "NEW-TESTS"})[-1]["content"]
    assert "NEW-TESTS" in prompt and "OLD-TESTS" not in prompt
    assert "OLD-TESTS" in coder.build_messages(payload, role)[-1]["content"]


@pytest.mark.parametrize("text", ["a\x00b", "a\ud800b"])
def test_a_free_text_reply_the_server_cannot_store_is_asked_again(text):
    """A free-text reply (the generic agent) was taken as it came: a NUL broke the PostgreSQL mirror, a lone
    surrogate failed the step as an internal error when the state file was written."""
    from agents.base import Agent, ReplyProblem

    with pytest.raises(ReplyProblem, match="not text the server can store"):
        Agent._parse(text, None, None)
    assert Agent._parse("  fine  ", None, None) == {"output": "fine"}


def test_debugs_fields_are_cut_to_what_it_takes():
    """A project's files (up to 20 of 200,000 characters) were given to Debug whole: past its 100,000, the
    round's Debug step failed with a PayloadError."""
    from orchestration.orchestration_engine import _cut

    debug = agent_class("debug")
    code = "x" * 150_000
    limit = debug.input_schema["properties"]["code"]["maxLength"]
    payload = debug.validate_payload({"failure": "f", "code": _cut(code, limit)})
    assert len(payload["code"]) == limit and "characters cut" in payload["code"]
    assert payload["code"].startswith("xxx") and payload["code"].endswith("xxx")


def test_code_nested_past_the_compilers_limit_fails_the_static_check_not_the_step():
    result = qa_agent.static_check([{"path": "deep.py", "content": "x = " + "1+" * 3000 + "1\n"}])
    assert result["passed"] is False and "too deeply nested" in result["output"]


def test_a_webp_image_is_one_by_its_whole_signature():
    """A WAV file (RIFF....WAVE) labelled image/webp was accepted: only RIFF was checked."""
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(16)
    webp = b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(16)
    vision = agent_class("vision")
    with pytest.raises(PayloadError, match="is not a webp image"):
        vision.validate_payload({"image": "data:image/webp;base64," + base64.b64encode(wav).decode(), "question": "?"})
    vision.validate_payload({"image": "data:image/webp;base64," + base64.b64encode(webp).decode(), "question": "?"})


def test_a_diagnosis_lists_its_causes_most_likely_first():
    diagnosis = agent_class("diagnosis")()
    causes = [
        {"cause": "c1", "likelihood": "low", "evidence": "e"},
        {"cause": "c2", "likelihood": "high", "evidence": "e"},
        {"cause": "c3", "likelihood": "medium", "evidence": "e"},
    ]
    result = diagnosis.parse_result({"causes": causes, "next_checks": []}, {"problem": "p"})
    assert [cause["cause"] for cause in result["causes"]] == ["c2", "c3", "c1"]


def test_a_reply_past_a_main_text_fields_grammar_bound_is_not_refused():
    """The bound of a reply's main text (a third of a 100-word summary with the shipped max_tokens, once) was
    enforced on every reply: an engine that takes the schema as guidance only (OpenAI's, without strict),
    or llama.cpp past the bounds its grammar holds, wrote the text asked for, and the step failed twice."""
    from agents.base import Agent, ReplyProblem

    config = configuration()
    role = config.role("productivity", "summarizer")
    summarizer = agent_class("summarizer")()
    schema = summarizer.output_schema(role, config)
    bound = schema["properties"]["summary"]["maxLength"]
    assert bound >= 100 * 6  # the default max_words, at about six characters a word
    summary = "word " * (bound // 2)
    result = Agent._parse(json.dumps({"summary": summary, "key_points": []}), schema, lambda data: data)
    assert result["summary"] == summary
    with pytest.raises(ReplyProblem, match="key_points"):  # the other bounds stand
        Agent._parse(json.dumps({"summary": "s", "key_points": ["k" * 81]}), schema, lambda data: data)


@pytest.mark.parametrize(
    "reply",
    [
        '<think>\nThe user wants a summary. {"not": "this"}\n</think>\n\n{"summary": "s", "key_points": ["k"]}',
        '```json\n{"summary": "s", "key_points": ["k"]}\n```',
        '<think>Short.</think>```\n{"summary": "s", "key_points": ["k"]}```\n',
        '  {"summary": "s", "key_points": ["k"]}  ',
    ],
    ids=["reasoning", "fence", "both", "plain"],
)
def test_a_json_reply_wrapped_in_reasoning_or_a_code_fence_is_read(reply):
    """Reasoning models (Qwen3, DeepSeek-R1) start with <think>…</think>, and models whose server does not
    enforce the schema fence their JSON: each such reply was "not valid JSON", asked again and failed."""
    from agents.base import Agent, ReplyProblem

    schema = {"type": "object", "required": ["summary", "key_points"]}
    assert Agent._parse(reply, schema, lambda data: data) == {"summary": "s", "key_points": ["k"]}
    assert Agent._parse("<think>Hm.</think>\nParis.", None, None) == {"output": "Paris."}
    for broken in ('<think>never closed {"summary": "s", "key_points": []}', 'Here: {"summary": "s"}'):
        with pytest.raises(ReplyProblem, match="not valid JSON"):
            Agent._parse(broken, schema, lambda data: data)
    with pytest.raises(ReplyProblem, match="cut off"):  # said of the JSON, not of the reasoning before it
        Agent._parse("<think>" + "Hm. " * 100 + '</think>{"summary": "s", "key_points": ', schema, lambda d: d)
