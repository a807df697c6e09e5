"""The relay's routing: presence, streams and forwarding (no I/O of its own).

The hub owns the roster and the stream table and moves encoded frames between
connections through their non-blocking ``send``. Its one hot method is
``handle``: decode the frame (the header fields are what matter; msgspec makes
that cheap), check it against the rules of ``wire``, splice the source into
``peer`` and queue the bytes for the destination. Nothing in it awaits, so a
frame is routed completely before the next one is read.

A connection whose queue overflows cannot be evicted from inside ``send``
(that may run while the hub walks a namespace); it is noted and evicted when
the hub's current operation ends (``_flush``).
"""

from __future__ import annotations

from typing import Protocol

import structlog

from .errors import ProtocolViolation
from .metrics import Stats
from .presence import Roster
from .rendezvous import Channel, Plates
from .splice import rewrite_peer
from .streams import OpenResult, StreamTable
from .wire import (
    CLOSE_REPLACED,
    CLOSE_TOO_SLOW,
    MAX_RENDEZVOUS_BYTES,
    Batch,
    Challenge,
    Claim,
    Claimed,
    Close,
    Data,
    Draining,
    Hello,
    HelloReply,
    Joined,
    Left,
    Open,
    Presence,
    Proof,
    Release,
    Rendezvous,
    Reset,
    Unreachable,
    Welcome,
    Window,
    decode,
    encode,
)

__all__ = ["Hub", "Link"]

log = structlog.get_logger(__name__)


class Link(Protocol):
    """What the hub needs of a connection (``conn.Conn`` is the real one)."""

    node_id: str
    since: float
    session: str
    peer_bytes: bytes
    peers: dict[str, Link]
    gone: bool
    draining: bool

    @property
    def namespace(self) -> str: ...
    def send(self, data: bytes) -> None: ...
    def close_soon(self, code: int, reason: str) -> None: ...


class Hub:
    def __init__(self, *, max_streams_per_node: int, max_frame_bytes: int, send_queue_bytes: int, stats: Stats) -> None:
        self.roster: Roster[Link] = Roster()
        self.streams = StreamTable(max_streams_per_node)
        self.stats = stats
        self.max_frame_bytes = max_frame_bytes
        self.send_queue_bytes = send_queue_bytes
        self.quiet = False  # set while the relay stops: nobody is told of departures
        self.plates = Plates()  # join codes' nameplates and the channels of the machines that join
        self._overflowed: list[Link] = []

    # membership

    def join(self, conn: Link) -> None:
        """Welcome ``conn``, replace an older connection of its node id, tell the others."""
        ns = conn.namespace
        old = self.roster.get(ns, conn.node_id)
        if old is not None:
            self._evict(old, CLOSE_REPLACED, "replaced by a newer connection", "replaced")
        peers = self.roster.peers(ns, conn.node_id)
        conn.send(  # first in its queue: nothing can be routed to it before it is registered below
            encode(
                Welcome(
                    session=conn.session,
                    node_id=conn.node_id,
                    peers=tuple(Presence(node_id=p.node_id, since=p.since, draining=p.draining) for p in peers),
                    max_frame_bytes=self.max_frame_bytes,
                    max_streams=self.streams.max_per_node,
                    send_queue_bytes=self.send_queue_bytes,
                    batch=True,
                    drain=True,
                    batch_streams=True,
                    rendezvous=True,
                )
            )
        )
        conn.peers, _ = self.roster.join(ns, conn)
        joined = encode(Joined(peer=Presence(node_id=conn.node_id, since=conn.since)))
        for p in peers:
            p.send(joined)
        self._flush()

    def leave(self, conn: Link) -> None:
        """``conn`` ended on its own (the node closed, the network failed)."""
        if not conn.gone:
            self._remove(conn)
            self._flush()

    def evict(self, conn: Link, code: int, reason: str, why: str) -> None:
        """Close ``conn`` with ``code`` and tell the others it left."""
        self._evict(conn, code, reason, why)
        self._flush()

    def drain(self, conn: Link) -> None:
        """``conn``'s node is stopping: tell the others (once), so they send it no new streams."""
        if conn.draining or conn.gone:
            return
        conn.draining = True
        log.info("node_draining", node_id=conn.node_id, session=conn.session)
        update = encode(Joined(peer=Presence(node_id=conn.node_id, since=conn.since, draining=True)))
        for other in list(conn.peers.values()):
            if other is not conn:
                other.send(update)
        self._flush()

    def on_overflow(self, conn: Link) -> None:
        self._overflowed.append(conn)

    def _evict(self, conn: Link, code: int, reason: str, why: str) -> None:
        if conn.gone:
            return
        self._remove(conn)
        self.stats.closes[why] += 1
        log.info("node_evicted", node_id=conn.node_id, session=conn.session, reason=why)
        conn.close_soon(code, reason)

    def _remove(self, conn: Link) -> None:
        conn.gone = True
        self.plates.drop(conn)
        ns, node_id = conn.namespace, conn.node_id
        if not self.roster.leave(ns, conn):
            return
        gone_streams = self.streams.drop_node(ns, node_id)
        if self.quiet:
            return
        members = conn.peers
        for other_id, stream in gone_streams:
            other = members.get(other_id)
            if other is not None:
                other.send(encode(Reset(peer=node_id, stream=stream, code="peer_gone")))
        left = encode(Left(node_id=node_id))
        for other in list(members.values()):
            other.send(left)

    def _flush(self) -> None:
        while self._overflowed:
            self._evict(self._overflowed.pop(), CLOSE_TOO_SLOW, "send queue full", "too_slow")

    # forwarding: the hot path

    def handle(self, src: Link, raw: bytes | str) -> None:
        """Route one message from ``src``; ``ProtocolViolation`` if it breaks the rules."""
        stats = self.stats
        stats.frames_in += 1
        if type(raw) is not bytes:
            raise ProtocolViolation("text message")
        stats.bytes_in += len(raw)
        try:
            frame = decode(raw)
        except ValueError:
            raise ProtocolViolation("frame does not decode") from None
        ns = src.namespace
        match frame:
            case Data(peer=peer, stream=stream) | Window(peer=peer, stream=stream):
                dst = self._route(src, peer, stream)
                if dst is None:
                    return
                if not self.streams.is_open(ns, src.node_id, peer, stream):
                    stats.dropped += 1
                    return
            case Open(peer=peer, stream=stream):
                dst = self._route(src, peer, stream)
                if dst is None:
                    return
                result = self.streams.open(ns, src.node_id, peer, stream)
                if result is not OpenResult.OPENED:
                    if result is OpenResult.TOO_MANY:
                        stats.rejections["too_many_streams"] += 1
                        src.send(encode(Reset(peer=peer, stream=stream, code="too_many_streams")))
                        self._flush()
                        return
                    raise ProtocolViolation(f"Open: {result.value} {stream}")
            case Close(peer=peer, stream=stream):
                dst = self._route(src, peer, stream)
                if dst is None:
                    return
                if not self.streams.close(ns, src.node_id, peer, stream):
                    stats.dropped += 1
                    return
            case Reset(peer=peer, stream=stream):
                dst = self._route(src, peer, stream)
                if dst is None:
                    return
                if not self.streams.reset(ns, src.node_id, peer, stream):
                    stats.dropped += 1
                    return
            case Batch(peer=peer, opens=opens, closes=closes) if opens or closes:
                dst = self._route(src, peer, 0)
                if dst is not None:
                    self._forward_batch(src, dst, raw, opens, closes)
                return
            case Hello(peer=peer) | HelloReply(peer=peer) | Batch(peer=peer):
                dst = self._route(src, peer, 0)
                if dst is None:
                    return
            case Draining():
                self.drain(src)
                return
            case Claim(ref=ref, nameplate=wanted):
                src.send(encode(Claimed(ref=ref, nameplate=self.plates.claim(src, wanted))))
                self._flush()
                return
            case Release(nameplate=plate):
                self.plates.release(src, plate)
                return
            case Rendezvous(nameplate=plate, channel=channel, payload=payload):
                if len(payload) > MAX_RENDEZVOUS_BYTES:
                    payload = b""  # more than a joining machine takes: the channel ends
                if not self.plates.answer(src, plate, channel, payload):
                    stats.dropped += 1
                return
            case Welcome() | Joined() | Left() | Unreachable() | Challenge() | Claimed():
                raise ProtocolViolation(f"{type(frame).__name__} is sent by the relay only")
            case Proof():
                raise ProtocolViolation("Proof is sent once, first")
        dst.send(rewrite_peer(raw, src.peer_bytes))
        if self._overflowed:
            self._flush()

    def to_holder(self, channel: Channel, payload: bytes) -> bool:
        """A joining machine's message, to the holder its channel was opened to; False where it left."""
        holder = channel.holder
        if holder.gone:
            return False
        holder.send(encode(Rendezvous(nameplate=channel.nameplate, channel=channel.id, payload=payload)))
        self._flush()
        return True

    def _forward_batch(self, src: Link, dst: Link, raw: bytes, opens: tuple[int, ...], closes: tuple[int, ...]) -> None:
        """A ``Batch`` that opens or ends streams: counted like ``Open``/``Close`` frames, forwarded whole.

        Its items cannot be taken out (they are encrypted together), so a stream past
        the limit reaches the destination opened and is reset there, as to its opener.
        """
        ns, node_id, streams = src.namespace, src.node_id, self.streams
        if len(opens) > streams.max_per_node or len(closes) > streams.max_per_node:
            # more than a node may have open: each refused one would cost a Reset to both sides
            raise ProtocolViolation("Batch opens or closes more streams than a node may have")
        refused: list[int] = []
        for stream in opens:
            result = streams.open(ns, node_id, dst.node_id, stream)
            if result is not OpenResult.OPENED:
                if result is not OpenResult.TOO_MANY:
                    raise ProtocolViolation(f"Batch opens: {result.value} {stream}")
                self.stats.rejections["too_many_streams"] += 1
                refused.append(stream)
        dst.send(rewrite_peer(raw, src.peer_bytes))
        for stream in closes:
            streams.close(ns, node_id, dst.node_id, stream)
        for stream in refused:
            src.send(encode(Reset(peer=dst.node_id, stream=stream, code="too_many_streams")))
            dst.send(encode(Reset(peer=node_id, stream=stream, code="too_many_streams")))
        if self._overflowed:
            self._flush()

    def _route(self, src: Link, peer: str, stream: int) -> Link | None:
        if peer == src.node_id:
            raise ProtocolViolation("frame addressed to its sender")
        dst = src.peers.get(peer)
        if dst is None:
            self.stats.unreachable += 1
            src.send(encode(Unreachable(peer=peer, stream=stream)))
            self._flush()
        return dst
