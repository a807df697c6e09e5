"""A peer's holders count in the admission queue: its health answer says how busy they are and how much they take.

Node a holds nothing; node b has one engine, which runs one request at a time (``holder_concurrency = 1``).
Requests entering at a wait their turn (at a, which knows b's engine is busy from b's health answers, or at
b, which knows best) instead of piling onto the engine or failing: every one is served, one at a time.
"""

from __future__ import annotations

import asyncio

from tests.members_support import CLUSTER, model_holders
from tests.support import eventually

MODEL = "m"


async def test_requests_for_a_busy_peers_model_wait_their_turn(start_node, fake, client_for, http) -> None:
    eng = await fake("openai", models=[MODEL], token_delay_s=0.05, tokens=["a ", "b ", "c ", "d "])
    b = await start_node(backends=[{"kind": "openai", "url": eng.url}], holder_concurrency=1, **CLUSTER)
    a = await start_node(**CLUSTER)
    assert a.cluster is not None and b.cluster is not None
    a.cluster.table.add_static(f"127.0.0.1:{b.peer_port}")
    b.cluster.table.add_static(f"127.0.0.1:{a.peer_port}")

    async def converged() -> bool:
        return await model_holders(http, a) == {MODEL: ["node0"]}

    await eventually(converged, "a sees b's model")

    async def b_says_its_capacity() -> bool:
        peer = a.cluster.table.get(b.cluster.node_id)
        return peer is not None and peer.load is not None and peer.load.engines[0].capacity == 1

    await eventually(b_says_its_capacity, "b's health answer says its engine runs one at a time")
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, eng.active_streams)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    client = client_for(a)

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        answers = await asyncio.gather(*(one(i) for i in range(6)))
    finally:
        watcher.cancel()
    assert answers == ["a b c d "] * 6  # every one served
    assert most == 1  # never more than the engine takes at once
