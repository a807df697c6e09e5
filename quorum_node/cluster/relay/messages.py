"""What two nodes say to each other inside the relay's frames (encrypted end to end), and the limits of it.

The relay frames themselves (``Open``, ``Data``, ``Batch``…) are
``quorum_relay.wire``'s; these are their plaintext payloads: a request's head
(``OpenHead``), an answer's head (``AnswerHead``), one stream's share of a
``Batch`` (``Item``) and what a node says in its handshake it reads
(``Features``). Their encodings are the wire format between nodes of every
version: never change a field's place, only add ones with defaults.
"""

from __future__ import annotations

import msgspec
import structlog

__all__ = [
    "BATCH_BYTES",
    "BATCH_ITEMS",
    "CHUNK",
    "COALESCE_S",
    "COALESCE_STREAMS",
    "FIN",
    "FEATURES",
    "HANDSHAKE_TIMEOUT_S",
    "HOP_BY_HOP",
    "TUNNEL",
    "INTRODUCE_EVERY_S",
    "MAX_FRAME_BYTES",
    "OPEN",
    "WINDOW",
    "AnswerHead",
    "Features",
    "Item",
    "OpenHead",
    "RelayLinkError",
    "SessionLost",
    "decode_answer_head",
    "decode_features",
    "decode_items",
    "decode_open_head",
    "encode",
]

log = structlog.get_logger(__name__)

CHUNK = 16 * 1024  # a data item's payload, at most
WINDOW = 256 * 1024  # a stream's credit window
BATCH_BYTES = 64 * 1024  # a batch's plaintext, at most (well below the relay's frame limit)
BATCH_ITEMS = 1024
# A busy link (at least ``COALESCE_STREAMS`` streams open) sends at most one round of messages every
# ``COALESCE_S``: what comes in between waits and leaves together (fewer, larger batches: fewer seals,
# writes and relay passes per event). A link with a few streams sends at once, so a lone request's head
# and first token, and a client's requests one after another, are never held back.
COALESCE_S = 0.002
COALESCE_STREAMS = 8
INTRODUCE_EVERY_S = 5.0  # at most one introduction taken from (and one refusal sent to) a peer this often
# The largest frame limit a relay may announce (its own settings allow no more); a hostile relay's
# larger claim is not believed.
MAX_FRAME_BYTES = 64 * 1024 * 1024
HANDSHAKE_TIMEOUT_S = 10.0  # a hello with no answer: the session is dropped, the next request tries anew

# Hop-by-hop headers never cross a link (RFC 9110 §7.6.1), nor do the body framing ones.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "host",
        "content-length",
    )
)

#: The method of a stream that is a tunnel (a byte stream both ways, e.g. a sharded model's rpc-server
#: connection, ``cluster/tunnel.py``): served as soon as it opens, its data going both ways until either closes.
TUNNEL = "CONNECT"

OPEN = 1  # ``Item.flags``: the item opens its stream (``data`` is the request head)
FIN = 2  # ``Item.flags``: the sender's half of the stream ends after ``data``


class RelayLinkError(ConnectionError):
    """The relay or the peer could not carry a request (before or during its answer)."""


class SessionLost(RelayLinkError):
    """The peer no longer has the Noise session a stream was opened in (it ended it, or restarted): nothing of
    the request was served, so it may be sent again in a fresh session."""


class OpenHead(msgspec.Struct, frozen=True, array_like=True):
    """A request's head: what an ``Open`` frame (or an opening ``Item``) carries; the body follows as data."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes  # always empty from this version (the body is data); kept for the wire


class AnswerHead(msgspec.Struct, frozen=True, array_like=True):
    """An answer's head: the first data of the answering side; its body follows."""

    status: int
    headers: list[tuple[str, str]]


class Item(msgspec.Struct, frozen=True, array_like=True):
    """One stream's share of a ``Batch``: data for it, or credit for it; it may open or end the stream.

    With ``OPEN`` in ``flags``, ``data`` is the request head (what an ``Open``
    frame carries); with ``FIN``, the sender's half ends after ``data`` (what a
    ``Close`` frame says). A peer reads flags only if its handshake said
    ``streams`` (an older one would take an opening item for data of a stream
    it does not have).
    """

    stream: int
    data: bytes = b""
    credit: int = 0
    flags: int = 0


class Features(msgspec.Struct, frozen=True, kw_only=True):
    """What a node reads beyond the first relay protocol: the payload of its handshake messages (encrypted).

    A map, so that fields a newer peer adds are skipped; a peer of an older
    version sends no payload at all, which decodes as "nothing beyond it".
    """

    v: int = 1
    batch: bool = False  # it decodes ``Batch`` frames
    streams: bool = False  # it reads ``Item.flags``: batches may open and end its streams
    # The initiator's membership records (as ``members.encode_records`` writes them), sent when the
    # responder may not know it yet: each record is signed by a member, so they speak for themselves.
    intro: bytes = b""


_ENCODER = msgspec.msgpack.Encoder()
encode = _ENCODER.encode
FEATURES = Features(batch=True, streams=True)  # what this version reads
_decode_features = msgspec.msgpack.Decoder(Features).decode
decode_open_head = msgspec.msgpack.Decoder(OpenHead).decode
decode_answer_head = msgspec.msgpack.Decoder(AnswerHead).decode
decode_items = msgspec.msgpack.Decoder(list[Item]).decode


def decode_features(payload: bytes) -> Features:
    """A handshake's payload: what the peer reads (nothing beyond the first protocol if it said nothing)."""
    if not payload:
        return Features()
    try:
        return _decode_features(payload)
    except (msgspec.DecodeError, ValueError):  # authentic (it came in the handshake) but not ours: assume nothing
        log.warning("relay_bad_features", size=len(payload))
        return Features()
