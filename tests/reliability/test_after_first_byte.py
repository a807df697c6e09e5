"""Contract 2: a stream cut after its first byte ends with an error event, never a clean end.

The engine (or the LAN link to the peer serving it) fails after a few content
chunks: RST, FIN, a body that ends early, an aborted connection, an in-band
error (vLLM's, followed by its ``[DONE]``), a malformed event, silence past
``idle_timeout_s``; on the LAN also an RST, a FIN or silence on the link
itself. The client must see a failure: the SDK raises while iterating, and on
the wire the body's last event is ``data: {"error": ...}`` with no
``data: [DONE]``. Nothing is retried (a second holder stands ready and gets
nothing: a retry would repeat text the client already has), and the nodes are
healthy afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest

from tests.reliability.support import (
    GOOD_TEXT,
    MODEL,
    Builder,
    Holders,
    ask,
    assert_healthy,
    chat_body,
    post_raw,
)

ClientFor = Any  # the `client_for` fixture
TOKENS = [f"w{i} " for i in range(12)]
FULL = "".join(TOKENS)
AFTER = 2  # content chunks that reach the client before the fault
IDLE_S = 0.5


def mid(mode: str) -> dict[str, Any]:
    return {"fail_after_tokens": AFTER, "fail_mode": mode}


@dataclass(frozen=True)
class Fault:
    name: str
    engine: dict[str, Any] = field(default_factory=dict)  # the bad engine's knobs
    kind: str = "openai"  # the bad engine's kind
    start: dict[str, Any] = field(default_factory=dict)  # more knobs for the bad engine, from its start
    link: str | None = None  # "rst" | "fin" | "silent": on the proxy before the bad peer
    slow: bool = False  # the engine streams slowly, so a fault switched on mid-stream lands mid-stream

    def __str__(self) -> str:
        return self.name


FAULTS = [
    Fault("rst", mid("rst")),
    Fault("fin", mid("fin")),
    Fault("eof", mid("eof")),
    Fault("drop", mid("drop")),
    Fault("error_event", mid("error")),
    Fault("vllm_error_event_then_done", mid("error"), kind="vllm"),
    Fault("llamacpp_error_event", mid("error"), kind="llamacpp"),
    # loaded: a node prefers an engine that has the model in memory over a cold one
    Fault("ollama_fin", mid("fin"), kind="ollama", start={"loaded_models": [MODEL]}),
    Fault("tgi_eof", mid("eof"), kind="tgi"),
    Fault("malformed_json", mid("malformed_json")),
    Fault("malformed_shape", mid("malformed_shape")),
    Fault("silence_past_idle_timeout", mid("stall")),
    Fault("link_rst", link="rst", slow=True),
    Fault("link_fin", link="fin", slow=True),
    Fault("link_silent", link="silent", slow=True),
]
CASES = [pytest.param(r, f, id=f"{r}-{f}") for f in FAULTS for r in ("local2", "lan2") if f.link is None or r == "lan2"]


async def arm(fault: Fault, h: Holders) -> Callable[[], None] | None:
    """Switch the fault on; returns what to call once the first chunk is in (or None).

    A link fault strikes at the first bytes the link passes on after the client has its first chunk (the
    engine streams slowly, so that is mid-stream): counting bytes from the start of a connection would
    need to know the size of its TLS handshake."""
    for name, value in fault.engine.items():
        setattr(h.bad, name, value)
    link = h.bad_link
    if fault.link is None:
        return None
    assert link is not None
    knob = {"silent": "stall", "rst": "reset_after_bytes", "fin": "close_after_bytes"}[fault.link]

    def strike() -> None:
        setattr(link, knob, True if knob == "stall" else 0)

    return strike


def disarm(fault: Fault, h: Holders) -> None:
    h.bad.fail_after_tokens = None
    if h.bad_link is not None:
        h.bad_link.reset_after_bytes = h.bad_link.close_after_bytes = None
        h.bad_link.stall = False


@pytest.mark.parametrize(("route", "fault"), CASES)
async def test_a_stream_cut_after_the_first_byte_ends_with_an_error_event(
    build: Builder, client_for: ClientFor, http: aiohttp.ClientSession, route: str, fault: Fault
) -> None:
    knobs: dict[str, Any] = {"tokens": list(TOKENS), "token_delay_s": 0.05 if fault.slow else 0.0, **fault.start}
    h = await build.build(route, bad_kind=fault.kind, bad_knobs=knobs, idle_timeout_s=IDLE_S)
    assert h.good is not None
    client = client_for(h.entry)
    warm = await ask(client, stream=True)  # the bad holder serves it whole: it is the one tried first
    assert warm.error is None and (warm.text, warm.finish) == (FULL, "stop"), warm
    on_first = await arm(fault, h)

    # the SDK raises while iterating, after the chunks that came before the fault
    asked = await ask(client, stream=True, on_first=on_first)
    assert isinstance(asked.error, openai.APIError), f"the stream ended without an error: {asked}"
    assert not isinstance(asked.error, openai.APIStatusError), "the fault struck before the first byte"
    assert asked.content_chunks >= 1 and FULL.startswith(asked.text) and asked.text != FULL, asked
    assert asked.finish is None, asked

    # on the wire: the last event is the error, and there is no [DONE]
    if h.bad_link is not None:  # the link passes everything again until the next first chunk strikes it
        h.bad_link.stall = False
        h.bad_link.reset_after_bytes = h.bad_link.close_after_bytes = None
    raw = await post_raw(http, h.entry, chat_body(stream=True), on_first=on_first)
    raw.assert_ends_with_error_event()
    assert raw.headers.get("X-Quorum-Node") == h.bad_node.name

    assert h.good.requests == [], "a stream that had begun was retried on another holder"
    disarm(fault, h)
    await assert_healthy(http, client, h, texts={FULL, GOOD_TEXT})
