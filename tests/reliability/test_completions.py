"""Contracts 1 and 2 on the legacy ``/v1/completions`` route, locally and across a peer.

Same failure contract as chat: a holder failing before the first byte is
replaced by the next one without the client noticing; a stream cut after it
ends with an error event and no ``[DONE]``.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.reliability.support import GOOD_TEXT, HELLO, MODEL, Builder, ask, post_raw

ClientFor = Any


@pytest.mark.parametrize("route", ["local2", "lan2"])
async def test_completions_keep_the_failure_contract(
    build: Builder, client_for: ClientFor, http: aiohttp.ClientSession, route: str
) -> None:
    h = await build.build(route)
    assert h.good_node is not None
    client = client_for(h.entry)
    warm = await ask(client, op="completions", stream=False)
    assert (warm.error, warm.text) == (None, HELLO), warm  # the bad holder is the one tried first

    h.bad.status_always = 503  # before the first byte: invisible
    for stream in (True, False):
        asked = await ask(client, op="completions", stream=stream)
        assert asked.error is None, asked.error
        assert (asked.text, asked.finish, asked.node) == (GOOD_TEXT, "stop", h.good_node.name), asked

    h.bad.status_always = None
    h.bad.fail_after_tokens, h.bad.fail_mode = 2, "rst"  # after it: an error, never a clean end
    asked = await ask(client, op="completions", stream=True)
    assert isinstance(asked.error, openai.APIError) and not isinstance(asked.error, openai.APIStatusError), asked
    assert asked.text and HELLO.startswith(asked.text) and asked.text != HELLO, asked
    raw = await post_raw(http, h.entry, {"model": MODEL, "prompt": "hi", "stream": True}, path="/v1/completions")
    raw.assert_ends_with_error_event()
