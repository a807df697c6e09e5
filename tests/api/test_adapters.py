"""Every engine kind, through the node, as the real `openai` SDK sees it.

One fake engine per kind (a real server speaking that engine's wire format,
quirks included) behind one node; the assertions are what a user of the SDK
would notice: model names, text, finish reasons, usage, tool calls, vectors.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest

from quorum_node.node import Node
from tests.fakes.engines import KINDS, FakeEngine

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]
ClientFor = Callable[..., openai.AsyncOpenAI]

# The name a user of each engine knows its default chat model by.
CHAT_MODEL = {
    "ollama": "llama3.2",  # `:latest` is implied, as in Ollama itself
    "llamacpp": "SmolLM2-135M-Instruct.Q4_1",  # the file stem, not the path
    "vllm": "meta-llama/Llama-3.1-8B-Instruct",
    "sglang": "meta-llama/Llama-3.1-8B-Instruct",
    "tgi": "meta-llama/Llama-3.1-8B-Instruct",
    "lmstudio": "qwen2.5-7b-instruct",
    "localai": "gpt-4",
    "mlx": "mlx-community/Qwen2.5-7B-Instruct-4bit",
    "openai": "gpt-4o-mini",
}
EMBED_MODEL = {
    "ollama": "nomic-embed-text",
    "llamacpp": "SmolLM2-135M-Instruct.Q4_1",
    "vllm": "meta-llama/Llama-3.1-8B-Instruct",
    "sglang": "meta-llama/Llama-3.1-8B-Instruct",
    "lmstudio": "text-embedding-nomic-embed-text-v1.5",
    "localai": "gpt-4",
    "openai": "text-embedding-3-small",
}
NO_EMBEDDINGS = ("tgi", "mlx")
OPENAI_FINISH = {"stop", "length", "tool_calls", "content_filter", "function_call"}
MSGS = [{"role": "user", "content": "say hello"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


async def serve(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str, **knobs: Any
) -> tuple[FakeEngine, Node, openai.AsyncOpenAI]:
    eng = await fake(kind, **knobs)
    node = await start_node(backends=[{"kind": kind, "url": eng.url}])
    return eng, node, client_for(node)


def as_float32(vec: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(vec)}f", struct.pack(f"<{len(vec)}f", *vec)))


# ---------------------------------------------------------------------- models


@pytest.mark.parametrize("kind", KINDS)
async def test_models_listed_by_the_names_users_know(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str
) -> None:
    _eng, node, client = await serve(start_node, fake, client_for, kind)
    ids = [m.id async for m in client.models.list()]
    assert CHAT_MODEL[kind] in ids or f"{CHAT_MODEL[kind]}:latest" in ids
    card = await client.models.retrieve(CHAT_MODEL[kind])  # the short name answers too
    assert card.id in ids
    extra = card.model_extra or {}
    assert extra["engines"] == [kind] and extra["nodes"] == [node.name]


async def test_ollama_tag_and_llamacpp_path_names(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    ollama = await fake("ollama")
    llama = await fake("llamacpp")
    node = await start_node(backends=[{"kind": "ollama", "url": ollama.url}, {"kind": "llamacpp", "url": llama.url}])
    client = client_for(node)
    ids = {m.id async for m in client.models.list()}
    assert {"llama3.2:latest", "nomic-embed-text:latest", "SmolLM2-135M-Instruct.Q4_1"} <= ids
    assert not any(i.startswith("/") for i in ids)  # no file paths shown
    for name in ("llama3.2", "llama3.2:latest"):
        done = await client.chat.completions.create(model=name, messages=MSGS)
        assert done.choices[0].message.content == "Hello, world!"
    assert [r["model"] for r in ollama.requests] == ["llama3.2:latest"] * 2  # the exact id Ollama wants
    for name in ("SmolLM2-135M-Instruct.Q4_1", "/models/SmolLM2-135M-Instruct.Q4_1.gguf"):
        done = await client.chat.completions.create(model=name, messages=MSGS)
        assert done.choices[0].message.content == "Hello, world!"
    assert len(llama.requests) == 2


# ------------------------------------------------------------------------ chat


@pytest.mark.parametrize("kind", KINDS)
async def test_chat(start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str) -> None:
    eng, _node, client = await serve(start_node, fake, client_for, kind)
    done = await client.chat.completions.create(model=CHAT_MODEL[kind], messages=MSGS)
    assert done.object == "chat.completion" and done.id
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == "Hello, world!"
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == 4
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert len(eng.requests) == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_chat_stream_with_usage(start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str) -> None:
    _eng, _node, client = await serve(start_node, fake, client_for, kind)
    # `stop` makes TGI answer finish_reason "stop_sequence", which the SDK does not know.
    stream = await client.chat.completions.create(
        model=CHAT_MODEL[kind], messages=MSGS, stream=True, stop=["\n\n"], stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    content = [c for c in chunks if c.choices]
    assert content and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id  # one id, never empty (TGI sends "")
    roles = [c.choices[0].delta.role for c in content]
    assert roles[0] == "assistant" and not any(roles[1:])  # role once, in the first chunk
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == "Hello, world!"
    finishes = [c.choices[0].finish_reason for c in content if c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert finishes[0] in OPENAI_FINISH
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and not chunks[-1].choices
    usage = usage_chunks[0].usage
    pieces = sum(1 for c in content if c.choices[0].delta.content)
    assert usage.completion_tokens == pieces == 4
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("kind", KINDS)
async def test_chat_stream_without_usage_has_no_usage_chunk(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str
) -> None:
    _eng, _node, client = await serve(start_node, fake, client_for, kind)
    stream = await client.chat.completions.create(model=CHAT_MODEL[kind], messages=MSGS, stream=True)
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)  # no `choices: []` usage chunk was asked for
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello, world!"
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kind", KINDS)
async def test_chat_max_tokens_finishes_with_length(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str
) -> None:
    _eng, _node, client = await serve(start_node, fake, client_for, kind)
    done = await client.chat.completions.create(model=CHAT_MODEL[kind], messages=MSGS, max_tokens=2)
    assert done.choices[0].message.content == "Hello,"
    assert done.choices[0].finish_reason == "length"


# ----------------------------------------------------------------------- tools


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_calls_pass_through(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str
) -> None:
    eng, _node, client = await serve(start_node, fake, client_for, kind, tool_arguments={"city": "Tokyo"})
    done = await client.chat.completions.create(model=CHAT_MODEL[kind], messages=MSGS, tools=TOOLS)
    call = done.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str)
    assert json.loads(call.function.arguments) == {"city": "Tokyo"}
    assert done.choices[0].finish_reason == "tool_calls"
    assert eng.requests[0]["tools"][0]["function"]["name"] == "get_weather"

    stream = await client.chat.completions.create(model=CHAT_MODEL[kind], messages=MSGS, tools=TOOLS, stream=True)
    names, args, finish = "", "", None
    async for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or ():
                names += (tc.function.name or "") if tc.function else ""
                args += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    assert names == "get_weather"
    assert json.loads(args) == {"city": "Tokyo"}
    assert finish == "tool_calls"


# ----------------------------------------------------------------- completions


@pytest.mark.parametrize("kind", KINDS)
async def test_completions(start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str) -> None:
    _eng, _node, client = await serve(start_node, fake, client_for, kind)
    done = await client.completions.create(model=CHAT_MODEL[kind], prompt="Say hello")
    assert done.object == "text_completion"
    assert done.choices[0].text == "Hello, world!"
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == 4

    stream = await client.completions.create(
        model=CHAT_MODEL[kind], prompt="Say hello", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in content) == "Hello, world!"
    assert [c.choices[0].finish_reason for c in content if c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4

    stream = await client.completions.create(model=CHAT_MODEL[kind], prompt="Say hello", stream=True)
    chunks = [c async for c in stream]
    assert all(c.choices and c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == "Hello, world!"


# ------------------------------------------------------------------ embeddings


@pytest.mark.parametrize("kind", sorted(EMBED_MODEL))
async def test_embeddings_base64_decodes_to_the_float_vectors(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str
) -> None:
    eng, _node, client = await serve(start_node, fake, client_for, kind)
    texts = ["the cat sat", "on the mat"]
    floats = await client.embeddings.create(model=EMBED_MODEL[kind], input=texts, encoding_format="float")
    default = await client.embeddings.create(model=EMBED_MODEL[kind], input=texts)  # SDK: base64
    assert [d.index for d in floats.data] == [0, 1]
    assert [len(d.embedding) for d in floats.data] == [eng.embedding_dim] * 2
    assert floats.data[0].embedding != floats.data[1].embedding
    for f, b in zip(floats.data, default.data, strict=True):
        assert b.embedding == as_float32(f.embedding)
    assert floats.usage.prompt_tokens > 0
    assert all(r["encoding_format"] == "float" for r in eng.requests)  # engines need not know base64


@pytest.mark.parametrize("kind", NO_EMBEDDINGS)
async def test_embeddings_on_engines_without_them_is_501(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str
) -> None:
    eng, _node, client = await serve(start_node, fake, client_for, kind)
    with pytest.raises(openai.APIStatusError) as info:
        await client.embeddings.create(model=CHAT_MODEL[kind], input="x")
    err = info.value
    assert err.status_code == 501
    assert err.type == "not_supported_error" and kind in err.message
    assert eng.requests == []  # never sent to the engine
