"""What waits to go to the relay, and how it leaves: sealed in order, gathered into batches (pure logic).

Frames are sealed here, as they are taken to be sent, in the order they go out
(Noise nonces must). Under load, what is queued for one peer goes together:
data and credit for many streams go as one ``Batch`` frame (one WebSocket
message, one Noise seal, one pass through the relay) when the relay says it
forwards them and the peer said, in its handshake, that it reads them (a peer
of an older version says nothing and gets the plain frames). Where both the
relay (``Welcome.batch_streams``) and the peer (``Features.streams``) know
how, a batch also opens and ends streams, so a small request is one item
(head, body, end) among many others' in one message instead of three frames.

Items are tuples, ``(kind, peer, ...)``: ``("raw", frame)``, ``("draining",
"")``, ``("hello" | "hello_reply", peer, payload)``, ``("reset", peer, sid,
code)``, ``("window", peer, sid, credit)``, ``("open" | "data" | "close",
peer, sid, plaintext)``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from quorum_relay import wire

from ..noise import NoiseError
from .messages import BATCH_BYTES, BATCH_ITEMS, FIN, OPEN, Item, encode
from .sessions import Session
from .streams import Outgoing

__all__ = ["Outbox"]


class Outbox:
    """The queue towards the relay. ``sessions`` is the protocol's (read here); ``worn(peer)`` is called when a
    session can seal no more (its nonces ran out): the next request handshakes anew."""

    def __init__(self, sessions: dict[str, Session], worn: Callable[[str], None]) -> None:
        self.queue: deque[Outgoing] = deque()
        self._sessions = sessions
        self._worn = worn
        self.batching = False  # the relay forwards Batch frames (Welcome.batch)
        self.batch_streams = False  # ... and counts the streams they open and end (Welcome.batch_streams)
        self.max_streams = 1024  # the relay's limit of open streams per node (Welcome.max_streams)
        self.batches_sent = 0  # Batch frames sent, and the stream items in them (for tests and tuning)
        self.batched_items = 0

    def __len__(self) -> int:
        return len(self.queue)

    def take(self) -> list[bytes]:
        """The frames for what is queued (up to ``BATCH_ITEMS`` items of it), ready to send in this order."""
        out = self.queue
        if len(out) <= BATCH_ITEMS:
            items = list(out)
            out.clear()
        else:
            items = [out.popleft() for _ in range(BATCH_ITEMS)]
        return self._build_all(items)

    def _build_all(self, items: list[Outgoing]) -> list[bytes]:
        """Frames for ``items``, in order per peer; data and credit per peer gathered into batches.

        Opening and closing a stream go into the batch too where the relay and
        the peer both know how (``_opens_in_batch``); otherwise they are frames of
        their own, and what was gathered for that peer goes before them.
        """
        if not self.batching:
            return [raw for item in items if (raw := self._build(item)) is not None]
        frames: list[bytes] = []
        pending: dict[str, list[Outgoing]] = {}
        size: dict[str, int] = {}
        streams_ok: dict[str, bool] = {}
        most = min(BATCH_ITEMS, self.max_streams)  # the relay refuses a batch opening more than its limit
        for item in items:
            kind, peer = item[0], item[1]
            batchable: bool | None
            if kind == "data" or kind == "window":
                batchable = True
            elif kind == "open" or kind == "close":
                batchable = streams_ok.get(peer)
                if batchable is None:
                    batchable = streams_ok[peer] = self._opens_in_batch(peer)
            else:
                batchable = False
            if batchable:
                group = pending.setdefault(peer, [])
                group.append(item)
                size[peer] = size.get(peer, 0) + (len(item[3]) if kind != "window" else 0) + 16
                if size[peer] >= BATCH_BYTES or len(group) >= most:
                    self._flush_batch(peer, pending.pop(peer), frames)
                    size.pop(peer)
                continue
            if peer in pending:  # what was queued before this frame goes before it
                self._flush_batch(peer, pending.pop(peer), frames)
                size.pop(peer)
            raw = self._build(item)
            if raw is not None:
                frames.append(raw)
        for peer, group in pending.items():
            self._flush_batch(peer, group, frames)
        return frames

    def _opens_in_batch(self, peer: str) -> bool:
        session = self._sessions.get(peer)
        return self.batch_streams and session is not None and session.streams

    def _flush_batch(self, peer: str, group: list[Outgoing], frames: list[bytes]) -> None:
        if len(group) == 1:
            raw = self._build(group[0])
            if raw is not None:
                frames.append(raw)
            return
        session = self._sessions.get(peer)
        if session is not None and not session.batch:  # a peer of an older version: it reads no Batch
            frames.extend(raw for item in group if (raw := self._build(item)) is not None)
            return
        if session is None or session.send is None:
            return  # the session ended while these waited; their streams were failed
        entries: list[Item] = []
        opens: list[int] = []
        closes: list[int] = []
        for kind, _, sid, value in group:
            if kind == "data":
                entries.append(Item(stream=sid, data=value))
            elif kind == "window":
                entries.append(Item(stream=sid, credit=value))
            elif kind == "open":
                entries.append(Item(stream=sid, data=value, flags=OPEN))
                opens.append(sid)
            else:  # close (no trailer: this version sends none): it ends the stream's last item if it can
                closes.append(sid)
                last = entries[-1] if entries else None
                if last is not None and last.stream == sid and not last.flags & FIN:
                    entries[-1] = Item(stream=sid, data=last.data, credit=last.credit, flags=last.flags | FIN)
                else:
                    entries.append(Item(stream=sid, flags=FIN))
        try:
            sealed = session.send.seal(encode(entries))
        except NoiseError:
            self._worn(peer)
            return
        frames.append(wire.encode(wire.Batch(peer=peer, payload=sealed, opens=tuple(opens), closes=tuple(closes))))
        self.batches_sent += 1
        self.batched_items += len(group)

    def _build(self, item: Outgoing) -> bytes | None:
        kind, peer = item[0], item[1]
        if kind == "raw":
            raw: bytes = item[1]
            return raw
        if kind == "hello":
            return wire.encode(wire.Hello(peer=peer, payload=item[2]))
        if kind == "hello_reply":
            return wire.encode(wire.HelloReply(peer=peer, payload=item[2]))
        if kind == "reset":
            return wire.encode(wire.Reset(peer=peer, stream=item[2], code=item[3]))
        if kind == "window":
            return wire.encode(wire.Window(peer=peer, stream=item[2], credit=item[3]))
        if kind == "draining":
            return wire.encode(wire.Draining())
        session = self._sessions.get(peer)
        if session is None or session.send is None:
            return None  # the session ended while this waited; its streams were failed
        try:
            sealed = session.send.seal(item[3])
        except NoiseError:  # this session sent its share: the next request handshakes anew
            self._worn(peer)
            return None
        if kind == "open":
            return wire.encode(wire.Open(peer=peer, stream=item[2], payload=sealed))
        if kind == "data":
            return wire.encode(wire.Data(peer=peer, stream=item[2], payload=sealed))
        return wire.encode(wire.Close(peer=peer, stream=item[2], payload=sealed))
