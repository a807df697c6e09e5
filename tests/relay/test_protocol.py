"""The relay link's protocol, driven directly: frames and ``now`` in, frames and events out (no sockets, no sleeps).

Two ``RelayProtocol``s talk through ``Wire``, which does what the relay does
to a frame (rewrites ``peer`` to the source) and nothing else; a test that
needs a peer of another version speaks Noise to the protocol itself.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from quorum_node.cluster.identity import NodeIdentity
from quorum_node.cluster.noise import Handshake
from quorum_node.cluster.relay import RelayLinkError, RelayProtocol, SessionLost
from quorum_node.cluster.relay.messages import FIN, OPEN, TUNNEL, WINDOW, AnswerHead, Features, Item, OpenHead
from quorum_node.cluster.relay.protocol import ProtocolError
from quorum_node.cluster.relay.sessions import prologue
from quorum_node.cluster.relay.streams import Stream
from quorum_relay import wire

HEAD = OpenHead(method="POST", path="/v1/chat/completions", headers=[], body=b"")


class Events:
    """A listener and stream handler that writes down what it is told."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.served: list[tuple[Stream, OpenHead, bytes]] = []
        self.tunnels: list[tuple[Stream, OpenHead]] = []

    def welcomed(self, welcome: wire.Welcome) -> None:
        self.log.append(("welcomed",))

    def presence(self, peer: str, online: bool) -> None:
        self.log.append(("presence", peer, online))

    def draining(self, peer: str) -> None:
        self.log.append(("draining", peer))

    def session_ready(self, peer: str) -> None:
        self.log.append(("ready", peer))

    def session_failed(self, peer: str, error: RelayLinkError) -> None:
        self.log.append(("session_failed", peer, type(error)))

    def serve(self, stream: Stream, head: OpenHead, body: bytes) -> None:
        self.served.append((stream, head, body))

    def tunnel(self, stream: Stream, head: OpenHead) -> None:
        stream.handler = Handler()
        self.tunnels.append((stream, head))

    def output(self) -> None:
        pass

    def room(self) -> None:
        self.log.append(("room",))


class Handler:
    def __init__(self) -> None:
        self.head: AnswerHead | None = None
        self.data = b""
        self.ended = False
        self.error: RelayLinkError | None = None
        self.credits = 0

    def on_head(self, head: AnswerHead) -> None:
        self.head = head

    def on_data(self, data: bytes) -> None:
        self.data += data

    def on_end(self) -> None:
        self.ended = True

    def on_failed(self, error: RelayLinkError) -> None:
        self.error = error

    def on_credit(self) -> None:
        self.credits += 1


def ids_in_order() -> tuple[NodeIdentity, NodeIdentity]:
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    return (a, b) if a.node_id < b.node_id else (b, a)


class Node:
    def __init__(self, identity: NodeIdentity, members: dict[str, bytes]) -> None:
        self.identity = identity
        self.members = members
        self.events = Events()
        self.p = RelayProtocol(identity=identity, peer_key=self.members.get, listener=self.events)

    @property
    def id(self) -> str:
        return self.identity.node_id

    def connect(self, *peers: str, now: float = 0.0, **welcome: Any) -> None:
        """A challenge (answered with a proof), then the relay's Welcome listing ``peers``."""
        self.p.receive(wire.encode(wire.Challenge(nonce=b"n" * wire.NONCE_BYTES)), now)
        assert [type(wire.decode(f)) for f in self.p.frames_to_send()] == [wire.Proof]
        kw: dict[str, Any] = {"max_frame_bytes": 256 * 1024, "batch": True, "batch_streams": True, **welcome}
        self.p.receive(
            wire.encode(
                wire.Welcome(
                    session=f"s-{self.id}",
                    node_id=self.id,
                    peers=tuple(wire.Presence(node_id=p, since=1.0) for p in peers),
                    **kw,
                )
            ),
            now,
        )


class Wire:
    """What the relay does between two nodes: each frame's ``peer`` becomes its source."""

    def __init__(self, *nodes: Node) -> None:
        self.nodes = {n.id: n for n in nodes}

    def frames(self, src: Node) -> list[wire.Frame]:
        return [wire.decode(raw) for raw in src.p.frames_to_send()]

    def pump(self, now: float = 0.0) -> int:
        """Deliver what every node has queued, until nothing is left; how many frames went."""
        moved = 0
        while True:
            batch = [(n, f) for n in self.nodes.values() for f in self.frames(n)]
            if not batch:
                return moved
            for src, frame in batch:
                self.deliver(src, frame, now)
                moved += 1

    def deliver(self, src: Node, frame: wire.Frame, now: float = 0.0) -> None:
        to = getattr(frame, "peer", None)
        if to in self.nodes:
            self.nodes[to].p.receive(wire.encode(msgspec.structs.replace(frame, peer=src.id)), now)


def pair(**welcome: Any) -> tuple[Node, Node, Wire]:
    ia, ib = ids_in_order()
    members = {ia.node_id: ia.dh_key, ib.node_id: ib.dh_key}
    a, b = Node(ia, dict(members)), Node(ib, dict(members))
    a.connect(**welcome)
    b.connect(a.id, **welcome)
    a.p.receive(wire.encode(wire.Joined(peer=wire.Presence(node_id=b.id, since=2.0))), 0.0)
    return a, b, Wire(a, b)


def session(a: Node, b: Node, net: Wire) -> None:
    assert a.p.hello(b.id, 0.0) is False
    net.pump()
    assert ("ready", b.id) in a.events.log and ("ready", a.id) in b.events.log


def answer(net: Wire, node: Node, stream: Stream, status: int, body: bytes) -> None:
    node.p.send(stream, memoryview(msgspec.msgpack.encode(AnswerHead(status=status, headers=[]))))
    node.p.send(stream, memoryview(body))
    node.p.close(stream)
    net.pump()


def test_a_request_goes_as_a_stream_and_its_answer_comes_back() -> None:
    a, b, net = pair()
    session(a, b, net)
    h = Handler()
    stream = a.p.open(b.id, HEAD, h)
    assert a.p.send(stream, memoryview(b"the body")) == 8
    a.p.close(stream)
    net.pump()
    [(served, head, body)] = b.events.served
    assert (served.peer, head.path, body) == (a.id, HEAD.path, b"the body")
    answer(net, b, served, 200, b"hello")
    assert (h.head, h.data, h.ended, h.error) == (AnswerHead(status=200, headers=[]), b"hello", True, None)
    assert len(a.p.streams) == 0 == len(b.p.streams)  # both halves closed: nothing is held


def test_a_burst_opens_and_ends_its_streams_inside_batches() -> None:
    a, b, net = pair()
    session(a, b, net)
    for _ in range(64):
        stream = a.p.open(b.id, HEAD, Handler())
        a.p.send(stream, memoryview(b"{}"))
        a.p.close(stream)
    frames = net.frames(a)
    assert len(frames) < 64 and all(isinstance(f, wire.Batch) for f in frames)
    assert sum(len(f.opens) for f in frames) == 64 == sum(len(f.closes) for f in frames)


def test_no_batch_opens_more_streams_than_the_relay_allows() -> None:
    a, b, net = pair(max_streams=3)
    session(a, b, net)
    for _ in range(24):
        a.p.close(a.p.open(b.id, HEAD, Handler()))
    batches = [f for f in net.frames(a) if isinstance(f, wire.Batch)]
    assert batches and all(len(f.opens) <= 3 and len(f.closes) <= 3 for f in batches)
    assert sum(len(f.opens) for f in batches) == 24


def test_a_peer_cannot_open_more_streams_than_the_relay_allows_by_hiding_them_in_a_batch() -> None:
    a, b, net = pair(max_streams=3)
    session(a, b, net)
    sids = [10_001 + 2 * i for i in range(8)]  # a's id sorts lower: it opens odd streams
    items = msgspec.msgpack.encode(
        [Item(stream=sid, data=msgspec.msgpack.encode(HEAD), flags=OPEN | FIN) for sid in sids]
    )
    sealed = a.p.sessions[b.id].send.seal(items)  # type: ignore[union-attr]
    # eight streams opened inside the encryption, none of them listed for the relay to count
    net.deliver(a, wire.Batch(peer=b.id, payload=sealed))
    assert len(b.events.served) == 3 and b.p.streams.serving == 3
    resets = [f for f in net.frames(b) if isinstance(f, wire.Reset)]
    assert [f.code for f in resets] == ["too_many_streams"] * 5


def test_a_malformed_batch_from_a_peer_ends_only_that_session() -> None:
    a, b, net = pair()
    session(a, b, net)
    sealed = a.p.sessions[b.id].send.seal(b"\xc1 not msgpack")  # type: ignore[union-attr]  # authentic, malformed
    net.deliver(a, wire.Batch(peer=b.id, payload=sealed))  # (no ProtocolError: the connection stays)
    assert a.id not in b.p.sessions and b.p.up
    # a's next stream in the old session is refused no_session; a handshakes anew and is served
    h = Handler()
    a.p.close(a.p.open(b.id, HEAD, h))
    net.pump()
    assert isinstance(h.error, SessionLost) and b.id not in a.p.sessions
    session(a, b, net)
    a.p.close(a.p.open(b.id, HEAD, Handler()))
    net.pump()
    assert len(b.events.served) == 1


def test_a_peer_that_batches_but_does_not_open_streams_in_batches_gets_open_frames() -> None:
    a, b, net = pair()
    a.p.hello(b.id, 0.0)
    [hello] = net.frames(a)
    assert isinstance(hello, wire.Hello)
    # b answers as the version before: it reads Batch, but no stream item opens or ends a stream
    their_session, message = hello.payload.split(b"\x00", 1)
    hs = Handshake(initiator=False, static=b.identity.dh_private, prologue=prologue(a.id, b.id, their_session.decode()))
    hs.read_message(message)
    reply = hs.write_message(msgspec.msgpack.encode(Features(batch=True)))
    a.p.receive(wire.encode(wire.HelloReply(peer=b.id, payload=reply)), 0.0)
    for _ in range(16):
        stream = a.p.open(b.id, HEAD, Handler())
        a.p.send(stream, memoryview(b"{}"))
        a.p.close(stream)
    frames = net.frames(a)
    assert (
        len([f for f in frames if isinstance(f, wire.Open)])
        == 16
        == len([f for f in frames if isinstance(f, wire.Close)])
    )
    assert not any(f.opens or f.closes for f in frames if isinstance(f, wire.Batch))


def test_a_stream_the_peer_lost_the_session_of_fails_as_session_lost_and_the_next_handshakes_anew() -> None:
    a, b, net = pair()
    session(a, b, net)
    b.p.lost("restart")  # b forgets every session (as after a reconnection)
    b.connect(a.id)
    handlers = [Handler() for _ in range(8)]
    for h in handlers:
        a.p.close(a.p.open(b.id, HEAD, h))
    net.pump()
    assert all(isinstance(h.error, SessionLost) for h in handlers)  # nothing served: the driver asks again
    assert b.events.served == [] and b.id not in a.p.sessions
    session(a, b, net)


def test_credit_bounds_what_is_sent_and_reading_grants_more() -> None:
    a, b, net = pair()
    session(a, b, net)
    h = Handler()
    stream = a.p.open(b.id, HEAD, h)
    a.p.close(stream)
    net.pump()
    [(served, _, _)] = b.events.served
    big = memoryview(b"x" * (2 * WINDOW))
    b.p.send(served, memoryview(msgspec.msgpack.encode(AnswerHead(status=200, headers=[]))))
    sent = b.p.send(served, big)
    assert sent < WINDOW and b.p.send(served, big[sent:]) == 0  # the window is spent
    net.pump()
    assert len(h.data) == sent
    a.p.consumed(stream, len(h.data))  # the reader took it: credit goes back
    net.pump()
    assert b.p.send(served, big[sent:]) > 0


def test_more_data_than_granted_resets_the_stream() -> None:
    a, b, net = pair()
    session(a, b, net)
    h = Handler()
    stream = a.p.open(b.id, HEAD, h)
    net.pump()
    seal = b.p.sessions[a.id].send.seal  # type: ignore[union-attr]
    net.deliver(
        b,
        wire.Data(
            peer=a.id, stream=stream.id, payload=seal(msgspec.msgpack.encode(AnswerHead(status=200, headers=[])))
        ),
    )
    for _ in range(WINDOW // 16384 + 1):  # a hostile sender ignores its credit
        net.deliver(b, wire.Data(peer=a.id, stream=stream.id, payload=seal(b"y" * 16384)))
    assert h.error is not None and "flow_control" in str(h.error)
    assert [f.code for f in net.frames(a) if isinstance(f, wire.Reset)] == ["flow_control"]


def test_the_budget_is_half_the_relays_queue_and_senders_hear_when_it_has_room() -> None:
    a, b, net = pair(send_queue_bytes=256 * 1024)
    session(a, b, net)
    assert b.p.streams.send_budget == 128 * 1024
    streams = [a.p.open(b.id, HEAD, Handler()) for _ in range(3)]
    net.pump()
    served = [s for s, _, _ in b.events.served]
    assert served == []  # (requests not closed yet: b has their streams, not their whole request)
    sent = [a.p.send(s, memoryview(b"z" * 64 * 1024)) for s in streams]
    assert sent[:2] == [64 * 1024, 64 * 1024] and sent[2] == 0  # the budget, not the streams' credit, stops it
    net.pump()  # b grants what it buffered: room again
    assert ("room",) in a.events.log and a.p.send(streams[2], memoryview(b"z")) == 1


def test_an_unanswered_hello_is_given_up_at_its_deadline() -> None:
    a, b, net = pair()
    assert a.p.hello(b.id, 100.0) is False
    net.frames(a)  # lost on the way
    deadline = a.p.next_deadline()
    assert deadline is not None and deadline > 100.0
    a.p.tick(deadline - 0.001)
    assert b.id in a.p.sessions
    a.p.tick(deadline)
    assert b.id not in a.p.sessions and ("session_failed", b.id, RelayLinkError) in a.events.log


def test_a_lost_connection_fails_every_stream_and_takes_members_offline() -> None:
    a, b, net = pair()
    session(a, b, net)
    h = Handler()
    a.p.open(b.id, HEAD, h)
    a.p.lost("gone")
    assert isinstance(h.error, RelayLinkError) and ("presence", b.id, False) in a.events.log
    assert not a.p.up and a.p.online == {} and len(a.p.streams) == 0
    with pytest.raises(RelayLinkError, match="not connected"):
        a.p.hello(b.id, 0.0)


def test_forget_peer_resets_its_streams_and_takes_it_offline() -> None:
    a, b, net = pair()
    session(a, b, net)
    h = Handler()
    a.p.open(b.id, HEAD, h)
    del a.members[b.id]
    a.p.forget_peer(b.id)
    assert h.error is not None and ("presence", b.id, False) in a.events.log
    assert [f.code for f in net.frames(a) if isinstance(f, wire.Reset)] == ["not_a_member"]
    a.members[b.id] = b.identity.dh_key
    a.p.members_changed()  # a member again: online again
    assert a.events.log[-1] == ("presence", b.id, True)


@pytest.mark.parametrize("first", ["welcome twice", "a proof", "garbage"])
def test_a_relay_that_breaks_the_protocol_is_told_so(first: str) -> None:
    a, _, _ = pair()
    raw = {
        "welcome twice": wire.encode(wire.Welcome(session="s", node_id=a.id)),
        "a proof": wire.encode(wire.Proof(signature=b"x" * 64)),
        "garbage": b"\xc1",
    }[first]
    with pytest.raises(ProtocolError) as e:
        a.p.receive(raw, 0.0)
    assert e.value.code == wire.CLOSE_PROTOCOL


TUNNEL_HEAD = OpenHead(method=TUNNEL, path="/quorum/v1/shards/tunnel?shard=m", headers=[], body=b"")


def test_a_tunnel_is_served_as_it_opens_and_carries_bytes_both_ways_within_credit() -> None:
    a, b, net = pair()
    session(a, b, net)
    h = Handler()
    stream = a.p.open(b.id, TUNNEL_HEAD, h)
    net.pump()
    assert b.events.served == []  # not a request waiting for its body's end: served at once
    [(served, head)] = b.events.tunnels
    assert (served.peer, head.path) == (a.id, TUNNEL_HEAD.path)
    b.p.send(served, memoryview(msgspec.msgpack.encode(AnswerHead(status=200, headers=[]))))
    net.pump()
    assert h.head == AnswerHead(status=200, headers=[])
    # both ways, as often as they like: no Close is needed for the other side to get the bytes
    for i in range(3):
        assert a.p.send(stream, memoryview(b"up%d" % i)) == 3
        assert b.p.send(served, memoryview(b"down%d" % i)) == 5
        net.pump()
    got = served.handler
    assert isinstance(got, Handler) and got.data == b"up0up1up2" and h.data == b"down0down1down2"
    # what the tunnel's reader has not consumed is not granted back: a sender stops at the window
    big = memoryview(b"x" * (2 * WINDOW))
    sent = a.p.send(stream, big)
    assert sent < WINDOW and a.p.send(stream, big[sent:]) == 0
    net.pump()
    b.p.consumed(served, len(got.data))
    net.pump()
    assert a.p.send(stream, big[sent:]) > 0
    # either end closes: the other hears it, and nothing is held once both have
    a.p.close(stream)
    net.pump()
    assert got.ended
    b.p.close(served)
    net.pump()
    assert h.ended and len(a.p.streams) == 0 == len(b.p.streams)


def test_a_tunnel_to_a_node_that_has_none_there_is_refused_with_its_head() -> None:
    a, b, net = pair()
    session(a, b, net)
    h = Handler()
    a.p.open(b.id, TUNNEL_HEAD, h)
    net.pump()
    [(served, _)] = b.events.tunnels
    answer(net, b, served, 404, b"")
    assert h.head is not None and h.head.status == 404 and h.ended
