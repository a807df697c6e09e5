"""The Responses and Messages surfaces for a model that another node holds (the LAN route)."""

from __future__ import annotations

import anthropic
import openai
import pytest


async def test_responses_and_messages_for_a_peers_model(start_cluster, client_for) -> None:
    a, b = await start_cluster(["alpha"], ["beta"])
    client = client_for(a.node)
    raw = await client.responses.with_raw_response.create(model="beta", input="hi")
    assert (raw.headers["X-Quorum-Node"], raw.headers["X-Quorum-Route"]) == (b.name, "lan")
    first = raw.parse()
    assert first.output_text == "Hello, world!" and first.usage.output_tokens == 4
    # the conversation is kept by the node the client talked to
    async with client.responses.stream(model="beta", input="again", previous_response_id=first.id) as s:
        second = await s.get_final_response()
    assert second.output_text == "Hello, world!"
    assert [m["role"] for m in b.engine.requests[-1]["messages"]] == ["user", "assistant", "user"]
    assert not a.engine.requests

    claude = anthropic.AsyncAnthropic(base_url=a.node.url, api_key="unused", max_retries=0)
    try:
        raw_msg = await claude.messages.with_raw_response.create(
            model="beta", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        assert raw_msg.headers["X-Quorum-Route"] == "lan"
        assert (await raw_msg.parse()).content[0].text == "Hello, world!"
        async with claude.messages.stream(
            model="beta", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        ) as s:
            assert "".join([t async for t in s.text_stream]) == "Hello, world!"
        b.engine.fail_after_tokens, b.engine.fail_mode = 2, "drop"
        with pytest.raises(anthropic.APIError):
            async with claude.messages.stream(
                model="beta", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
            ) as s:
                async for _ in s.text_stream:
                    pass
        with pytest.raises(openai.APIError):
            async for _ in await client.responses.create(model="beta", input="hi", stream=True):
                pass
    finally:
        await claude.close()
