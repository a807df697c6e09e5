"""Contracts 6 and 7: faults cost nothing that stays, and a slow reader costs bounded memory.

Everything runs in this process (nodes, engines, clients), so this process's
open file descriptors, asyncio tasks and RSS are the node's. A leak per faulty
request (a socket not closed, a task not ended, a buffer kept) shows as growth
over ~200 requests with every kind of fault mixed, on the local route and
across a peer; pools of idle keep-alive connections are filled by a warm-up
round of the same shape first, so what remains after is only what leaks.

A client that stops reading a stream must not make the nodes buffer what the
engine keeps producing: backpressure reaches the engine, whose output (counted
by a proxy in front of it) levels off; and once the client closes, the engine
sees the cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import psutil
import pytest

from quorum_node.node import Node
from tests.conftest import StartFake, StartNode
from tests.fakes.base import FakeEngine
from tests.reliability.conftest import MakeProxy
from tests.reliability.support import CLUSTER, MSGS, ask, wait_for_holders
from tests.support import eventually

ClientFor = Any
MiB = 1024 * 1024
#: Deadlines in the soak; and no background probes (they would add connections at random).
SOAK = {
    "holder_failures": 1000,  # the faults keep reaching the engines: ejecting them would end the soak's faults
    "first_token_timeout_s": 0.3,
    "request_timeout_s": 0.3,
    "idle_timeout_s": 0.2,
    "probe_interval_s": 30.0,
    "health_interval_s": 30.0,
}
ROUNDS = 4
FD_SLACK = 10
TASK_SLACK = 5
RSS_SLACK = 50 * MiB

#: One engine per behaviour, each holding a model of its own name (kind, knobs).
BEHAVIOURS: dict[str, tuple[str, dict[str, Any]]] = {
    "ok": ("openai", {}),
    "rst": ("openai", {"fail_after_tokens": 2, "fail_mode": "rst"}),
    "fin": ("openai", {"fail_after_tokens": 2, "fail_mode": "fin"}),
    "eof": ("openai", {"fail_after_tokens": 2, "fail_mode": "eof"}),
    "drop": ("openai", {"fail_after_tokens": 2, "fail_mode": "drop"}),
    "error": ("vllm", {"fail_after_tokens": 2, "fail_mode": "error"}),
    "malformed": ("openai", {"fail_after_tokens": 1, "fail_mode": "malformed_json"}),
    "silent": ("openai", {"fail_after_tokens": 2, "fail_mode": "stall"}),
    "late": ("openai", {"first_token_delay_s": 5.0}),
    "unavailable": ("openai", {"status_always": 503}),
    "redirect": ("openai", {"redirect_status": 307}),
    "first_rst": ("openai", {"fail_after_tokens": 0, "fail_mode": "rst"}),
}
#: Served by an endless engine; the client reads one chunk, then hangs up.
ABANDONED = "abandoned"


def usage() -> tuple[int, int, int]:
    """(open fds, asyncio tasks, RSS bytes) of this process."""
    proc = psutil.Process()
    return proc.num_fds(), len(asyncio.all_tasks()), proc.memory_info().rss


@dataclass
class Soak:
    entry: Node
    nodes: list[Node]
    engines: list[FakeEngine]
    models: list[str]


async def soak_cluster(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> Soak:
    """Node A holds every behaviour as ``local-*``; each ``peer-*`` is held by a peer of its own.

    One peer per behaviour, because a breaker is per peer: a peer whose only model
    fails is ejected (after its first few failures) without taking the others along.
    """
    engines: list[FakeEngine] = []
    local: list[dict[str, str]] = []
    peers: list[Node] = []
    behaviours = {**BEHAVIOURS, ABANDONED: ("openai", {"endless": True, "token_delay_s": 0.005})}
    for name, (kind, knobs) in behaviours.items():
        for where in ("local", "peer"):
            eng = await fake(kind, models=[f"{where}-{name}"], **knobs)
            engines.append(eng)
            if where == "local":
                local.append({"kind": kind, "url": eng.url})
            else:
                peers.append(await start_node(backends=[{"kind": kind, "url": eng.url}], **CLUSTER, **SOAK))
    a = await start_node(backends=local, peers=[f"127.0.0.1:{p.peer_port}" for p in peers], **CLUSTER, **SOAK)
    for name, peer in zip(behaviours, peers, strict=True):
        await wait_for_holders(http, a, {peer.name}, model=f"peer-{name}")
    models = [f"{w}-{n}" for w in ("local", "peer") for n in behaviours]
    return Soak(a, [a, *peers], engines, models)


async def abandon(client: openai.AsyncOpenAI, model: str) -> None:
    """Open a stream, read its first chunk, hang up."""
    try:
        stream = await client.chat.completions.create(model=model, messages=MSGS, stream=True)
    except openai.APIError:
        return  # a machine too busy to start it in time: a fault like the others
    async for _ in stream:
        break
    await stream.close()


async def one_round(client: openai.AsyncOpenAI, models: list[str]) -> int:
    """Every model once streamed, then every model once whole (the endless one: abandoned, twice).

    One request per engine at a time: keep-alive pools then never need a second
    connection, so the warm-up round fills them exactly as far as any later round.
    Outcomes are not asserted here (a busy machine may time out the healthy ones
    too); that every request ends, and what it leaves behind, is what counts.
    """
    sent = 0
    for stream in (True, False):
        jobs = [abandon(client, m) if m.endswith(ABANDONED) else ask(client, model=m, stream=stream) for m in models]
        await asyncio.gather(*jobs)
        sent += len(jobs)
    return sent


async def settled(soak: Soak, http: aiohttp.ClientSession) -> bool:
    """Nothing in flight anywhere, and no client connection left on the entry node but ours."""
    for node in soak.nodes:
        async with http.get(node.url + "/health") as resp:
            health = await resp.json()
            if resp.status != 200 or health["in_flight"] != 0:
                return False
            if node is soak.entry and health["connections"] > 1:  # this /health request's own
                return False
    return all(e.active_streams == 0 for e in soak.engines)


@contextlib.asynccontextmanager
async def sdk(node: Node):
    """An SDK client of its own, closed at the end: its idle pool must not count as the node's."""
    client = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    try:
        yield client
    finally:
        await client.close()


@pytest.mark.timeout(30)
async def test_two_hundred_faulty_requests_leave_no_fds_tasks_or_memory_behind(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    soak = await soak_cluster(start_node, fake, http)
    async with sdk(soak.entry) as client:
        await one_round(client, soak.models)  # warm-up: fills every keep-alive pool a round uses
    await eventually(lambda: settled(soak, http), what="the warm-up settles")
    fds0, tasks0, rss0 = usage()
    reached = {e.models[0]: len(e.requests) for e in soak.engines}

    sent = 0
    async with sdk(soak.entry) as client:
        for _ in range(ROUNDS):
            sent += await one_round(client, soak.models)
    assert sent >= 200
    for eng in soak.engines:  # every fault really was met, at least on the local route, each round
        if eng.models[0].startswith("local-"):
            assert len(eng.requests) - reached[eng.models[0]] >= ROUNDS, eng.models[0]

    last: list[object] = []

    async def back_to_baseline() -> bool:
        if not await settled(soak, http):
            last[:] = ["not settled (requests in flight or client connections open)"]
            return False
        fds, tasks, _ = usage()
        last[:] = [f"fds {fds}, tasks {tasks}:", *(t.get_coro() for t in asyncio.all_tasks())]
        return fds <= fds0 + FD_SLACK and tasks <= tasks0 + TASK_SLACK

    try:
        await eventually(back_to_baseline, what=f"fds/tasks back within +{FD_SLACK}/+{TASK_SLACK} of {fds0}/{tasks0}")
    except BaseException:
        print("last seen:", *last, sep="\n  ")  # what stayed, in the failure's captured output
        raise
    rss = usage()[2]
    assert rss - rss0 < RSS_SLACK, f"RSS grew {(rss - rss0) / MiB:.1f} MiB over {sent} requests"
    async with sdk(soak.entry) as client:  # and the nodes still serve, both routes
        for model, stream in (("local-ok", True), ("peer-ok", True), ("local-ok", False), ("peer-ok", False)):
            asked = await ask(client, model=model, stream=stream)
            assert asked.error is None and asked.finish == "stop", (model, asked)


# -- the slow reader ---------------------------------------------------------------------------------------

#: Big events, so an engine that is not held back would produce hundreds of MiB per second.
BIG_TOKEN = "x" * 16384
#: The engine's output must level off below this (kernel socket buffers on each hop included).
ENGINE_OUTPUT_CAP = 48 * MiB
LEVEL_WINDOW_S = 0.5
LEVEL_GROWTH = 256 * 1024


async def levelled_off(counter: Any, timeout_s: float = 4.0) -> int:
    """Wait until ``counter()`` grows by less than ``LEVEL_GROWTH`` over ``LEVEL_WINDOW_S``; its value.

    Absence of progress has no event to await: this samples ``counter()`` once a window, for ``timeout_s``.
    """
    samples = [counter()]

    def grew_little() -> bool:
        samples.append(counter())
        return samples[-1] - samples[-2] < LEVEL_GROWTH

    await asyncio.sleep(LEVEL_WINDOW_S)  # the first window: ``eventually`` checks at once
    try:
        await eventually(
            grew_little,
            "the engine's output levels off",
            timeout_s=timeout_s - LEVEL_WINDOW_S,
            interval_s=LEVEL_WINDOW_S,
        )
    except AssertionError:
        pytest.fail(f"the engine's output never levelled off: {samples[-1] / MiB:.0f} MiB and growing")
    return samples[-1]


@contextlib.asynccontextmanager
async def non_reading_client(node: Node, body: dict[str, Any]):
    """A raw socket that sends a streamed request, then reads nothing (asyncio stops at its buffer limit)."""
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(head + data)
        await writer.drain()
        yield reader
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("route", ["local", "lan"])
async def test_a_client_that_stops_reading_costs_bounded_memory_and_hanging_up_cancels_the_engine(
    start_node: StartNode, fake: StartFake, proxy: MakeProxy, http: aiohttp.ClientSession, route: str
) -> None:
    eng = await fake("openai", models=["m"], endless=True, tokens=[BIG_TOKEN])
    tap = await proxy(eng.port)  # counts what the engine managed to send
    backend = {"kind": "openai", "url": tap.url}
    if route == "local":
        entry = await start_node(backends=[backend])
    else:
        b = await start_node(backends=[backend], **CLUSTER)
        entry = await start_node(peers=[f"127.0.0.1:{b.peer_port}"], **CLUSTER)
        await wait_for_holders(http, entry, {b.name})
    rss0 = usage()[2]
    async with non_reading_client(entry, {"model": "m", "messages": MSGS, "stream": True}):
        await asyncio.wait_for(eng.wait_until(lambda e: e.active_streams == 1), 3.0)
        sent = await levelled_off(lambda: tap.bytes_down)
        assert sent < ENGINE_OUTPUT_CAP, f"{sent / MiB:.0f} MiB left the engine for a client reading nothing"
        grown = usage()[2] - rss0
        assert grown < RSS_SLACK, f"RSS grew {grown / MiB:.0f} MiB while the client read nothing"
        assert eng.cancelled == 0
    await asyncio.wait_for(eng.wait_until(lambda e: e.cancelled == 1 and e.active_streams == 0), 3.0)
