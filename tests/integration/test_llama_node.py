"""The integration tier: the real llama-server with SmolLM2, through the node, with the real openai SDK.

Every test runs its own engine (about half a second to load here) and its own
node, so a test that kills or stops an engine cannot disturb another. Waits are
deadlines with polling, never fixed sleeps. The binary and the model come from
the shared cache (``$QUORUM_CACHE_DIR`` or ``~/.cache/quorum``); on a cold cache
the session fixtures build them, hence ``needs_build`` on the tests that use them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest

from quorum_node.embedded.supervisor import LlamaServerProcess
from quorum_node.node import Node
from tests.support import eventually

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"  # the file stem of the GGUF the engine serves
CTX_SIZE = 1536  # neither llama-server's default nor the model's, so seeing it proves it came from the engine
# Allocating a 64k-token KV cache keeps llama-server in its "Loading model" phase
# for seconds instead of a third of a second: long enough to watch it load.
SLOW_LOAD_CTX_SIZE = 65536
N_CTX_TRAIN = 8192  # SmolLM2-135M's training context
READY_TIMEOUT_S = 30.0
PROBE_INTERVAL_S = 0.5
# A changed engine is seen at the next probe; allow a few probe rounds on a busy machine.
NOTICE_WITHIN_S = PROBE_INTERVAL_S * 6

# func_only: the limit covers the test body, not the session fixtures, which
# compile llama.cpp (about 10 minutes) when the cache is cold.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(60, func_only=True)]

CHAT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


# --- fixtures --------------------------------------------------------------------


@pytest.fixture
async def engines(llama_server: Path, model: Path) -> AsyncIterator[Callable[..., Awaitable[LlamaServerProcess]]]:
    """Start supervised llama-servers (not waited for); every one is stopped afterwards."""
    started: list[LlamaServerProcess] = []

    async def _start(*, port: int = 0, ctx_size: int = CTX_SIZE) -> LlamaServerProcess:
        proc = LlamaServerProcess(llama_server, model, port=port, ctx_size=ctx_size)
        started.append(proc)
        await proc.start()
        return proc

    yield _start
    for proc in started:
        await proc.stop()


@pytest.fixture
async def engine(engines: Callable[..., Awaitable[LlamaServerProcess]]) -> LlamaServerProcess:
    """One ready llama-server on an ephemeral port."""
    proc = await engines()
    await proc.wait_ready(READY_TIMEOUT_S)
    return proc


# --- helpers ---------------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> float:
    """``eventually(check)``; return how long that took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    await eventually(check, what, timeout_s=within_s)
    return loop.time() - start


async def get_json(url: str) -> tuple[int, dict[str, str], Any]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, allow_redirects=False) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def model_ids(node: Node) -> set[str]:
    status, _, body = await get_json(node.url + "/v1/models")
    assert status == 200
    return {m["id"] for m in body["data"]}


def listening_port(pid: int) -> int | None:
    """The port a process listens on (llama-server binds before it loads the model)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return None
    ports = [c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN]
    return ports[0] if ports else None


def llama_servers_of_ours() -> list[psutil.Process]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() == "llama-server":
                found.append(p)
        except psutil.NoSuchProcess:
            pass  # it ended while we looked
    return found


async def chat_text(client: openai.AsyncOpenAI, max_tokens: int = 8) -> str:
    reply = await client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=max_tokens)
    return reply.choices[0].message.content or ""


def configured(engine: LlamaServerProcess) -> dict[str, Any]:
    return {"backends": [{"kind": "llamacpp", "url": engine.url}]}


# --- detection and the model list ------------------------------------------------


async def test_node_detects_the_engine_and_lists_its_model_with_context_length(
    engine: LlamaServerProcess, start_node, client_for, model: Path
) -> None:
    node = await start_node(detect=True, detect_ports=[engine.port])
    client = client_for(node)

    models = (await client.models.list()).data

    assert [m.id for m in models] == [MODEL_ID]
    card = models[0].model_dump()
    assert card["context_length"] == CTX_SIZE  # the engine's --ctx-size, not the model's 8192
    assert card["owned_by"] == "llamacpp"
    assert card["engines"] == ["llamacpp"]
    assert card["loaded"] is True
    # the engine's own names for it still find it
    assert (await client.models.retrieve(model.name)).id == MODEL_ID
    status, _, ready = await get_json(node.url + "/ready")
    assert status == 200
    assert [(e["kind"], e["state"], e["models"]) for e in ready["engines"]] == [("llamacpp", "ready", 1)]


# --- chat and completions --------------------------------------------------------


async def test_chat_returns_text_with_consistent_usage(engine: LlamaServerProcess, start_node, client_for) -> None:
    node = await start_node(**configured(engine))
    client = client_for(node)

    reply = await client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=48
    )

    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens > 5  # the chat template wraps the question
    assert 0 < usage.completion_tokens <= 48
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(
    engine: LlamaServerProcess, start_node, client_for
) -> None:
    node = await start_node(**configured(engine))
    client = client_for(node)

    reply = await client.chat.completions.create(
        model=MODEL_ID, messages=CHAT, max_tokens=7, extra_body={"ignore_eos": True}
    )
    streamed = await client.chat.completions.create(
        model=MODEL_ID,
        messages=CHAT,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    finish = [c.choices[0].finish_reason async for c in streamed if c.choices and c.choices[0].finish_reason]

    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 7
    assert finish == ["length"]


async def test_streamed_chat_tokens_match_the_usage_chunk(engine: LlamaServerProcess, start_node, client_for) -> None:
    node = await start_node(**configured(engine))
    client = client_for(node)

    stream = await client.chat.completions.create(
        model=MODEL_ID,
        messages=CHAT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]

    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content).strip()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    # the usage chunk comes last, alone, with no choices (as OpenAI sends it)
    with_usage = [c for c in chunks if c.usage is not None]
    assert with_usage == [chunks[-1]]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # llama.cpp sends one content chunk per token; it may hold back a partial UTF-8 sequence
    # and merge it into the next chunk, so the chunks can be fewer, never more
    assert 0 < len(content) <= usage.completion_tokens <= 24
    assert usage.completion_tokens - len(content) <= 2
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    if finishes == ["length"]:
        assert usage.completion_tokens == 24


async def test_stream_without_include_usage_has_no_usage_chunk(
    engine: LlamaServerProcess, start_node, client_for
) -> None:
    node = await start_node(**configured(engine))
    client = client_for(node)

    stream = await client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=6, stream=True)
    chunks = [c async for c in stream]

    assert all(c.usage is None for c in chunks)  # the node asked the engine for usage, not the client
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()


async def test_completions_endpoint_streamed_and_not(engine: LlamaServerProcess, start_node, client_for) -> None:
    node = await start_node(**configured(engine))
    client = client_for(node)

    whole = await client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=12)
    stream = await client.completions.create(
        model=MODEL_ID,
        prompt="Once upon a time",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]

    assert whole.object == "text_completion"
    assert whole.choices[0].text.strip()
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.prompt_tokens >= 4

    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts).strip()
    with_usage = [c for c in chunks if c.usage is not None]
    assert with_usage == [chunks[-1]]
    assert chunks[-1].choices == []  # llama.cpp puts it on its finish chunk; the node splits it off
    usage = chunks[-1].usage
    assert 0 < len(texts) <= usage.completion_tokens <= 12


# --- not ready while the engine loads --------------------------------------------


async def test_node_is_not_ready_while_the_engine_loads(engines, start_node, client_for) -> None:
    engine = await engines(ctx_size=SLOW_LOAD_CTX_SIZE)
    assert engine.pid is not None
    port_holder: list[int] = []

    async def bound() -> bool:
        port = listening_port(engine.pid)  # type: ignore[arg-type]
        if port is not None:
            port_holder.append(port)
        return port is not None

    await until(bound, 10, "llama-server binds its port")
    url = f"http://127.0.0.1:{port_holder[0]}"
    status, headers, body = await get_json(url + "/health")
    assert (status, body["error"]["message"]) == (503, "Loading model"), "the engine loaded too fast to watch"
    assert headers["Server"] == "llama.cpp"

    node = await start_node(backends=[{"kind": "llamacpp", "url": url}])
    detecting = await start_node(detect=True, detect_ports=[port_holder[0]])
    client = client_for(node)

    for n in (node, detecting):  # configured, and detected by its Server header while it loads
        status, headers, ready = await get_json(n.url + "/ready")
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        assert [(e["kind"], e["state"]) for e in ready["engines"]] == [("llamacpp", "loading")]
    with pytest.raises(openai.APIStatusError) as caught:
        await chat_text(client)
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert caught.value.code == "engine_loading"
    status, _, _ = await get_json(url + "/health")
    assert status == 503, "the engine finished loading during the checks; they proved nothing"

    async def node_ready() -> bool:
        return (await get_json(node.url + "/ready"))[0] == 200

    await until(node_ready, READY_TIMEOUT_S, "the node turns ready once the engine has loaded")
    assert await chat_text(client)
    # llama-server caps a slot's context at the model's training context (8192) and reports the cap
    assert (await client.models.retrieve(MODEL_ID)).model_dump()["context_length"] == N_CTX_TRAIN


# --- the embedded engine ---------------------------------------------------------


async def test_embedded_engine_starts_serves_restarts_and_stops_with_the_node(
    start_node, client_for, cache: Path, llama_server: Path, model: Path
) -> None:
    # Bound but never listening: a connection there is refused, and nobody else can take the port.
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))
        empty_port = nobody.getsockname()[1]
        assert llama_servers_of_ours() == []

        node = await start_node(detect=True, detect_ports=[empty_port], embedded_engine=True, cache_dir=str(cache))
        client = client_for(node)

        status, _headers, ready = await get_json(node.url + "/ready")
        assert status == 503  # nothing detected, the embedded engine still starting
        assert [(e["name"], e["state"]) for e in ready["engines"]] == [("embedded-llamacpp", "starting")]
        # a request meanwhile is "try again shortly", not "no such model"
        with pytest.raises(openai.InternalServerError) as starting:
            await client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])
        assert starting.value.status_code == 503
        assert starting.value.response.headers.get("Retry-After")

        async def node_ready() -> bool:
            return (await get_json(node.url + "/ready"))[0] == 200

        await until(node_ready, READY_TIMEOUT_S, "the embedded engine comes up")
        engine = node.embedded
        assert engine is not None and engine.pid is not None
        [proc] = llama_servers_of_ours()
        assert proc.pid == engine.pid
        assert Path(proc.exe()) == llama_server
        assert str(model) in proc.cmdline()
        assert await model_ids(node) == {MODEL_ID}
        assert await chat_text(client)
        # embeddings: what Quorum can do about it, not the engine's own flag advice; and no blind retries
        with pytest.raises(openai.APIStatusError) as no_embeddings:
            await client_for(node, max_retries=2).embeddings.create(model=MODEL_ID, input="x")
        assert no_embeddings.value.status_code == 501
        assert "--embeddings" not in no_embeddings.value.message
        assert "embedded engine" in no_embeddings.value.message
        assert no_embeddings.value.response.headers["x-should-retry"] == "false"

        old_pid = engine.pid
        os.kill(old_pid, signal.SIGKILL)
        assert await asyncio.wait_for(engine.wait_exited(old_pid), 10) == -signal.SIGKILL

        async def serves_again() -> bool:
            try:
                return bool(await chat_text(client, max_tokens=4))
            except (openai.APIStatusError, openai.APIConnectionError):
                return False

        await until(serves_again, READY_TIMEOUT_S, "the restarted embedded engine serves again")
        assert engine.restarts == 1
        new_pid = engine.pid
        assert new_pid not in (None, old_pid)

        await node.stop()

        assert not psutil.pid_exists(new_pid)
        assert llama_servers_of_ours() == []


# --- the engine dies mid-stream --------------------------------------------------


async def test_engine_killed_mid_stream_sdk_raises(engine: LlamaServerProcess, start_node, client_for) -> None:
    node = await start_node(**configured(engine))
    client = client_for(node)
    stream = await client.chat.completions.create(
        model=MODEL_ID, messages=CHAT, max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    received: list[str] = []

    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
                if len(received) == 3:
                    assert engine.pid is not None
                    os.kill(engine.pid, signal.SIGKILL)
            assert not (chunk.choices and chunk.choices[0].finish_reason), "the stream finished normally"

    assert len(received) >= 3
    assert "engine" in caught.value.message


async def test_engine_killed_mid_stream_raw_bytes_end_with_an_error_event(
    engine: LlamaServerProcess, start_node
) -> None:
    node = await start_node(**configured(engine))
    body = {
        "model": MODEL_ID,
        "messages": CHAT,
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    raw = b""
    killed = False
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(node.url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        while chunk := await resp.content.readany():
            raw += chunk
            if not killed and raw.count(b'"content":"') >= 3:
                assert engine.pid is not None
                os.kill(engine.pid, signal.SIGKILL)
                killed = True

    assert killed
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1].startswith(b'data: {"error"')
    assert b"[DONE]" not in raw
    assert b'"finish_reason":"' not in raw


# --- the engine stops and comes back ---------------------------------------------


@pytest.mark.parametrize("how", ["detected", "configured"])
async def test_stopped_engine_disappears_and_returns(how: str, engines, start_node, client_for) -> None:
    first = await engines()
    await first.wait_ready(READY_TIMEOUT_S)
    port = first.port
    assert port is not None
    if how == "detected":
        node = await start_node(detect=True, detect_ports=[port], probe_interval_s=PROBE_INTERVAL_S)
    else:
        node = await start_node(probe_interval_s=PROBE_INTERVAL_S, **configured(first))
    client = client_for(node)
    assert await model_ids(node) == {MODEL_ID}

    await first.stop()

    async def gone() -> bool:
        return await model_ids(node) == set()

    await until(gone, NOTICE_WITHIN_S, "the stopped engine's model leaves /v1/models")
    status, _, ready = await get_json(node.url + "/ready")
    assert status == 503
    if how == "detected":
        assert ready["engines"] == []  # a detected engine that went away is forgotten
        with pytest.raises(openai.NotFoundError):
            await chat_text(client)
    else:
        assert [(e["state"], e["models"]) for e in ready["engines"]] == [("down", 0)]
        # the node still knows whose model it was: unavailable for now, not unknown
        with pytest.raises(openai.APIStatusError) as caught:
            await chat_text(client)
        assert caught.value.status_code == 503
        assert int(caught.value.response.headers["Retry-After"]) >= 1

    # the same port again (it was ours a moment ago), as a restarted engine would have
    second = await engines(port=port)
    await second.wait_ready(READY_TIMEOUT_S)

    async def back() -> bool:
        return await model_ids(node) == {MODEL_ID}

    await until(back, NOTICE_WITHIN_S, "the restarted engine's model returns to /v1/models")
    assert await chat_text(client)


async def test_the_embedded_engine_takes_a_prompt_as_long_as_its_model_was_trained_for(
    start_node, client_for, cache: Path, llama_server: Path, model: Path
) -> None:
    """Issue 23: smolagents' CodeAgent sends a 2,301-token prompt; the embedded engine used to run SmolLM2 with
    2,048 tokens of context and refused it. It runs with the model's own context now."""
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))
        node = await start_node(
            detect=True, detect_ports=[nobody.getsockname()[1]], embedded_engine=True, cache_dir=str(cache)
        )

        async def node_ready() -> bool:
            return (await get_json(node.url + "/ready"))[0] == 200

        await until(node_ready, READY_TIMEOUT_S, "the embedded engine comes up")
        _, _, listed = await get_json(node.url + "/v1/models")
        assert [m["context_length"] for m in listed["data"]] == [N_CTX_TRAIN]
        long = " ".join(f"Step {i}: think about the task, then write the code." for i in range(200))
        answer = await client_for(node).chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": long}], max_tokens=4
        )
        assert answer.usage is not None and answer.usage.prompt_tokens > 2300  # taken whole, not refused
        assert answer.choices[0].finish_reason in ("length", "stop")  # answered (sampled: it may end at once)
