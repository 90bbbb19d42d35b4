"""configuration.json: the shipped file is valid, and every kind of mistake is named with its field."""

import copy
import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from agents.registry import AGENTS
from balancer.configuration import ConfigurationError, ConfigurationSource, load_configuration, parse_configuration

SHIPPED = Path(__file__).resolve().parents[2] / "balancer" / "configuration.json"


@pytest.fixture
def raw():
    return json.loads(SHIPPED.read_text())


def problems(raw, **kwargs):
    with pytest.raises(ConfigurationError) as error:
        parse_configuration(raw, known_agents=AGENTS.names(), **kwargs)
    return dict(error.value.problems)


def test_the_shipped_configuration_is_valid():
    config = load_configuration(SHIPPED, known_agents=AGENTS.names())
    assert set(config.profiles) == {"developer", "productivity"}
    assert set(config.profiles["developer"].roles) == {
        "diagnosis", "architect", "planner", "fast_coder", "deep_coder", "qa", "debug",
    }  # fmt: skip
    assert {"vision", "summarizer", "writer", "translator"} <= set(config.profiles["productivity"].roles)
    assert all(role.system_prompt for profile in config.profiles.values() for role in profile.roles.values())
    assert "developer.planner" in config.queues()


def test_unknown_engine_is_named_with_a_suggestion(raw):
    raw["llms"][0]["engine"] = "llamacpp"
    assert "did you mean 'llama_cpp'" in problems(raw)["llms[0].engine"]


def test_a_role_preferring_a_missing_llm_is_named(raw):
    raw["profiles"]["developer"]["roles"]["planner"]["preferred_llms"] = ["gpt-9"]
    assert "gpt-9" in problems(raw)["profiles.developer.roles.planner.preferred_llms[0]"]


def test_a_secret_in_the_file_is_refused(raw):
    raw["llms"][0]["api_key"] = "sk-123"
    raw["llms"][0]["options"]["token"] = "abc"
    found = problems(raw)
    assert "environment variable" in found["llms[0].api_key"]
    assert "environment variable" in found["llms[0].options.token"]


def test_duplicate_ids_wrong_types_and_unknown_fields(raw):
    raw["llms"].append(copy.deepcopy(raw["llms"][0]))
    raw["llms"][0]["toggle"] = "yes"
    raw["llms"][0]["max_concurrency"] = 0
    raw["profiles"]["developer"]["roles"]["qa"]["temprature"] = 0.5
    raw["profiles"]["developer"]["roles"]["qa"]["agent"] = "wizard"
    raw["profiles"]["productivity"]["roles"]["writer"]["capabilities"] = ["telepathy"]
    found = problems(raw)
    assert "duplicate id" in found["llms[1].id"]
    assert "true or false" in found["llms[0].toggle"]
    assert "at least 1" in found["llms[0].max_concurrency"]
    assert "unknown field" in found["profiles.developer.roles.qa.temprature"]
    assert "unknown agent" in found["profiles.developer.roles.qa.agent"]
    assert "telepathy" in found["profiles.productivity.roles.writer.capabilities[0]"]


def test_a_missing_model_file_and_bad_names(raw):
    raw["llms"][0]["options"]["model_path"] = "/nowhere/model.gguf"
    raw["profiles"]["Bad Name"] = raw["profiles"].pop("productivity")
    raw["profiles"]["tasks"] = copy.deepcopy(raw["profiles"]["developer"])
    found = problems(raw)
    assert "does not exist" in found["llms[0].options.model_path"]
    assert "must match" in found["profiles.Bad Name"]
    assert "reserved" in found["profiles.tasks"]


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "configuration.json"
    path.write_text('{"llms": [,]}')
    with pytest.raises(ConfigurationError, match="line 1, column 11"):
        load_configuration(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"llms": [],\n "profiles": "caf\xe9"}'.encode("latin-1"), "is not UTF-8: byte 0xe9 at line 2"),
        (b'{"llms": [{"max_tokens": ' + b"1" * 5000 + b"}]}", "is not valid JSON: Exceeds the limit"),
        (b"[" * 100_000, "is not valid JSON: nested too deeply"),
        (b'{"llms": [], "profiles": {"p": {"roles": {}, "daily_budget": ' + b"1" * 400 + b"}}}", "must be between"),
    ],
    ids=["latin-1", "long-integer", "deep", "integer-past-a-float"],
)
def test_a_file_json_cannot_read_is_a_configuration_error_and_the_last_good_one_stays(tmp_path, raw, content, problem):
    """Found by review: these raised UnicodeDecodeError, ValueError and RecursionError past the source, so
    every submission was a 500 and every step failed while the file stayed so."""
    path = tmp_path / "configuration.json"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match=problem):
        load_configuration(path)
    path.write_text(json.dumps(raw))
    source = ConfigurationSource(path, known_agents=AGENTS.names())
    good = source.current()
    path.write_bytes(content)
    assert source.current() is good
    assert problem in str(source.last_error)


def test_a_byte_order_mark_is_no_error(tmp_path, raw):
    path = tmp_path / "configuration.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(raw).encode())
    assert load_configuration(path, known_agents=AGENTS.names()).profiles["developer"]


def test_a_broken_edit_keeps_the_last_good_configuration(tmp_path, raw):
    path = tmp_path / "configuration.json"
    path.write_text(json.dumps(raw))
    source = ConfigurationSource(path, known_agents=AGENTS.names())
    good = source.current()
    raw["llms"][0]["engine"] = "nope"
    path.write_text(json.dumps(raw) + " ")
    assert source.current() is good
    assert "llms[0].engine" in str(source.last_error)
    raw["llms"][0]["engine"] = "llama_cpp"
    raw["profiles"]["developer"]["roles"]["planner"]["max_tokens"] = 99
    path.write_text(json.dumps(raw))
    assert source.current().profiles["developer"].roles["planner"].max_tokens == 99
    assert source.last_error is None


def test_a_time_limit_past_the_visibility_timeout_is_named_on_every_load(raw, edit_config, settings):
    """Found by review: only `manage.py check` compared them, at start-up; an admin edit or a file edit to a
    `time_limit_s` of 7200 under the default visibility timeout (3600) went in force unwarned, and each of the
    role's jobs came back from Redis, taken for one whose worker died, while its step still ran."""
    from orchestration.runtime import configuration, configuration_error, validation

    timeout = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    assert validation()["time_limit_below_s"] == timeout - 30
    raw["profiles"]["developer"]["roles"]["qa"]["time_limit_s"] = timeout - 30
    found = problems(raw, time_limit_below_s=timeout - 30)
    assert "visibility timeout" in found["profiles.developer.roles.qa.time_limit_s"]
    raw["profiles"]["developer"]["roles"]["qa"]["time_limit_s"] = timeout - 31
    valid = parse_configuration(raw, known_agents=AGENTS.names(), time_limit_below_s=timeout - 30)
    assert valid.role("developer", "qa").time_limit_s == timeout - 31

    before = configuration().role("developer", "qa").time_limit_s
    edit_config(lambda config: config["profiles"]["developer"]["roles"]["qa"].update(time_limit_s=timeout))
    assert configuration().role("developer", "qa").time_limit_s == before  # the last good one stays
    assert "profiles.developer.roles.qa.time_limit_s: must be under" in str(configuration_error())
    with pytest.raises(CommandError, match="time_limit_s: must be under"):
        call_command("check_config")


def test_check_config_command_prints_every_problem(tmp_path, raw, capsys):
    raw["llms"][0]["engine"] = "nope"
    raw["profiles"]["developer"]["roles"]["qa"]["max_tokens"] = -1
    path = tmp_path / "configuration.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(CommandError) as error:
        call_command("check_config", str(path))
    assert "llms[0].engine" in str(error.value)
    assert "profiles.developer.roles.qa.max_tokens" in str(error.value)
    call_command("check_config")
    assert "valid" in capsys.readouterr().out


def test_values_of_the_wrong_type_are_named_not_crashed_on(raw):
    raw["llms"][0]["source"] = []
    raw["profiles"]["developer"]["roles"]["qa"]["capabilities"] = [{}]
    raw["profiles"]["developer"]["roles"]["qa"]["preferred_llms"] = [[1]]
    raw["profiles"]["developer"]["default_llms"] = "smollm2-135m"
    found = problems(raw)
    assert "must be a string" in found["llms[0].source"]
    assert "unknown capability" in found["profiles.developer.roles.qa.capabilities[0]"]
    assert "no LLM has the id" in found["profiles.developer.roles.qa.preferred_llms[0]"]
    assert "must be a list" in found["profiles.developer.default_llms"]


def test_api_fields_are_checked(raw):
    raw["llms"].append(
        {"id": "remote", "engine": "openai", "source": "api", "model": "gpt", "base_url": "ftp://x",
         "api_key_env": "sk-live-abcdef", "cost_per_1k_tokens": {"prompt": -1, "output": 2}}
    )  # fmt: skip
    raw["llms"][0]["cost_per_1k_tokens"] = {"prompt": 0.1}
    found = problems(raw)
    assert "http://" in found["llms[1].base_url"]
    assert "never the key itself" in found["llms[1].api_key_env"]
    assert (
        "at least" in found["llms[1].cost_per_1k_tokens.prompt"]
        or "between" in found["llms[1].cost_per_1k_tokens.prompt"]
    )
    assert "unknown field" in found["llms[1].cost_per_1k_tokens.output"]
    assert "only api LLMs" in found["llms[0].cost_per_1k_tokens"]


def test_the_tools_capability_needs_an_engine_that_calls_tools(raw):
    raw["llms"][0]["capabilities"] = ["chat", "tools"]  # llama_cpp
    assert "cannot call tools" in problems(raw)["llms[0].capabilities"]
    raw["llms"][0]["capabilities"] = ["chat"]
    raw["llms"].append({"id": "api", "engine": "openai", "source": "api", "model": "m", "capabilities": ["tools"]})
    assert parse_configuration(raw, known_agents=AGENTS.names()).llms["api"].capabilities == {"tools"}


def test_engine_options_names_and_sizes_that_would_break_later_are_refused_at_load(raw):
    """Each of these loaded before, and failed later: at every call (an engine that cannot be built, a
    timeout of null meaning none), in the admin (an integer too large for the database), or as a name
    with a newline in it."""
    raw["llms"].append(
        {"id": "remote", "engine": "openai", "source": "api", "model": "gpt", "base_url": "http://127.0.0.1:9/v1",
         "options": {"request_timeout": "abc", "model": "other", "structured_output": "json_schema"}}
    )  # fmt: skip
    raw["llms"].append(
        {"id": "pot", "engine": "ollama", "source": "local", "model": "m", "base_url": "http://127.0.0.1:9",
         "options": {"request_timeout": -5, "keep_alive": "5m"}}
    )  # fmt: skip
    raw["llms"].append({"id": "nl\n", "engine": "instant", "source": "local", "model": "m", "context_length": 10**30})
    raw["profiles"]["developer"]["roles"]["qa"]["max_tokens"] = 10**12
    found = problems(raw)
    assert "must be a number" in found["llms[1].options.request_timeout"]
    assert "field of the LLM itself" in found["llms[1].options.model"]
    assert "more than 0 seconds" in found["llms[2].options.request_timeout"]
    assert "llms[2].options.keep_alive" not in found
    assert "llms[3].id" in found
    assert "at most" in found["llms[3].context_length"]
    assert "at most" in found["profiles.developer.roles.qa.max_tokens"]
    raw["llms"][1]["options"] = {"request_timeout": None}
    assert "must be a number" in problems(raw)["llms[1].options.request_timeout"]


def test_a_role_whose_reply_no_llm_context_holds_is_named_at_its_max_tokens(raw):
    roles = raw["profiles"]["developer"]["roles"]
    roles["planner"]["max_tokens"] = 8000  # the shipped LLM's context is 4096
    raw["profiles"]["productivity"]["roles"]["vision"]["max_tokens"] = 8000  # no LLM can see: said at submit
    raw["llms"].append({"id": "big-locked", "engine": "instant", "source": "local", "model": "m", "locked": True,
                        "context_length": 16384})  # fmt: skip
    found = problems(raw)
    assert "fits in the context of no LLM" in found["profiles.developer.roles.planner.max_tokens"]
    assert "4096 tokens, smollm2-135m" in found["profiles.developer.roles.planner.max_tokens"]
    assert set(found) == {"profiles.developer.roles.planner.max_tokens"}
    roles["planner"]["preferred_llms"] = ["big-locked"]  # the role may use the locked LLM
    raw["llms"][-1]["toggle"] = False  # turning an LLM off is the operator's switch, never refused
    config = parse_configuration(raw, known_agents=AGENTS.names())
    assert config.profiles["developer"].roles["planner"].max_tokens == 8000


def test_text_fields_are_refused_longer_than_the_admins_columns(raw):
    from balancer.models import LLM, Role

    columns = {"id": LLM._meta.get_field("llm_id").max_length}
    columns |= {name: LLM._meta.get_field(name).max_length for name in ("engine", "model", "base_url", "api_key_env")}
    columns["agent"] = Role._meta.get_field("agent").max_length
    url = "http://127.0.0.1:9/v1/"
    suffix = "_API_KEY"

    def remote(extra):
        return {
            "id": "r" * (columns["id"] + extra), "engine": "openai", "source": "api",
            "model": "m" * (columns["model"] + extra), "base_url": url + "a" * (columns["base_url"] - len(url) + extra),
            "api_key_env": "K" * (columns["api_key_env"] - len(suffix) + extra) + suffix,
        }  # fmt: skip

    raw["llms"].append(remote(0))
    config = parse_configuration(raw, known_agents=AGENTS.names())
    llm = config.llms["r" * columns["id"]]
    LLM(
        llm_id=llm.id,
        engine=llm.engine,
        source=llm.source,
        model=llm.model,
        base_url=llm.base_url,
        api_key_env=llm.api_key_env,
        capabilities=sorted(llm.capabilities),
    ).clean_fields()  # the admin saves it
    raw["llms"][-1] = remote(1)
    raw["llms"][-1]["engine"] = "e" * (columns["engine"] + 1)
    raw["profiles"]["developer"]["roles"]["qa"]["agent"] = "a" * (columns["agent"] + 1)
    found = problems(raw)
    for name in ("id", "engine", "model", "base_url", "api_key_env"):
        assert f"at most {columns[name]} characters" in found[f"llms[1].{name}"], name
    assert f"at most {columns['agent']} characters" in found["profiles.developer.roles.qa.agent"]


def test_a_child_forked_while_a_thread_reloads_the_configuration_can_reload_it(tmp_path, raw):
    """Found by a full run on PostgreSQL (and seen on SQLite): a worker's pool child forked while a thread of the
    main process (the LLMs' health checks, the sweep) held the source's lock inherited it held by a thread it
    does not have, and hung at its first reload, each task it took until the hard time limit."""
    import os
    import threading

    path = tmp_path / "configuration.json"
    path.write_text(json.dumps(raw))
    source = ConfigurationSource(path, known_agents=AGENTS.names())
    source.current()
    raw["profiles"]["developer"]["roles"]["planner"]["max_tokens"] = 77
    path.write_text(json.dumps(raw) + " ")  # changed: the child must reload it
    reloading, forked = threading.Event(), threading.Event()

    def reload_in_progress():  # a thread holding the lock as a reload does, across the fork
        with source._lock:
            reloading.set()
            forked.wait(10)

    holder = threading.Thread(target=reload_in_progress)
    holder.start()
    reloading.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: reloads within the time, or exits with 1 (its lock inherited held)
        done = threading.Event()

        def reload():
            if source.current().profiles["developer"].roles["planner"].max_tokens == 77:
                done.set()

        threading.Thread(target=reload, daemon=True).start()
        os._exit(0 if done.wait(10) else 1)
    forked.set()
    holder.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
