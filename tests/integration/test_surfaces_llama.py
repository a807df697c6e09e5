"""The Responses and Messages surfaces against the real llama-server (SmolLM2), through the node.

llama-server b11434 serves ``/v1/responses``, ``/v1/messages`` and
``/v1/messages/count_tokens`` itself, so the node passes these requests
through (its probe finds the routes) and erases the engine's quirks; these
tests prove that with the real ``openai`` SDK's ``responses``, the real
``openai-agents`` runner and the real ``anthropic`` SDK, and (the engine told
it has no such routes) the translation to Chat Completions too.

Tool calls. With SmolLM2's own chat template llama-server renders no tools
at all (the template has no tool syntax, and this build derives its tool
grammar from the template), so ``tool_choice`` forces nothing and the model
never calls one: the first round trips here carry the call in the client's
history. With a tool-capable ChatML template (``TOOL_TEMPLATE``: content
always wrapped, calls as ``<tool_call>`` JSON) and ``tool_choice``
"required" (Messages: ``any``), the grammar leaves the model no way out but a
call, and the real engine's call round-trips through every surface, both ways.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import agents  # openai-agents: a test dependency (pyproject), installed wherever the suite runs
import anthropic
import openai
import pytest

from quorum_node.backends.base import NATIVE_OPS
from quorum_node.embedded.supervisor import LlamaServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90, func_only=True)]

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
READY_TIMEOUT_S = 30.0
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
A_WEATHER = {"name": "get_weather", "description": "Get the weather in a city", "input_schema": WEATHER["parameters"]}
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
    resp = await client.responses.create(
        model=MODEL_ID, input="Say hello.", instructions="Be brief.", max_output_tokens=16
    )
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
        # With its own chat template SmolLM2-135M calls no tool (llama-server renders none): the call is the
        # client's own history here, and the engine's answer to the tool's output is what is checked (the
        # engine's own calls: test_real_tool_call_*, below).
        second = await client.responses.create(
            model=MODEL_ID,
            previous_response_id=first.id,
            tools=[WEATHER],
            max_output_tokens=24,
            input=[
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
            ],
        )
        assert second.output_text.strip() and second.previous_response_id == first.id
        assert (await client.responses.retrieve(second.id)).output_text == second.output_text


async def test_openai_agents_default_model_runs_an_agent_with_a_tool(node) -> None:

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return f"Sunny in {city}"

    client = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    try:
        agent = agents.Agent(
            name="weather",
            instructions="Be brief.",
            tools=[get_weather],
            model=agents.OpenAIResponsesModel(model=MODEL_ID, openai_client=client),
            # room to finish: an answer cut by max_tokens is "incomplete", and the runner raises on it (issue 23)
            model_settings=agents.ModelSettings(max_tokens=256),
        )
        result = await agents.Runner.run(
            agent, "Say hello.", max_turns=4, run_config=agents.RunConfig(tracing_disabled=True)
        )
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
    msg = await claude.messages.create(
        model=MODEL_ID, max_tokens=16, system="Be brief.", messages=[{"role": "user", "content": "Say hello."}]
    )
    assert msg.content[0].type == "text" and msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.usage.input_tokens > 0
    async with claude.messages.stream(
        model=MODEL_ID, max_tokens=16, messages=[{"role": "user", "content": "Say hello."}]
    ) as s:
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
        second = await claude.messages.create(
            model=MODEL_ID,
            max_tokens=24,
            tools=[A_WEATHER],
            messages=[
                *ask,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]},
            ],
        )
        assert second.content and second.content[0].type == "text" and second.content[0].text.strip()


async def test_messages_errors_and_count_tokens(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        await claude.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["error"]["type"] == "not_found_error"
    msgs = [{"role": "user", "content": "Count my tokens, please."}]
    count = await claude.messages.count_tokens(model=MODEL_ID, messages=msgs)
    msg = await claude.messages.create(model=MODEL_ID, max_tokens=4, messages=msgs)
    # Anthropic's input_tokens leaves out the prompt read from the cache (llama-server keeps one)
    u = msg.usage
    assert (
        count.input_tokens
        == u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
        > 0
    )


async def test_messages_engine_killed_mid_stream_sdk_raises(
    claude: anthropic.AsyncAnthropic, engine: LlamaServerProcess
) -> None:
    with pytest.raises(anthropic.APIError):
        async with claude.messages.stream(
            model=MODEL_ID, max_tokens=300, messages=[{"role": "user", "content": STORY}]
        ) as s:
            async for ev in s:
                assert ev.type != "message_stop", "the stream finished normally"
                if ev.type == "content_block_delta" and engine.pid is not None:
                    os.kill(engine.pid, signal.SIGKILL)


# ------------------------------------------------------------- passed through, not translated


async def test_the_node_passes_both_apis_through_to_llama_server(
    node, claude: anthropic.AsyncAnthropic, client_for
) -> None:
    [backend] = node.registry.backends.values()
    assert all(backend.supports(op) for op in NATIVE_OPS)  # the probe found the routes
    # Facts only the engine's own answer has: a stop at a stop sequence says so (the translation
    # cannot tell it from end_turn), and a repeated prompt is read from llama-server's cache.
    # (greedy, so the answer is the same every run: sampled, 1 run in a few never wrote a space in 32 tokens)
    msg = await claude.messages.create(
        model=MODEL_ID,
        max_tokens=32,
        stop_sequences=[" "],
        messages=[{"role": "user", "content": "Say hello to the world."}],
        extra_body={"temperature": 0},
    )
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", " ")
    assert msg.id.startswith("msg_") and msg.model == MODEL_ID
    client = client_for(node)
    for _ in range(2):
        resp = await client.responses.create(model=MODEL_ID, input="Say hello.", max_output_tokens=4)
    assert resp.usage.input_tokens_details.cached_tokens > 0 and resp.model == MODEL_ID
    assert (await client.responses.retrieve(resp.id)).output_text == resp.output_text


# --------------------------------------------------------------------- the real engine's tool calls

# A ChatML template (SmolLM2's own tokens) that can describe tools: content always wrapped in
# <response>, calls as <tool_call> JSON. llama-server's template analysis finds both, so with
# tool_choice "required" its grammar allows an optional wrapped answer, then one or more calls.
TOOL_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You are a helpful assistant. You can call these functions:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
To call one, write <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}<response>{{ message.content }}</response>{% endif %}
{%- if message.tool_calls %}{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}{% endif %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
"""
ASK = "What is the weather in Paris?"


@pytest.fixture
async def tool_node(llama_server: Path, model: Path, tmp_path: Path, start_node, request):
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    proc = LlamaServerProcess(
        llama_server, model, port=0, ctx_size=2048, extra_args=("--jinja", "--chat-template-file", str(template))
    )
    await proc.start()
    try:
        await proc.wait_ready(READY_TIMEOUT_S)
        node = await start_node(backends=[{"kind": "llamacpp", "url": proc.url}])
        [backend] = node.registry.backends.values()
        if request.param == "translated":  # as for an engine whose probe found no such routes
            backend.native.update(dict.fromkeys(NATIVE_OPS, False))
        assert all(backend.supports(op) is (request.param == "native") for op in NATIVE_OPS)
        yield node
    finally:
        await proc.stop()


def _city(arguments: str | dict) -> str:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert isinstance(args, dict) and isinstance(args.get("city"), str) and args["city"], args
    return args["city"]


# The follow-ups keep tool_choice "required": with this template an answer in plain text is one llama-server
# cannot parse (its content is always wrapped), so the grammar keeps every answer parseable. What is checked is
# that the engine's own call, sent back with its result, is taken by the engine and answered.
FORCE = 200  # max tokens: SmolLM2 makes one or two calls (~40 tokens each); a call cut short is a 500


@pytest.mark.parametrize("tool_node", ["translated"], indirect=True)
async def test_real_tool_call_through_chat_completions(tool_node, client_for) -> None:
    client = client_for(tool_node)
    tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    kw = dict(model=MODEL_ID, tools=tools, tool_choice="required", max_tokens=FORCE, temperature=0)
    ask = [{"role": "user", "content": ASK}]
    first = await client.chat.completions.create(messages=ask, **kw)
    calls = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls"
    assert calls and all(c.function.name == "get_weather" and c.id for c in calls)
    _city(calls[0].function.arguments)
    stream = await client.chat.completions.create(messages=ask, stream=True, **kw)
    args = "".join(
        [
            d.function.arguments or ""
            async for ch in stream
            if ch.choices
            for d in ch.choices[0].delta.tool_calls or ()
            if d.index == 0 and d.function
        ]
    )
    _city(args)
    second = await client.chat.completions.create(
        messages=[
            *ask,
            first.choices[0].message.model_dump(exclude_none=True),
            *({"role": "tool", "tool_call_id": c.id, "content": "Sunny, 21 C"} for c in calls),
        ],
        **kw,
    )
    assert second.choices[0].message.tool_calls and second.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize("tool_node", ["native", "translated"], indirect=True)
async def test_real_tool_call_through_responses(tool_node, client_for) -> None:
    client = client_for(tool_node)
    kw = dict(model=MODEL_ID, tools=[WEATHER], tool_choice="required", max_output_tokens=FORCE, temperature=0)
    first = await client.responses.create(input=ASK, **kw)
    calls = [it for it in first.output if it.type == "function_call"]
    assert calls and all(c.name == "get_weather" and c.call_id for c in calls)
    _city(calls[0].arguments)
    async with client.responses.stream(input=ASK, **kw) as s:
        deltas = [ev.delta async for ev in s if ev.type == "response.function_call_arguments.delta"]
        final = await s.get_final_response()
    streamed = [it for it in final.output if it.type == "function_call"]
    assert streamed and "".join(deltas).startswith(streamed[0].arguments)
    _city(streamed[0].arguments)
    # the engine's calls go back to it, with their outputs, through the node's stored conversation
    second = await client.responses.create(
        previous_response_id=first.id,
        **kw,
        input=[{"type": "function_call_output", "call_id": c.call_id, "output": "Sunny, 21 C"} for c in calls],
    )
    assert [it.type for it in second.output if it.type == "function_call"]
    assert second.usage.input_tokens > first.usage.input_tokens and second.previous_response_id == first.id


@pytest.mark.parametrize("tool_node", ["native", "translated"], indirect=True)
async def test_real_tool_call_through_messages(tool_node) -> None:
    claude = anthropic.AsyncAnthropic(base_url=tool_node.url, api_key="unused", max_retries=0)
    try:
        ask = [{"role": "user", "content": ASK}]
        kw = dict(
            model=MODEL_ID,
            max_tokens=FORCE,
            tools=[A_WEATHER],
            tool_choice={"type": "any"},
            extra_body={"temperature": 0},
        )
        first = await claude.messages.create(messages=ask, **kw)
        uses = [b for b in first.content if b.type == "tool_use"]
        assert first.stop_reason == "tool_use" and uses and all(u.name == "get_weather" and u.id for u in uses)
        _city(uses[0].input)
        async with claude.messages.stream(messages=ask, **kw) as s:
            final = await s.get_final_message()
        streamed = [b for b in final.content if b.type == "tool_use"]
        assert streamed and final.stop_reason == "tool_use"
        _city(streamed[0].input)
        second = await claude.messages.create(
            **kw,
            messages=[
                *ask,
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": u.id, "name": u.name, "input": u.input} for u in uses],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "Sunny, 21 C"} for u in uses],
                },
            ],
        )
        assert second.stop_reason == "tool_use" and second.usage.output_tokens > 0
    finally:
        await claude.close()


async def test_an_answer_cut_by_max_output_tokens_is_incomplete_on_every_node(
    engine: LlamaServerProcess, start_node
) -> None:
    """Issue 23: llama-server calls such an answer "completed"; a node that translates (for a peer) said
    "incomplete", as OpenAI does; openai-agents' non-streamed run raised on one node and not the other.
    One answer everywhere: ``incomplete`` with ``incomplete_details``, whether passed through or translated."""
    from tests.members_support import CLUSTER
    from tests.support import eventually

    local = await start_node(backends=[{"kind": "llamacpp", "url": engine.url}], **CLUSTER)
    entry = await start_node(**CLUSTER)  # no engine: it forwards to local, which translates for a peer
    assert local.cluster is not None and entry.cluster is not None
    entry.cluster.table.add_static(f"127.0.0.1:{local.peer_port}")
    local.cluster.table.add_static(f"127.0.0.1:{entry.peer_port}")
    await eventually(lambda: MODEL_ID in entry.router.known_models(), "entry sees local's model", timeout_s=10)
    outcomes = []
    for node, route in ((local, "local"), (entry, "lan")):
        async with openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0) as client:
            raw = await client.responses.with_raw_response.create(model=MODEL_ID, input=STORY, max_output_tokens=4)
            assert raw.headers["X-Quorum-Route"] == route
            resp = raw.parse()
            assert (resp.status, resp.incomplete_details and resp.incomplete_details.reason) == (
                "incomplete",
                "max_output_tokens",
            ), route
            async with client.responses.stream(model=MODEL_ID, input=STORY, max_output_tokens=4) as s:
                final = await s.get_final_response()
            assert final.status == "incomplete", route
            agent = agents.Agent(
                name="writer",
                model=agents.OpenAIResponsesModel(model=MODEL_ID, openai_client=client),
                model_settings=agents.ModelSettings(max_tokens=4),
            )
            try:
                await agents.Runner.run(agent, STORY, max_turns=2, run_config=agents.RunConfig(tracing_disabled=True))
                outcomes.append("finished")
            except agents.exceptions.AgentsException as e:  # it raises on a cut answer, as with OpenAI's
                outcomes.append(type(e).__name__)
    assert outcomes == ["ModelBehaviorError", "ModelBehaviorError"], outcomes
