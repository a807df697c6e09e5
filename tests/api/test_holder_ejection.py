"""Outlier ejection of local holders: an engine that keeps failing a model is tried no more for a while.

Two engines of one node hold the same model; the first (tried first: it is listed first) answers every
stream with a malformed first event. Without ejection it is tried first every time, and once the retry
budget is spent the client gets its 502s. With it, it is ejected after ``holder_failures`` failures in a
row, every request is served by the healthy one, and it is let back in by a probe once it heals.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from quorum_node.records import Record
from tests.support import eventually

MODEL = "m"
MSGS = [{"role": "user", "content": "hi"}]


async def two_holders(start_node: Any, fake: Any, **settings: Any) -> tuple[Any, Any, Any, list[Record]]:
    broken = await fake("openai", models=[MODEL], fail_after_tokens=0, fail_mode="malformed_json")
    healthy = await fake("openai", models=[MODEL])
    node = await start_node(
        backends=[
            {"kind": "openai", "url": broken.url, "name": "broken"},
            {"kind": "openai", "url": healthy.url, "name": "healthy"},
        ],
        affinity=False,  # the first listed is tried first: the order these tests are about
        **settings,
    )
    records: list[Record] = []
    node.records.add(records.append)
    return node, broken, healthy, records


async def stream_text(client: openai.AsyncOpenAI) -> str:
    out = []
    async for chunk in await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            out.append(chunk.choices[0].delta.content)
    return "".join(out)


async def test_a_broken_holder_is_ejected_and_every_request_is_served(start_node, fake, client_for) -> None:
    node, broken, healthy, records = await two_holders(start_node, fake, holder_reset_s=60.0)
    client = client_for(node)
    for _ in range(12):
        assert await stream_text(client)  # 12 of 12 served
    assert len(broken.requests) == 3  # its three failures in a row, then never again while ejected
    assert len(healthy.requests) == 12
    assert [r.engine for r in records] == ["healthy"] * 12 and all(r.status == 200 for r in records)
    assert [r.attempts for r in records] == [2, 2, 2] + [1] * 9  # no attempt (no retry) spent on it after


async def test_an_ejected_holder_is_let_back_in_once_it_heals(start_node, fake, client_for) -> None:
    node, broken, _healthy, records = await two_holders(start_node, fake, holder_reset_s=0.3)
    client = client_for(node)
    for _ in range(4):
        assert await stream_text(client)
    assert len(broken.requests) == 3
    broken.fail_after_tokens = None  # it heals
    await asyncio.sleep(0.3)  # the ejection period under test: no request reaches it before it ends

    async def broken_serves_again() -> bool:
        assert await stream_text(client)
        return records[-1].engine == "broken"

    await eventually(broken_serves_again, "the healed holder is tried (a probe) and serves again", timeout_s=5.0)
    assert all(r.status == 200 for r in records)


async def test_a_lone_holder_that_is_ejected_answers_503_with_retry_after(start_node, fake, client_for) -> None:
    broken = await fake("openai", models=[MODEL], fail_after_tokens=0, fail_mode="malformed_json")
    node = await start_node(backends=[{"kind": "openai", "url": broken.url, "name": "broken"}], holder_reset_s=30.0)
    client = client_for(node)
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as failed:
            await stream_text(client)
        assert failed.value.status_code == 502
    with pytest.raises(openai.APIStatusError) as ejected:
        await stream_text(client)
    assert ejected.value.status_code == 503
    assert ejected.value.code == "holders_unavailable"
    assert 1 <= int(ejected.value.response.headers["Retry-After"]) <= 30
    assert len(broken.requests) == 3  # the fourth never reached it


async def test_a_request_the_engine_refuses_ejects_no_one(start_node, fake, client_for) -> None:
    """A 400 from the engine is the request's fault: the holder stays in, however many come."""
    eng = await fake("openai", models=[MODEL], status_always=400)
    node = await start_node(backends=[{"kind": "openai", "url": eng.url, "name": "picky"}], holder_reset_s=30.0)
    client = client_for(node)
    for _ in range(5):
        with pytest.raises(openai.BadRequestError):
            await stream_text(client)
    assert len(eng.requests) == 5  # never ejected
