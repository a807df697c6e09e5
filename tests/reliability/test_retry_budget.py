"""Contract 4: with every upstream failing, retries stay within their budget.

Three holders of a model all answer 503: three engines on one node (nothing
but the budget stops the node from trying each of them for every request), or
three peers (their breakers help too). ``R`` requests from the SDK, which does
not retry on its own here (``max_retries=0``), sequential or all at once: the
upstream attempts, counted where they land (the engines' request logs), stay
within ``1.2 R + 3``; and every client gets the documented 503 with
Retry-After, never a 404.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import StartFake, StartNode
from tests.fakes.base import FakeEngine
from tests.reliability.support import CLUSTER, MODEL, ask, assert_api_error, wait_for_holders

ClientFor = Any
R = 30
HOLDERS = 3


def budget(requests: int) -> float:
    return 1.2 * requests + 3


async def failing_engines(fake: StartFake) -> list[FakeEngine]:
    return [await fake("openai", models=[MODEL], status_always=503) for _ in range(HOLDERS)]


async def send(client: Any, *, concurrent: bool) -> None:
    """R requests, streamed and not in turn; each must fail with the documented 503."""

    async def one(i: int) -> None:
        assert_api_error(await ask(client, stream=i % 2 == 0), {503})

    if concurrent:
        await asyncio.gather(*(one(i) for i in range(R)))
    else:
        for i in range(R):
            await one(i)


@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
async def test_engines_all_failing_get_at_most_the_retry_budget(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, concurrent: bool
) -> None:
    engines = await failing_engines(fake)
    # the budget alone: ejecting the failing engines (test_holder_ejection.py) would spare them even more
    node = await start_node(backends=[{"kind": e.kind, "url": e.url} for e in engines], holder_failures=1000)
    await send(client_for(node), concurrent=concurrent)
    attempts = sum(len(e.requests) for e in engines)
    assert R <= attempts <= budget(R), f"{attempts} upstream attempts for {R} requests"


@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
async def test_peers_all_failing_get_at_most_the_retry_budget(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession, concurrent: bool
) -> None:
    engines = await failing_engines(fake)
    peers = [await start_node(backends=[{"kind": e.kind, "url": e.url}], **CLUSTER) for e in engines]
    entry = await start_node(peers=[f"127.0.0.1:{p.peer_port}" for p in peers], **CLUSTER)
    await wait_for_holders(http, entry, {p.name for p in peers})
    await send(client_for(entry), concurrent=concurrent)
    attempts = sum(len(e.requests) for e in engines)  # each peer serves locally: one engine request each
    assert 1 <= attempts <= budget(R), f"{attempts} upstream attempts for {R} requests"
