"""Stopping in order, and signed requests that cannot be replayed (issue 7, items 7 and 8)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from quorum_node.node import Node
from tests.conftest import eventually
from tests.fakes.engines import FakeEngine

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]

CLUSTER = {"cluster": "life", "cluster_secret": "k" * 32}
MODEL = "gpt-4o-mini"
MSGS = [{"role": "user", "content": "hi"}]


async def holds(http: aiohttp.ClientSession, node: Node, model: str) -> bool:
    async with http.get(node.url + "/v1/models") as resp:
        return model in {m["id"] for m in (await resp.json())["data"]}


async def pair(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession, **a_settings: Any):
    """Node A (no engine) in front of node B (the engine's node)."""
    eng = await fake("openai", tokens=[f"t{i} " for i in range(100)], token_delay_s=0.05)
    b = await start_node(backends=[{"kind": "openai", "url": eng.url}], **CLUSTER)
    a = await start_node(peers=[f"127.0.0.1:{b.peer_port}"], **CLUSTER, **a_settings)

    async def ready() -> bool:
        return await holds(http, a, MODEL)

    await eventually(ready, what="A sees B's model")
    return a, b, eng


async def test_stop_drains_streams_served_by_a_peer_and_cuts_the_rest_with_an_error(
    start_node, fake, http, client_for
) -> None:
    a, b, eng = await pair(start_node, fake, http, drain_timeout_s=1.5)
    client = client_for(a)
    started = asyncio.Event()
    begun = 0

    async def consume(max_tokens: int | None) -> tuple[str, str | None]:
        nonlocal begun
        kw = {"max_tokens": max_tokens} if max_tokens else {}
        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True, **kw)
        text, finish = "", None
        first = True
        async for chunk in stream:
            if first:
                first = False
                begun += 1
                if begun == 5:
                    started.set()
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    # three streams that end within the drain deadline (~0.3 s), two that would take 5 s
    tasks = [asyncio.create_task(consume(n)) for n in (6, 6, 6, None, None)]
    async with asyncio.timeout(10):
        await started.wait()
    t0 = time.monotonic()
    await a.stop()  # what SIGTERM does
    took = time.monotonic() - t0
    results = await asyncio.gather(*tasks, return_exceptions=True)

    for text, finish in results[:3]:  # completed through the peer, not cut when A began to stop
        assert finish == "length" and text.split() == [f"t{i}" for i in range(6)]
    for err in results[3:]:  # cut at the deadline with an error event: the SDK raises, nothing silently truncated
        assert isinstance(err, openai.APIError), err
        assert "shutting down" in str(err)
    assert 1.5 <= took < 1.5 + 1.5
    await eng.wait_until(lambda e: e.cancelled == 2)  # only the cut streams were cancelled on B's engine


async def test_stop_without_streams_is_prompt_and_idle_connections_do_not_hold_it(start_node, fake, http) -> None:
    eng = await fake("openai")
    node = await start_node(backends=[{"kind": "openai", "url": eng.url}], drain_timeout_s=5)
    async with http.get(node.url + "/health") as resp:  # leaves an idle keep-alive connection behind
        assert resp.status == 200
    t0 = time.monotonic()
    await node.stop()
    assert time.monotonic() - t0 < 1.0


async def test_a_non_streamed_request_cut_by_the_drain_gets_a_503(start_node, fake, client_for) -> None:
    eng = await fake("openai", tokens=["x"] * 100, token_delay_s=0.05)  # 5 s to answer
    node = await start_node(backends=[{"kind": "openai", "url": eng.url}], drain_timeout_s=0.3)
    task = asyncio.create_task(client_for(node).chat.completions.create(model=MODEL, messages=MSGS))
    await eng.wait_until(lambda e: len(e.requests) == 1)
    await node.stop()
    with pytest.raises(openai.APIStatusError) as err:
        await task
    assert err.value.status_code == 503 and err.value.code == "node_stopping"


# -- replay ------------------------------------------------------------------------


async def test_a_captured_peer_request_cannot_be_replayed_elsewhere_or_after_a_restart(
    start_node, fake, http, tmp_path
) -> None:
    eng_b = await fake("openai")
    eng_c = await fake("openai")
    b = await start_node(backends=[{"kind": "openai", "url": eng_b.url}], **CLUSTER)
    c = await start_node(backends=[{"kind": "openai", "url": eng_c.url}], **CLUSTER)
    a = await start_node(**CLUSTER)
    assert a.cluster is not None and b.cluster is not None
    path = "/v1/chat/completions"
    data = json.dumps({"model": MODEL, "messages": MSGS}).encode()
    # exactly what A puts on the wire when it forwards to B
    captured = a.cluster.signed_headers("POST", path, data, to=b.cluster.node_id, hop="1", origin=a.cluster.node_id)
    captured["Content-Type"] = "application/json"

    async def send(node: Node, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async with http.post(node.url + path, data=data, headers=headers) as resp:
            return resp.status, await resp.json()

    status, body = await send(c, captured)  # another member of the cluster: refused
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert not eng_c.requests
    status, _ = await send(b, dict(captured, **{"X-Quorum-Hop": "0"}))  # hop headers are signed
    assert status == 401
    status, _ = await send(b, captured)  # the real destination serves it once
    assert status == 200 and len(eng_b.requests) == 1
    status, _ = await send(b, captured)  # ...and only once
    assert status == 401

    fresh = a.cluster.signed_headers("POST", path, data, to=b.cluster.node_id, hop="1", origin=a.cluster.node_id)
    fresh["Content-Type"] = "application/json"
    await asyncio.sleep(0.01)  # the restarted node starts strictly after the signature
    data_dir = b.settings.data_dir
    await b.stop()
    b2 = await start_node(backends=[{"kind": "openai", "url": eng_b.url}], data_dir=data_dir, **CLUSTER)
    assert b2.cluster is not None and b2.cluster.node_id == b.cluster.node_id
    status, _ = await send(b2, fresh)  # unused before the restart, still inside the 30 s window: refused
    assert status == 401
    assert len(eng_b.requests) == 1


async def test_a_signed_body_cannot_be_swapped(start_node, fake, http) -> None:
    eng = await fake("openai")
    b = await start_node(backends=[{"kind": "openai", "url": eng.url}], **CLUSTER)
    a = await start_node(**CLUSTER)
    assert a.cluster is not None and b.cluster is not None
    path = "/v1/chat/completions"
    signed = json.dumps({"model": MODEL, "messages": MSGS}).encode()
    other = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "something else"}]}).encode()
    headers = a.cluster.signed_headers("POST", path, signed, to=b.cluster.node_id, hop="1", origin=a.cluster.node_id)
    async with http.post(b.url + path, data=other, headers=headers) as resp:
        assert resp.status == 401
    assert not eng.requests
