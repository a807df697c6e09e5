"""When every holder of a model is busy, requests wait their turn: fair across keys, bounded, with a deadline.

One fake engine, and ``holder_concurrency = 1``: the node sends it one request at a time (an engine that
does not say how many it runs at once gets the setting's number), so every other request waits in the
node's admission queue (``quorum_node/admission.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest

from quorum_node.records import Record
from tests.support import eventually

MODEL = "m"
MSGS = [{"role": "user", "content": "hi"}]


async def busy_node(start_node: Any, fake: Any, *, delay_s: float = 0.05, **settings: Any) -> tuple[Any, Any]:
    eng = await fake("openai", models=[MODEL], first_token_delay_s=delay_s)
    node = await start_node(backends=[{"kind": "openai", "url": eng.url}], holder_concurrency=1, **settings)
    return node, eng


def sdk(node: Any, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url + "/v1", api_key=key or "unused", max_retries=0)


async def test_a_light_key_is_not_stuck_behind_a_heavy_keys_backlog(start_node, fake) -> None:
    node, _eng = await busy_node(start_node, fake)
    (_, heavy), (_, light) = node.keys.create("batch-job"), node.keys.create("chat-app")
    done: list[Record] = []
    node.records.add(lambda r: done.append(r) if r.operation == "chat" else None)
    async with sdk(node, heavy) as h, sdk(node, light) as lt:
        flood = [asyncio.create_task(h.chat.completions.create(model=MODEL, messages=MSGS)) for _ in range(10)]
        await eventually(lambda: node.admission.depth(MODEL) == 9, "the heavy key's backlog waits")
        chats = [asyncio.create_task(lt.chat.completions.create(model=MODEL, messages=MSGS)) for _ in range(2)]
        await asyncio.gather(*flood, *chats)
    order = [r.key_name for r in done]
    assert sorted(order) == ["batch-job"] * 10 + ["chat-app"] * 2
    # First come, first served would finish them 11th and 12th; taking turns, within the next few slots.
    assert [i for i, name in enumerate(order) if name == "chat-app"] <= [3, 5], order
    waited = [r.queue_ms for r in done if r.key_name == "chat-app"]
    assert all(w is not None and w > 0 for w in waited)  # the record says how long each waited
    async with aiohttp.ClientSession() as http, http.get(node.url + "/metrics") as resp:
        assert f'quorum_queue_wait_seconds_count{{model="{MODEL}"}} 11.0' in await resp.text()  # all but the first


async def test_a_full_queue_answers_429_with_retry_after(start_node, fake, http) -> None:
    node, _eng = await busy_node(start_node, fake, delay_s=1.0, queue_max=2)
    async with sdk(node) as client:
        running = [asyncio.create_task(client.chat.completions.create(model=MODEL, messages=MSGS)) for _ in range(3)]
        await eventually(lambda: node.admission.depth() == 2, "one runs, two wait")
        async with http.get(node.url + "/quorum/admin/fleet") as resp:  # the dashboard's view of this node
            assert (await resp.json())["self"]["load"]["waiting"] == 2
        async with http.get(node.url + "/metrics") as resp:
            assert "quorum_queue_waiting 2.0" in await resp.text()
        body = {"model": MODEL, "messages": MSGS}
        async with http.post(node.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["error"]["code"] == "queue_full"
        await asyncio.gather(*running)  # the three that were taken are all served


async def test_no_request_waits_past_its_deadline(start_node, fake) -> None:
    node, _eng = await busy_node(start_node, fake, delay_s=3.0, queue_timeout_s=0.3)
    async with sdk(node) as client:
        running = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=MSGS))
        await eventually(lambda: node.registry.backends and next(iter(node.registry.backends.values())).in_flight, "")
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model=MODEL, messages=MSGS)
        assert 0.3 <= time.monotonic() - t0 < 1.5
        assert refused.value.code == "queue_timeout" and int(refused.value.response.headers["Retry-After"]) >= 1
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running


async def test_a_client_that_leaves_while_waiting_frees_its_place_at_once(start_node, fake) -> None:
    node, eng = await busy_node(start_node, fake, delay_s=0.5)
    async with aiohttp.ClientSession() as http, sdk(node) as client:
        running = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=MSGS))
        await eventually(lambda: len(eng.requests) == 1, "the first request runs")
        body = {"model": MODEL, "messages": MSGS}
        waiting = asyncio.create_task(http.post(node.url + "/v1/chat/completions", json=body))
        await eventually(lambda: node.admission.depth(MODEL) == 1, "the second waits")
        waiting.cancel()  # the client goes away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await eventually(lambda: node.admission.depth(MODEL) == 0, "its place is freed", timeout_s=1.0)
        await running
    assert len(eng.requests) == 1  # the one that left never reached the engine
