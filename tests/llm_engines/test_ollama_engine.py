"""The ollama engine with the official client against the suite's Ollama-API server.

No Ollama binary can be installed on these machines: tests/llm_engines/ollama_api_server.py
implements the documented /api/chat (streaming NDJSON too), /api/tags and /api/version on the
real SmolLM2 model, in its own process.
"""

import json
import time

import pytest

from llm_engines.base import ChatOptions, estimate_tokens
from llm_engines.errors import (
    EngineAuthError,
    EngineBadRequest,
    EngineConfigurationError,
    EngineRateLimited,
    EngineTimeout,
    EngineUnavailable,
)
from llm_engines.local.ollama_engine import OllamaEngine, to_ollama_message

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name one fruit."}]


@pytest.fixture
def engine(ollama_server):
    return OllamaEngine(model="smollm2:135m", base_url=ollama_server, context_length=512)


def test_a_stream_takes_its_counts_from_the_final_line(engine):
    chunks = list(engine.stream(HELLO, ChatOptions(max_tokens=16)))
    pieces = [chunk.text for chunk in chunks if chunk.result is None]
    result = chunks[-1].result
    assert len(pieces) > 1
    assert result.text == "".join(pieces)
    assert result.completion_tokens == len(pieces)
    assert result.prompt_tokens > 0
    assert 0 < result.time_to_first_token_s <= result.latency_s


def test_images_go_as_base64_in_the_message():
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    }
    assert to_ollama_message(message) == {"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo="]}
    with pytest.raises(EngineBadRequest, match="data: URLs"):
        to_ollama_message({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]})


def test_the_server_refusing_images_is_the_llms_configuration_error(engine):
    """Only an LLM configured with ``vision`` is sent images (rule 1): one whose model cannot read them is
    configured wrong, and another LLM may serve the call."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(EngineConfigurationError, match="does not support images"):
        engine.chat([{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}])


def test_health_says_when_the_model_is_not_pulled(ollama_server):
    missing = OllamaEngine(model="llama3:70b", base_url=ollama_server).health()
    assert not missing.ok
    assert "not pulled" in missing.detail


def test_an_unknown_model_is_a_configuration_error_that_another_llm_may_take_over(ollama_server):
    with pytest.raises(EngineConfigurationError, match="not found") as error:
        OllamaEngine(model="nope", base_url=ollama_server).chat(HELLO)
    assert error.value.llm_at_fault


def test_a_stopped_server_is_unavailable(closed_url):
    engine = OllamaEngine(model="m", base_url=closed_url)
    with pytest.raises(EngineUnavailable):
        engine.chat(HELLO)
    assert not engine.health().ok


def test_a_429_is_rate_limited_with_its_retry_after(fault_server):
    with pytest.raises(EngineRateLimited) as error:
        OllamaEngine(model="m", base_url=fault_server("ratelimit")).chat(HELLO)
    assert error.value.retry_after == 7.0


def test_no_answer_within_the_timeout_is_engine_timeout(fault_server):
    with pytest.raises(EngineTimeout):
        OllamaEngine(model="m", base_url=fault_server("hang")).chat(HELLO, ChatOptions(timeout=0.5))


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("streamed", [False, True])
def test_tools_reach_ollama_and_its_calls_come_back_in_openais_shape(engine, streamed):
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    options = ChatOptions(max_tokens=48, temperature=0, tools=(WEATHER,))
    result = (
        next(c.result for c in engine.stream(messages, options) if c.result)
        if streamed
        else engine.chat(messages, options)
    )
    [call] = result.tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)


def test_a_tool_call_and_its_answer_go_to_ollama_in_its_shape():
    engine = OllamaEngine(model="m")
    call = {"id": "call_7", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
    ]
    sent = engine._request(messages, ChatOptions(tools=(WEATHER,)))
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}],
    }
    assert sent["messages"][2] == {"role": "tool", "content": "sunny", "tool_name": "weather"}
    assert sent["tools"] == [WEATHER]
    broken = [
        {"role": "assistant", "content": None, "tool_calls": [{**call, "function": {"name": "w", "arguments": "{"}}]}
    ]
    with pytest.raises(EngineBadRequest, match="not JSON"):
        engine._request(broken, ChatOptions())


def test_a_tool_the_ollama_client_refuses_is_a_bad_request(closed_url):
    engine = OllamaEngine(model="m", base_url=closed_url)
    tool = {"type": "function", "function": {"name": "f", "description": {"x": 1}}}
    with pytest.raises(EngineBadRequest, match="refused the request"):
        engine.chat([{"role": "user", "content": "hi"}], ChatOptions(tools=(tool,)))


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html><body>Welcome to nginx!</body></html>"),
        ("application/json", b"[1, 2]"),
        ("application/json", json.dumps({"model": "m", "message": None, "done": True}).encode()),
    ],
)
def test_a_reply_that_is_not_a_chat_reply_is_an_unavailable_engine(fault_server, content_type, body):
    """The server is at fault (the balancer counts it and fails over), not the request."""
    engine = OllamaEngine(model="m", base_url=fault_server("canned", (200, content_type, body)))
    with pytest.raises(EngineUnavailable) as error:
        engine.chat(HELLO)
    assert error.value.transient


def test_an_error_line_in_the_middle_of_a_stream_is_an_unavailable_engine(fault_server):
    """The model's runner died mid-reply: Ollama's client reports it with status -1, which is not the
    request's fault (a bad request would neither fail over nor count against the LLM)."""
    lines = [{"model": "m", "message": {"role": "assistant", "content": "Pe"}, "done": False},
             {"error": "llama runner process has terminated"}]  # fmt: skip
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    engine = OllamaEngine(model="m", base_url=fault_server("canned", (200, "application/x-ndjson", body)))
    with pytest.raises(EngineUnavailable, match="runner process has terminated"):
        list(engine.stream(HELLO))


def test_a_timeout_is_kept_to_the_second_not_rounded_to_a_coarse_step():
    engine = OllamaEngine(model="m", base_url="http://127.0.0.1:9")
    assert engine._client(61.2)._client.timeout.read == 62.0
    assert engine._client(0.3)._client.timeout.read == 1.0


def _line(content: str, done: bool = False, thinking: str | None = None) -> bytes:
    """One line of Ollama's streamed reply (the last, ``done``, without its counts); ``thinking``, a piece of a
    thinking model's thinking, in the message beside its content."""
    message = {"role": "assistant", "content": content, **({"thinking": thinking} if thinking is not None else {})}
    line = {"model": "m", "created_at": "2026-01-01T00:00:00Z", "message": message, "done": done}
    return json.dumps(line).encode() + b"\n"


def test_a_thinking_models_streamed_thinking_comes_apart_from_its_text_and_is_timed_first(fault_server):
    """Ollama gives a thinking model's thinking in ``message.thinking``, before the answer: it was dropped, and
    the first token was timed at the answer's. The request leaves ``think`` out: ``think: true`` is a 400 for
    a model that cannot think."""
    received: list[bytes] = []
    lines = [_line("", thinking="Hm"), _line("", thinking=", fruit."), _line("Pe"), _line("ar."), _line("", done=True)]
    url = fault_server("pieces", (200, "application/x-ndjson", lines), interval=0.3, received=received)
    chunks = list(OllamaEngine(model="m", base_url=url).stream(HELLO))
    assert [(chunk.reasoning, chunk.text) for chunk in chunks[:-1]] == [("Hm", ""), (", fruit.", ""), ("", "Pe"),
                                                                        ("", "ar.")]  # fmt: skip
    result = chunks[-1].result
    assert (result.reasoning, result.text) == ("Hm, fruit.", "Pear.")
    assert result.time_to_first_token_s < 0.3  # the first thought's, not the answer's (0.6 s later)
    assert "think" not in json.loads(received[0])


def test_a_thinking_models_whole_reply_carries_its_thinking_apart_from_its_text(fault_server):
    """Without a count from Ollama, the thinking's tokens are estimated with the text's ("Hm, fruit." and
    "Pear.": 15 characters, 5 tokens)."""
    received: list[bytes] = []
    url = fault_server(
        "canned", (200, "application/json", _line("Pear.", done=True, thinking="Hm, fruit.")), received=received
    )
    result = OllamaEngine(model="m", base_url=url).chat(HELLO)
    assert (result.reasoning, result.text, result.completion_tokens) == ("Hm, fruit.", "Pear.", 5)
    assert "think" not in json.loads(received[0])


def test_a_stream_that_keeps_sending_ends_at_its_timeout(fault_server):
    """The client's timeout bounds each read: a server that sent a token every 0.2 s ran its whole 5 s
    past a timeout of 1 s, and a step past its time limit."""
    lines = [_line("tok")] * 25 + [_line("", done=True)]
    url = fault_server("pieces", (200, "application/x-ndjson", lines), interval=0.2)
    started = time.monotonic()
    with pytest.raises(EngineTimeout, match="past its timeout of 1s") as error:
        list(OllamaEngine(model="m", base_url=url).stream(HELLO, ChatOptions(timeout=1.0)))
    assert time.monotonic() - started < 2.5
    assert error.value.transient


def test_the_operators_request_timeout_caps_the_callers_timeout(fault_server):
    """The caller's timeout (the time left before the step's deadline, up to 300 s) replaced it: a
    request_timeout of 0.5 s waited out the whole 3 s of a server that hangs."""
    engine = OllamaEngine(model="m", base_url=fault_server("hang"), request_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(EngineTimeout):
        engine.chat(HELLO, ChatOptions(timeout=30))
    assert time.monotonic() - started < 2.5


def test_counts_ollama_leaves_out_are_estimated(fault_server):
    """They counted as 0 tokens, and the reply's speed per token was then its whole latency (rule 5)."""
    url = fault_server("canned", (200, "application/json", _line("Pear.", done=True)))
    result = OllamaEngine(model="m", base_url=url).chat(HELLO)
    # About three characters a token: the prompt as the balancer estimates it, "Pear." as two tokens.
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("Pear.", estimate_tokens(HELLO), 2)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html><body>Welcome to nginx!</body></html>"),
        ("application/json", json.dumps({"models": [{"size": 1}]}).encode()),
        ("application/json", b"[1, 2]"),
    ],
    ids=["html", "a model without a name", "a list"],
)
def test_a_model_list_that_is_not_one_is_unhealthy_rather_than_raise(fault_server, content_type, body):
    """The check raised (a JSONDecodeError, a TypeError), and with it the health check of every LLM."""
    health = OllamaEngine(model="m", base_url=fault_server("canned", (200, content_type, body))).health()
    assert not health.ok


def test_a_stream_kept_alive_with_whitespace_ends_at_its_timeout(fault_server):
    """Each byte restarts the client's read timeout and a line that never ends yields nothing, so the check
    on every line never ran: a server that sent a space every 0.1 s held the call until it stopped."""
    url = fault_server("pieces", (200, "application/x-ndjson", [_line("tok")] + [b" "] * 100), interval=0.1)
    started = time.monotonic()
    chunks = OllamaEngine(model="m", base_url=url).stream(HELLO, ChatOptions(timeout=1.0))
    assert next(chunks).text == "tok"
    with pytest.raises(EngineTimeout, match="past its timeout of 1s"):
        next(chunks)
    assert time.monotonic() - started < 2.5


def test_a_whole_reply_sent_a_byte_at_a_time_ends_at_its_timeout(fault_server):
    """Only streams had the watchdog: a whole reply's body sent a space every 0.1 s held the call until the
    server stopped, each byte restarting the client's read timeout."""
    url = fault_server("pieces", (200, "application/json", [b" "] * 100), interval=0.1)
    started = time.monotonic()
    with pytest.raises(EngineTimeout, match="past its timeout of 1s"):
        OllamaEngine(model="m", base_url=url).chat(HELLO, ChatOptions(timeout=1.0))
    assert time.monotonic() - started < 2.5


def test_a_cancelled_call_ends_at_once_though_its_server_goes_on(fault_server):
    """A step whose lease went to another worker cancels its call (llm_engines.base.Cancel): a stream whose
    server goes on sending tokens, and a whole reply whose server sends a byte at a time, end at once, and
    a call cancelled before it starts ends at once."""
    import threading

    from llm_engines.base import Cancel
    from llm_engines.errors import EngineCancelled

    url = fault_server("pieces", (200, "application/x-ndjson", [_line("tok")] * 100), interval=0.1)
    cancel = Cancel()
    chunks = OllamaEngine(model="m", base_url=url).stream(HELLO, ChatOptions(timeout=30, cancel=cancel))
    assert next(chunks).text == "tok"
    threading.Timer(0.3, cancel.cancel).start()
    started = time.monotonic()
    with pytest.raises(EngineCancelled):
        list(chunks)
    assert time.monotonic() - started < 1.5

    url = fault_server("pieces", (200, "application/json", [b" "] * 100), interval=0.1)
    cancel = Cancel()
    threading.Timer(0.3, cancel.cancel).start()
    started = time.monotonic()
    with pytest.raises(EngineCancelled):
        OllamaEngine(model="m", base_url=url).chat(HELLO, ChatOptions(timeout=30, cancel=cancel))
    assert time.monotonic() - started < 1.5

    cancelled = Cancel()
    cancelled.cancel()
    started = time.monotonic()
    with pytest.raises(EngineCancelled):
        OllamaEngine(model="m", base_url=url).chat(HELLO, ChatOptions(timeout=30, cancel=cancelled))
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    ("status", "error", "raised", "said"),
    [
        # A proxy in front of Ollama answering in OpenAI's shape: the error object crashed the classification.
        (400, {"message": "bad field", "type": "invalid_request_error"}, EngineBadRequest, '"message": "bad field"'),
        (401, "unauthorized", EngineAuthError, "refused the credentials"),
        (403, {"message": "forbidden"}, EngineAuthError, "forbidden"),
        (400, "library/gemma:2b does not support tools", EngineConfigurationError, "does not support tools"),
    ],
    ids=["error-object", "401", "403", "no-tools"],
)
def test_errors_are_classified_whatever_their_shape(fault_server, status, error, raised, said):
    """An error object (not a string) escaped as AttributeError, and a 401/403 or a model without the tools it
    was configured with were the request's fault: no failover, and the breaker learned nothing."""
    url = fault_server("canned", (status, "application/json", json.dumps({"error": error}).encode()))
    engine = OllamaEngine(model="m", base_url=url)
    for call in (engine.chat, lambda messages: list(engine.stream(messages))):
        with pytest.raises(raised, match=said):
            call(HELLO)


def test_a_503_says_how_long_the_server_needs(fault_server):
    body = json.dumps({"error": "server busy, please try again"}).encode()
    url = fault_server("canned", (503, "application/json", body), headers=(("Retry-After", "12"),))
    with pytest.raises(EngineUnavailable) as error:
        OllamaEngine(model="m", base_url=url).chat(HELLO)
    assert error.value.retry_after == 12.0
