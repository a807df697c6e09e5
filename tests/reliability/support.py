"""What the reliability tests share: asking through the SDK, reading raw SSE, building holders.

Every fault is run against real nodes on 127.0.0.1 with the real `openai` SDK as
the client, on two routes: *local* (node → engine) and *LAN* (node A → node B →
engine, A reaching B through a `FaultProxy` so the link itself can go bad).

`Builder.build(route)` sets up the holders of one model, ``MODEL``:

- ``local``: one node, one engine (the *bad* one: the test turns its faults on);
- ``local2``: one node, two engines, the bad one tried first;
- ``local+peer``: the bad engine on the entry node, a good one on a peer;
- ``lan``: an entry node without engines, one peer whose engine is the bad one;
- ``lan2``: as ``lan``, plus a second peer with a good engine, ranked second: the
  link to it adds latency, and the first peer's warm-up answer gives it a measured,
  low time to first token.

The good holder answers ``GOOD_TEXT``, the bad one (when healthy) ``HELLO``, so
the answer itself says who served it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai

from quorum_node.node import Node
from tests.conftest import StartFake, StartNode
from tests.fakes.base import FakeEngine
from tests.faults import FaultProxy
from tests.support import eventually

__all__ = [
    "CLUSTER",
    "GOOD_TEXT",
    "GOOD_TOKENS",
    "HELLO",
    "MODEL",
    "MSGS",
    "ONE_HOLDER",
    "TWO_HOLDERS",
    "Asked",
    "Builder",
    "Holders",
    "RawAnswer",
    "ask",
    "assert_api_error",
    "assert_healthy",
    "chat_body",
    "post_raw",
    "reset_link",
    "wait_for_holders",
]

CLUSTER: dict[str, Any] = {"cluster": "x", "cluster_secret": "s" * 32}
MODEL = "m"
MSGS = [{"role": "user", "content": "hi"}]
HELLO = "Hello, world!"  # the fakes' default tokens, joined
GOOD_TOKENS = ["Served", " by", " the", " other", " holder"]
GOOD_TEXT = "".join(GOOD_TOKENS)
#: Between the entry node and the second peer of ``lan2``: ranks it behind the first (RTT). With 20 ms, a
#: first request to the bad holder slowed by a loaded CI machine could measure a longer time to first token
#: than the second peer's, and the second was tried first.
SECOND_PEER_LATENCY_S = 0.1
#: The entry node of a LAN route probes its peers once, at start: link faults then hit
#: only the requests under test, never a health check that would reorder the peers.
QUIET_HEALTH_S = 30.0
OnFirst = Callable[[], Any] | None


def chat_body(model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MSGS, **extra}


# -- the SDK -----------------------------------------------------------------------


@dataclass
class Asked:
    """How one request through the SDK went: what arrived, and the error that ended it, if any."""

    text: str = ""
    finish: str | None = None
    error: openai.APIError | None = None
    headers: Any = None  # the answer's HTTP headers (the SDK's Headers)
    content_chunks: int = 0
    #: loop time of each content chunk / of the error, for timing assertions
    chunk_at: list[float] = field(default_factory=list)
    error_at: float | None = None
    started_at: float = 0.0

    @property
    def node(self) -> str | None:
        return self.headers.get("X-Quorum-Node") if self.headers is not None else None

    @property
    def elapsed_s(self) -> float:
        """From the request to its error (or to the last chunk)."""
        end = self.error_at if self.error_at is not None else (self.chunk_at[-1] if self.chunk_at else self.started_at)
        return end - self.started_at


async def ask(
    client: openai.AsyncOpenAI,
    *,
    stream: bool,
    model: str = MODEL,
    op: str = "chat",
    on_first: OnFirst = None,
    **extra: Any,
) -> Asked:
    """One chat (or ``op="completions"``) request; never raises an `openai.APIError`, returns it in
    ``Asked.error``.

    ``on_first`` is called (and awaited, if it returns an awaitable) once the first
    content chunk of a stream has arrived: a fault to switch on mid-stream.
    """
    loop = asyncio.get_running_loop()
    out = Asked(started_at=loop.time())
    try:
        if op == "chat":
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=MSGS, stream=stream, **extra
            )
        else:
            raw = await client.completions.with_raw_response.create(model=model, prompt="hi", stream=stream, **extra)
        out.headers = raw.headers
        parsed = raw.parse()
        if not stream:
            choice = parsed.choices[0]
            out.text = (choice.message.content if op == "chat" else choice.text) or ""
            out.finish = choice.finish_reason
            return out
        async with parsed as events:
            async for chunk in events:
                for choice in chunk.choices:
                    piece = choice.delta.content if op == "chat" else choice.text
                    if piece:
                        out.text += piece
                        out.content_chunks += 1
                        out.chunk_at.append(loop.time())
                        if out.content_chunks == 1 and on_first is not None:
                            result = on_first()
                            if isinstance(result, Awaitable):
                                await result
                    if choice.finish_reason:
                        out.finish = choice.finish_reason
    except openai.APIError as e:
        out.error = e
        out.error_at = loop.time()
    return out


def assert_api_error(asked: Asked, statuses: set[int]) -> openai.APIStatusError:
    """The request failed with one of ``statuses``, in the OpenAI error shape; 503 carries Retry-After."""
    err = asked.error
    assert isinstance(err, openai.APIStatusError), f"expected HTTP {statuses}, got {err!r} (text {asked.text!r})"
    assert err.status_code in statuses, f"HTTP {err.status_code} ({err.message}), expected one of {statuses}"
    assert isinstance(err.body, dict) and {"message", "type", "param", "code"} <= set(err.body), err.body
    assert isinstance(err.body["message"], str) and err.body["message"], err.body
    if err.status_code == 503:
        retry_after = err.response.headers.get("Retry-After")
        assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, retry_after
    return err


# -- raw bytes -----------------------------------------------------------------------


@dataclass
class RawAnswer:
    """An answer as bytes: for what the SDK hides (the exact last event, [DONE])."""

    status: int
    headers: Any
    body: bytes
    cut: BaseException | None  # the HTTP body did not end properly

    @property
    def events(self) -> list[str]:
        """The data of each SSE event, in order."""
        out = []
        for block in self.body.decode(errors="replace").replace("\r\n", "\n").split("\n\n"):
            data = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
            if data:
                out.append("\n".join(data))
        return out

    def assert_ends_with_error_event(self) -> dict[str, Any]:
        """The failure contract after the first byte: the last event is an error, and no [DONE]."""
        assert self.cut is None, f"the body was cut instead of ended with an error event: {self.cut!r}"
        assert self.status == 200, self.status
        events = self.events
        assert events, self.body
        assert all(e.strip() != "[DONE]" for e in events), f"[DONE] after a failure: {events[-3:]}"
        last = json.loads(events[-1])
        assert isinstance(last, dict) and isinstance(last.get("error"), dict), f"last event: {events[-1]!r}"
        assert {"message", "type", "param", "code"} <= set(last["error"]), last
        return last["error"]


async def post_raw(
    http: aiohttp.ClientSession,
    node: Node,
    body: dict[str, Any],
    *,
    on_first: OnFirst = None,
    path: str = "/v1/chat/completions",
) -> RawAnswer:
    """POST a request with aiohttp and read the whole body, however it ends."""
    chunks: list[bytes] = []
    cut: BaseException | None = None
    async with http.post(node.url + path, json=body) as resp:
        try:
            async for data in resp.content.iter_any():
                chunks.append(data)
                if len(chunks) == 1 and on_first is not None:
                    result = on_first()
                    if isinstance(result, Awaitable):
                        await result
        except aiohttp.ClientPayloadError as e:
            cut = e
        return RawAnswer(resp.status, resp.headers, b"".join(chunks), cut)


# -- holders -------------------------------------------------------------------------


async def wait_for_holders(http: aiohttp.ClientSession, node: Node, holders: set[str], model: str = MODEL) -> None:
    """Wait until ``node`` lists ``model`` (by id or alias) as held by exactly the nodes named ``holders``."""

    async def listed() -> bool:
        async with http.get(node.url + "/v1/models") as resp:
            cards = (await resp.json())["data"]
        seen = {n for c in cards if model == c["id"] or model in c["aliases"] for n in c["nodes"]}
        return seen == holders

    await eventually(listed, what=f"{node.name} lists {model} on {sorted(holders)}")


@dataclass
class Holders:
    """The holders of ``MODEL`` one route has, and where each fault can be injected."""

    route: str
    entry: Node
    bad: FakeEngine
    bad_node: Node
    bad_link: FaultProxy | None = None  # entry → bad_node (LAN routes)
    good: FakeEngine | None = None
    good_node: Node | None = None
    nodes: list[Node] = field(default_factory=list)


ONE_HOLDER = ("local", "lan")
TWO_HOLDERS = ("local2", "local+peer", "lan2")


class Builder:
    """Sets up a route's holders with the shared fixtures; everything is closed by them."""

    def __init__(
        self,
        start_node: StartNode,
        fake: StartFake,
        proxy: Callable[..., Awaitable[FaultProxy]],
        http: aiohttp.ClientSession,
    ) -> None:
        self.start_node = start_node
        self.fake = fake
        self.proxy = proxy
        self.http = http

    async def build(
        self, route: str, *, bad_kind: str = "openai", bad_knobs: dict[str, Any] | None = None, **settings: Any
    ) -> Holders:
        """The holders of ``route``; ``settings`` go to every node.

        The failure contract is asserted holder by holder, the bad one tried first every time: ejecting it
        after a few failures (``holder_failures``, tested in ``tests/api/test_holder_ejection.py``) would
        take it out of the test, so it is off here unless a test asks for it. So is affinity (the holder a
        conversation keeps to, ``affinity.py``): the order the holders are listed in is the order tried."""
        settings.setdefault("holder_failures", 1000)
        settings.setdefault("affinity", False)
        bad = await self.fake(bad_kind, models=[MODEL], **(bad_knobs or {}))
        good = None
        if route in TWO_HOLDERS:
            good = await self.fake("openai", models=[MODEL], tokens=list(GOOD_TOKENS))
        start = self.start_node
        if route == "local":
            entry = await start(backends=[spec(bad)], **settings)
            return Holders(route, entry, bad, entry, nodes=[entry])
        if route == "local2":
            entry = await start(backends=[spec(bad), spec(good)], **settings)
            return Holders(route, entry, bad, entry, good=good, good_node=entry, nodes=[entry])
        if route == "local+peer":
            peer = await start(backends=[spec(good)], **CLUSTER, **settings)
            link = await self.proxy(peer.peer_port)
            entry = await start(
                backends=[spec(bad)],
                peers=[f"127.0.0.1:{link.port}"],
                **CLUSTER,
                health_interval_s=QUIET_HEALTH_S,
                **settings,
            )
            await wait_for_holders(self.http, entry, {entry.name, peer.name})
            return Holders(route, entry, bad, entry, good=good, good_node=peer, nodes=[entry, peer])
        if route in ("lan", "lan2"):
            b = await start(backends=[spec(bad)], **CLUSTER, **settings)
            links = [await self.proxy(b.peer_port)]
            holders = {b.name}
            c = None
            if route == "lan2":
                assert good is not None
                c = await start(backends=[spec(good)], **CLUSTER, **settings)
                links.append(await self.proxy(c.peer_port, latency_s=SECOND_PEER_LATENCY_S))
                holders.add(c.name)
            entry = await start(
                peers=[f"127.0.0.1:{p.port}" for p in links], **CLUSTER, health_interval_s=QUIET_HEALTH_S, **settings
            )
            await wait_for_holders(self.http, entry, holders)
            nodes = [entry, b] + ([c] if c is not None else [])
            return Holders(route, entry, bad, b, bad_link=links[0], good=good, good_node=c, nodes=nodes)
        raise ValueError(f"unknown route {route!r}")


def spec(eng: FakeEngine | None) -> dict[str, str]:
    assert eng is not None
    return {"kind": eng.kind, "url": eng.url}


# -- afterwards ------------------------------------------------------------------------


async def assert_healthy(
    http: aiohttp.ClientSession, client: openai.AsyncOpenAI, h: Holders, texts: set[str] | None = None
) -> None:
    """Every node answers /health with nothing left in flight, and a normal streamed request is
    served whole, [DONE] included (by any holder: ``texts`` are the answers they give)."""
    texts = texts or {HELLO, GOOD_TEXT}
    for node in h.nodes:

        async def settled(node: Node = node) -> bool:
            async with http.get(node.url + "/health") as resp:
                assert resp.status == 200, (node.name, resp.status)
                return (await resp.json())["in_flight"] == 0

        await eventually(settled, what=f"{node.name} has nothing in flight")
    asked = await ask(client, stream=True)
    assert asked.error is None, asked.error
    assert asked.text in texts and asked.finish == "stop", asked
    raw = await post_raw(http, h.entry, chat_body(stream=True))
    assert raw.status == 200 and raw.cut is None
    assert raw.events[-1] == "[DONE]", raw.events[-2:]


async def reset_link(link: FaultProxy) -> None:
    """RST every connection through ``link``, so the next request starts a fresh one (byte counts from 0)."""
    link.reset_all()
    await asyncio.wait_for(link.wait_until(lambda p: p.connections == 0), 2.0)
