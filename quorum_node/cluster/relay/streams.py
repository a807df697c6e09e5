"""Streams and their credit: who may send how much, on each stream and on the whole link (pure logic).

Flow control is per stream and end to end (yamux-style credit windows): a
sender never has more than ``WINDOW`` unacknowledged bytes on a stream, and a
receiver grants more only as its reader consumes, so one slow client or one
huge answer never stalls the others and nothing is buffered without bound. A
node also keeps what it has out on all its streams below ``send_budget``, so
that it fits the relay's queue towards a peer (``Welcome.send_queue_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from quorum_relay import wire

from .messages import WINDOW, AnswerHead, OpenHead, RelayLinkError

__all__ = ["Outgoing", "Stream", "StreamHandler", "Streams"]

Outgoing = tuple[Any, ...]  # an item for the outbox: (kind, peer, ...), see ``outbox.py``


class StreamHandler(Protocol):
    """What a stream tells its owner (the driver): the protocol calls these, synchronously, as frames come."""

    def on_head(self, head: AnswerHead) -> None:
        """The answer's head arrived (a stream we opened)."""

    def on_data(self, data: bytes) -> None:
        """More of the answer's body (a stream we opened)."""

    def on_end(self) -> None:
        """The peer's half ended (after its last data)."""

    def on_failed(self, error: RelayLinkError) -> None:
        """The stream was reset, or its session or connection ended: nothing more comes or goes."""

    def on_credit(self) -> None:
        """The peer granted credit: a sender waiting for it may go on."""


class Stream:
    """One stream's state. ``handler`` is its owner's (set when it is opened, or when it is served)."""

    __slots__ = (
        "id",
        "peer",
        "outgoing",
        "handler",
        "credit",
        "sent_close",
        "got_close",
        "answered",
        "ended",
        "unacked",
        "received_in_window",
        "request",
        "request_body",
        "tunnel",
    )

    def __init__(self, peer: str, sid: int, *, outgoing: bool, handler: StreamHandler | None = None) -> None:
        self.id = sid
        self.peer = peer
        self.outgoing = outgoing  # we opened it (we are the requester)
        self.handler = handler
        self.credit = WINDOW  # bytes we may still send
        self.sent_close = False
        self.got_close = False
        self.answered = False  # (ours) the answer's head arrived
        self.ended = False  # no longer in the table: nothing more is sent or taken on it
        self.unacked = 0  # consumed bytes not yet granted back
        self.received_in_window = 0  # received bytes the sender still counts against our grant
        self.request: OpenHead | None = None  # the server side: the head, then the body as it arrives
        self.request_body = bytearray()
        self.tunnel = False  # (served) a byte stream both ways: its data goes to the handler as it comes


class Streams:
    """The open streams of one relay connection, and the credit of the whole link.

    ``push`` queues an outgoing item (a ``window`` grant here); ``on_room`` is
    called when the link's budget, found full by a sender, has room again.
    """

    def __init__(self, push: Callable[[Outgoing], None], on_room: Callable[[], None]) -> None:
        self.table: dict[tuple[str, int], Stream] = {}
        self.serving = 0  # streams peers opened to us and still open
        # Payload bytes sent on all streams and not yet acknowledged by credit: kept below ``send_budget``.
        self.unacked_bytes = 0
        self.send_budget = 4 * 1024 * 1024
        self.ungranted_bytes = 0  # bytes read on all streams and not yet granted back (``grant``)
        self._blocked = False  # a sender found the budget full: ``on_room`` when it is not
        self._push = push
        self._on_room = on_room

    def __len__(self) -> int:
        return len(self.table)

    def add(self, stream: Stream) -> None:
        self.table[(stream.peer, stream.id)] = stream
        if not stream.outgoing:
            self.serving += 1

    def forget(self, key: tuple[str, int]) -> Stream | None:
        """Remove a stream from the table; what it had out no longer counts against the budget."""
        stream = self.table.pop(key, None)
        if stream is not None:
            stream.ended = True
            if not stream.outgoing:
                self.serving -= 1
            self.release(WINDOW - stream.credit)
            stream.credit = WINDOW
            self.ungranted_bytes -= stream.unacked  # its sender stops counting it too
            stream.unacked = 0
        return stream

    def clear(self) -> None:
        for stream in self.table.values():
            stream.ended = True
        self.table.clear()
        self.serving = 0
        self.unacked_bytes = 0
        self.ungranted_bytes = 0
        self._room()

    def release(self, n: int) -> None:
        if n > 0:
            self.unacked_bytes = max(0, self.unacked_bytes - n)
            if self._blocked and self.unacked_bytes < self.send_budget:
                self._room()

    def _room(self) -> None:
        self._blocked = False
        self._on_room()

    def has_room(self) -> bool:
        if self.unacked_bytes < self.send_budget:
            return True
        self._blocked = True
        return False

    def take(self, stream: Stream, n: int) -> bool:
        """Count ``n`` bytes out on ``stream`` if its credit and the budget allow all of them now."""
        if stream.ended or n > stream.credit or self.unacked_bytes + n > self.send_budget:
            if self.unacked_bytes + n > self.send_budget:
                self._blocked = True
            return False
        stream.credit -= n
        self.unacked_bytes += n
        return True

    def room_for(self, stream: Stream, n: int) -> int:
        """How many of ``n`` bytes ``stream`` may send now (at least one byte of credit, room in the budget);
        counted out as taken."""
        if stream.ended or stream.credit <= 0 or not self.has_room():
            return 0
        n = min(n, stream.credit)
        stream.credit -= n
        self.unacked_bytes += n
        return n

    def credited(self, stream: Stream, credit: int) -> None:
        """The peer granted ``credit`` more bytes on ``stream``."""
        if credit > 0:
            back = min(credit, WINDOW - stream.credit)  # never more than it had out (a peer cannot inflate it)
            stream.credit += credit
            self.release(back)
            if stream.handler is not None:
                stream.handler.on_credit()

    def grant(self, stream: Stream, consumed: int) -> None:
        """``consumed`` bytes of ``stream`` were read: grant them back, half a window at a time.

        A sender also counts what it has out on all its streams against one budget (``send_budget``),
        so many streams that each stay below half a window would, together, hold that budget with
        bytes long consumed here, and every stream would wait for credit that never comes. Past a
        quarter of the budget consumed and not yet granted, every stream's share is granted at once.
        """
        if stream.ended:
            return  # its sender no longer counts what it sent
        stream.unacked += consumed
        self.ungranted_bytes += consumed
        if stream.unacked >= WINDOW // 2:
            self._send_grant(stream)
        elif self.ungranted_bytes >= self.send_budget // 4:
            for s in list(self.table.values()):
                if s.unacked:
                    self._send_grant(s)

    def _send_grant(self, stream: Stream) -> None:
        self.ungranted_bytes -= stream.unacked
        stream.received_in_window -= stream.unacked
        self._push(("window", stream.peer, stream.id, stream.unacked))
        stream.unacked = 0


class Listener(Protocol):
    """What the protocol tells its driver (called synchronously, as it happens)."""

    def welcomed(self, welcome: wire.Welcome) -> None:
        """The relay let us in: the connection is up (its limits are in ``welcome``)."""

    def presence(self, peer: str, online: bool) -> None:
        """A member came online on the relay, or went."""

    def draining(self, peer: str) -> None:
        """A member is stopping: send it no new requests."""

    def session_ready(self, peer: str) -> None:
        """A session with ``peer`` is ready: streams may be opened to it."""

    def session_failed(self, peer: str, error: RelayLinkError) -> None:
        """The handshake with ``peer`` failed (``SessionLost``: try once more, a fresh one)."""

    def serve(self, stream: Stream, head: OpenHead, body: bytes) -> None:
        """A member's request came whole: serve it, set ``stream.handler``, answer with ``send`` and ``close``."""

    def tunnel(self, stream: Stream, head: OpenHead) -> None:
        """A member opened a tunnel (``TUNNEL``): set ``stream.handler`` (its data comes to ``on_data`` as it
        arrives, granted back with ``consumed``), answer with a head, then ``send`` and ``close`` as for any."""

    def claimed(self, ref: int, nameplate: int) -> None:
        """The relay's answer to ``claim(ref, …)``: the nameplate it holds for us (0: none)."""

    def rendezvous(self, nameplate: int, channel: int, payload: bytes) -> None:
        """A message of a machine with a join code (``wire.Rendezvous``): answer with ``rendezvous_answer``."""

    def output(self) -> None:
        """Frames are waiting to be sent (``frames_to_send``)."""

    def room(self) -> None:
        """The link's budget has room again: senders waiting for it may go on."""
