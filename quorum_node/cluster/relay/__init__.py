"""The relay link: peer requests as encrypted, multiplexed streams over one WebSocket to ``quorum-relay``.

``protocol.RelayProtocol`` is the link as a state machine (no I/O, nothing
awaits: frames and ``now`` in, frames and events out), built of
``sessions`` (presence, Noise sessions), ``streams`` (streams and credit),
``outbox`` (sealing and batching what goes out) and ``messages`` (what nodes
say inside the relay's frames). ``link.RelayLink`` is its asyncio driver;
``body`` is the answer it hands up through the link seam.
"""

from .body import RelayAnswer, RelayBody
from .link import RelayLink
from .messages import CHUNK, WINDOW, RelayLinkError, SessionLost
from .protocol import ProtocolError, RelayProtocol

__all__ = [
    "CHUNK",
    "WINDOW",
    "ProtocolError",
    "RelayAnswer",
    "RelayBody",
    "RelayLink",
    "RelayLinkError",
    "RelayProtocol",
    "SessionLost",
]
