"""The OpenAI Responses API on the node, translated to Chat Completions for an engine that has none.

The client is the real ``openai`` SDK (``client.responses``) and the real
``openai-agents`` runner; the engine is the vLLM fake, which serves Chat
Completions only.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import pytest

from quorum_node.api.responses import ResponseStore, Stored
from quorum_node.node import Node
from tests.fakes.engines import FakeEngine

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]
ClientFor = Callable[..., openai.AsyncOpenAI]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


async def _setup(start_node: StartNode, fake: StartFake, **knobs) -> tuple[FakeEngine, Node]:
    eng = await fake("vllm", **knobs)
    node = await start_node(name="den", backends=[{"kind": "vllm", "url": eng.url}])
    return eng, node


async def test_create_answers_a_response_with_text_and_usage(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    eng, node = await _setup(start_node, fake)
    records: list = []
    node.records.add(records.append)
    client = client_for(node)
    raw = await client.responses.with_raw_response.create(
        model=MODEL, input="hi there", instructions="Be brief.", max_output_tokens=50, temperature=0.2
    )
    assert (raw.headers["X-Quorum-Node"], raw.headers["X-Quorum-Route"]) == ("den", "local")
    resp = raw.parse()
    assert resp.output_text == "Hello, world!"
    assert resp.status == "completed" and resp.id.startswith("resp_") and resp.model == MODEL
    assert resp.usage is not None and resp.usage.output_tokens == 4
    assert resp.usage.total_tokens == resp.usage.input_tokens + 4 and resp.usage.input_tokens > 0
    sent = eng.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.2
    # one record for the request, on the responses surface, with the engine's token counts
    assert [(r.surface, r.operation, r.model, r.status, r.completion_tokens) for r in records] == [
        ("responses", "responses", MODEL, 200, 4)
    ]


async def test_max_output_tokens_reached_is_incomplete(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    _, node = await _setup(start_node, fake)
    resp = await client_for(node).responses.create(model=MODEL, input="hi", max_output_tokens=2)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == "Hello,"
    async with client_for(node).responses.stream(model=MODEL, input="hi", max_output_tokens=2) as s:
        final = await s.get_final_response()  # the helper needs response.completed, incomplete or not
    assert final.status == "incomplete" and final.output_text == "Hello,"


async def test_stream_has_the_responses_events_in_order(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    eng, node = await _setup(start_node, fake)
    client = client_for(node)
    stream = await client.responses.create(model=MODEL, input=[{"role": "user", "content": "hi"}], stream=True)
    events = [ev async for ev in stream]
    kinds = [ev.type for ev in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [ev.sequence_number for ev in events] == list(range(len(events)))
    assert "".join(ev.delta for ev in events if ev.type == "response.output_text.delta") == "Hello, world!"
    done = events[-1].response
    assert done.output_text == "Hello, world!" and done.usage.output_tokens == 4
    assert eng.requests[-1]["stream"] is True

    # the SDK's helper accumulates the same answer
    async with client.responses.stream(model=MODEL, input="hi") as s:
        final = await s.get_final_response()
    assert final.output_text == "Hello, world!"


async def test_function_tool_round_trip_with_previous_response_id(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    eng, node = await _setup(start_node, fake)
    client = client_for(node)
    for stream in (False, True):
        if stream:
            async with client.responses.stream(model=MODEL, input="Weather in Tokyo?", tools=[WEATHER]) as s:
                first = await s.get_final_response()
        else:
            first = await client.responses.create(model=MODEL, input="Weather in Tokyo?", tools=[WEATHER])
        calls = [it for it in first.output if it.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "get_weather"
        assert json.loads(calls[0].arguments) == {"city": "Tokyo"}
        sent = eng.requests[-1]
        assert sent["tools"][0] == {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": WEATHER["parameters"],
            },
        }

        second = await client.responses.create(
            model=MODEL,
            previous_response_id=first.id,
            tools=[WEATHER],
            stream=False,
            input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}],
        )
        assert second.output_text == "Hello, world!" and second.previous_response_id == first.id
        history = eng.requests[-1]["messages"]
        assert history[0] == {"role": "user", "content": "Weather in Tokyo?"}
        assert history[1]["role"] == "assistant"
        assert history[1]["tool_calls"][0]["id"] == calls[0].call_id
        assert history[1]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert history[2] == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "Sunny, 21 C"}


async def test_tool_round_trip_without_stored_state(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    """Clients that keep the conversation themselves send the function_call item back as input."""
    eng, node = await _setup(start_node, fake)
    client = client_for(node)
    first = await client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER], store=False)
    call = first.output[0]
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)  # store=false: not kept
    second = await client.responses.create(
        model=MODEL,
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Rain"},
        ],
    )
    assert second.output_text == "Hello, world!"
    assert [m["role"] for m in eng.requests[-1]["messages"]] == ["user", "assistant", "tool"]


async def test_conversation_state_retrieve_and_delete(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    eng, node = await _setup(start_node, fake)
    client = client_for(node)
    one = await client.responses.create(model=MODEL, input="My name is Ada.", instructions="first rules")
    two = await client.responses.create(model=MODEL, input="What is my name?", previous_response_id=one.id)
    assert eng.requests[-1]["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello, world!"},  # instructions are not carried over
        {"role": "user", "content": "What is my name?"},
    ]
    got = await client.responses.retrieve(two.id)
    assert got.id == two.id and got.output_text == "Hello, world!"
    await client.responses.delete(two.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(two.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(two.id)
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input="again", previous_response_id=two.id)
    assert info.value.body["param"] == "previous_response_id"


async def test_text_format_json_schema_becomes_response_format(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    eng, node = await _setup(start_node, fake)
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    resp = await client_for(node).responses.create(
        model=MODEL,
        input="give x",
        text={"format": {"type": "json_schema", "name": "X", "schema": schema, "strict": True}},
    )
    assert resp.text.format.type == "json_schema"
    assert eng.requests[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "X", "schema": schema, "strict": True},
    }


async def test_unsupported_fields_are_refused_with_a_400_naming_them(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    eng, node = await _setup(start_node, fake)
    client = client_for(node)
    cases = [
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"background": True}, "background"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ]
    for extra, param in cases:
        body = {"model": MODEL, "input": "hi", **extra}
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(**body)
        assert info.value.body["param"] == param, extra
    assert eng.requests == []


async def test_hostile_bodies_get_400s_never_500s(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng, node = await _setup(start_node, fake)
    bodies = [
        b"",
        b"{",
        b"[]",
        b'"x"',
        b'{"model": 5, "input": "x"}',
        b'{"model": "m"}',
        b'{"model": "m", "input": 7}',
        b'{"model": "m", "input": [1]}',
        b'{"model": "m", "input": [{"role": "wizard", "content": "x"}]}',
        b'{"model": "m", "input": [{"role": "user", "content": {"a": 1}}]}',
        b'{"model": "m", "input": [{"type": "function_call_output", "call_id": 3}]}',
        b'{"model": "m", "input": "x", "tools": [7]}',
        b'{"model": "m", "input": "x", "text": {"format": 1}}',
        b'{"model": "m", "input": "x", "tool_choice": {"type": "mcp"}}',
        b"\xff\xfe",
        b'{"model": "m", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ]
    for body in bodies:
        async with http.post(node.url + "/v1/responses", data=body, headers={"Content-Type": "application/json"}) as r:
            data = await r.json()
            assert r.status == 400, (body[:60], r.status, data)
            assert data["error"]["type"] == "invalid_request_error"
    assert eng.requests == []


async def test_unknown_model_is_a_404_in_the_openai_envelope(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    _, node = await _setup(start_node, fake)
    with pytest.raises(openai.NotFoundError) as info:
        await client_for(node).responses.create(model="nope", input="hi")
    assert info.value.body["code"] == "model_not_found"


async def test_mid_stream_failure_makes_the_sdk_raise(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    _, node = await _setup(start_node, fake, fail_after_tokens=2, fail_mode="drop")
    client = client_for(node)
    stream = await client.responses.create(model=MODEL, input="hi", stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError):
        async for ev in stream:
            seen.append(ev.type)
    assert "response.output_text.delta" in seen and "response.completed" not in seen
    with pytest.raises(openai.APIError):
        async with client.responses.stream(model=MODEL, input="hi") as s:
            await s.get_final_response()


async def test_openai_agents_runs_a_tool_using_agent(start_node: StartNode, fake: StartFake) -> None:
    agents = pytest.importorskip("agents")
    eng, node = await _setup(start_node, fake)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    client = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    try:
        agent = agents.Agent(
            name="helper",
            instructions="Use the tool.",
            tools=[get_weather],
            model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
        )
        result = await agents.Runner.run(
            agent, "Weather in Tokyo?", max_turns=4, run_config=agents.RunConfig(tracing_disabled=True)
        )
    finally:
        await client.close()
    assert calls == ["Tokyo"]
    assert result.final_output == "Hello, world!"
    last = eng.requests[-1]["messages"]
    assert last[-1]["role"] == "tool" and last[-1]["content"] == "Sunny in Tokyo"


# ------------------------------------------------------------- the store, alone


def _stored(n: int, owner: str | None = None, at: float = 0.0) -> Stored:
    return Stored(response=b"r" * n, history=b"", owner=owner, at=at)


def test_store_is_bounded_by_count_bytes_and_age() -> None:
    s = ResponseStore(max_entries=3, max_bytes=100, ttl_s=10.0)
    for i in range(5):
        s.put(f"r{i}", _stored(10, at=float(i)), now=float(i))
    assert len(s) == 3 and s.get("r0", None, 4.0) is None and s.get("r4", None, 4.0) is not None
    s.put("big", _stored(90, at=5.0), now=5.0)  # pushes the others out by bytes
    assert s.bytes <= 100 and s.get("big", None, 5.0) is not None and s.get("r3", None, 5.0) is None
    s.put("huge", _stored(101, at=5.0), now=5.0)  # larger than the whole store: not kept
    assert s.get("huge", None, 5.0) is None and s.get("big", None, 5.0) is not None
    assert s.get("big", None, 15.1) is None and len(s) == 0 and s.bytes == 0  # expired


def test_store_shows_a_response_only_to_its_key() -> None:
    s = ResponseStore(max_entries=10, max_bytes=1000, ttl_s=10.0)
    s.put("r", _stored(5, owner="key_a"), now=0.0)
    assert s.get("r", "key_a", 1.0) is not None
    assert s.get("r", "key_b", 1.0) is None and s.get("r", None, 1.0) is None


async def test_a_stored_response_is_visible_only_to_its_key(start_node: StartNode, fake: StartFake) -> None:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}], require_key=True)
    (_, key_a), (_, key_b) = node.keys.create("a"), node.keys.create("b")
    a = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key=key_a, max_retries=0)
    b = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key=key_b, max_retries=0)
    try:
        resp = await a.responses.create(model=MODEL, input="secret plans")
        assert (await a.responses.retrieve(resp.id)).output_text == "Hello, world!"
        with pytest.raises(openai.NotFoundError):
            await b.responses.retrieve(resp.id)
        with pytest.raises(openai.BadRequestError):
            await b.responses.create(model=MODEL, input="and?", previous_response_id=resp.id)
        with pytest.raises(openai.NotFoundError):
            await b.responses.delete(resp.id)
        assert (await a.responses.retrieve(resp.id)).id == resp.id
    finally:
        await a.close()
        await b.close()


async def test_a_base_url_without_v1_reaches_the_responses_api_too(start_node: StartNode, fake: StartFake) -> None:
    """Issue 23: the forgiving paths (a base_url set without /v1) include /responses."""
    _eng, node = await _setup(start_node, fake)
    async with openai.AsyncOpenAI(base_url=node.url, api_key="unused", max_retries=0) as client:
        resp = await client.responses.create(model=MODEL, input="hi there", store=True)
        assert resp.status == "completed" and resp.output_text == "Hello, world!"
        again = await client.responses.retrieve(resp.id)
        assert again.id == resp.id and again.output_text == resp.output_text
        await client.responses.delete(resp.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(resp.id)
