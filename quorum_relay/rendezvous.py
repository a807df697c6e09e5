"""Join codes through the relay: nameplates members hold, and the channels of machines that join.

A member holds a nameplate (``wire.Claim``) for each join code it gave; a
machine with the code, and no token, opens ``/v1/join/<nameplate>``
(``server``), and its messages reach the holder as ``wire.Rendezvous``. The
relay never reads them (a SPAKE2 exchange and what it seals); it bounds them:
``wire.MAX_RENDEZVOUS_BYTES`` a message, ``wire.MAX_RENDEZVOUS_MESSAGES`` a
channel, ``wire.RENDEZVOUS_S`` a channel's life, ``_CHANNELS_PER_PLATE``
channels at once on one nameplate, ``wire.MAX_PLATES_PER_NODE`` nameplates a
member. No I/O here: a channel's answers wait in its bounded queue for the
joining machine's handler (``server``) to send.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from dataclasses import dataclass, field
from typing import Protocol

from .wire import MAX_NAMEPLATE, MAX_PLATES_PER_NODE

__all__ = ["Channel", "Holder", "Plates"]


class Holder(Protocol):
    """A member's connection, as far as its nameplates go (``hub.Link`` is one)."""

    gone: bool

    def send(self, data: bytes) -> None: ...


#: Joining machines talking to one nameplate at once (a guesser's parallel tries; the code allows 3 wrong).
_CHANNELS_PER_PLATE = 4
#: Answers queued towards one joining machine (the exchange needs one per message it sends).
_QUEUE = 4


@dataclass(eq=False)
class Channel:
    """One joining machine's connection to the holder of its nameplate: ``answers`` (None: ended)."""

    nameplate: int
    id: int
    holder: Holder
    answers: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(_QUEUE))

    def end(self) -> None:
        while self.answers.full():  # what it has not read yet is dropped: it ends now
            self.answers.get_nowait()
        self.answers.put_nowait(None)


class Plates:
    """Who holds which nameplate, and the channels open to them.

    A channel belongs to the holder it was opened to. A released nameplate is free at once for a new claim,
    while its open channels run to their end (the answer that used the code is on its way after the
    release); a holder that leaves the relay ends its channels.
    """

    def __init__(self) -> None:
        self.holders: dict[int, Holder] = {}
        self.channels: dict[int, Channel] = {}  # channel id -> channel
        self._ids = itertools.count(1)

    def claim(self, holder: Holder, wanted: int) -> int:
        """A nameplate for ``holder``: ``wanted`` if it is free (or already its own), else any free one; 0: none."""
        held = [n for n, h in self.holders.items() if h is holder]
        if 1 <= wanted <= MAX_NAMEPLATE and self.holders.get(wanted) is holder:
            return wanted
        if len(held) >= MAX_PLATES_PER_NODE:
            return 0
        if 1 <= wanted <= MAX_NAMEPLATE and wanted not in self.holders:
            plate = wanted
        else:
            free = [n for n in range(1, MAX_NAMEPLATE + 1) if n not in self.holders]
            if not free:
                return 0
            # short numbers while few are out; a random one of all when many are
            plate = free[0] if len(free) > MAX_NAMEPLATE - 100 else secrets.choice(free)
        self.holders[plate] = holder
        return plate

    def release(self, holder: Holder, plate: int) -> None:
        if self.holders.get(plate) is holder:
            del self.holders[plate]

    def drop(self, holder: Holder) -> None:
        """``holder`` left the relay: its nameplates are free, its channels end."""
        for plate in [n for n, h in self.holders.items() if h is holder]:
            del self.holders[plate]
        for channel in [c for c in self.channels.values() if c.holder is holder]:
            channel.end()

    def holder(self, plate: int) -> Holder | None:
        return self.holders.get(plate)

    def open(self, plate: int) -> Channel | None:
        """A channel to ``plate``'s holder; None where nobody holds it, or it has enough channels open."""
        holder = self.holders.get(plate)
        if holder is None:
            return None
        if sum(1 for c in self.channels.values() if c.holder is holder and c.nameplate == plate) >= _CHANNELS_PER_PLATE:
            return None
        channel = Channel(plate, next(self._ids), holder)
        self.channels[channel.id] = channel
        return channel

    def close(self, channel: Channel) -> None:
        self.channels.pop(channel.id, None)

    def answer(self, holder: Holder, plate: int, channel_id: int, payload: bytes) -> bool:
        """The holder's answer on a channel it was opened to; False where it is not, or the channel is gone."""
        channel = self.channels.get(channel_id)
        if channel is None or channel.holder is not holder or channel.nameplate != plate:
            return False
        if not payload:
            channel.end()
            return True
        try:
            channel.answers.put_nowait(payload)
        except asyncio.QueueFull:  # more answers than it asked for: end it
            channel.end()
        return True
