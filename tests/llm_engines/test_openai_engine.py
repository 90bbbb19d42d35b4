"""The openai engine with the official client against ``python -m llama_cpp.server`` (SmolLM2)."""

import json

import pytest

from llm_engines.api.openai_engine import OpenAIEngine
from llm_engines.base import ChatOptions
from llm_engines.errors import (
    EngineAuthError,
    EngineRateLimited,
    EngineTimeout,
    EngineUnavailable,
)

HELLO = [{"role": "user", "content": "Name one fruit."}]


@pytest.fixture
def engine(openai_server):
    # llama-cpp-python's server takes a schema as response_format json_object + schema.
    return OpenAIEngine(model="smollm2", base_url=openai_server, structured_output="json_object")


def test_health_says_when_the_model_is_not_served(openai_server):
    missing = OpenAIEngine(model="not-served", base_url=openai_server).health()
    assert not missing.ok
    assert "not served" in missing.detail


def test_a_stopped_server_is_unavailable(closed_url):
    engine = OpenAIEngine(model="m", base_url=f"{closed_url}/v1")
    with pytest.raises(EngineUnavailable) as error:
        engine.chat(HELLO)
    assert error.value.transient
    assert not engine.health().ok


def test_a_429_is_rate_limited_with_its_retry_after(fault_server):
    engine = OpenAIEngine(model="m", base_url=f"{fault_server('ratelimit')}/v1")
    with pytest.raises(EngineRateLimited) as error:
        engine.chat(HELLO)
    assert error.value.retry_after == 7.0
    assert error.value.transient


def test_no_answer_within_the_timeout_is_engine_timeout(fault_server):
    engine = OpenAIEngine(model="m", base_url=f"{fault_server('hang')}/v1")
    with pytest.raises(EngineTimeout):
        engine.chat(HELLO, ChatOptions(timeout=0.5))


def test_the_key_comes_from_the_named_environment_variable(monkeypatch, openai_server):
    monkeypatch.delenv("AIAGENT_TEST_KEY", raising=False)
    with pytest.raises(EngineAuthError, match="AIAGENT_TEST_KEY is not set"):
        OpenAIEngine(model="smollm2", base_url=openai_server, api_key_env="AIAGENT_TEST_KEY")
    monkeypatch.setenv("AIAGENT_TEST_KEY", "sk-test-secret-value")
    engine = OpenAIEngine(model="smollm2", base_url=openai_server, api_key_env="AIAGENT_TEST_KEY")
    assert engine.client.api_key == "sk-test-secret-value"
    assert engine.chat(HELLO, ChatOptions(max_tokens=4)).text


def test_a_model_the_server_does_not_serve_is_a_configuration_error(fault_server):
    """llama-cpp-python's server answers any model name, so this one is the fault server's 404."""
    from llm_engines.errors import EngineConfigurationError

    with pytest.raises(EngineConfigurationError, match="does not exist") as error:
        OpenAIEngine(model="m", base_url=f"{fault_server('notfound')}/v1").chat(HELLO, ChatOptions(max_tokens=4))
    assert error.value.llm_at_fault


def test_a_stream_that_breaks_midway_is_an_unavailable_engine(fault_server):
    engine = OpenAIEngine(model="m", base_url=f"{fault_server('badstream')}/v1")
    chunks = engine.stream([{"role": "user", "content": "hi"}], ChatOptions(max_tokens=8))
    assert [next(chunks).text, next(chunks).text] == ["tok", "tok"]
    with pytest.raises(EngineUnavailable, match="broke"):
        next(chunks)


COMPLETION = {
    "id": "c", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Pear."}, "finish_reason": "stop"}],
}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (200, "text/html", b"<html><body>Welcome to nginx!</body></html>"),
        (200, "application/json", json.dumps({"error": {"message": "overloaded"}}).encode()),
        (200, "application/json", json.dumps({**COMPLETION, "choices": []}).encode()),
        (200, "application/json", json.dumps({**COMPLETION, "choices": None}).encode()),
        (200, "application/json", b'{"id": "c", "choi'),
        (200, "application/json", b"[1, 2]"),
    ],
)
def test_a_reply_that_is_not_a_chat_completion_is_an_unavailable_engine(fault_server, status, content_type, body):
    """The server is at fault: an EngineError the balancer counts against the LLM and fails over from,
    not an IndexError or AttributeError that it would only pass on."""
    engine = OpenAIEngine(model="m", base_url=f"{fault_server('canned', (status, content_type, body))}/v1")
    with pytest.raises(EngineUnavailable, match="not a chat completion") as error:
        engine.chat(HELLO)
    assert error.value.transient


def test_a_stream_with_no_chunk_is_an_unavailable_engine_not_an_empty_answer(fault_server):
    engine = OpenAIEngine(model="m", base_url=f"{fault_server('canned', (200, 'text/html', b'<html></html>'))}/v1")
    with pytest.raises(EngineUnavailable, match="no chat completion chunk"):
        list(engine.stream(HELLO))


def test_token_counts_that_are_not_numbers_count_as_none(fault_server):
    reply = {**COMPLETION, "usage": {"prompt_tokens": None, "completion_tokens": "7", "total_tokens": None}}
    engine = OpenAIEngine(
        model="m", base_url=f"{fault_server('canned', (200, 'application/json', json.dumps(reply).encode()))}/v1"
    )
    result = engine.chat(HELLO)
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("Pear.", 0, 0)


@pytest.mark.parametrize(("value", "expected"), [("1e12", 3600.0), ("inf", 3600.0), ("nan", None), ("30", 30.0)])
def test_a_retry_after_beyond_any_real_one_is_capped(fault_server, value, expected):
    """The balancer cools the LLM down that long: 1e12 s disabled it for ever, and its cooldown's date
    then broke every selection that wrote it."""
    body = json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode()
    url = fault_server("canned", (429, "application/json", body), headers=(("Retry-After", value),))
    with pytest.raises(EngineRateLimited) as error:
        OpenAIEngine(model="m", base_url=f"{url}/v1").chat(HELLO)
    assert error.value.retry_after == expected
