"""A model served with other members' memory (issue 22): llama.cpp's RPC backend, through the peer link.

Three nodes of one cluster on loopback: ``a`` leads SmolLM2 across ``b`` and
``c``, which each lend an ``rpc-server`` (on their loopback, reached only through
a tunnel on the mutual-TLS peer link). The sharded engine is a holder like any
other: its answers, greedy, are the unsharded engine's word for word, through
any node of the cluster and the real openai SDK.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest

from quorum_node.embedded.supervisor import LlamaServerProcess
from quorum_node.node import Node
from quorum_node.records import Record
from tests.members_support import CLUSTER
from tests.relay.wan import TOKEN, RelayHandle, Tap
from tests.support import cli, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180, func_only=True)]

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
ENGINE = f"shard:{MODEL_ID}"
PROMPTS = [
    [{"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]
LEASE_S = 4.0


async def models_of(http: aiohttp.ClientSession, node: Node) -> dict[str, dict[str, Any]]:
    async with http.get(node.url + "/v1/models") as resp:
        assert resp.status == 200
        return {m["id"]: m for m in (await resp.json())["data"]}


def rpc_servers() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("/rpc-server"):
            out.append(p)
    return out


@pytest.fixture
async def trio(start_node: Any, http: aiohttp.ClientSession) -> AsyncIterator[tuple[Node, Node, Node]]:
    """``a`` (the leader, no engine of its own), ``b`` and ``c`` (they lend), all peers of one another."""
    nodes = [await start_node(shard_lease_s=LEASE_S, drain_timeout_s=20, **CLUSTER) for _ in range(3)]
    for n in nodes:
        assert n.cluster is not None
        for other in nodes:
            if other is not n:
                n.cluster.table.add_static(f"127.0.0.1:{other.peer_port}")

    def lenders_seen() -> bool:
        a = nodes[0]
        assert a.cluster is not None
        return len(a.cluster.lenders()) == 2

    await eventually(lenders_seen, "a sees two members with memory to lend", timeout_s=20)
    yield nodes[0], nodes[1], nodes[2]


async def greedy(client: openai.AsyncOpenAI, model: str, messages: list[dict[str, str]], *, stream: bool) -> str:
    kw: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": 24, "temperature": 0, "seed": 1}
    if not stream:
        answer = await client.chat.completions.create(**kw)
        return answer.choices[0].message.content or ""
    chunks = await client.chat.completions.create(**kw, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])


async def test_a_model_sharded_across_two_members_answers_as_the_whole_engine_does(
    trio: tuple[Node, Node, Node], llama_server: Path, model: Path, http: aiohttp.ClientSession, client_for: Any
) -> None:
    a, b, c = trio
    whole = LlamaServerProcess(llama_server, model)
    await whole.start()
    try:
        await whole.wait_ready(30)
        async with openai.AsyncOpenAI(base_url=whole.url + "/v1", api_key="unused", max_retries=0) as direct:
            expected = [await greedy(direct, MODEL_ID, p, stream=False) for p in PROMPTS]
    finally:
        await whole.stop()

    admin = ("--url", a.url, "--data-dir", a.settings.data_dir)
    rc, out, err = await cli("shard", MODEL_ID, "--across", "2", *admin)  # a name in its model cache
    assert rc == 0 and f"leading {ENGINE} across 2 members" in out, err
    records: list[Record] = []
    a.records.add(lambda r: records.append(r) if r.operation == "chat" else None)

    async def published() -> bool:
        return MODEL_ID in await models_of(http, b)

    await eventually(published, "every node lists the sharded model", timeout_s=120)
    listed = (await models_of(http, b))[MODEL_ID]
    holder = next(h for h in listed["holders"] if h["engine"] == ENGINE)
    assert holder["node"] == a.name and sorted(holder["helpers"]) == sorted([b.name, c.name])
    rc, out, err = await cli("shard", "--list", *admin)
    assert rc == 0 and ENGINE in out and " up " in out and f"{b.name} " in out and f"{c.name} " in out, out + err
    rc, out, err = await cli("models", "--url", b.url)
    assert rc == 0 and f"{a.name} across " in out, out + err
    async with http.get(c.url + "/quorum/admin/fleet") as resp:  # what the dashboard shows
        fleet = await resp.json()
    (entry,) = [m for m in fleet["models"] if m["id"] == MODEL_ID]
    assert entry["holders"] == [a.name] and entry["sharded"] == {a.name: sorted([b.name, c.name])}
    assert a.sharding is not None
    (shard,) = a.sharding.shards.values()

    for node in (a, b, c):  # the leader, and a helper whose own request goes round through the leader
        client = client_for(node)
        for prompt, want in zip(PROMPTS, expected, strict=True):
            assert await greedy(client, MODEL_ID, prompt, stream=False) == want
            assert await greedy(client, MODEL_ID, prompt, stream=True) == want
    # Every layer went through the tunnels: the helpers hold the model, the leader none of it
    assert all(h["bytes_sent"] > 10_000_000 for h in shard.status()["helpers"])
    # The records of the requests it served say whose memory held the layers
    assert records and all(sorted(r.helpers) == sorted([b.name, c.name]) for r in records if r.peer is None)


async def test_a_helper_that_dies_mid_stream_ends_the_stream_with_an_error_and_the_shard_comes_back(
    trio: tuple[Node, Node, Node], model: Path, http: aiohttp.ClientSession, client_for: Any
) -> None:
    a, b, c = trio
    assert a.sharding is not None and c.lending is not None
    shard = a.sharding.lead(model, 2)
    await eventually(lambda: shard.state == "up", "the shard is up", timeout_s=120)
    builds = shard.builds
    client = client_for(a)
    stream = await client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}],
        max_tokens=400,
        stream=True,
    )
    got = 0
    with pytest.raises(openai.APIError):
        async for _chunk in stream:
            got += 1
            if got == 3:  # a helper's machine goes away mid-answer
                (loan,) = c.lending.loans()
                os.kill(int(loan["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    assert got >= 3

    async def back() -> bool:
        return shard.state == "up" and shard.builds > builds

    await eventually(back, "the shard is built again", timeout_s=120)

    async def listed_again() -> bool:
        return MODEL_ID in await models_of(http, b)

    await eventually(listed_again, "the rebuilt shard is published again", timeout_s=10)
    assert await greedy(client_for(b), MODEL_ID, PROMPTS[0], stream=False)


async def test_a_helper_that_stops_lets_the_answers_under_way_finish_first(
    trio: tuple[Node, Node, Node], model: Path, client_for: Any
) -> None:
    a, b, c = trio
    assert a.sharding is not None
    shard = a.sharding.lead(model, 2)
    await eventually(lambda: shard.state == "up", "the shard is up", timeout_s=120)
    stream = await client_for(a).chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}],
        max_tokens=150,
        stream=True,
    )
    stopping: asyncio.Task[None] | None = None
    parts: list[str] = []
    async for chunk in stream:  # no error: the answer ends as it should
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if len(parts) == 3 and stopping is None:
            stopping = asyncio.create_task(c.stop())  # c leaves gracefully in the middle of the answer
        if chunk.choices and chunk.choices[0].finish_reason:
            assert chunk.choices[0].finish_reason == "length"
    assert stopping is not None and len(parts) > 100
    await stopping

    async def without_c() -> bool:
        return shard.state == "up" and [h["node"] for h in shard.status()["helpers"]] == [b.name]

    await eventually(without_c, "built again over the member that stays", timeout_s=60)
    assert await greedy(client_for(a), MODEL_ID, PROMPTS[0], stream=False)


async def test_a_leader_that_stops_releases_its_helpers_workers(trio: tuple[Node, Node, Node], model: Path) -> None:
    a, b, c = trio
    assert a.sharding is not None and b.lending is not None and c.lending is not None
    shard = a.sharding.lead(model, 2)
    await eventually(lambda: shard.state == "up", "the shard is up", timeout_s=120)
    pids = [int(w["pid"]) for n in (b, c) for w in n.lending.loans()]  # type: ignore[union-attr]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    await a.sharding.drop(shard.id)
    assert len(b.lending) == len(c.lending) == 0  # released at once, not at the lease's end
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


async def test_a_leader_that_vanishes_leaves_no_worker_behind(trio: tuple[Node, Node, Node], model: Path) -> None:
    a, b, _c = trio
    assert a.sharding is not None and b.lending is not None
    shard = a.sharding.lead(model, 2)
    await eventually(lambda: shard.state == "up", "the shard is up", timeout_s=120)
    (loan,) = b.lending.loans()
    pid = int(loan["pid"])  # type: ignore[call-overload]
    # The leader goes silent as a killed one would: no renewal, no release (its task is gone, its engine too)
    task = shard._task
    assert task is not None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert shard.engine is not None
    await shard.engine.stop()
    await eventually(lambda: len(b.lending) == 0, "the lease runs out", timeout_s=LEASE_S + 3)
    await eventually(lambda: not psutil.pid_exists(pid), "its rpc-server is gone", timeout_s=5)


async def test_a_first_build_waits_for_as_many_helpers_as_asked(trio: tuple[Node, Node, Node], model: Path) -> None:
    a, b, _c = trio
    assert a.sharding is not None and b.lending is not None
    shard = a.sharding.lead(model, 3)  # two members can lend
    await eventually(lambda: shard.error is not None, "the build says why it waits", timeout_s=10)
    assert shard.state != "up" and "only 2 of the 3" in (shard.error or "")
    assert len(b.lending) == 0  # nothing leased meanwhile


async def test_helpers_reached_only_through_the_relay_serve_and_the_relays_wire_sees_no_prompt(
    start_node: Any, llama_server: Path, model: Path, client_for: Any
) -> None:
    """No LAN between them: the lends, the leases and the tunnels go through the relay, in the Noise
    sessions of the members (a tap on the relay's wire sees neither the prompt nor the answer)."""
    whole = LlamaServerProcess(llama_server, model)
    await whole.start()
    try:
        await whole.wait_ready(30)
        async with openai.AsyncOpenAI(base_url=whole.url + "/v1", api_key="unused", max_retries=0) as direct:
            expected = await greedy(direct, MODEL_ID, PROMPTS[1], stream=False)
    finally:
        await whole.stop()
    relay = RelayHandle()
    await relay.start()
    tap = Tap(relay.port)
    await tap.start()
    nodes: list[Node] = []
    try:
        for _ in range(3):
            url = f"ws://127.0.0.1:{tap.port}"
            nodes.append(await start_node(relay=url, relay_token=TOKEN, shard_lease_s=LEASE_S, **CLUSTER))
        a, b, c = nodes
        assert a.cluster is not None and a.sharding is not None

        def through_the_relay() -> bool:
            assert a.cluster is not None
            lenders = a.cluster.lenders()
            return len(lenders) == 2 and all(lender.route == "relay" for lender in lenders)

        await eventually(through_the_relay, "a sees two lenders, through the relay only", timeout_s=20)
        shard = a.sharding.lead(model, 2)
        await eventually(lambda: shard.state == "up", "the shard is up", timeout_s=120)
        assert sorted(h["node"] for h in shard.status()["helpers"]) == sorted([b.name, c.name])
        assert all(h["bytes_sent"] > 10_000_000 for h in shard.status()["helpers"])
        got = [await greedy(client_for(a), MODEL_ID, PROMPTS[1], stream=s) for s in (False, True)]
        assert got == [expected, expected]
        for secret in (PROMPTS[1][0]["content"], expected):
            assert secret.encode() not in tap.seen, f"{secret!r} crossed the relay in the clear"
        assert len(tap.seen) > 20_000_000  # the weights went that way: the tap saw the traffic, sealed
    finally:
        for n in reversed(nodes):
            await n.stop()
        await tap.close()
        await relay.stop()
