"""The OpenAI-compatible API (/v1/chat/completions, /v1/models) through the official openai client, against
a real gunicorn server: the real SmolLM2 model whole and streamed, a role's virtual model, tools and
response_format passed through to an OpenAI-compatible upstream, OpenAI's error shape, throttling and
the metrics.

The upstream that answers with tool calls is a small HTTP server in this file: it stands in for a hosted
API (OpenAI's own) that cannot be reached from these machines, and records what it was sent. Everything
else is the real server.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import redis
import requests
from django.conf import settings
from rest_framework.authtoken.models import Token

from tests.conftest import _serve, _stop, free_port, server_env

pytestmark = pytest.mark.django_db(transaction=True)

PLANNER_PROMPT = "You are a planner"
# The server's work rate: each test uses a client of its own, so only the throttling test reaches it.
WORK_RATE = 8
# Completions the server process runs at once (of its 4 threads).
MAX_CALLS = 2


class Upstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible API that calls the first tool it is offered, or answers in text; asked to think (the
    last message begins with "Think"), it streams its thinking first, in ``reasoning``, as OpenRouter and later
    vLLM do."""

    protocol_version = "HTTP/1.1"
    received: list[dict] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        body = {"object": "list", "data": [{"id": "upstream-model", "object": "model", "created": 0, "owned_by": "t"}]}
        self._send(200, json.dumps(body).encode(), "application/json")

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append(request)
        tools = request.get("tools") or []
        base = {"id": "chatcmpl-up", "created": 1, "model": "upstream-model"}
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        call = None
        if tools:
            name = tools[0]["function"]["name"]
            call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": '{"city": "Oslo"}'}}
        thinks = str(request["messages"][-1].get("content")).startswith("Think")
        if not request.get("stream"):
            message = {"role": "assistant", "content": None if call else '{"answer": 42}'}
            if call:
                message["tool_calls"] = [call]
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if call else "stop"}
            body = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            self._send(200, json.dumps(body).encode(), "application/json")
            return
        # Streamed, the tool call's arguments come in two pieces, as OpenAI sends them.
        deltas = []
        if call:
            first = {**call, "index": 0, "function": {"name": call["function"]["name"], "arguments": '{"city": '}}
            deltas += [{"tool_calls": [first]}, {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}]
        elif request.get("response_format"):
            deltas.append({"content": '{"answer": 42}'})
        elif thinks:
            deltas += [{"reasoning": "Hm, "}, {"reasoning": "a fruit."}, {"content": "Pe"}, {"content": "ar."}]
        else:
            deltas += [{"content": "up"}, {"content": "stream"}]
        events = [{**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d}]} for d in deltas]
        finish = "tool_calls" if call else "stop"
        events.append(
            {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        )
        events.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        body = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"
        self._send(200, body, "text/event-stream")


@pytest.fixture(scope="module")
def upstream() -> Iterator[type[Upstream]]:
    handler = type("Handler", (Upstream,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield handler
    server.shutdown()
    server.server_close()


class Endless(BaseHTTPRequestHandler):
    """An OpenAI-compatible API whose streams never end: after a first piece, model "ping" sends only SSE
    comments (a stuck upstream behind a proxy that keeps the connection alive), model "slow" a piece every
    0.2 s (a long reply). It stops when the client has gone (or after a minute)."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes

        def piece(text: str) -> bytes:
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": request["model"],
                     "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}  # fmt: skip
            return f"data: {json.dumps(chunk)}\n\n".encode()

        ends = time.monotonic() + 60
        try:
            self.wfile.write(piece("first "))
            while time.monotonic() < ends:
                self.wfile.write(b": ping\n\n" if request["model"] == "ping" else piece("tok "))
                self.wfile.flush()
                time.sleep(0.1 if request["model"] == "ping" else 0.2)
        except OSError:
            pass


@pytest.fixture(scope="module")
def endless() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def web(upstream, endless, ollama_server, tmp_path_factory) -> Iterator[str]:
    """gunicorn as `make run` starts it, with the session's configuration plus an instant LLM, the
    tool-calling upstream, the suite's Ollama-API server (tools too), a scripted LLM (locked) that the
    planner role prefers, and a disabled LLM.
    The configuration is the session's file, so that the metrics consumer knows these LLMs too."""
    directory = tmp_path_factory.mktemp("openai_api")
    config = Path(settings.AIAGENT_CONFIG)
    original = config.read_text()
    raw = json.loads(original)
    script = directory / "script.json"
    rules = [
        {"match": "sleepy", "reply": "slept", "delay_s": 3},
        {"match": PLANNER_PROMPT, "reply": "the planner's prompt came first"},
    ]
    script.write_text(json.dumps({"rules": rules}))
    raw["llms"] += [
        {"id": "echo", "engine": "instant", "source": "local", "model": "instant"},
        {"id": "upstream", "engine": "openai", "source": "api", "model": "upstream-model",
         "base_url": upstream.url, "capabilities": ["chat", "tools"]},
        {"id": "script", "engine": "scripted", "source": "local", "model": "scripted", "locked": True,
         "max_concurrency": 4, "options": {"script": str(script)}},
        {"id": "off", "engine": "instant", "source": "local", "model": "instant", "toggle": False},
        {"id": "paid", "engine": "openai", "source": "api", "model": "upstream-model", "base_url": upstream.url,
         "cost_per_1k_tokens": {"prompt": 0.01, "completion": 0.03}, "capabilities": ["chat", "json"]},
        {"id": "up_ping", "engine": "openai", "source": "api", "model": "ping", "base_url": endless,
         "options": {"request_timeout": 2}},
        {"id": "up_ping_long", "engine": "openai", "source": "api", "model": "ping", "base_url": endless,
         "options": {"request_timeout": 30}},
        {"id": "up_slow", "engine": "openai", "source": "api", "model": "slow", "base_url": endless,
         "locked": True, "capabilities": ["chat", "json"]},
        {"id": "up_slow_short", "engine": "openai", "source": "api", "model": "slow", "base_url": endless,
         "locked": True, "capabilities": ["chat", "json"], "options": {"request_timeout": 2}},
        {"id": "ollama", "engine": "ollama", "source": "local", "model": "smollm2:135m", "base_url": ollama_server,
         "capabilities": ["chat", "tools"], "context_length": 512},
    ]  # fmt: skip
    raw["profiles"]["developer"]["roles"]["planner"]["preferred_llms"] = ["script"]
    # Only the paid LLM has "json" (and up_slow, locked to the role that names it): the budget role's calls are
    # bounded by the profile's daily budget; the slow role's by its time limit.
    raw["profiles"]["frugal"] = {"daily_budget": 1e-6, "roles": {"budget": {
        "agent": "writer", "system_prompt": "Be brief.", "capabilities": ["chat", "json"], "max_tokens": 64,
        "preferred_llms": ["paid"]}, "slow": {
        "agent": "writer", "system_prompt": "Be brief.", "capabilities": ["chat", "json"], "time_limit_s": 2,
        "preferred_llms": ["up_slow"]}, "slow_llm": {
        "agent": "writer", "system_prompt": "Be brief.", "capabilities": ["chat", "json"], "time_limit_s": 30,
        "preferred_llms": ["up_slow_short"]}}}  # fmt: skip
    config.write_text(json.dumps(raw))
    port = free_port()
    command = [
        sys.executable, "-m", "gunicorn", "aiagentserver.wsgi", "--bind", f"127.0.0.1:{port}",
        "--no-control-socket", "--workers", "1", "--worker-class", "gthread", "--threads", "4",
    ]  # fmt: skip
    env = server_env(API_SUBMIT_THROTTLE_RATE=f"{WORK_RATE}/min", OPENAI_API_MAX_CALLS=str(MAX_CALLS))
    try:
        process = _serve(command, f"http://127.0.0.1:{port}/healthz", directory / "gunicorn.log", env=env)
        yield f"http://127.0.0.1:{port}"
        _stop(process)
    finally:
        config.write_text(original)


@pytest.fixture
def key(django_user_model) -> str:
    user = django_user_model.objects.create_user(username=f"openai-{time.monotonic_ns()}")
    return Token.objects.create(user=user).key


@pytest.fixture
def client(web, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{web}/v1", api_key=key, max_retries=0, timeout=600)


def test_models_lists_the_offered_llms_and_one_model_per_role(client):
    listed = {model.id: model for model in client.models.list()}
    profiles = json.loads(Path(settings.AIAGENT_CONFIG).read_text())["profiles"]
    roles = [f"{profile}/{role}" for profile, body in profiles.items() for role in body["roles"]]
    # Not the locked one, the disabled one, the one with a cost; not the role no LLM can serve (vision).
    roles.remove("productivity/vision")
    assert set(listed) == {"smollm2-135m", "echo", "upstream", "ollama", "up_ping", "up_ping_long", *roles}
    assert all(model.object == "model" and model.owned_by == "ai-agent-server" for model in listed.values())
    assert client.models.retrieve("developer/planner").id == "developer/planner"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("off")
    assert caught.value.body["code"] == "model_not_found"


def test_the_real_model_answers_whole_with_its_usage(client):
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0
    )
    completion = raw.parse()
    assert raw.headers["x-llm"] == "smollm2-135m"
    assert completion.object == "chat.completion" and completion.model == "smollm2-135m"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= 16 and completion.usage.prompt_tokens > 0


def test_the_real_model_streams_token_by_token(client):
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 1, "the reply came in one piece, not streamed"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(texts)


def test_a_client_that_leaves_a_stream_gives_the_llms_slot_back_and_the_call_counts_as_cancelled(
    client, api, mcp_consumer
):
    def cancelled() -> tuple[int, int, int]:
        performance = api.get("/api/v1/metrics").json()["performance"]
        figures = performance["llms"].get("smollm2-135m", {}).get("since_start", {})
        return figures.get("outcomes", {}).get("cancelled", 0), figures.get("errors", 0), figures.get("requests", 0)

    before = cancelled()
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        max_tokens=2000,
        stream=True,
    )
    next(iter(stream))
    stream.close()
    slots = redis.Redis.from_url(settings.REDIS_URL)
    deadline = time.monotonic() + 15
    while slots.zcard("aiagent:lb:slots:smollm2-135m") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slots.zcard("aiagent:lb:slots:smollm2-135m") == 0, "the generation went on after the client left"
    deadline = time.monotonic() + 20
    while cancelled() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled() == (before[0] + 1, before[1], before[2] + 1), "counted as cancelled, not as an error"


def test_a_roles_model_puts_the_roles_prompt_first_and_the_balancer_picks(client):
    raw = client.chat.completions.with_raw_response.create(
        model="developer/planner", messages=[{"role": "user", "content": "Plan a picnic."}]
    )
    assert raw.headers["x-llm"] == "script"  # the role's preference, although the LLM is locked to roles
    assert raw.parse().choices[0].message.content == "the planner's prompt came first"


def test_tools_and_response_format_pass_through_whole_and_streamed(client, upstream):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    upstream.received.clear()
    completion = client.chat.completions.create(model="upstream", messages=messages, tools=tools, tool_choice="auto")
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("call_1", "weather", {"city": "Oslo"})
    assert upstream.received[-1]["tools"] == tools and upstream.received[-1]["tool_choice"] == "auto"

    chunks = list(client.chat.completions.create(model="upstream", messages=messages, tools=tools, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [(0, "weather", '{"city": "Oslo"}')]

    # The conversation goes on with the call and its answer, as a client sends it.
    follow = [*messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    answer = client.chat.completions.create(
        model="upstream",
        messages=follow,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert json.loads(answer.choices[0].message.content) == {"answer": 42}
    sent = upstream.received[-1]
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.id and sent["messages"][2]["role"] == "tool"
    assert sent["response_format"]["json_schema"]["schema"] == schema


@pytest.mark.parametrize("streamed", [False, True])
def test_a_local_ollama_model_calls_a_tool(client, streamed):
    tool = {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                           "required": ["city"], "additionalProperties": False},
        },
    }  # fmt: skip
    request = {"model": "ollama", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [tool]}
    if streamed:
        chunks = list(client.chat.completions.create(**request, max_tokens=48, stream=True))
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "tool_calls"
        ]
        name, arguments = calls[0].function.name, calls[0].function.arguments
    else:
        choice = client.chat.completions.create(**request, max_tokens=48).choices[0]
        assert choice.finish_reason == "tool_calls"
        name, arguments = choice.message.tool_calls[0].function.name, choice.message.tool_calls[0].function.arguments
    assert name == "weather" and isinstance(json.loads(arguments)["city"], str)


def _deltas(web: str, key: str, body: dict) -> tuple[str, list[dict]]:
    """The LLM that answered a streamed completion, and its chunks' deltas, as sent."""
    response = requests.post(
        f"{web}/v1/chat/completions", json={**body, "stream": True}, headers={"Authorization": f"Bearer {key}"},
        stream=True, timeout=60,
    )  # fmt: skip
    assert response.status_code == 200
    events = [line[len("data: ") :] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return response.headers["x-llm"], [json.loads(event)["choices"][0]["delta"] for event in events[:-1]]


def test_a_reasoning_models_thinking_comes_as_reasoning_content_and_a_plain_reply_is_unchanged(web, key, client):
    """It was dropped. Streamed, it comes in ``delta.reasoning_content`` (the field of DeepSeek's API, which
    clients and chat UIs read), before the answer; whole, in ``message.reasoning_content`` beside the content.
    A reply without thinking is as it was, without the field; the usage is the upstream's either way. (The
    server streams from its engines, whole replies too.)"""
    think = {"model": "upstream", "messages": [{"role": "user", "content": "Think, then name one fruit."}]}
    assert _deltas(web, key, think) == (
        "upstream",
        [{"role": "assistant", "content": ""}, {"reasoning_content": "Hm, "}, {"reasoning_content": "a fruit."},
         {"content": "Pe"}, {"content": "ar."}, {}],
    )  # fmt: skip
    whole = requests.post(
        f"{web}/v1/chat/completions", json=think, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ).json()
    assert whole["choices"][0]["message"] == {
        "role": "assistant", "content": "Pear.", "refusal": None, "reasoning_content": "Hm, a fruit.",
    }  # fmt: skip
    assert whole["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert client.chat.completions.create(**think).choices[0].message.reasoning_content == "Hm, a fruit."

    plain = {"model": "upstream", "messages": [{"role": "user", "content": "Name one fruit."}]}
    assert _deltas(web, key, plain) == (
        "upstream", [{"role": "assistant", "content": ""}, {"content": "up"}, {"content": "stream"}, {}]
    )  # fmt: skip
    whole = requests.post(
        f"{web}/v1/chat/completions", json=plain, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ).json()
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "upstream", "refusal": None}


def test_a_reply_sent_back_in_the_history_with_its_thinking_is_taken_and_the_thinking_not_passed_on(client, upstream):
    """A client that keeps the assistant's message as it came (``model_dump()``) sends its reasoning_content
    back with the next turn: that was a 400, an unknown field. It is dropped, as reasoning models' templates
    drop earlier thinking; one that is not text is a 400 that names it."""
    asked = [{"role": "user", "content": "Think, then name one fruit."}]
    reply = client.chat.completions.create(model="upstream", messages=asked).choices[0].message.model_dump()
    assert reply["reasoning_content"] == "Hm, a fruit."
    upstream.received.clear()
    follow = [*asked, reply, {"role": "user", "content": "And another?"}]
    assert client.chat.completions.create(model="upstream", messages=follow).choices[0].message.content == "upstream"
    assert upstream.received[-1]["messages"][1] == {"role": "assistant", "content": "Pear."}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="upstream", messages=[*asked, {**reply, "reasoning_content": ["Hm"]}])
    assert caught.value.body["param"] == "messages[1].reasoning_content"


def test_tools_for_an_llm_that_cannot_call_them_are_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    assert caught.value.body["code"] == "no_llm_available"
    assert "lacks capabilities tools" in caught.value.body["message"]


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"temperature": 5}, "temperature", "between 0 and 2"),
        ({"n": 2}, "n", "not supported"),
        ({"n": True}, "n", "not supported"),  # not 1, although Python's True == 1
        ({"logprobs": 0}, "logprobs", "not supported"),
        ({"frequency_penalty": False}, "frequency_penalty", "not supported"),
        ({"max_tokens": "abc", "max_completion_tokens": 5}, "max_tokens", "positive integer"),
        ({"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages", "NUL"),
        ({"functions": []}, "functions", "not supported"),
        ({"made_up": None}, "made_up", "Unrecognized request argument"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options", "true or false"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "must be one of"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "is required"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type", "no other"),
        ({"max_tokens": 0}, "max_tokens", "positive integer"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({"model": 5}, "model", "must be a string"),
        ({"temperature": 10**400}, "temperature", "between 0 and 2"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
          "function": {"name": ["f"]}}}, "tool_choice", "one of the tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "description": {"x": 1}}}]},
         "tools[0].function.description", "must be a string"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
         "tools[0].function.parameters", "not a valid JSON schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"maxLength": "9"}}}},
         "response_format.json_schema.schema", "not a valid JSON schema"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "audio": {"id": 1}}]},
         "messages[1].audio", "unknown field"),
    ],
)  # fmt: skip
def test_a_bad_request_is_a_400_naming_the_parameter(web, api, change, param, words):
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], **change}
    response = api.post("/v1/chat/completions", body, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]


@pytest.mark.parametrize(
    "schema",
    [{"enum": []}, {"type": "array", "maxItems": 100000, "items": {"type": "integer"}},
     {"type": "string", "pattern": "^a{1,20000}$"}],
)  # fmt: skip
def test_a_schema_llama_cpp_cannot_take_is_a_400_and_the_server_lives(web, client, schema):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "JSON please"}],
            max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert caught.value.body["param"] == "response_format" and "llama.cpp" in caught.value.body["message"]
    assert requests.get(f"{web}/healthz", timeout=10).status_code == 200


def test_messages_as_clients_send_them_reach_the_local_model(client):
    """Text parts (LangChain, Open WebUI), a tool call's history without tools, OpenAI's own reply fields."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is 6 times 7?"}]},
        {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "mul", "arguments": '{"a": 6}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
    ]  # fmt: skip
    whole = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8)
    assert whole.choices[0].message.content.strip()
    streamed = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip()


def test_a_web_process_runs_a_bounded_number_of_completions_and_keeps_threads_for_the_rest(web, client):
    sleepy = {"model": "developer/planner", "messages": [{"role": "user", "content": "sleepy"}]}
    outcomes: list[object] = []

    def call() -> None:
        try:
            outcomes.append(client.chat.completions.create(**sleepy).choices[0].message.content)
        except openai.APIStatusError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(MAX_CALLS + 1)]
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    started = time.monotonic()
    assert requests.get(f"{web}/healthz", timeout=10).status_code == 200
    assert time.monotonic() - started < 2, "the health check waited for a thread"
    for thread in threads:
        thread.join()
    refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    assert len(refused) == 1 and refused[0].status_code == 503 and refused[0].body["code"] == "server_busy"
    assert int(refused[0].response.headers["Retry-After"]) >= 1
    assert [o for o in outcomes if isinstance(o, str)] == ["slept"] * MAX_CALLS


def test_a_prompt_over_the_context_is_context_length_exceeded(client):
    too_long = [{"role": "user", "content": "word " * 20000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2-135m", messages=too_long)
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=5000
        )
    assert caught.value.body["code"] == "context_length_exceeded"


def test_errors_come_in_openais_shape(web, client, key):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    stranger = openai.OpenAI(base_url=f"{web}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    response = requests.get(f"{web}/v1/models", timeout=10)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "missing_api_key"
    for method in ("GET", "POST"):
        response = requests.request(method, f"{web}/v1/embeddings", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"
    with pytest.raises(openai.NotFoundError):  # an api LLM with a cost is only reached through a role
        client.chat.completions.create(model="paid", messages=[{"role": "user", "content": "hi"}])
    response = requests.post(
        f"{web}/v1/chat/completions", data=b"x" * (2 * 1024 * 1024), timeout=10,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    # The same token opens the REST API, under either keyword.
    assert requests.get(f"{web}/api/v1/llms", headers={"Authorization": f"Bearer {key}"}, timeout=10).ok


def test_completions_are_throttled_as_work(client):
    messages = [{"role": "user", "content": "hi"}]
    for _ in range(WORK_RATE):
        assert client.chat.completions.create(model="echo", messages=messages).choices[0].message.content == "echo: hi"
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="echo", messages=messages)
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    client.models.list()  # reading is not work


def test_calls_are_counted_in_the_metrics(client, api, mcp_consumer):
    def calls(kind: str, name: str) -> int:
        performance = api.get("/api/v1/metrics").json()["performance"]
        return performance[kind].get(name, {}).get("since_start", {}).get("requests", 0)

    before = calls("llms", "echo"), calls("roles", "developer/planner"), calls("llms", "script")
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    client.chat.completions.create(model="developer/planner", messages=[{"role": "user", "content": "hi"}])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = calls("llms", "echo"), calls("roles", "developer/planner"), calls("llms", "script")
        if after == (before[0] + 1, before[1] + 1, before[2] + 1):
            break
        time.sleep(0.2)
    assert after == (before[0] + 1, before[1] + 1, before[2] + 1)


def test_a_streams_completion_is_given_back_when_its_generation_has_stopped_not_when_the_client_left(monkeypatch):
    """The process's permit (OPENAI_API_MAX_CALLS) came back when the client left, while the engine still
    worked (reading a long prompt, say): one process then ran more generations than its bound."""
    from types import SimpleNamespace

    from orchestration import chat

    working = threading.Event()

    def balanced(request, balancer, deadline, call):
        call.__self__.events.put(("text", ("m", "Once")))
        working.wait(10)  # the engine, busy until its next token
        raise chat.ClientGone()

    monkeypatch.setattr(chat, "_balanced", balanced)
    ended = threading.Event()
    stream = chat.Stream(SimpleNamespace(deadline_s=30), on_end=ended.set)
    assert stream.first() == ("text", ("m", "Once"))
    stream.stop.set()  # the client left
    assert not ended.wait(0.3), "given back while the generation went on"
    working.set()
    assert ended.wait(5)
    assert stream._next()[0] == "error"


def test_stream_null_is_a_whole_answer(web, key):
    """OpenAI takes `"stream": null` for false, as this server takes null for every other optional
    parameter; it answered 400 "stream must be true or false"."""
    response = requests.post(
        f"{web}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": None},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi"


def test_a_role_no_llm_can_serve_is_no_model_for_chat_either(client):
    """GET /v1/models/productivity/vision is a 404 (no LLM has vision), but a chat naming it answered 400
    no_llm_available: a model the client may not name is a 404, wherever it is named."""
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("productivity/vision")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="productivity/vision", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def _slots(llm: str) -> int:
    return redis.Redis.from_url(settings.REDIS_URL).zcard(f"aiagent:lb:slots:{llm}")


def _wait_free(llm: str, within: float) -> float:
    """Seconds until the LLM's slots are free, failing past ``within``."""
    started = time.monotonic()
    while _slots(llm) and time.monotonic() - started < within:
        time.sleep(0.1)
    assert _slots(llm) == 0, f"a slot of {llm} is still held"
    return time.monotonic() - started


def test_an_upstream_that_keeps_its_stream_alive_with_comments_times_out(client):
    """The SSE decoder swallows ": ping" comments and each byte restarts httpx's read timeout: the call held
    its slot, its permit and a thread as long as the upstream pinged, past every timeout."""
    started = time.monotonic()
    stream = client.chat.completions.create(model="up_ping", messages=[{"role": "user", "content": "hi"}], stream=True)
    texts = []
    with pytest.raises(openai.APIError) as caught:
        texts.extend(chunk.choices[0].delta.content for chunk in stream if chunk.choices)  # kept up to the error
    assert "first " in texts and "past its timeout of 2s" in str(caught.value)
    assert time.monotonic() - started < 6
    _wait_free("up_ping", within=2)


def test_a_client_that_leaves_a_stream_whose_upstream_only_pings_frees_the_slot(web, key):
    """Nothing reached the client while the upstream pinged, so its leaving went unnoticed, and the
    generation was only checked for a stop when a piece came: the slot stayed held."""
    response = requests.post(
        f"{web}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, stream=True, timeout=30,
        json={"model": "up_ping_long", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )  # fmt: skip
    lines = response.iter_lines()
    while b"first " not in next(lines):
        pass
    assert _slots("up_ping_long") == 1
    response.close()
    assert _wait_free("up_ping_long", within=10) < 10


def test_the_time_limit_ending_a_long_reply_answers_it_cut_and_does_not_count_against_the_llm(client):
    """A client asking for more tokens than fit in the time got a 504 timeout, which counted as the LLM's
    failure: five such calls opened its breaker for every worker and role."""
    calls = redis.Redis.from_url(settings.REDIS_URL)
    calls.delete("aiagent:lb:calls:up_slow")
    messages = [{"role": "user", "content": "Write a very long story."}]
    whole = client.chat.completions.create(model="frugal/slow", messages=messages)
    assert whole.choices[0].finish_reason == "length"
    assert whole.choices[0].message.content.startswith("first tok")
    assert whole.usage.completion_tokens >= 2
    chunks = list(
        client.chat.completions.create(
            model="frugal/slow", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens >= 2
    assert b"0" not in calls.lrange("aiagent:lb:calls:up_slow", 0, -1), "counted as the LLM's failure"
    _wait_free("up_slow", within=2)


def test_the_llms_request_timeout_ending_a_steady_reply_answers_it_cut_too(client):
    """Found by review: only the role's time limit cut a reply; the LLM's request_timeout (120 s by default,
    before the 300 s time limit) ending a reply that streamed steadily was a 504 that counted as the LLM's
    failure. A stall (an upstream that stops sending, or sends only comments) still is one."""
    calls = redis.Redis.from_url(settings.REDIS_URL)
    calls.delete("aiagent:lb:calls:up_slow_short")
    started = time.monotonic()
    whole = client.chat.completions.create(
        model="frugal/slow_llm", messages=[{"role": "user", "content": "Write a very long story."}]
    )
    assert whole.choices[0].finish_reason == "length"
    assert whole.choices[0].message.content.startswith("first tok")
    assert time.monotonic() - started < 10  # the LLM's 2 s, not the role's 30
    assert b"0" not in calls.lrange("aiagent:lb:calls:up_slow_short", 0, -1), "counted as the LLM's failure"
    _wait_free("up_slow_short", within=2)


def test_a_strict_json_schema_reaches_the_upstream_with_its_name(client, upstream):
    """The upstream was sent {"name": "reply", "schema": ...}: without strict, OpenAI does not enforce it."""
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": schema}}
    answer = client.chat.completions.create(
        model="upstream", messages=[{"role": "user", "content": "6 x 7?"}], response_format=response_format
    )
    assert json.loads(answer.choices[0].message.content) == {"answer": 42}
    assert upstream.received[-1]["response_format"] == response_format


def test_a_spent_daily_budget_is_429_insufficient_quota(client):
    """It was a 400 invalid_request_error no_llm_available: a client is told its request is wrong, and not to
    try again, when it would succeed tomorrow."""
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="frugal/budget", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "daily budget" in error["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"  # the client would try twice more


def test_errors_that_another_try_cannot_mend_tell_the_client_not_to_retry():
    """OpenAI's client retries a 429 and a 5xx twice by itself: a spent quota upstream, a refused key or a
    model the LLM's server lacks were asked three times, and the quota was a rate limit to wait out."""
    from llm_engines.errors import EngineAuthError, EngineQuotaExceeded, EngineUnavailable
    from orchestration.openai_api import engine_error, error_response

    quota = error_response(engine_error(EngineQuotaExceeded("out of quota")))
    assert quota.status_code == 429 and quota["x-should-retry"] == "false"
    assert json.loads(quota.content)["error"]["code"] == "insufficient_quota"
    refused = error_response(engine_error(EngineAuthError("refused the credentials")))
    assert refused.status_code == 502 and refused["x-should-retry"] == "false"
    down = error_response(engine_error(EngineUnavailable("cannot reach")))
    assert down.status_code == 503 and "x-should-retry" not in down  # the client's own rule: it retries


def test_a_roles_messages_over_every_context_are_context_length_exceeded_beside_a_disabled_llm(client):
    """The toggled-off LLM's reason ("rule 1: toggled off") turned the answer into no_llm_available."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="developer/planner", messages=[{"role": "user", "content": "word " * 40000}]
        )
    assert caught.value.body["code"] == "context_length_exceeded" and caught.value.body["param"] == "messages"
    assert "off: rule 1: toggled off" in caught.value.body["message"]


def test_a_busy_process_checks_no_grammar(web, client, key):
    """The llama.cpp grammar check (a child process, ~0.5 s) ran before the busy gate: a busy process still
    spawned one per new schema, and answered a schema it cannot take 400 rather than 503 at once."""
    sleepy = {"model": "developer/planner", "messages": [{"role": "user", "content": "sleepy"}]}
    threads = [threading.Thread(target=client.chat.completions.create, kwargs=sleepy) for _ in range(MAX_CALLS)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    response = requests.post(
        f"{web}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
        json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "JSON"}], "max_tokens": 4,
              "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}},
    )  # fmt: skip
    for thread in threads:
        thread.join()
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "server_busy"


def test_null_for_a_parameter_the_server_does_not_implement_is_absent(web, key):
    """Clients that serialise every field send null for those they leave unset; OpenAI takes it."""
    body = {
        "model": "echo", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": None, "functions": None,
        "function_call": None, "reasoning_effort": None, "modalities": None, "prediction": None, "audio": None,
        "web_search_options": None, "stream": True, "stream_options": {"include_usage": None},
    }  # fmt: skip
    response = requests.post(
        f"{web}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60
    )
    assert response.status_code == 200, response.text
    assert b"echo: hi" in response.content and b'"usage"' not in response.content


@pytest.mark.parametrize(("method", "path", "code"), [("POST", "/v1", "unknown_url"), ("GET", "/v1", "unknown_url"),
                                                      ("POST", "/api", None)])  # fmt: skip
def test_v1_and_api_without_their_slash_are_json_404s(web, key, method, path, code):
    """APPEND_SLASH answered them: an HTML 500 under DEBUG for a POST, an HTML redirect without."""
    response = requests.request(
        method, f"{web}{path}", headers={"Authorization": f"Bearer {key}"}, allow_redirects=False, timeout=10
    )
    assert response.status_code == 404 and response.headers["Content-Type"] == "application/json"
    if code:
        assert response.json()["error"]["code"] == code


def test_a_context_overflow_after_streamed_text_is_not_handed_to_a_larger_llm(monkeypatch):
    """The balancer fails over on ContextTooLong whatever its flags (rule 6): raised after the client had
    text, a second LLM's reply would have been appended to the first's. No engine raises it so late today,
    hence an engine of this test's own."""
    from types import SimpleNamespace

    from llm_engines.base import ChatChunk, ChatOptions, Engine
    from llm_engines.errors import ContextTooLong, EngineBadRequest
    from orchestration import chat
    from orchestration.runtime import load_balancer

    class Overflowing(Engine):
        name = "overflowing"

        def stream(self, messages, options=None):
            yield ChatChunk(text="Once")
            raise ContextTooLong("the context is full", engine=self.name)

        def health(self):
            raise NotImplementedError

    monkeypatch.setattr(chat, "get_engine", lambda *args, **kwargs: Overflowing())
    request = SimpleNamespace(options=ChatOptions(), messages=[{"role": "user", "content": "hi"}])
    llm = SimpleNamespace(id="t", model="m", engine="overflowing", engine_settings=dict)
    balancer = load_balancer()
    pieces: list[tuple[str, str]] = []
    with pytest.raises(EngineBadRequest, match="the context is full") as caught:
        chat._generate(request, llm, balancer, balancer.clock() + 30, on_piece=lambda *piece: pieces.append(piece))
    assert not isinstance(caught.value, ContextTooLong) and pieces == [("text", "Once")]
