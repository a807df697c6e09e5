"""The node's relay link against a real quorum-relay (and a hostile fake one): who gets a session, what it costs.

Each node here is a real ``RelayLink`` (public API only; the protocol's rules are
``test_protocol.py``'s) with its own ``NodeIdentity``; what
membership says is a plain dict of node id → X25519 key per node (the
``peer_key`` the cluster service hands the link). Requests are served by a
real aiohttp server through the in-memory pipe, which answers with the peer
id the link authenticated.
"""

from __future__ import annotations

import asyncio
import os
import resource
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import structlog
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve

from quorum_node.cluster.identity import NodeIdentity
from quorum_node.cluster.pipe import serve_in_memory
from quorum_node.cluster.relay import RelayLink, RelayLinkError
from quorum_relay import wire
from quorum_relay.identity import decode_key, verify_proof
from quorum_relay.server import Relay
from tests.support import eventually

from .conftest import TOKEN_A, WAIT_S

Membership = dict[str, bytes]  # node id -> X25519 public key


class Member:
    """A node: its identity, its view of membership, its link, and what it served."""

    def __init__(self, identity: NodeIdentity, members: Membership) -> None:
        self.identity = identity
        self.members = members
        self.served: list[tuple[str, str]] = []  # (peer id as authenticated, path)
        self.online: set[str] = set()
        self.presence_calls = 0
        self.introductions: list[str] = []
        self.hold = asyncio.Event()  # requests to /slow wait for it
        self.slow_started = asyncio.Event()
        self.slow_cancelled = asyncio.Event()
        self.link: RelayLink | None = None

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def peer_key(self, node_id: str) -> bytes | None:
        return self.members.get(node_id) if node_id != self.node_id else None

    def on_presence(self, node_id: str, online: bool) -> None:
        self.presence_calls += 1
        (self.online.add if online else self.online.discard)(node_id)

    async def handler(self, request: web.BaseRequest) -> web.StreamResponse:
        peer = request.transport.get_extra_info("quorum_peer") if request.transport is not None else None
        self.served.append((peer, request.path))
        if request.path == "/slow":
            self.slow_started.set()
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.slow_cancelled.set()
                raise
        return web.Response(text=f"served {peer}")


StartLink = Callable[..., Awaitable[RelayLink]]


@pytest.fixture
async def start_link() -> AsyncIterator[StartLink]:
    links: list[RelayLink] = []

    async def _start(url: str, m: Member, token: str = TOKEN_A, **kw: Any) -> RelayLink:
        server = web.Server(m.handler, handler_cancellation=True)  # as the node's own server

        async def serve_it(peer: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> Any:
            return await serve_in_memory(server, method, path, headers, body, peer=peer)

        link = RelayLink(
            url=url,
            token=token,
            identity=m.identity,
            peer_key=m.peer_key,
            on_presence=m.on_presence,
            serve=serve_it,
            **kw,
        )
        m.link = link
        links.append(link)
        await link.start()
        return link

    yield _start
    for link in links:
        await link.close()


async def get(link: RelayLink, peer: str, path: str = "/who", timeout_s: float = WAIT_S) -> tuple[int, bytes]:
    resp = await link.request(peer, "GET", path, {}, b"", timeout_s=timeout_s)
    return resp.status, await resp.body.read()


def cluster(n: int) -> list[Member]:
    """``n`` members who all know each other."""
    ids = [NodeIdentity.generate() for _ in range(n)]
    members = {i.node_id: i.dh_key for i in ids}
    return [Member(i, dict(members)) for i in ids]


async def test_members_serve_each_other_as_the_member_their_session_proved(relay: Relay, start_link: StartLink) -> None:
    a, b = cluster(2)
    la = await start_link(relay.url, a)
    await start_link(relay.url, b)
    await eventually(lambda: b.node_id in a.online and a.node_id in b.online, "both online", timeout_s=WAIT_S)
    assert await get(la, b.node_id) == (200, f"served {a.node_id}".encode())
    assert b.served == [(a.node_id, "/who")]


async def test_a_non_member_gets_no_session_and_nothing_served(relay: Relay, start_link: StartLink) -> None:
    a, b = cluster(2)
    # c holds a valid relay token and a key of its own; it believes b is a member, b does not know it
    c = Member(NodeIdentity.generate(), {b.node_id: b.identity.dh_key})
    await start_link(relay.url, a)
    lb = await start_link(relay.url, b)
    lc = await start_link(relay.url, c)
    await eventually(lambda: b.node_id in c.online and a.node_id in b.online, "online", timeout_s=WAIT_S)
    with pytest.raises(RelayLinkError):
        await get(lc, b.node_id)
    assert b.served == [] and c.node_id not in b.online and c.node_id not in (a.online | b.online)
    assert lb.refused_hellos >= 1
    # b never starts one with it either
    with pytest.raises(RelayLinkError, match=r"not a member|not on the relay"):
        await get(lb, c.node_id)


async def test_a_member_id_with_another_key_is_refused(relay: Relay, start_link: StartLink) -> None:
    a, b = cluster(2)
    b.members[a.node_id] = NodeIdentity.generate().dh_key  # b's membership has another key for a's id
    la = await start_link(relay.url, a)
    lb = await start_link(relay.url, b)
    await eventually(lambda: b.node_id in a.online and a.node_id in b.online, "online", timeout_s=WAIT_S)
    with pytest.raises(RelayLinkError):
        await get(la, b.node_id)
    assert b.served == [] and lb.refused_hellos >= 1


async def test_a_member_not_known_yet_introduces_itself(relay: Relay, start_link: StartLink) -> None:
    a, b = cluster(2)
    del b.members[a.node_id]  # b has not heard of a's admission yet
    a_records = msgspec.msgpack.encode({"admit": a.node_id, "key": a.identity.dh_key})

    def introduce(peer: str, records: bytes) -> None:  # stands for membership's merge: records decide, not peer
        b.introductions.append(peer)
        got = msgspec.msgpack.decode(records)
        if got.get("admit") == peer == a.node_id:
            b.members[peer] = got["key"]

    la = await start_link(relay.url, a, introduction=lambda: a_records)
    await start_link(relay.url, b, introduce=introduce)
    await eventually(lambda: b.node_id in a.online, "b online at a", timeout_s=WAIT_S)
    assert a.node_id not in b.online  # a stranger to b
    assert await get(la, b.node_id) == (200, f"served {a.node_id}".encode())  # refused, introduced, asked again
    assert b.introductions == [a.node_id] and a.node_id in b.online


async def test_an_introduction_that_does_not_make_a_member_is_refused(relay: Relay, start_link: StartLink) -> None:
    a, b = cluster(2)
    del b.members[a.node_id]
    la = await start_link(relay.url, a, introduction=lambda: b"records signed by nobody b knows")
    lb = await start_link(relay.url, b, introduce=lambda peer, records: b.introductions.append(peer))
    await eventually(lambda: b.node_id in a.online, "b online at a", timeout_s=WAIT_S)
    for _ in range(3):
        with pytest.raises(RelayLinkError):
            await get(la, b.node_id)
    assert b.served == [] and a.node_id not in b.online
    assert 1 <= len(b.introductions) <= 2  # within its budget: the rest is refused with no crypto
    assert lb.refused_hellos >= 3


async def test_forget_peer_ends_its_streams_now(relay: Relay, start_link: StartLink) -> None:
    a, b = cluster(2)
    la = await start_link(relay.url, a)
    lb = await start_link(relay.url, b)
    await eventually(lambda: b.node_id in a.online and a.node_id in b.online, "online", timeout_s=WAIT_S)
    pending = asyncio.create_task(get(la, b.node_id, "/slow"))
    await asyncio.wait_for(b.slow_started.wait(), WAIT_S)
    del b.members[a.node_id]  # a is evicted
    t0 = time.monotonic()
    lb.forget_peer(a.node_id)
    with pytest.raises(RelayLinkError):
        await pending
    assert time.monotonic() - t0 < 1.0
    await asyncio.wait_for(b.slow_cancelled.wait(), WAIT_S)  # its handler stopped too
    assert a.node_id not in b.online and lb.open_streams == 0
    with pytest.raises(RelayLinkError):  # and a gets no new session
        await get(la, b.node_id)
    assert [p for p, _ in b.served] == [a.node_id]


# -- a hostile relay ----------------------------------------------------------------------------------------


class FakeRelay:
    """A relay that admits a node as the real one does (challenge, proof), then does what a test tells it."""

    def __init__(self, script: Callable[[ServerConnection], Awaitable[None]]) -> None:
        self.script = script
        self.received: list[wire.Frame] = []
        self.proven = asyncio.Event()
        self.port = 0
        self._server: Any = None

    async def __aenter__(self) -> FakeRelay:
        self._server = await serve(self._handler, "127.0.0.1", 0, compression=None, max_size=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _handler(self, ws: ServerConnection) -> None:
        nonce = secrets.token_bytes(wire.NONCE_BYTES)
        assert ws.request is not None
        key = decode_key(ws.request.headers[wire.NODE_KEY_HEADER])
        await ws.send(wire.encode(wire.Challenge(nonce=nonce)))
        proof = wire.decode(await ws.recv())
        assert isinstance(proof, wire.Proof) and key is not None
        assert verify_proof(key, ws.request.headers[wire.NODE_ID_HEADER], nonce, proof.signature)
        self.proven.set()

        async def record() -> None:
            async for raw in ws:
                assert isinstance(raw, bytes)
                self.received.append(wire.decode(raw))

        reader = asyncio.create_task(record())
        try:
            await self.script(ws)
            await ws.wait_closed()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def welcome(**kw: Any) -> bytes:
    return wire.encode(wire.Welcome(session="s" * 16, node_id="n", max_frame_bytes=256 * 1024, batch=True, **kw))


def ghost() -> str:
    return os.urandom(12).hex()


async def test_ghost_presence_of_30000_non_members_leaves_the_link_small(start_link: StartLink) -> None:
    (a,) = cluster(1)
    ghosts = [ghost() for _ in range(30_000)]

    async def script(ws: ServerConnection) -> None:
        await ws.send(welcome(peers=tuple(wire.Presence(node_id=g, since=1.0) for g in ghosts[:5000])))
        for g in ghosts[5000:]:
            await ws.send(wire.encode(wire.Joined(peer=wire.Presence(node_id=g, since=1.0))))
        for g in ghosts[:100]:  # and hellos from some of them
            await ws.send(wire.encode(wire.Hello(peer=g, payload=b"s\x00" + os.urandom(96))))

    async with FakeRelay(script) as fake:
        t0 = time.process_time()
        link = await start_link(fake.url, a, max_peers=64)
        await eventually(
            lambda: link.protocol.presence.ignored + link.refused_hellos >= 30_100, "all ghosts seen", timeout_s=30
        )
        cpu = time.process_time() - t0
        assert link.online == {} and a.presence_calls == 0  # nobody to probe, nobody in the peer table
        assert len(link.protocol.presence.strangers) <= 64 and link.protocol.presence.ignored == 30_000
        # no handshake: nothing but refusals (an empty HelloReply, no crypto) went out
        assert not link.protocol.sessions
        await eventually(lambda: len(fake.received) == 100, "the refusals arrived", timeout_s=WAIT_S)
        assert all(isinstance(f, wire.HelloReply) and not f.payload for f in fake.received)
    assert cpu < 10, f"{cpu:.1f} s of CPU for 30,000 ghosts"


async def test_members_past_max_peers_are_refused_with_one_warning(start_link: StartLink) -> None:
    (a,) = cluster(1)
    many = [NodeIdentity.generate() for _ in range(40)]
    a.members.update({i.node_id: i.dh_key for i in many})

    async def script(ws: ServerConnection) -> None:
        await ws.send(welcome(peers=tuple(wire.Presence(node_id=i.node_id, since=1.0) for i in many[:30])))
        for i in many[30:]:
            await ws.send(wire.encode(wire.Joined(peer=wire.Presence(node_id=i.node_id, since=1.0))))

    with structlog.testing.capture_logs() as logs:
        async with FakeRelay(script) as fake:
            link = await start_link(fake.url, a, max_peers=8)
            await eventually(lambda: link.protocol.presence.refused == 32, "all refused", timeout_s=WAIT_S)
            assert len(link.online) == 8 == len(a.online)
    warnings = [e for e in logs if e["event"] == "relay_peers_refused"]
    assert len(warnings) == 1 and warnings[0]["refused"] == 22  # the Welcome's, in one line; then silence


@pytest.mark.parametrize("when", ["before the welcome", "after the welcome"])
async def test_an_oversized_message_closes_the_link_unread(start_link: StartLink, when: str) -> None:
    (a,) = cluster(1)
    declared = 400 * 1024 * 1024
    sent = 0

    async def script(ws: ServerConnection) -> None:
        nonlocal sent
        if when == "after the welcome":
            await ws.send(welcome())
            await asyncio.sleep(0.1)
        # a binary frame that says it is 400 MiB long, then its bytes for as long as the node takes them
        ws.transport.write(b"\x82\x7f" + declared.to_bytes(8, "big"))
        chunk = b"\x00" * (1 << 20)
        try:
            while sent < declared and not ws.transport.is_closing():
                ws.transport.write(chunk)
                sent += len(chunk)
                await asyncio.sleep(0)  # let the node read (or hang up)
                while ws.transport.get_write_buffer_size() > 4 << 20:
                    await asyncio.sleep(0.005)
                    if ws.transport.is_closing():
                        return
        except (ConnectionError, RuntimeError):
            return

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with FakeRelay(script) as fake:
        link = await start_link(fake.url, a)
        await eventually(
            lambda: link.last_error is not None and "1009" in link.last_error, "closed with 1009", timeout_s=WAIT_S
        )
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert sent < 64 * 1024 * 1024, f"the node read {sent >> 20} MiB of it"
    assert grown_mib < 64, f"peak RSS grew {grown_mib:.0f} MiB"
    assert link.state == "down" and link.online == {}
