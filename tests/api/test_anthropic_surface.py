"""The Anthropic Messages API on the node, translated to Chat Completions for an engine that has none.

The client is the real ``anthropic`` SDK; the engine is the vLLM fake (Chat Completions only).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import anthropic
import pytest

from quorum_node.node import Node
from tests.fakes.engines import FakeEngine

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HI = [{"role": "user", "content": "hi there"}]


@pytest.fixture
async def claude() -> AsyncIterator[Callable[[Node], anthropic.AsyncAnthropic]]:
    clients: list[anthropic.AsyncAnthropic] = []

    def _make(node: Node) -> anthropic.AsyncAnthropic:
        c = anthropic.AsyncAnthropic(base_url=node.url, api_key="unused", max_retries=0)
        clients.append(c)
        return c

    yield _make
    for c in clients:
        await c.close()


async def _setup(start_node: StartNode, fake: StartFake, **knobs) -> tuple[FakeEngine, Node]:
    eng = await fake("vllm", **knobs)
    node = await start_node(name="den", backends=[{"kind": "vllm", "url": eng.url}])
    return eng, node


async def test_create_answers_a_message(start_node: StartNode, fake: StartFake, claude) -> None:
    eng, node = await _setup(start_node, fake)
    records: list = []
    node.records.add(records.append)
    raw = await claude(node).messages.with_raw_response.create(
        model=MODEL,
        max_tokens=64,
        system="Be brief.",
        messages=HI,
        stop_sequences=["END"],
        extra_body={"temperature": 0.3},
    )
    assert (raw.headers["X-Quorum-Node"], raw.headers["X-Quorum-Route"]) == ("den", "local")
    msg = await raw.parse()
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Hello, world!"
    assert msg.stop_reason == "end_turn" and msg.role == "assistant" and msg.model == MODEL
    assert msg.usage.output_tokens == 4 and msg.usage.input_tokens > 0
    sent = eng.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    assert (sent["max_tokens"], sent["stop"], sent["temperature"]) == (64, ["END"], 0.3)
    assert [(r.surface, r.operation, r.status, r.completion_tokens) for r in records] == [
        ("anthropic", "messages", 200, 4)
    ]


async def test_output_config_format_becomes_response_format(start_node: StartNode, fake: StartFake, claude) -> None:
    eng, node = await _setup(start_node, fake)
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    await claude(node).messages.create(
        model=MODEL, max_tokens=8, messages=HI, output_config={"format": {"type": "json_schema", "schema": schema}}
    )
    assert eng.requests[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }


async def test_max_tokens_reached(start_node: StartNode, fake: StartFake, claude) -> None:
    _, node = await _setup(start_node, fake)
    msg = await claude(node).messages.create(model=MODEL, max_tokens=2, messages=HI)
    assert msg.stop_reason == "max_tokens" and msg.content[0].text == "Hello,"


async def test_stream_has_anthropics_events(start_node: StartNode, fake: StartFake, claude) -> None:
    eng, node = await _setup(start_node, fake)
    client = claude(node)
    async with client.messages.stream(model=MODEL, max_tokens=64, messages=HI) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text == "Hello, world!" and final.content[0].text == text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 4 and final.usage.input_tokens > 0
    assert eng.requests[-1]["stream"] is True

    stream = await client.messages.create(model=MODEL, max_tokens=64, messages=HI, stream=True)
    kinds = [ev.type async for ev in stream]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") == 4


async def test_tool_round_trip(start_node: StartNode, fake: StartFake, claude) -> None:
    eng, node = await _setup(start_node, fake)
    client = claude(node)
    for stream in (False, True):
        ask = [{"role": "user", "content": "Weather in Tokyo?"}]
        if stream:
            async with client.messages.stream(model=MODEL, max_tokens=64, messages=ask, tools=[WEATHER]) as s:
                first = await s.get_final_message()
        else:
            first = await client.messages.create(model=MODEL, max_tokens=64, messages=ask, tools=[WEATHER])
        assert first.stop_reason == "tool_use"
        use = [b for b in first.content if b.type == "tool_use"]
        assert len(use) == 1 and use[0].name == "get_weather" and use[0].input == {"city": "Tokyo"}
        assert eng.requests[-1]["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": WEATHER["input_schema"],
                    "description": "The weather in a city",
                },
            }
        ]

        second = await client.messages.create(
            model=MODEL,
            max_tokens=64,
            tools=[WEATHER],
            messages=[
                *ask,
                {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id, "content": "Sunny"}]},
            ],
        )
        assert second.stop_reason == "end_turn" and second.content[0].text == "Hello, world!"
        msgs = eng.requests[-1]["messages"]
        assert msgs[1]["role"] == "assistant" and msgs[1]["tool_calls"][0]["id"] == use[0].id
        assert msgs[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}
        assert msgs[2] == {"role": "tool", "tool_call_id": use[0].id, "content": "Sunny"}


async def test_errors_are_in_anthropics_envelope(
    start_node: StartNode, fake: StartFake, claude, http: aiohttp.ClientSession
) -> None:
    eng, node = await _setup(start_node, fake)
    client = claude(node)
    with pytest.raises(anthropic.NotFoundError) as info:
        await client.messages.create(model="nope", max_tokens=8, messages=HI)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(
            model=MODEL, max_tokens=8, messages=HI, tools=[{"type": "web_search_20250305", "name": "web_search"}]
        )
    assert "server tools" in bad.value.body["error"]["message"]
    eng.status_always = 503
    with pytest.raises(anthropic.InternalServerError) as down:
        await client.messages.create(model=MODEL, max_tokens=8, messages=HI)
    assert down.value.body["error"]["type"] in ("overloaded_error", "api_error")
    eng.status_always = None
    async with http.post(node.url + "/v1/messages/nowhere", json={}) as r:
        assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"


async def test_hostile_bodies_get_400s_never_500s(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng, node = await _setup(start_node, fake)
    m = b'"model": "m", '
    bodies = [
        b"",
        b"{",
        b"[]",
        b'{"model": "m", "max_tokens": 5}',
        b"{" + m + b'"messages": []}',
        b"{" + m + b'"max_tokens": 5, "messages": "x"}',
        b"{" + m + b'"max_tokens": 0, "messages": [{}]}',
        b"{" + m + b'"max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}',
        b"{" + m + b'"max_tokens": 5, "messages": [{"role": "user", "content": 5}]}',
        b"{" + m + b'"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]}',
        b"{" + m + b'"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}',
        b"{" + m + b'"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}',
        b"{" + m + b'"max_tokens": 5, "system": 5, "messages": [{"role": "user", "content": "x"}]}',
        b"{" + m + b'"max_tokens": 5, "tool_choice": {"type": "x"}, "messages": [{"role": "user", "content": "x"}]}',
        b"{" + m + b'"max_tokens": 5, "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"\xff",
    ]
    for body in bodies:
        async with http.post(node.url + "/v1/messages", data=body, headers={"Content-Type": "application/json"}) as r:
            data = await r.json()
            assert r.status == 400, (body[:70], r.status, data)
            assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert eng.requests == []


async def test_mid_stream_failure_makes_the_sdk_raise(start_node: StartNode, fake: StartFake, claude) -> None:
    _, node = await _setup(start_node, fake, fail_after_tokens=2, fail_mode="drop")
    client = claude(node)
    got: list[str] = []
    with pytest.raises(anthropic.APIError):
        async with client.messages.stream(model=MODEL, max_tokens=64, messages=HI) as s:
            async for t in s.text_stream:
                got.append(t)
    assert got == ["Hello", ","]
    stream = await client.messages.create(model=MODEL, max_tokens=64, messages=HI, stream=True)
    kinds: list[str] = []
    with pytest.raises(anthropic.APIError):
        async for ev in stream:
            kinds.append(ev.type)
    assert "message_stop" not in kinds


async def test_count_tokens_asks_the_engine(start_node: StartNode, fake: StartFake, claude) -> None:
    eng, node = await _setup(start_node, fake)
    client = claude(node)
    count = await client.messages.count_tokens(model=MODEL, messages=HI, system="Be brief.")
    msg = await client.messages.create(model=MODEL, max_tokens=64, messages=HI, system="Be brief.")
    assert count.input_tokens == msg.usage.input_tokens > 0
    assert eng.requests[-2]["max_tokens"] == 1 and not eng.requests[-2].get("stream")


async def test_x_api_key_is_the_key_header_here(start_node: StartNode, fake: StartFake) -> None:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}], require_key=True)
    _, secret = node.keys.create("coder")
    records: list = []
    node.records.add(records.append)
    good = anthropic.AsyncAnthropic(base_url=node.url, api_key=secret, max_retries=0)  # sends x-api-key
    bad = anthropic.AsyncAnthropic(base_url=node.url, api_key="qk_wrong", max_retries=0)
    try:
        msg = await good.messages.create(model=MODEL, max_tokens=8, messages=HI)
        assert msg.content[0].text == "Hello, world!"
        assert records[-1].key_name == "coder"
        with pytest.raises(anthropic.AuthenticationError) as info:
            await bad.messages.create(model=MODEL, max_tokens=8, messages=HI)
        assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "authentication_error"
    finally:
        await good.close()
        await bad.close()


@pytest.mark.parametrize("suffix", ["/v1", ""])
async def test_a_base_url_with_or_without_v1_reaches_messages(
    suffix: str, start_node: StartNode, fake: StartFake
) -> None:
    """Issue 23: the Anthropic SDK adds /v1 itself; a base_url copied from an OpenAI client ends in /v1 already."""
    _eng, node = await _setup(start_node, fake)
    async with anthropic.AsyncAnthropic(base_url=node.url + suffix, api_key="unused", max_retries=0) as client:
        msg = await client.messages.create(model=MODEL, max_tokens=64, messages=HI)
        assert msg.content[0].text == "Hello, world!"  # type: ignore[union-attr]
        counted = await client.messages.count_tokens(model=MODEL, messages=HI)
        assert counted.input_tokens > 0
