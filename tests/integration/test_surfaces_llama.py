"""The Responses and Messages surfaces against the real llama-server (SmolLM2), through the node.

The node translates both to Chat Completions (it does not pass them through to
llama-server's own /v1/responses and /v1/messages), so these tests prove the
translation against a real engine's answers: the real ``openai`` SDK's
``responses``, the real ``openai-agents`` runner, the real ``anthropic`` SDK.
SmolLM2-135M does not emit tool calls (and this llama-server does not force
them with ``tool_choice``), so the tool round trips here carry the call in the
client's history; the fake-engine tests cover calls the engine makes.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anthropic
import openai
import pytest

from quorum_node.engine.supervisor import LlamaServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90, func_only=True)]

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
READY_TIMEOUT_S = 30.0
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
A_WEATHER = {"name": "get_weather", "description": "Get the weather in a city",
             "input_schema": WEATHER["parameters"]}
STORY = "Write a long story about a dragon who learns to bake bread."


@pytest.fixture
async def engine(llama_server: Path, model: Path) -> AsyncIterator[LlamaServerProcess]:
    proc = LlamaServerProcess(llama_server, model, port=0, ctx_size=2048, extra_args=("--jinja",))
    await proc.start()
    try:
        await proc.wait_ready(READY_TIMEOUT_S)
        yield proc
    finally:
        await proc.stop()


@pytest.fixture
async def node(engine: LlamaServerProcess, start_node):
    return await start_node(backends=[{"kind": "llamacpp", "url": engine.url}])


@pytest.fixture
async def claude(node) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = anthropic.AsyncAnthropic(base_url=node.url, api_key="unused", max_retries=0)
    yield c
    await c.close()


# --------------------------------------------------------------- Responses


async def test_responses_create_and_stream(node, client_for: Callable[..., openai.AsyncOpenAI]) -> None:
    client = client_for(node)
    resp = await client.responses.create(model=MODEL_ID, input="Say hello.", instructions="Be brief.",
                                         max_output_tokens=16)
    assert resp.status in ("completed", "incomplete") and resp.output_text.strip()
    assert resp.usage.input_tokens > 0 and 0 < resp.usage.output_tokens <= 16
    async with client.responses.stream(model=MODEL_ID, input="Say hello.", max_output_tokens=16) as s:
        deltas = [ev.delta async for ev in s if ev.type == "response.output_text.delta"]
        final = await s.get_final_response()
    assert deltas and "".join(deltas) == final.output_text
    assert final.usage.output_tokens > 0


async def test_responses_tool_round_trip_with_previous_response_id(node, client_for) -> None:
    client = client_for(node)
    for stream in (False, True):
        kw = dict(model=MODEL_ID, input="What is the weather in Paris?", tools=[WEATHER], max_output_tokens=24)
        if stream:
            async with client.responses.stream(**kw) as s:
                first = await s.get_final_response()
        else:
            first = await client.responses.create(**kw)
        assert first.output and first.usage.output_tokens > 0
        # SmolLM2-135M does not call tools (llama-server does not force it to): the call is the client's
        # own history here, and the engine's answer to the tool's output is what is checked.
        second = await client.responses.create(
            model=MODEL_ID, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=24, input=[
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"}])
        assert second.output_text.strip() and second.previous_response_id == first.id
        assert (await client.responses.retrieve(second.id)).output_text == second.output_text


async def test_openai_agents_default_model_runs_an_agent_with_a_tool(node) -> None:
    agents = pytest.importorskip("agents")

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return f"Sunny in {city}"

    client = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    try:
        agent = agents.Agent(name="weather", instructions="Be brief.", tools=[get_weather],
                             model=agents.OpenAIResponsesModel(model=MODEL_ID, openai_client=client),
                             model_settings=agents.ModelSettings(max_tokens=32))
        result = await agents.Runner.run(agent, "Say hello.", max_turns=4,
                                         run_config=agents.RunConfig(tracing_disabled=True))
    finally:
        await client.close()
    assert isinstance(result.final_output, str) and result.final_output.strip()


async def test_responses_engine_killed_mid_stream_sdk_raises(node, engine: LlamaServerProcess, client_for) -> None:
    stream = await client_for(node).responses.create(model=MODEL_ID, input=STORY, max_output_tokens=300, stream=True)
    with pytest.raises(openai.APIError):
        async for ev in stream:
            assert ev.type != "response.completed", "the stream finished normally"
            if ev.type == "response.output_text.delta" and engine.pid is not None:
                os.kill(engine.pid, signal.SIGKILL)


# ---------------------------------------------------------------- Messages


async def test_messages_create_and_stream(claude: anthropic.AsyncAnthropic) -> None:
    msg = await claude.messages.create(model=MODEL_ID, max_tokens=16, system="Be brief.",
                                       messages=[{"role": "user", "content": "Say hello."}])
    assert msg.content[0].type == "text" and msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.usage.input_tokens > 0
    async with claude.messages.stream(model=MODEL_ID, max_tokens=16,
                                      messages=[{"role": "user", "content": "Say hello."}]) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text and final.content[0].text == text and final.usage.output_tokens > 0


async def test_messages_tool_round_trip(claude: anthropic.AsyncAnthropic) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    for stream in (False, True):
        kw = dict(model=MODEL_ID, max_tokens=24, messages=ask, tools=[A_WEATHER])
        if stream:
            async with claude.messages.stream(**kw) as s:
                first = await s.get_final_message()
        else:
            first = await claude.messages.create(**kw)
        assert first.content and first.usage.output_tokens > 0
        # as for Responses: the tool_use is the client's history, the engine answers its result
        second = await claude.messages.create(model=MODEL_ID, max_tokens=24, tools=[A_WEATHER], messages=[
            *ask, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                     "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]}])
        assert second.content and second.content[0].type == "text" and second.content[0].text.strip()


async def test_messages_errors_and_count_tokens(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        await claude.messages.create(model="no-such-model", max_tokens=8,
                                     messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["error"]["type"] == "not_found_error"
    msgs = [{"role": "user", "content": "Count my tokens, please."}]
    count = await claude.messages.count_tokens(model=MODEL_ID, messages=msgs)
    msg = await claude.messages.create(model=MODEL_ID, max_tokens=4, messages=msgs)
    assert count.input_tokens == msg.usage.input_tokens > 0


async def test_messages_engine_killed_mid_stream_sdk_raises(claude: anthropic.AsyncAnthropic,
                                                            engine: LlamaServerProcess) -> None:
    with pytest.raises(anthropic.APIError):
        async with claude.messages.stream(model=MODEL_ID, max_tokens=300,
                                          messages=[{"role": "user", "content": STORY}]) as s:
            async for ev in s:
                assert ev.type != "message_stop", "the stream finished normally"
                if ev.type == "content_block_delta" and engine.pid is not None:
                    os.kill(engine.pid, signal.SIGKILL)
