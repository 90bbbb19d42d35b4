"""The openai engine with the official client against ``python -m llama_cpp.server`` (SmolLM2)."""

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
