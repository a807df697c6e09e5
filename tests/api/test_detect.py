"""Auto-detection: engines on this machine are found by their signatures, come and go.

Each fake engine sits on a real port of 127.0.0.1; the node probes exactly
that port (``detect_ports``) every ``probe_interval_s`` (0.2 s in tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from quorum_node.api.server import close_runner
from quorum_node.node import Node
from tests.fakes.engines import KINDS, FakeEngine
from tests.support import eventually

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]
ClientFor = Callable[..., openai.AsyncOpenAI]

DETECTABLE = tuple(k for k in KINDS if k != "openai")  # "openai" is generic: configure it
CHAT_MODEL = {
    "ollama": "llama3.2:latest",
    "llamacpp": "SmolLM2-135M-Instruct.Q4_1",
    "vllm": "meta-llama/Llama-3.1-8B-Instruct",
    "sglang": "meta-llama/Llama-3.1-8B-Instruct",
    "tgi": "meta-llama/Llama-3.1-8B-Instruct",
    "lmstudio": "qwen2.5-7b-instruct",
    "localai": "gpt-4",
    "mlx": "mlx-community/Qwen2.5-7B-Instruct-4bit",
}


async def engines_of(http: aiohttp.ClientSession, node: Node) -> list[dict[str, Any]]:
    async with http.get(node.url + "/ready") as r:
        return (await r.json())["engines"]


async def model_ids(client: openai.AsyncOpenAI) -> list[str]:
    return [m.id async for m in client.models.list()]


@pytest.fixture
async def imposter() -> AsyncIterator[Callable[[Callable[[web.Request], Any]], Awaitable[int]]]:
    """Start a plain HTTP server (not an engine) with one catch-all handler; returns its port."""
    runners: list[web.AppRunner] = []

    async def _start(handler: Callable[[web.Request], Any]) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    yield _start
    for r in runners:
        await close_runner(r)


@pytest.mark.parametrize("kind", DETECTABLE)
async def test_each_engine_is_found_by_its_signature(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession, kind: str
) -> None:
    eng = await fake(kind)
    node = await start_node(detect=True, detect_ports=[eng.port])
    # Found during start-up: the first refresh runs before the node answers.
    engines = await engines_of(http, node)
    assert [(e["kind"], e["state"]) for e in engines] == [(kind, "ready")]
    client = client_for(node)
    assert CHAT_MODEL[kind] in await model_ids(client)
    done = await client.chat.completions.create(model=CHAT_MODEL[kind], messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content == "Hello, world!"
    assert len(eng.requests) == 1


async def test_generic_openai_server_is_not_claimed_as_an_engine(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng = await fake("openai")
    node = await start_node(detect=True, detect_ports=[eng.port])
    assert await engines_of(http, node) == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"status": "ok", "version": "1.0", "object": "list", "data": []}',
    ],
)
async def test_server_answering_200_to_anything_is_not_taken_for_an_engine(
    start_node: StartNode, imposter: Any, http: aiohttp.ClientSession, body: bytes
) -> None:
    async def anything(request: web.Request) -> web.Response:
        # 200 to every path, as LM Studio does: the shape that fools status-only probes.
        return web.Response(body=body, content_type="application/json")

    port = await imposter(anything)
    node = await start_node(detect=True, detect_ports=[port])
    assert await engines_of(http, node) == []


async def test_lmstudio_catch_all_is_lmstudio_not_anything_else(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    # LM Studio answers 200 {"error": "Unexpected endpoint"} to /props, /info, /api/version…
    eng = await fake("lmstudio")
    node = await start_node(detect=True, detect_ports=[eng.port])
    assert [e["kind"] for e in await engines_of(http, node)] == ["lmstudio"]


async def test_localai_imitating_ollama_is_localai(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng = await fake("localai")
    async with http.get(eng.url + "/api/tags") as r:  # the imitation is really there
        assert r.status == 200 and (await r.json())["models"]
    node = await start_node(detect=True, detect_ports=[eng.port])
    assert [e["kind"] for e in await engines_of(http, node)] == ["localai"]
    card = await client_for(node).models.retrieve("gpt-4")
    assert (card.model_extra or {})["engines"] == ["localai"]


async def test_engine_started_later_is_picked_up(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng = await fake("ollama")
    await eng.stop_listening()  # the port is reserved but refuses, as before an engine starts
    node = await start_node(detect=True, detect_ports=[eng.port])
    client = client_for(node)
    assert await model_ids(client) == []
    await eng.resume_listening()

    async def found() -> bool:
        return "llama3.2:latest" in await model_ids(client)

    # probe_interval_s is 0.2: well within a second
    await eventually(found, timeout_s=2.0, what="engine started later appears")
    done = await client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content == "Hello, world!"


async def test_engine_that_stops_disappears_with_its_models(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    stays = await fake("llamacpp")
    goes = await fake("vllm")
    node = await start_node(detect=True, detect_ports=[stays.port, goes.port])
    client = client_for(node)
    assert set(await model_ids(client)) == {"SmolLM2-135M-Instruct.Q4_1", "meta-llama/Llama-3.1-8B-Instruct"}
    await goes.stop_listening()

    async def gone() -> bool:
        return await model_ids(client) == ["SmolLM2-135M-Instruct.Q4_1"]

    await eventually(gone, timeout_s=2.0, what="stopped engine's models disappear")
    assert [e["kind"] for e in await engines_of(http, node)] == ["llamacpp"]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="meta-llama/Llama-3.1-8B-Instruct", messages=[{"role": "user", "content": "hi"}]
        )
    await goes.resume_listening()  # and it comes back when the engine does

    async def back() -> bool:
        return "meta-llama/Llama-3.1-8B-Instruct" in await model_ids(client)

    await eventually(back, timeout_s=2.0, what="restarted engine reappears")


async def test_configured_engine_is_not_probed_twice(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng = await fake("sglang")
    node = await start_node(detect=True, detect_ports=[eng.port], backends=[{"kind": "sglang", "url": eng.url}])
    assert [e["kind"] for e in await engines_of(http, node)] == ["sglang"]


async def test_an_engine_slow_to_answer_as_the_node_starts_is_still_found(
    start_node: StartNode, fake: StartFake
) -> None:
    from tests.faults import FaultProxy

    eng = await fake("llamacpp")
    async with FaultProxy("127.0.0.1", eng.port) as proxy:
        proxy.latency_s = 0.35  # each answer ~0.7 s: past a probe's 0.6 s here, as on a machine busy at boot
        node = await start_node(detect=True, detect_ports=[proxy.port])
        proxy.latency_s = 0.0
        assert [b.kind for b in node.registry.backends.values()] == ["llamacpp"]


async def test_a_web_app_on_a_default_port_is_asked_again_rarely_not_every_round(
    start_node: StartNode, imposter: Any, http: aiohttp.ClientSession
) -> None:
    """Issue 23: Open WebUI on 8080 got six requests every 2 s, forever, filling its access log."""
    seen: list[str] = []

    async def web_app(request: web.Request) -> web.Response:  # a single-page app: HTML for every path
        seen.append(request.path)
        return web.Response(text="<!doctype html><title>Open WebUI</title>", content_type="text/html")

    port = await imposter(web_app)
    node = await start_node(detect=True, detect_ports=[port], probe_interval_s=0.05)
    await eventually(lambda: len(seen) > 0, "the first identification")
    first = len(seen)
    assert 0 < first <= 10  # one identification: a handful of requests
    for _ in range(20):  # twenty detection rounds (each refresh probes the default ports)
        await node.registry.refresh_once()
    assert len(seen) == first, seen[first:]  # not asked again: the next time is a minute away, then rarer
    assert await engines_of(http, node) == []
