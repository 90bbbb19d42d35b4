"""The openai engine with the official client against ``python -m llama_cpp.server`` (SmolLM2)."""

import json
import time

import pytest

from llm_engines.api.openai_engine import OpenAIEngine
from llm_engines.base import ChatOptions, estimate_tokens
from llm_engines.errors import (
    EngineAuthError,
    EngineBadRequest,
    EngineQuotaExceeded,
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


@pytest.mark.parametrize(
    "usage",
    [None, {"prompt_tokens": None, "completion_tokens": "7", "total_tokens": None}],
    ids=["none", "not numbers"],
)
def test_token_counts_the_server_did_not_give_are_estimated(fault_server, usage):
    """They counted as 0: such a call of a paid API cost nothing against the daily budget (rule 7), and
    its one token (at least) made the LLM look many times slower per token (rule 5)."""
    reply = {**COMPLETION, **({"usage": usage} if usage else {})}
    engine = OpenAIEngine(
        model="m", base_url=f"{fault_server('canned', (200, 'application/json', json.dumps(reply).encode()))}/v1"
    )
    result = engine.chat(HELLO)
    # About three characters a token: the prompt as the balancer estimates it, "Pear." as two tokens.
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("Pear.", estimate_tokens(HELLO), 2)


def test_a_stream_without_usage_has_its_tokens_estimated(fault_server):
    """The prompt counted as 0 tokens, the reply as one a piece."""
    engine = streaming(fault_server, [_chunk({"content": "Pe"}), _chunk({"content": "ar."}, "stop"), DONE])
    result = next(chunk.result for chunk in engine.stream(HELLO) if chunk.result)
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("Pear.", estimate_tokens(HELLO), 2)


def test_a_reasoning_models_thinking_counts_as_tokens_and_times_the_first_one(fault_server):
    """Streamed apart from the text (reasoning_content), the thinking was not counted: a reply without usage
    cost only its visible tokens (rule 7), and its first token was timed at the answer's (rule 5)."""
    thinking = [_chunk({"reasoning_content": "Hm"}), _chunk({"reasoning_content": ", fruit."})]
    pieces = [*thinking, _chunk({"content": "Pe"}), _chunk({"content": "ar."}, "stop"), DONE]
    url = fault_server("pieces", (200, "text/event-stream", pieces), interval=0.3)
    result = next(chunk.result for chunk in OpenAIEngine(model="m", base_url=f"{url}/v1").stream(HELLO) if chunk.result)
    assert (result.text, result.completion_tokens) == ("Pear.", 4)
    assert result.time_to_first_token_s < 0.3  # the first thought's, not the answer's (0.6 s later)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_reasoning_models_streamed_thinking_comes_apart_from_its_text(fault_server, field):
    """vLLM and DeepSeek's API (reasoning_content), OpenRouter and later vLLM (reasoning) stream the thinking
    before the answer: it was dropped. A thought under both names is one thought; one that is not text is the
    server's own, and ignored."""
    pieces = [_chunk({field: "Hm"}), _chunk({"reasoning_content": ", fruit.", "reasoning": ", fruit."}),
              _chunk({field: {"tokens": 3}}), _chunk({"content": "Pe"}), _chunk({"content": "ar."}, "stop"),
              DONE]  # fmt: skip
    chunks = list(streaming(fault_server, pieces).stream(HELLO))
    assert [(chunk.reasoning, chunk.text) for chunk in chunks[:-1]] == [("Hm", ""), (", fruit.", ""), ("", "Pe"),
                                                                        ("", "ar.")]  # fmt: skip
    result = chunks[-1].result
    assert (result.reasoning, result.text, chunks[-1].reasoning, chunks[-1].text) == ("Hm, fruit.", "Pear.", "", "")


def _replying(fault_server, message: dict) -> OpenAIEngine:
    """An engine whose server answers every call whole, with ``message``."""
    body = json.dumps({**COMPLETION, "choices": [{**COMPLETION["choices"][0], "message": message}]}).encode()
    return OpenAIEngine(model="m", base_url=f"{fault_server('canned', (200, 'application/json', body))}/v1")


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_reasoning_models_whole_reply_carries_its_thinking_apart_from_its_text(fault_server, field):
    """The thinking of a reply not streamed was dropped; without a count from the server, its tokens are
    estimated with the text's ("Hm, fruit." and "Pear.": 15 characters, 5 tokens)."""
    result = _replying(fault_server, {"role": "assistant", "content": "Pear.", field: "Hm, fruit."}).chat(HELLO)
    assert (result.reasoning, result.text, result.completion_tokens) == ("Hm, fruit.", "Pear.", 5)
    result = _replying(fault_server, {"role": "assistant", "content": "Pear.", field: ["not", "text"]}).chat(HELLO)
    assert (result.reasoning, result.text, result.completion_tokens) == ("", "Pear.", 2)


@pytest.mark.parametrize(("value", "expected"), [("1e12", 3600.0), ("inf", 3600.0), ("nan", None), ("30", 30.0)])
def test_a_retry_after_beyond_any_real_one_is_capped(fault_server, value, expected):
    """The balancer cools the LLM down that long: 1e12 s disabled it for ever, and its cooldown's date
    then broke every selection that wrote it."""
    body = json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode()
    url = fault_server("canned", (429, "application/json", body), headers=(("Retry-After", value),))
    with pytest.raises(EngineRateLimited) as error:
        OpenAIEngine(model="m", base_url=f"{url}/v1").chat(HELLO)
    assert error.value.retry_after == expected


def _chunk(delta: dict | None = None, finish_reason: str | None = None) -> bytes:
    """One event of a chat completion stream."""
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish_reason}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def streaming(fault_server, pieces: list[bytes], interval: float = 0.0, **settings) -> OpenAIEngine:
    """An engine whose server streams ``pieces``, ``interval`` seconds apart, then closes the connection."""
    url = fault_server("pieces", (200, "text/event-stream", pieces), interval=interval)
    return OpenAIEngine(model="m", base_url=f"{url}/v1", **settings)


def test_a_stream_that_keeps_sending_ends_at_its_timeout(fault_server):
    """httpx's timeout bounds each read: a server that sent a token every 0.2 s ran its whole 5 s past a
    timeout of 1 s, and a step past its time limit."""
    pieces = [_chunk({"content": "tok"})] * 25 + [_chunk(finish_reason="stop"), DONE]
    engine = streaming(fault_server, pieces, interval=0.2)
    started = time.monotonic()
    with pytest.raises(EngineTimeout, match="past its timeout of 1s") as error:
        list(engine.stream(HELLO, ChatOptions(timeout=1.0)))
    assert time.monotonic() - started < 2.5
    assert error.value.transient


def test_the_operators_request_timeout_caps_the_callers_timeout(fault_server):
    """The caller's timeout (the time left before the step's deadline, up to 300 s) replaced it: a
    request_timeout of 0.5 s waited out the whole 3 s of a server that hangs."""
    engine = OpenAIEngine(model="m", base_url=f"{fault_server('hang')}/v1", request_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(EngineTimeout):
        engine.chat(HELLO, ChatOptions(timeout=30))
    assert time.monotonic() - started < 2.5
    slow = streaming(
        fault_server,
        [_chunk({"content": "tok"})] * 10 + [_chunk(finish_reason="stop")],
        interval=0.2,
        request_timeout=0.5,
    )
    with pytest.raises(EngineTimeout, match=r"past its timeout of 0\.5s"):
        list(slow.stream(HELLO, ChatOptions(timeout=30)))


def test_an_error_event_in_a_stream_is_an_unavailable_engine(fault_server):
    """vLLM and llama.cpp's server report a failing engine so; it was a bare, permanent EngineError: no
    failover, and an outcome of "error" instead of a fault of the LLM's server."""
    error = b'data: {"error": {"message": "the engine crashed", "type": "server_error"}}\n\n'
    with pytest.raises(EngineUnavailable, match="the engine crashed") as raised:
        list(streaming(fault_server, [error]).stream(HELLO))
    assert raised.value.transient


def test_a_stream_cut_before_its_finish_reason_is_an_unavailable_engine(fault_server):
    """A stream closed after "Hel", "lo" (no finish reason, no [DONE]) counted as the whole reply "Hello",
    and the OpenAI-compatible API then said it finished with "stop"."""
    chunks = streaming(fault_server, [_chunk({"content": "Hel"}), _chunk({"content": "lo"})]).stream(HELLO)
    assert [next(chunks).text, next(chunks).text] == ["Hel", "lo"]
    with pytest.raises(EngineUnavailable, match="ended before the reply was done") as error:
        next(chunks)
    assert error.value.transient


def test_tool_call_deltas_without_an_index_are_told_apart_by_their_ids(fault_server):
    """A missing index counted as 0: calls c1 (a) and c2 (b) became one call a with the arguments
    {"x":1}{"y":2}."""

    def call(call_id: str | None, name: str | None, arguments: str) -> dict:
        function = {"arguments": arguments, **({"name": name} if name else {})}
        return {"tool_calls": [{**({"id": call_id, "type": "function"} if call_id else {}), "function": function}]}

    pieces = [_chunk(call("c1", "a", '{"x":')), _chunk(call(None, None, "1}")), _chunk(call("c2", "b", '{"y":2}')),
              _chunk(finish_reason="tool_calls"), DONE]  # fmt: skip
    result = next(chunk.result for chunk in streaming(fault_server, pieces).stream(HELLO) if chunk.result)
    calls = [(call["id"], call["function"]["name"], call["function"]["arguments"]) for call in result.tool_calls]
    assert calls == [("c1", "a", '{"x":1}'), ("c2", "b", '{"y":2}')]


def test_a_429_for_an_exhausted_quota_is_the_llms_fault_not_a_rate_limit_to_wait_out(fault_server):
    """It was a transient EngineRateLimited: steps were retried against a key that cannot recover."""
    error = {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}
    url = fault_server("canned", (429, "application/json", json.dumps({"error": error}).encode()))
    with pytest.raises(EngineQuotaExceeded, match="out of quota") as raised:
        OpenAIEngine(model="m", base_url=f"{url}/v1").chat(HELLO)
    assert not raised.value.transient
    assert raised.value.llm_at_fault


def test_a_408_is_transient(fault_server):
    """A request the server (or a proxy) gave up waiting for was a permanent bad request."""
    body = json.dumps({"error": {"message": "request timeout"}}).encode()
    with pytest.raises(EngineUnavailable, match="408") as error:
        OpenAIEngine(model="m", base_url=f"{fault_server('canned', (408, 'application/json', body))}/v1").chat(HELLO)
    assert error.value.transient


def test_a_base_url_without_v1_is_unhealthy_and_the_check_says_so(openai_server):
    """Its 404 on /models was reported healthy ("the server does not list its models"), yet every call
    was a 404."""
    health = OpenAIEngine(model="smollm2", base_url=openai_server.removesuffix("/v1")).health()
    assert not health.ok
    assert "lacks /v1" in health.detail


def test_a_server_that_does_not_list_its_models_is_reachable(fault_server):
    """Some OpenAI-compatible servers answer 404 on /models (and on /v1/models): reachable is all that can
    be told of them, and their calls may well work."""
    url = fault_server("canned", (404, "application/json", b'{"error": {"message": "not found"}}'))
    health = OpenAIEngine(model="m", base_url=f"{url}/v1").health()
    assert health.ok and "does not list its models" in health.detail


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html><body>Welcome to nginx!</body></html>"),
        ("application/json", json.dumps({"object": "list", "data": [{"object": "model"}]}).encode()),
        ("application/json", b"[1, 2]"),
    ],
    ids=["html", "a model without an id", "a list"],
)
def test_a_model_list_that_is_not_one_is_unhealthy_rather_than_raise(fault_server, content_type, body):
    """The check raised (a JSONDecodeError, a TypeError), and with it the health check of every LLM."""
    health = OpenAIEngine(model="m", base_url=f"{fault_server('canned', (200, content_type, body))}/v1").health()
    assert not health.ok


def test_a_stream_kept_alive_with_comments_ends_at_its_timeout(fault_server):
    """The SSE decoder swallows comment lines and each byte restarts httpx's read timeout, so the check on
    every chunk never ran: a server that sent ": ping" every 0.1 s after its first piece held the call (its
    slot, its thread) until the server itself stopped."""
    engine = streaming(fault_server, KEPT_ALIVE, interval=0.1)
    _ends_at_its_timeout_of_1s(engine)


def test_a_whole_reply_sent_a_byte_at_a_time_ends_at_its_timeout(fault_server):
    """Only streams had the watchdog: each byte of a whole reply's body restarted httpx's read timeout, and a
    server that sent whitespace every 0.1 s held a worker's call (and its step) for as long as it went on."""
    engine = streaming(fault_server, [b" "] * 100, interval=0.1)
    started = time.monotonic()
    with pytest.raises(EngineTimeout, match="past its timeout of 1s"):
        engine.chat(HELLO, ChatOptions(timeout=1.0))
    assert time.monotonic() - started < 2.5


def test_a_redirected_stream_kept_alive_ends_at_its_timeout(fault_server):
    """The client follows redirects, and the watchdog kept the redirect's socket, closed by then (and back in
    the pool, for another call to use): the timer shut nothing of the stream it leads to, which ran on."""
    target = fault_server("pieces", (200, "text/event-stream", KEPT_ALIVE), interval=0.1)
    moved = fault_server("canned", (307, "text/plain", b""), headers=(("Location", f"{target}/v1/chat/completions"),))
    _ends_at_its_timeout_of_1s(OpenAIEngine(model="m", base_url=f"{moved}/v1"))


# A piece of text, then SSE comments (which carry nothing) 0.1 s apart for 10 s.
KEPT_ALIVE = [_chunk({"content": "tok"})] + [b": ping\n\n"] * 100


def _ends_at_its_timeout_of_1s(engine: OpenAIEngine) -> None:
    started = time.monotonic()
    chunks = engine.stream(HELLO, ChatOptions(timeout=1.0))
    assert next(chunks).text == "tok"
    with pytest.raises(EngineTimeout, match="past its timeout of 1s"):
        next(chunks)
    assert time.monotonic() - started < 2.5


def test_a_cancelled_stream_ends_at_once_though_its_server_sends_nothing_useful(fault_server):
    """A client that left a stream could not stop it while the server sent only keep-alive comments."""
    import threading

    from llm_engines.base import Cancel
    from llm_engines.errors import EngineCancelled

    engine = streaming(fault_server, KEPT_ALIVE, interval=0.1)
    cancel = Cancel()
    chunks = engine.stream(HELLO, ChatOptions(timeout=30, cancel=cancel))
    assert next(chunks).text == "tok"
    threading.Timer(0.3, cancel.cancel).start()
    started = time.monotonic()
    with pytest.raises(EngineCancelled):
        next(chunks)
    assert time.monotonic() - started < 1.5


def test_a_json_schemas_name_and_strict_reach_the_server():
    """OpenAI enforces a schema only in strict mode: the client's strict (and name) were dropped, and the
    schema was sent as "reply", unenforced."""
    engine = OpenAIEngine(model="m", base_url="http://127.0.0.1:9/v1")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    options = ChatOptions(json_schema=schema, json_schema_settings={"name": "answer", "strict": True})
    sent = engine._request(HELLO, options)["response_format"]
    assert sent == {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": schema}}
    plain = engine._request(HELLO, ChatOptions(json_schema=schema))["response_format"]
    assert plain == {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}


@pytest.mark.parametrize(
    "refusal",
    [
        (400, {"error": {"message": "Unrecognized request argument supplied: stream_options", "type": "invalid"}}),
        (422, {"detail": [{"type": "extra_forbidden", "loc": ["body", "stream_options"], "msg": "Extra inputs"}]}),
        (400, {"error": "unknown field: stream_options"}),
    ],
    ids=["azure", "fastapi", "plain"],
)
def test_a_server_that_refuses_stream_options_is_streamed_without_them(fault_server, refusal):
    """Streams ask for their usage with ``stream_options``, which some OpenAI-compatible servers refuse
    (Azure OpenAI before its 2024-05 API versions with a 400, FastAPI servers that forbid extra fields
    with a 422): every stream, /v1's included, failed there."""
    received: list[bytes] = []
    pieces = [_chunk({"content": "Pe"}), _chunk({"content": "ar."}, "stop"), DONE]
    url = fault_server("strict", (200, "text/event-stream", pieces), received=received, refusal=refusal)
    engine = OpenAIEngine(model="m", base_url=f"{url}/v1")
    for _ in range(2):
        result = next(chunk.result for chunk in engine.stream(HELLO) if chunk.result)
        assert (result.text, result.completion_tokens) == ("Pear.", 2)  # the pieces counted, as without a usage
    asked = ["stream_options" in json.loads(body) for body in received]
    assert asked == [True, False, False]  # refused once, then not asked again


def test_a_bad_request_that_does_not_name_stream_options_is_not_sent_again(fault_server):
    received: list[bytes] = []
    refusal = (400, {"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}})
    url = fault_server("strict", (200, "text/event-stream", [DONE]), received=received, refusal=refusal)
    with pytest.raises(EngineBadRequest, match="max_tokens is too large"):
        list(OpenAIEngine(model="m", base_url=f"{url}/v1").stream(HELLO))
    assert len(received) == 1


_NO_MAX_TOKENS = {
    "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' "
    "instead.",
    "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter",
}  # fmt: skip
_NO_TEMPERATURE = {
    "message": "Unsupported value: 'temperature' does not support 0.7 with this model. Only the default (1) value is "
    "supported.",
    "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value",
}  # fmt: skip


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_a_reasoning_model_that_refuses_max_tokens_and_the_temperature_is_sent_them_as_it_takes_them(
    fault_server, streamed
):
    """OpenAI's o-series and gpt-5 refuse ``max_tokens`` and any temperature but 1 with a 400: every call to
    them failed, as the request's fault (no failover, and the breaker never learned)."""
    received: list[bytes] = []
    refusals = [(b'"max_tokens"', 400, {"error": _NO_MAX_TOKENS}), (b'"temperature"', 400, {"error": _NO_TEMPERATURE})]
    if streamed:
        reply = (200, "text/event-stream", [_chunk({"content": "Pe"}), _chunk({"content": "ar."}, "stop"), DONE])
    else:
        message = {"role": "assistant", "content": "Pear."}
        whole = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "usage": None,
                 "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}  # fmt: skip
        reply = (200, "application/json", [json.dumps(whole).encode()])
    url = fault_server("strict", reply, received=received, refusal=refusals)
    engine = OpenAIEngine(model="gpt-5-mini", base_url=f"{url}/v1")
    for _ in range(2):
        call = engine.stream if streamed else engine.chat
        result = call(HELLO, ChatOptions(max_tokens=64))
        if streamed:
            result = next(chunk.result for chunk in result if chunk.result)
        assert result.text == "Pear."
    sent = [json.loads(body) for body in received]
    assert [("max_tokens" in body, "temperature" in body) for body in sent] == [
        (True, True),
        (False, True),
        (False, False),
        (False, False),
    ]  # refused twice, adapted for good
    assert sent[-1]["max_completion_tokens"] == 64


def test_a_parameter_the_model_does_not_take_and_a_402_are_the_llms_fault(fault_server):
    """Both were EngineBadRequest, the request's fault: no other LLM was tried, and the breaker learned nothing."""
    from llm_engines.errors import EngineConfigurationError

    schema = {"message": "Unsupported parameter: 'response_format'", "param": "response_format",
              "code": "unsupported_parameter"}  # fmt: skip
    url = fault_server("canned", (400, "application/json", json.dumps({"error": schema}).encode()))
    with pytest.raises(EngineConfigurationError, match="does not take the request") as raised:
        OpenAIEngine(model="m", base_url=f"{url}/v1").chat(HELLO, ChatOptions(json_schema={"type": "object"}))
    assert raised.value.llm_at_fault
    credits = {"error": {"message": "Insufficient credits", "code": 402}}
    url = fault_server("canned", (402, "application/json", json.dumps(credits).encode()))
    with pytest.raises(EngineQuotaExceeded, match="out of credits") as raised:
        OpenAIEngine(model="m", base_url=f"{url}/v1").chat(HELLO)
    assert raised.value.llm_at_fault and not raised.value.transient


def test_a_model_ollama_lists_with_its_latest_tag_is_served(fault_server):
    """Ollama's /v1/models lists "llama3.2:latest" for a model its calls take as "llama3.2": the check said
    it was not served, and every check counted against its breaker until it tripped."""
    listed = {"object": "list", "data": [{"id": "llama3.2:latest", "object": "model", "created": 0, "owned_by": "x"}]}
    url = fault_server("canned", (200, "application/json", json.dumps(listed).encode()))
    assert OpenAIEngine(model="llama3.2", base_url=f"{url}/v1").health().ok
    assert not OpenAIEngine(model="llama3.1", base_url=f"{url}/v1").health().ok


def test_tool_arguments_sent_as_an_object_come_back_as_json_text(fault_server):
    """A server that sends a call's arguments as an object (not the JSON text OpenAI sends) had them handed on
    as a dict: a /v1 client got arguments that were not a string."""
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
    }
    whole = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}]}  # fmt: skip
    url = fault_server("canned", (200, "application/json", json.dumps(whole).encode()))
    result = OpenAIEngine(model="m", base_url=f"{url}/v1").chat(HELLO)
    assert result.tool_calls[0]["function"]["arguments"] == '{"x": 1}'


def test_a_reply_nested_past_what_the_parser_follows_is_an_unavailable_engine(fault_server):
    """Its RecursionError escaped the engine's errors, and the step failed with it."""
    url = fault_server("canned", (200, "application/json", b"[" * 100_000 + b"]" * 100_000))
    with pytest.raises(EngineUnavailable):
        OpenAIEngine(model="m", base_url=f"{url}/v1").chat(HELLO)


def test_a_503_says_how_long_the_server_needs(fault_server):
    """A server loading its model answers 503 with Retry-After: the breaker was not told, and the LLM was
    tried again at once."""
    body = json.dumps({"error": {"message": "loading model"}}).encode()
    url = fault_server("canned", (503, "application/json", body), headers=(("Retry-After", "12"),))
    with pytest.raises(EngineUnavailable) as error:
        OpenAIEngine(model="m", base_url=f"{url}/v1").chat(HELLO)
    assert error.value.retry_after == 12.0 and error.value.transient


@pytest.mark.parametrize("finish_reason", ["abort", "error"])
def test_a_reply_its_server_gave_up_on_is_an_unavailable_engine(fault_server, finish_reason):
    """vLLM and SGLang end an aborted request with finish_reason "abort": the part that came was taken as the
    whole reply."""
    url = fault_server("pieces", (200, "text/event-stream", [_chunk({"content": "Pe"}), _chunk({}, finish_reason)]))
    with pytest.raises(EngineUnavailable, match="gave up"):
        list(OpenAIEngine(model="m", base_url=f"{url}/v1").stream(HELLO))
    message = {"role": "assistant", "content": "Pe"}
    whole = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "finish_reason": finish_reason, "message": message}]}  # fmt: skip
    url = fault_server("canned", (200, "application/json", json.dumps(whole).encode()))
    with pytest.raises(EngineUnavailable, match="gave up"):
        OpenAIEngine(model="m", base_url=f"{url}/v1").chat(HELLO)


def test_concurrent_first_calls_to_a_reasoning_model_all_adapt_and_a_too_large_max_tokens_is_not_taken_for_one(
    fault_server,
):
    """Found by review: the calls in flight together were each refused before the first had adapted, and the
    others failed as the LLM's fault; and any 400 that named max_tokens ("too large") switched the engine to
    max_completion_tokens for good."""
    import threading

    received: list[bytes] = []
    refusals = [(b'"max_tokens"', 400, {"error": _NO_MAX_TOKENS})]
    message = {"role": "assistant", "content": "Pear."}
    whole = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}  # fmt: skip
    url = fault_server("strict", (200, "application/json", [json.dumps(whole).encode()]), received=received,
                       refusal=refusals, interval=0.2)  # fmt: skip
    engine = OpenAIEngine(model="o3-mini", base_url=f"{url}/v1")
    outcomes: list = []
    barrier = threading.Barrier(4)

    def call() -> None:
        barrier.wait()
        try:
            outcomes.append(engine.chat(HELLO, ChatOptions(max_tokens=64)).text)
        except Exception as exc:  # the test reports what each call got
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == ["Pear."] * 4

    too_large = {"message": "max_tokens is too large: 99999", "param": "max_tokens", "code": "invalid_value"}
    url = fault_server("strict", (200, "application/json", [json.dumps(whole).encode()]),
                       refusal=[(b'"max_tokens"', 400, {"error": too_large})])  # fmt: skip
    engine = OpenAIEngine(model="gpt-4o", base_url=f"{url}/v1")
    with pytest.raises(EngineBadRequest, match="too large"):
        engine.chat(HELLO, ChatOptions(max_tokens=99999))
    assert engine._token_limit == "max_tokens"
    top_p = {"message": "Unsupported parameter: 'top_p'", "param": "top_p", "code": "unsupported_parameter"}
    url = fault_server("canned", (400, "application/json", json.dumps({"error": top_p}).encode()))
    with pytest.raises(EngineBadRequest, match="does not take"):  # the client's choice: not the LLM's fault
        OpenAIEngine(model="o3-mini", base_url=f"{url}/v1").chat(HELLO, ChatOptions(top_p=0.5))


def test_a_request_too_large_for_the_accounts_rate_is_not_a_rate_limit_to_wait_out(fault_server):
    """It was EngineRateLimited, and its Retry-After held the LLM for every caller."""
    from llm_engines.errors import RequestTooLarge

    error = {"message": "Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, "
             "Requested 45000.", "type": "tokens", "code": "rate_limit_exceeded"}  # fmt: skip
    body = json.dumps({"error": error}).encode()
    url = fault_server("canned", (429, "application/json", body), headers=(("Retry-After", "20"),))
    with pytest.raises(RequestTooLarge, match="Request too large") as raised:
        OpenAIEngine(model="gpt-4o", base_url=f"{url}/v1").chat(HELLO)
    assert not raised.value.transient and not raised.value.llm_at_fault
