"""The Responses and Messages APIs passed through to an engine that serves them itself.

The engine is the llama.cpp fake, which serves `/v1/responses` and `/v1/messages` in the
exact wire formats of llama-server b11434, quirks included (`tests/fakes/native.py`); the
clients are the real `openai` and `anthropic` SDKs. The fake records the path it was
called on, so each test knows which way the node sent the request.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable

import anthropic
import openai
import pytest

from quorum_node.node import Node
from tests.api.test_anthropic_surface import claude  # noqa: F401  (the fixture: the real anthropic SDK)
from tests.fakes.engines import FakeEngine

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]

MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the public id of the fake's /models/SmolLM2-135M-Instruct.Q4_1.gguf
ENGINE_ID = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
A_WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER["parameters"]}
HI = [{"role": "user", "content": "hi there"}]


async def _setup(start_node: StartNode, fake: StartFake, **knobs) -> tuple[FakeEngine, Node, list]:
    eng = await fake("llamacpp", **knobs)
    node = await start_node(name="den", backends=[{"kind": "llamacpp", "url": eng.url}])
    records: list = []
    node.records.add(records.append)
    return eng, node, records


def _paths(eng: FakeEngine) -> list[str]:
    return [r.path for r in eng.requests]


# ------------------------------------------------------------------------------------ Responses


async def test_responses_pass_through_whole_and_streamed(start_node: StartNode, fake: StartFake, client_for) -> None:
    eng, node, records = await _setup(start_node, fake)
    client = client_for(node)
    raw = await client.responses.with_raw_response.create(
        model=MODEL, input="hi there", instructions="Be brief.", max_output_tokens=50, metadata={"tag": "t1"}
    )
    assert (raw.headers["X-Quorum-Node"], raw.headers["X-Quorum-Route"]) == ("den", "local")
    resp = raw.parse()
    sent = eng.requests[-1]
    assert sent.path == "/v1/responses"  # the engine's own API, not /v1/chat/completions
    assert sent["model"] == ENGINE_ID and sent["input"] == "hi there" and sent["instructions"] == "Be brief."
    assert sent["store"] is False  # the node keeps the response; the engine need not
    assert resp.output_text == "Hello, world!" and resp.status == "completed"
    assert resp.model == MODEL  # not the engine's file path
    assert resp.id.startswith("resp_") and resp.metadata == {"tag": "t1"} and resp.instructions == "Be brief."
    assert resp.usage.output_tokens == 4 and resp.usage.input_tokens > 0
    assert resp.usage.output_tokens_details.reasoning_tokens == 0  # filled in: llama-server leaves it out
    assert (await client.responses.retrieve(resp.id)).output_text == "Hello, world!"

    # Streamed: llama-server numbers nothing and names items by id only; the SDK's helper needs both.
    async with client.responses.stream(model=MODEL, input="hi there") as s:
        events = [ev async for ev in s]
        final = await s.get_final_response()
    assert _paths(eng)[-1] == "/v1/responses" and eng.requests[-1]["stream"] is True
    assert "".join(ev.delta for ev in events if ev.type == "response.output_text.delta") == "Hello, world!"
    assert final.output_text == "Hello, world!" and final.model == MODEL and final.usage.output_tokens == 4
    seqs = [ev.sequence_number for ev in events]
    assert seqs == list(range(len(seqs)))
    assert events[0].type == "response.created" and events[0].response.id == final.id
    assert events[-1].type == "response.completed"
    assert (await client.responses.retrieve(final.id)).output_text == "Hello, world!"

    # the record of each, with the engine's own token counts
    assert [
        (r.surface, r.operation, r.status, r.completion_tokens, r.tokens_estimated)
        for r in records
        if r.operation == "responses"
    ] == [("responses", "responses", 200, 4, False)] * 2
    assert all(r.prompt_tokens and r.prompt_tokens > 0 for r in records if r.operation == "responses")
    assert node.ledger is not None
    rows = [r for r in await node.ledger.recent(10) if r.operation == "responses"]
    assert [(r.completion_tokens, r.tokens_estimated) for r in rows] == [(4, False)] * 2


async def test_responses_previous_response_id_is_the_nodes_conversation(
    start_node: StartNode, fake: StartFake, client_for
) -> None:
    eng, node, _ = await _setup(start_node, fake)
    client = client_for(node)
    first = await client.responses.create(model=MODEL, input="Weather in Tokyo?", tools=[WEATHER])
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Tokyo"} and call.call_id.startswith("call_")
    async with client.responses.stream(
        model=MODEL,
        previous_response_id=first.id,
        tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
    ) as s:
        second = await s.get_final_response()
    assert second.output_text == "Hello, world!" and second.previous_response_id == first.id
    sent = eng.requests[-1]
    # llama-server refuses previous_response_id: it gets the conversation the node kept instead
    assert sent.path == "/v1/responses" and "previous_response_id" not in sent
    assert [it.get("type") for it in sent["input"]] == ["message", "function_call", "function_call_output"]
    assert sent["input"][1]["call_id"] == call.call_id
    third = await client.responses.create(model=MODEL, previous_response_id=second.id, input="Thanks!")
    assert third.output_text == "Hello, world!"
    assert len(eng.requests[-1]["input"]) == 5  # + the answer, + "Thanks!"
    await client.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model=MODEL, previous_response_id=first.id, input="again")


async def test_responses_stream_of_a_tool_call(start_node: StartNode, fake: StartFake, client_for) -> None:
    eng, node, _ = await _setup(start_node, fake)
    async with client_for(node).responses.stream(model=MODEL, input="Weather in Tokyo?", tools=[WEATHER]) as s:
        deltas = [ev.delta async for ev in s if ev.type == "response.function_call_arguments.delta"]
        final = await s.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather" and "".join(deltas) == call.arguments
    assert json.loads(call.arguments) == {"city": "Tokyo"}
    assert _paths(eng) == ["/v1/responses"]


async def test_responses_checks_and_refusals_are_the_translations(
    start_node: StartNode, fake: StartFake, client_for
) -> None:
    eng, node, _ = await _setup(start_node, fake)
    client = client_for(node)
    with pytest.raises(openai.BadRequestError) as info:  # refused as when translating: nothing new gets through
        await client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])
    assert info.value.body["param"] == "tools[0]"
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model=MODEL, input="hi", background=True)
    assert eng.requests == []


# ------------------------------------------------------------------------------------- Messages


async def test_messages_pass_through_whole_streamed_and_counted(start_node: StartNode, fake: StartFake, claude) -> None:
    eng, node, records = await _setup(start_node, fake)
    c = claude(node)
    raw = await c.messages.with_raw_response.create(model=MODEL, max_tokens=64, system="Be brief.", messages=HI)
    assert raw.headers["X-Quorum-Route"] == "local"
    msg = await raw.parse()
    sent = eng.requests[-1]
    assert sent.path == "/v1/messages" and sent["model"] == ENGINE_ID and sent["system"] == "Be brief."
    assert msg.content[0].text == "Hello, world!" and msg.stop_reason == "end_turn"
    assert msg.id.startswith("msg_") and msg.model == MODEL  # llama-server: chatcmpl-…, the file path
    assert msg.usage.output_tokens == 4 and msg.usage.input_tokens > 0

    async with c.messages.stream(model=MODEL, max_tokens=64, messages=HI) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text == "Hello, world!" and final.content[0].text == text and final.model == MODEL
    assert final.usage.output_tokens == 4 and final.usage.input_tokens > 0 and final.id.startswith("msg_")

    count = await c.messages.count_tokens(model=MODEL, messages=HI)
    assert count.input_tokens == 2 and _paths(eng) == ["/v1/messages"] * 2 + ["/v1/messages/count_tokens"]
    assert [(r.operation, r.status, r.completion_tokens) for r in records] == [
        ("messages", 200, 4),
        ("messages", 200, 4),
        ("count_tokens", 200, 0),
    ]
    assert all(r.prompt_tokens and r.prompt_tokens > 0 and not r.tokens_estimated for r in records)


async def test_messages_tool_use_whole_and_streamed(start_node: StartNode, fake: StartFake, claude) -> None:
    eng, node, _ = await _setup(start_node, fake)
    c = claude(node)
    ask = [{"role": "user", "content": "Weather in Tokyo?"}]
    msg = await c.messages.create(model=MODEL, max_tokens=64, messages=ask, tools=[A_WEATHER])
    [use] = msg.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Tokyo"}
    assert msg.stop_reason == "tool_use"
    async with c.messages.stream(model=MODEL, max_tokens=64, messages=ask, tools=[A_WEATHER]) as s:
        final = await s.get_final_message()
    [use] = final.content  # llama-server starts the block with no input: the node gives it one
    assert use.type == "tool_use" and use.input == {"city": "Tokyo"} and use.id
    answer = await c.messages.create(
        model=MODEL,
        max_tokens=64,
        tools=[A_WEATHER],
        messages=[
            *ask,
            {"role": "assistant", "content": [use.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}]},
        ],
    )
    assert answer.content[0].text == "Hello, world!"
    assert eng.requests[-1]["messages"][-1]["content"][0]["tool_use_id"] == use.id
    assert _paths(eng) == ["/v1/messages"] * 3


# ------------------------------------------------------------------------- failures and errors


@pytest.mark.parametrize("mode", ["error", "drop"])
async def test_a_native_stream_that_breaks_raises_in_both_sdks(
    start_node: StartNode, fake: StartFake, client_for, claude, mode: str
) -> None:
    eng, node, records = await _setup(start_node, fake, fail_after_tokens=2, fail_mode=mode)
    with pytest.raises(openai.APIError):
        async with client_for(node).responses.stream(model=MODEL, input="hi") as s:
            async for ev in s:
                assert ev.type != "response.completed"
    with pytest.raises(anthropic.APIError):
        async with claude(node).messages.stream(model=MODEL, max_tokens=64, messages=HI) as s:
            async for ev in s:
                assert ev.type != "message_stop"
    assert _paths(eng) == ["/v1/responses", "/v1/messages"]
    assert [(r.operation, r.status, r.outcome) for r in records] == [
        ("responses", 502, "failed"),
        ("messages", 502, "failed"),
    ]


async def test_engine_errors_come_in_each_surfaces_envelope(
    start_node: StartNode, fake: StartFake, client_for, claude
) -> None:
    eng, node, _ = await _setup(start_node, fake)
    eng.next_status = 400
    with pytest.raises(openai.BadRequestError) as oi:
        await client_for(node).responses.create(model=MODEL, input="hi")
    assert oi.value.body["message"] == "Bad Request" and oi.value.body["type"] == "invalid_request_error"
    eng.next_status = 400
    with pytest.raises(anthropic.BadRequestError) as ai:
        await claude(node).messages.create(model=MODEL, max_tokens=8, messages=HI)
    assert ai.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": "Bad Request"}}
    eng.status_always = 503  # the engine is overloaded: a 503 the SDKs know, in each envelope
    with pytest.raises(anthropic.InternalServerError) as ai:
        await claude(node).messages.create(model=MODEL, max_tokens=8, messages=HI)
    assert ai.value.status_code == 503 and ai.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(openai.InternalServerError):
        await client_for(node).responses.create(model=MODEL, input="hi")
    assert set(_paths(eng)) == {"/v1/responses", "/v1/messages"}


# --------------------------------------------------------------------- which way a request goes


async def test_an_engine_without_the_routes_is_translated(
    start_node: StartNode, fake: StartFake, client_for, claude
) -> None:
    eng, node, _ = await _setup(start_node, fake, native_apis=False)  # a llama-server from before them
    assert (await client_for(node).responses.create(model=MODEL, input="hi")).output_text == "Hello, world!"
    msg = await claude(node).messages.create(model=MODEL, max_tokens=8, messages=HI)
    assert msg.content[0].text == "Hello, world!"
    assert _paths(eng) == ["/v1/chat/completions"] * 2


async def test_what_llama_servers_own_apis_drop_is_translated(
    start_node: StartNode, fake: StartFake, client_for, claude
) -> None:
    """llama-server's /v1/responses ignores text.format, its /v1/messages output_config.format and
    tool_choice none (seen against b11434): those requests go to its Chat Completions, which honour them."""
    eng, node, _ = await _setup(start_node, fake)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    await client_for(node).responses.create(
        model=MODEL, input="2+2?", text={"format": {"type": "json_schema", "name": "a", "schema": schema}}
    )
    assert _paths(eng) == ["/v1/chat/completions"] and eng.requests[-1]["response_format"]["type"] == "json_schema"
    await claude(node).messages.create(
        model=MODEL,
        max_tokens=8,
        messages=HI,
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}},
    )
    await claude(node).messages.create(
        model=MODEL, max_tokens=8, messages=HI, tools=[A_WEATHER], tool_choice={"type": "none"}
    )
    assert _paths(eng)[1:] == ["/v1/chat/completions"] * 2 and eng.requests[-1]["tool_choice"] == "none"
    await client_for(node).responses.create(model=MODEL, input="2+2?", text={"format": {"type": "text"}})
    assert _paths(eng)[-1] == "/v1/responses"


@pytest.mark.parametrize("status", [404, 405])
async def test_no_native_route_after_all_falls_back_to_the_translation(
    start_node: StartNode, fake: StartFake, client_for, status: int
) -> None:
    eng, node, _ = await _setup(start_node, fake)
    eng.next_status = status  # the engine was swapped for one without the route, between two probes
    resp = await client_for(node).responses.create(model=MODEL, input="hi")
    assert resp.output_text == "Hello, world!"
    assert _paths(eng) == ["/v1/responses", "/v1/chat/completions"]  # the same engine, translated


async def test_a_failed_native_attempt_is_retried_on_an_engine_that_translates(
    start_node: StartNode, fake: StartFake, claude
) -> None:
    native = await fake("llamacpp", models=["m"], status_always=503)
    plain = await fake("vllm", models=["m"])
    node = await start_node(  # tried in the order listed: the native one first
        backends=[{"kind": "llamacpp", "url": native.url}, {"kind": "vllm", "url": plain.url}], affinity=False
    )
    async with claude(node).messages.stream(model="m", max_tokens=8, messages=HI) as s:
        assert "".join([t async for t in s.text_stream]) == "Hello, world!"
    assert _paths(native) == ["/v1/messages"] and _paths(plain) == ["/v1/chat/completions"]


async def test_a_peers_model_is_translated_on_the_entry_node(
    start_node: StartNode, fake: StartFake, http, client_for, claude
) -> None:
    """The peer's engine speaks both APIs, but a peer is sent Chat Completions: the entry node translates."""
    from tests.members_support import CLUSTER, Member, model_holders
    from tests.support import eventually

    plain = await fake("openai", models=["alpha"])
    native = await fake("llamacpp")
    a = Member(await start_node(backends=[{"kind": "openai", "url": plain.url}], **CLUSTER), plain)
    b = Member(await start_node(backends=[{"kind": "llamacpp", "url": native.url}], **CLUSTER), native)
    for m, other in ((a, b), (b, a)):
        assert m.node.cluster is not None
        m.node.cluster.table.add_static(other.address)

    async def b_seen() -> bool:
        return (await model_holders(http, a.node)).get(MODEL) == [b.name]

    await eventually(b_seen, f"{a.name} sees {MODEL} on {b.name}")
    raw = await client_for(a.node).responses.with_raw_response.create(model=MODEL, input="hi")
    assert raw.headers["X-Quorum-Route"] == "lan" and raw.parse().output_text == "Hello, world!"
    async with claude(a.node).messages.stream(model=MODEL, max_tokens=8, messages=HI) as s:
        assert "".join([t async for t in s.text_stream]) == "Hello, world!"
    assert _paths(native) == ["/v1/chat/completions"] * 2 and not plain.requests


async def test_a_native_stream_ends_at_its_last_event_and_its_connection_is_reused(
    start_node: StartNode, fake: StartFake, client_for, claude
) -> None:
    eng, node, _ = await _setup(start_node, fake)
    for _ in range(3):
        async with client_for(node).responses.stream(model=MODEL, input="hi") as s:
            await s.get_final_response()
        async with claude(node).messages.stream(model=MODEL, max_tokens=8, messages=HI) as s:
            await s.get_final_message()
    ports = {r.peer for r in eng.requests}
    # one connection, or another where a probe (every 0.2 s here) held it at the moment; not one per stream
    assert len(eng.requests) == 6 and len(ports) <= 3, ports


async def test_a_client_that_leaves_a_native_stream_cancels_the_engines_work(
    start_node: StartNode, fake: StartFake, http
) -> None:
    eng, node, _ = await _setup(start_node, fake, token_delay_s=0.2)
    eng.tokens = ["word "] * 50
    for path, body in (
        ("/v1/responses", {"model": MODEL, "input": "hi", "stream": True}),
        ("/v1/messages", {"model": MODEL, "max_tokens": 64, "messages": HI, "stream": True}),
    ):
        eng.cancelled_event().clear()
        async with http.post(node.url + path, json=body) as resp:
            assert resp.status == 200 and b"event: " in await resp.content.readline()
            resp.close()  # hang up mid-answer
        await asyncio.wait_for(eng.cancelled_event().wait(), 5)
    assert eng.cancelled == 2 and _paths(eng) == ["/v1/responses", "/v1/messages"]
    assert node.registry.backends[eng.url].in_flight == 0


async def test_the_probe_tells_which_engines_serve_the_apis(start_node: StartNode, fake: StartFake) -> None:
    engines = {
        "native": await fake("llamacpp"),
        "old": await fake("llamacpp", native_apis=False),
        "lmstudio": await fake("lmstudio"),
        "vllm": await fake("vllm"),
        "tgi": await fake("tgi"),
        "locked": await fake("llamacpp", api_key="k"),
    }  # quorum has no key for it: 401, nothing learnt
    kinds = {"native": "llamacpp", "old": "llamacpp", "locked": "llamacpp"}
    node = await start_node(backends=[{"kind": kinds.get(n, n), "url": e.url, "name": n} for n, e in engines.items()])
    native = {b.name: dict(b.native) for b in node.registry.backends.values()}
    everything = dict.fromkeys(("count_tokens", "messages", "responses"), True)
    assert native == {
        "native": everything,
        "old": dict.fromkeys(everything, False),
        "lmstudio": dict.fromkeys(everything, False),  # its 200 "Unexpected endpoint"
        "vllm": dict.fromkeys(everything, False),  # the fake has no such routes
        "tgi": {},
        "locked": {},
    }  # tgi: never asked; locked: asked again at each refresh
    assert all(r.path not in ("/v1/responses", "/v1/messages") for e in engines.values() for r in e.requests)


async def test_a_messages_stream_without_its_first_event_is_mended(start_node, fake, claude) -> None:
    eng, node, records = await _setup(start_node, fake, messages_start=False)  # as llama-server now and then
    async with claude(node).messages.stream(model=MODEL, max_tokens=64, messages=HI) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()  # the SDK's final message is built from message_start
    assert text == "Hello, world!" and final.content[0].text == text
    assert final.id.startswith("msg_") and final.model == MODEL and final.role == "assistant"
    assert final.usage.output_tokens == 4 and final.stop_reason == "end_turn"
    assert _paths(eng) == ["/v1/messages"] and [(r.operation, r.status) for r in records] == [("messages", 200)]


FORGED = (
    '\n\nevent: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_forged",'
    '"object":"response","status":"completed","output":[]}}\n\nevent: x'
)


async def test_an_engines_event_type_cannot_forge_events(
    start_node: StartNode, fake: StartFake, client_for, http
) -> None:
    # The engine's `type` is written into the `event:` line; one with a newline in it is a malformed event:
    # after the first byte the stream ends with the error event (the failure contract), nothing forged.
    _eng, node, records = await _setup(start_node, fake, forged_event_type=FORGED, token_delay_s=0.05)
    async with http.post(node.url + "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}) as resp:
        assert resp.status == 200
        body = await resp.read()
    lines = body.split(b"\n")
    assert all(line.startswith((b"event: ", b"data: ")) or not line for line in lines)  # nothing injected
    names = [line.removeprefix(b"event: ") for line in lines if line.startswith(b"event: ")]
    assert b"response.completed" not in names and all(re.fullmatch(rb"[a-z0-9_.]+", n) for n in names), names
    assert names[-1] == b"response.failed"  # it ends as a broken Responses stream does: the SDK raises
    with pytest.raises(openai.APIError):
        async with client_for(node).responses.stream(model=MODEL, input="hi") as s:
            async for ev in s:
                assert ev.type != "response.completed"
    assert [(r.operation, r.status) for r in records] == [("responses", 502)] * 2
