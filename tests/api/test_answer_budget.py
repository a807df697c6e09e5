"""Whole (non-streamed) answers held in memory share one node-wide budget (``max_buffered_answers_bytes``).

Each answer is bounded on its own (64 MiB); together they are bounded too: an
answer is read from its engine (or peer) only while the node's budget has
room for it, and its bytes count until the client has it. A request that finds
no room gets a retryable 503 (``node_busy``) instead of growing the node's memory.
"""

from __future__ import annotations

import asyncio

import openai

from quorum_node.backends.budget import ByteBudget, Hold
from tests.conftest import StartFake, StartNode
from tests.faults import FaultProxy

MIB = 1024 * 1024
HI = [{"role": "user", "content": "hi"}]


def test_a_hold_takes_what_fits_and_gives_it_all_back_once() -> None:
    budget = ByteBudget(100)
    a, b = Hold(budget), Hold(budget)
    assert a.grow(60) and not b.grow(50) and b.grow(40)
    assert (budget.used, budget.peak, budget.refused) == (100, 100, 1)
    assert not a.grow(1)  # refused: nothing taken
    a.shrink_to(10)
    assert budget.used == 50 and b.grow(50)
    a.release()
    a.release()  # once
    b.release()
    assert (budget.used, a.size, b.size) == (0, 0, 0)


async def test_concurrent_large_answers_share_the_budget_and_the_rest_get_503(
    start_node: StartNode, fake: StartFake, client_for
) -> None:
    eng = await fake("openai", tokens=["x" * MIB])  # every answer: one MiB of text
    async with FaultProxy("127.0.0.1", eng.port) as proxy:
        node = await start_node(
            backends=[{"kind": "openai", "url": proxy.url}], max_buffered_answers_bytes=int(2.5 * MIB)
        )
        proxy.bandwidth_bps = 4 * MIB  # each answer takes a while to arrive: all six are read at once
        client = client_for(node)
        results = await asyncio.gather(
            *(client.chat.completions.create(model="gpt-4o-mini", messages=HI) for _ in range(6)),
            return_exceptions=True,
        )
        served = [r for r in results if not isinstance(r, BaseException)]
        busy = [r for r in results if isinstance(r, openai.APIStatusError) and r.status_code == 503]
        assert served and busy and len(served) + len(busy) == 6, results
        assert all(r.choices[0].message.content == "x" * MIB for r in served)
        assert all(e.code == "node_busy" and e.response.headers.get("Retry-After") for e in busy)
        budget = node.answer_budget
        assert budget.peak <= budget.limit and budget.refused >= len(busy)
        assert budget.used == 0  # every answer gave its bytes back

        proxy.bandwidth_bps = None  # one at a time: always room
        for _ in range(3):
            assert (await client.chat.completions.create(model="gpt-4o-mini", messages=HI)).choices
        assert budget.used == 0
