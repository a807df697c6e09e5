"""Contract 5: a failing peer is ejected by its breaker, and re-admitted once it recovers.

Peer B's engine starts answering 503. After a few requests node A stops
sending to B at all (B's engine sees no more attempts), while every client
gets 503 with Retry-After — the model still exists, so never a 404. Once B's
engine recovers, A tries B again by itself (the breaker half-opens after its
reset period, a few seconds) and requests succeed again, the next ones too.

This test waits out the breaker's real reset period (5 s, not a setting), so it
is the one test of the tier that runs past 5 s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import StartFake, StartNode
from tests.reliability.support import CLUSTER, HELLO, MODEL, ask, assert_api_error, wait_for_holders

ClientFor = Any
#: The breaker's reset period is 5 s; recovery must be seen within it plus this.
RECOVERY_MARGIN_S = 2.5


@pytest.mark.timeout(25)
async def test_a_failing_peer_is_ejected_then_readmitted_when_it_recovers(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng = await fake("openai", models=[MODEL])
    b = await start_node(backends=[{"kind": eng.kind, "url": eng.url}], **CLUSTER)
    a = await start_node(peers=[f"127.0.0.1:{b.peer_port}"], **CLUSTER)
    await wait_for_holders(http, a, {b.name})
    client = client_for(a)
    assert (await ask(client, stream=False)).text == HELLO

    eng.status_always = 503
    before = len(eng.requests)
    for i in range(5):
        assert_api_error(await ask(client, stream=i % 2 == 0), {503})
    ejected_at = time.monotonic()
    sent = len(eng.requests) - before
    assert 1 <= sent <= 4, f"{sent} of 5 requests reached the failing peer: it was never ejected"
    for i in range(5):  # ejected: nothing reaches B, and the model is unavailable, not unknown
        err = assert_api_error(await ask(client, stream=i % 2 == 0), {503})
        assert int(err.response.headers["Retry-After"]) <= 60
    assert len(eng.requests) == before + sent, "the node kept sending to an ejected peer"

    eng.status_always = None  # B recovers
    deadline = ejected_at + 5.0 + RECOVERY_MARGIN_S
    while True:
        asked = await ask(client, stream=False)
        if asked.error is None:
            break
        assert_api_error(asked, {503})  # while it waits: still 503, never 404
        assert time.monotonic() < deadline, "the recovered peer was not re-admitted in time"
        await asyncio.sleep(0.1)  # a client polling; the breaker's own clock decides
    assert (asked.text, asked.node) == (HELLO, b.name)
    for stream in (True, False, True):  # re-admitted for good, not for one probe
        again = await ask(client, stream=stream)
        assert again.error is None and again.text == HELLO, again
