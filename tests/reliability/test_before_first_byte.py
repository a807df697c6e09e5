"""Contract 1: a fault before the first byte is retried on another holder, invisibly.

Every fault an engine or a LAN link can show before a request's first byte —
refused connections, 5xx answers, a 200 that then says nothing, a malformed
first event or answer, a redirect, an RST or FIN before the first chunk — is
run against the first holder a node tries. With a second holder the client
(the openai SDK) gets that holder's whole answer, streamed or not; with only
one it gets the documented error: 503 with Retry-After when the holder is
unavailable, 502 when it answered nonsense, 504 when it answered nothing in
time, each in the OpenAI error shape.

Routes (see `support`): ``local2`` (two engines on one node), ``local+peer``
(a local engine, then a peer), ``lan2`` (two peers); ``local`` and ``lan`` for
the one-holder answers. A warm-up request served by the bad holder proves it
is the one tried first before its fault is switched on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from tests.reliability.support import (
    GOOD_TEXT,
    HELLO,
    ONE_HOLDER,
    TWO_HOLDERS,
    Builder,
    Holders,
    ask,
    assert_api_error,
    reset_link,
)

ClientFor = Any  # the `client_for` fixture
#: First-token and whole-answer deadlines on every node here: a silent holder costs 0.5 s.
DEADLINES = {"first_token_timeout_s": 0.5, "request_timeout_s": 0.5}
#: An engine's in-band error as its first event (LM Studio and llama.cpp do this).
ERROR_EVENT = '{"error": {"message": "CUDA error: out of memory", "type": "server_error", "code": 500}}'


@dataclass(frozen=True)
class Fault:
    name: str
    engine: dict[str, Any] = field(default_factory=dict)  # knobs of the bad holder's engine
    link: dict[str, Any] = field(default_factory=dict)  # knobs of the proxy in front of the bad peer
    refuse: str | None = None  # "engine": the engine's port refuses; "link": the peer's port refuses
    statuses: frozenset[int] = frozenset()  # what a client gets when the bad holder is the only one
    stream_only: bool = False
    whole_only: bool = False
    recorded: bool = True  # the bad engine records the request (so "it was tried" can be asserted)
    cut_mid_answer: str | None = None  # "rst" | "fin": the link cuts a whole answer halfway

    @property
    def lan_only(self) -> bool:
        return bool(self.link) or self.refuse == "link" or self.cut_mid_answer is not None

    def __str__(self) -> str:
        return self.name


def at_start(mode: str, **more: Any) -> dict[str, Any]:
    """The fake's fault ``mode`` struck right after the response head, before any event."""
    return {"fail_after_tokens": 0, "fail_mode": mode, **more}


FAULTS = [
    Fault("refused", refuse="engine", statuses=frozenset({503}), recorded=False),
    Fault("http_502", {"status_always": 502}, statuses=frozenset({502})),
    Fault("http_503", {"status_always": 503}, statuses=frozenset({503})),
    Fault("http_500", {"status_always": 500}, statuses=frozenset({500})),
    Fault("redirect_307", {"redirect_status": 307}, statuses=frozenset({502})),
    Fault("200_then_silence", at_start("stall"), statuses=frozenset({504})),
    Fault("malformed_json", at_start("malformed_json"), statuses=frozenset({502})),
    Fault("malformed_shape", at_start("malformed_shape"), statuses=frozenset({502})),
    Fault("rst_before_first_chunk", at_start("rst"), statuses=frozenset({502, 503})),
    Fault("fin_before_first_chunk", at_start("fin"), statuses=frozenset({502, 503})),
    Fault("eof_before_first_event", at_start("eof"), statuses=frozenset({502})),
    Fault(
        "error_as_first_event",
        at_start("malformed_json", malformed_payload=ERROR_EVENT),
        statuses=frozenset({500}),
        stream_only=True,
    ),
    # the LAN link between the entry node and the bad peer
    Fault("link_refused", refuse="link", statuses=frozenset({503}), recorded=False),
    # (on a fresh connection that is in the TLS handshake, before the request is sent: not recorded)
    Fault("link_rst_before_first_byte", link={"reset_after_bytes": 0}, statuses=frozenset({502, 503}), recorded=False),
    Fault("link_fin_before_first_byte", link={"close_after_bytes": 0}, statuses=frozenset({502, 503}), recorded=False),
    Fault("link_silent", link={"stall": True}, statuses=frozenset({504}), recorded=False),
    # a whole answer is not sent on until it is all in: a cut halfway through is still "before"
    Fault("link_rst_mid_answer", cut_mid_answer="rst", statuses=frozenset({502, 503}), whole_only=True),
    Fault("link_fin_mid_answer", cut_mid_answer="fin", statuses=frozenset({502, 503}), whole_only=True),
]


def cases(routes: tuple[str, ...]) -> list[Any]:
    """(route, fault) pairs that exist: link faults only where a LAN link leads to the bad holder."""
    lan_routes = {"lan", "lan2"}
    return [pytest.param(r, f, id=f"{r}-{f}") for f in FAULTS for r in routes if not f.lan_only or r in lan_routes]


async def inject(fault: Fault, h: Holders, answer_bytes: int) -> None:
    """Switch the fault on; ``answer_bytes``: the size of a whole answer on a fresh connection of the bad link."""
    for name, value in fault.engine.items():
        setattr(h.bad, name, value)
    if fault.cut_mid_answer is not None:
        assert h.bad_link is not None
        await reset_link(h.bad_link)  # cuts count bytes per connection: the next one starts at 0
        cut = answer_bytes - 16  # the head and most of the body go through; the end never does
        if fault.cut_mid_answer == "rst":
            h.bad_link.reset_after_bytes = cut
        else:
            h.bad_link.close_after_bytes = cut
    if fault.refuse == "engine":
        await h.bad.set_refuse(True)
    if fault.link or fault.refuse == "link":
        assert h.bad_link is not None
        if fault.refuse == "link":
            await h.bad_link.stop_listening()
            await reset_link(h.bad_link)  # pooled connections too: the port is gone
        for name, value in fault.link.items():
            setattr(h.bad_link, name, value)


async def setup(build: Builder, client_for: ClientFor, route: str, fault: Fault) -> tuple[Holders, openai.AsyncOpenAI]:
    """The route's holders with the fault on, after proof that the bad holder is the one tried first
    (it serves a warm-up, whose size on the bad link is measured)."""
    h = await build.build(route, **DEADLINES)
    client = client_for(h.entry)
    warm = await ask(client, stream=False)
    assert warm.error is None, warm.error
    assert warm.text == HELLO, f"the warm-up was not served by the holder under test: {warm.text!r}"
    answer_bytes = 0
    if h.bad_link is not None:  # what a whole answer costs on a fresh connection, its TLS handshake included
        await reset_link(h.bad_link)
        before = h.bad_link.bytes_down
        assert (await ask(client, stream=False)).text == HELLO
        answer_bytes = h.bad_link.bytes_down - before
    await inject(fault, h, answer_bytes)
    return h, client


def streams(fault: Fault) -> list[bool]:
    if fault.stream_only:
        return [True]
    return [False] if fault.whole_only else [True, False]


@pytest.mark.parametrize(("route", "fault"), cases(TWO_HOLDERS))
async def test_a_fault_before_the_first_byte_is_invisible_with_a_second_holder(
    build: Builder, client_for: ClientFor, route: str, fault: Fault
) -> None:
    h, client = await setup(build, client_for, route, fault)
    assert h.good_node is not None
    for stream in streams(fault):
        tried = len(h.bad.requests)
        asked = await ask(client, stream=stream)
        assert asked.error is None, f"stream={stream}: the client saw {asked.error!r}"
        assert (asked.text, asked.finish) == (GOOD_TEXT, "stop"), f"stream={stream}: {asked}"
        assert asked.node == h.good_node.name
        if fault.recorded:  # the bad holder really was tried first, and failed
            # (an engine that closes the connection unanswered is asked once more on a fresh one first: to
            # its node that looks like a kept-alive connection it had just closed, see ``upstream.send``)
            # (streamed: a head came.) A whole answer is one TLS record on the peer link: cut inside it, not a
            # byte of it can be read, so a FIN there looks the same as one before the answer.
            again = 1 if fault.name in ("fin_before_first_chunk", "link_fin_mid_answer") and not stream else 0
            assert len(h.bad.requests) == tried + 1 + again, f"stream={stream}: the bad holder was not tried"


@pytest.mark.parametrize(("route", "fault"), cases(ONE_HOLDER))
async def test_a_fault_before_the_first_byte_with_one_holder_is_the_documented_error(
    build: Builder, client_for: ClientFor, route: str, fault: Fault
) -> None:
    _h, client = await setup(build, client_for, route, fault)
    for stream in streams(fault):
        asked = await ask(client, stream=stream)
        assert asked.text == "", f"stream={stream}: {asked}"
        assert_api_error(asked, set(fault.statuses))
