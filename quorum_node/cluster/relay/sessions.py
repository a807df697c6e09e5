"""Who is online on the relay, and the Noise session with each peer (pure logic).

Members (``peer_key`` has a key for them) are tracked up to ``max_peers``;
past it they are refused and counted. Non-members are counted and kept in a
bounded set (oldest out first), only so that one that becomes a member while
online is found (``RelayProtocol.members_changed``), and never handshaken with.
"""

from __future__ import annotations

from ..noise import Handshake, NumberedReceiver, NumberedSender
from .messages import Features

__all__ = ["Presence", "Session", "numbered", "prologue"]


class Presence:
    """Who of the relay's namespace is online, as far as this node keeps track."""

    __slots__ = ("members", "strangers", "max_peers", "refused", "ignored")

    def __init__(self, max_peers: int) -> None:
        self.members: dict[str, float] = {}  # node id -> since
        self.strangers: dict[str, float] = {}
        self.max_peers = max_peers
        self.refused = 0  # members not tracked: the table was full
        self.ignored = 0  # presences of non-members

    def stranger(self, node_id: str, since: float, *, count: bool = True) -> None:
        self.ignored += count
        self.strangers.pop(node_id, None)
        if len(self.strangers) >= self.max_peers:
            del self.strangers[next(iter(self.strangers))]
        self.strangers[node_id] = since

    def left(self, node_id: str) -> bool:
        """It left; whether it was a tracked member."""
        self.strangers.pop(node_id, None)
        return self.members.pop(node_id, None) is not None

    def clear(self) -> None:
        self.members.clear()
        self.strangers.clear()


class Session:
    """The Noise session with one peer over this relay connection: being handshaken, then ready."""

    __slots__ = ("send", "recv", "handshake", "initiator", "batch", "streams", "opened_after", "deadline", "introduced")

    def __init__(self, opened_after: int) -> None:
        self.send: NumberedSender | None = None
        self.recv: NumberedReceiver | None = None
        self.handshake: Handshake | None = None  # ours, as initiator, until the reply
        self.initiator = False
        self.batch = False  # the peer said in its handshake that it reads Batch frames
        self.streams = False  # ... and that its batches may open and end streams (``Item.flags``)
        # Our streams numbered past this (the count of ids we opened) were opened in this session, the rest before.
        self.opened_after = opened_after
        self.deadline: float | None = None  # our hello's answer is awaited until then
        self.introduced = False  # our hello carried our membership records

    @property
    def ready(self) -> bool:
        return self.send is not None

    def learn(self, theirs: Features) -> None:
        """What the peer said in its handshake it reads."""
        self.batch = theirs.batch
        self.streams = theirs.batch and theirs.streams


def numbered(hs: Handshake) -> tuple[NumberedSender, NumberedReceiver]:
    # The relay may drop frames (those of a stream it saw reset), so nonces travel with the frames.
    send, recv = hs.split()
    return NumberedSender(send), NumberedReceiver(recv)


def prologue(initiator: str, responder: str, initiator_session: str) -> bytes:
    """What both ends of a handshake bind into it: both node ids and the initiator's relay session."""
    return b"\x00".join((b"quorum-relay-noise-v1", initiator.encode(), responder.encode(), initiator_session.encode()))
