"""The relay protocol: frames between a node and ``quorum-relay``, over one WebSocket.

Shared by both ends (the relay imports nothing of ``quorum_node``; nodes import
this module). Every WebSocket message is one binary message holding one
msgpack-encoded frame of the tagged union ``Frame`` (tag = the class name, the
Struct encoded as an array for compactness). Text messages are a protocol error.

Connecting
----------
A node opens ``ws(s)://RELAY/v1/connect`` with the headers::

    Authorization: Bearer <token>      admits the node into the token's namespace
    X-Quorum-Node-Id: <node id>        [A-Za-z0-9._-]{1,64}; a node's is 24 hex characters
    X-Quorum-Node-Key: <key>           its Ed25519 public key, 32 bytes, standard base64

A missing or bad token is refused during the handshake with HTTP 401 and a
JSON body ``{"error": {"message", "type", "param", "code"}}``; so are a
missing or malformed key and a node id that is not the key's (the id is
SHA-256 over ``quorum/v1/node-id`` and the key, its first 12 bytes in hex: an
id names exactly one key). Too many handshakes or connections from one address
get HTTP 429.

The node then proves it holds the key, by challenge and response: the relay's
first frame is ``Challenge`` (32 random bytes, fresh for this connection),
and the node's first frame must be ``Proof``, its Ed25519 signature of
``proof_message(nonce, node_id, key)``. A wrong, late (past the relay's open
timeout) or missing proof closes the connection with ``CLOSE_UNAUTHORIZED``,
and the node was never registered: nobody was told of it and nobody it claims
to be was displaced. Why a challenge rather than a signed timestamp: the
nonce is fresh, so a proof can never be replayed (not to this relay, which
made the nonce, and needs no replay cache), and it needs no agreement between
the node's and the relay's clocks, which home machines do not always keep.
It costs one round trip per connection. What the relay learns is the public
key, which it checks and keeps nothing of. (A relay that a node connects to
could pass it another relay's challenge, and so appear at that other relay as
the node while the node is connected to it instead; when the node connects
there itself, its own proof replaces that connection. Either way no session
with the node's peers can be had without its X25519 key: the traffic between
nodes is authenticated end to end, whichever relay carries it.)

Only then does the relay send ``Welcome``: the session id, who else of the
namespace is online, and the limits in force (``max_frame_bytes`` bounds what
a node sends; a frame it receives may be up to ``FRAME_OVERHEAD`` bytes
longer, since ``peer`` now holds the source's id; a node bounds what it
receives by that, and by ``MAX_WELCOME_BYTES`` before the ``Welcome``).
Afterwards it sends ``Joined`` / ``Left`` as peers come and go. A second
connection with the same node id in the same namespace, once its proof is
good, replaces the first (closed with ``CLOSE_REPLACED``): the same node,
reconnecting, since only it holds the key.

Draining
--------
A node that begins to stop sends ``Draining`` (only to a relay whose
``Welcome.drain`` says it knows the frame): it finishes the streams it has and
takes no new ones. The relay tells the namespace with ``Joined`` again, its
``Presence.draining`` set, and lists it so in the ``Welcome`` of nodes that
join later; a node of an older version reads that as a repeated ``Joined``
and ignores it. The connection stays open until the node closes it (1001).

Peer traffic
------------
``Hello``, ``HelloReply``, ``Open``, ``Data``, ``Batch``, ``Window``, ``Close``
and ``Reset`` carry traffic between two nodes of one namespace. ``peer`` is the
destination when a node sends the frame and is rewritten by the relay to the
source when it delivers it; nothing else is changed, and ``payload`` is never
decoded by the relay (the nodes encrypt it end to end: ``Hello`` /
``HelloReply`` carry a Noise handshake, the rest its transport messages; a
``HelloReply`` with an empty payload is a refusal: the responder does not take
the initiator for a member of its cluster).

Streams (``stream`` ids) are chosen by the node that opens them, unique per
pair of nodes: the node whose id sorts lower uses odd ids, the other even ids,
so the relay can key a stream by ``(pair, id)``. A stream is open from its
``Open`` until both sides sent ``Close`` or either side sent ``Reset``; the
relay counts open streams per node against its limit and answers an ``Open``
past it with ``Reset(code="too_many_streams")``. A frame for a peer that is not
online is answered with ``Unreachable``; streams of a peer that disconnects
are reset (``Reset(code="peer_gone")``) to the other side. ``Window`` grants
the other side ``credit`` more payload bytes on a stream (flow control is end
to end; the relay only forwards). ``Batch`` carries many streams' data and
credit to one peer in one encrypted message; the relay routes it by ``peer``
alone (it cannot see which streams it holds; the receiving node drops items of
streams it does not have open). A relay that forwards it says so in
``Welcome.batch``; nodes send it only to such a relay. A batch may also open
and end streams (its encrypted items say so to the peer): ``opens`` and
``closes`` list those stream ids in the clear, and the relay applies them to
its stream table as it would ``Open`` and ``Close`` frames (an ``opens`` id
past the stream limit is reset to both sides with ``too_many_streams``; a
wrong-parity or duplicate id, or more ids in either list than
``Welcome.max_streams``, is a protocol violation). A relay that does so
says ``Welcome.batch_streams``; nodes send ``opens``/``closes`` only to such a
relay (an older one would forward them without counting).

Join codes
----------
A relay that says ``Welcome.rendezvous`` also carries the exchange of a short
join code (``quorum-node invite --code``) between a member and a machine that
is not one yet, and so has no token. The member asks for a nameplate,
``Claim`` (``nameplate`` 0: any free one; otherwise the one it held before a
reconnection), and the relay answers ``Claimed`` with the same ``ref`` and
the nameplate (0: none free); it holds it until the member sends ``Release``
or disconnects, at most ``MAX_PLATES_PER_NODE`` a member. The new machine
opens ``ws(s)://RELAY/v1/join/<nameplate>`` with no token (a nameplate nobody
holds is refused with HTTP 404), and each of its binary messages
(``MAX_RENDEZVOUS_BYTES`` at most, ``MAX_RENDEZVOUS_MESSAGES`` of them, within
``RENDEZVOUS_S``) reaches the holder as ``Rendezvous`` with a ``channel`` id the
relay chose; the holder's ``Rendezvous`` answers go back to that machine, one
binary message each (an empty ``payload`` ends the channel). A channel belongs
to the member it was opened to: after ``Release`` the nameplate is free for
another claim, and the channels already open run to their end. What the two say
is a password-authenticated key exchange and what it seals: the relay only
forwards it, and learns nothing it could use.

Close codes (the relay closing a node's WebSocket)
--------------------------------------------------
``CLOSE_UNAUTHORIZED`` no good ``Proof`` of the node's key; ``1001`` relay shutting down;
``1009`` frame over ``max_frame_bytes`` (websockets' own); ``CLOSE_PROTOCOL`` a frame that does not decode or breaks
the rules; ``CLOSE_TOO_SLOW`` the node's send queue passed its limit;
``CLOSE_REPLACED`` another connection took this node id;
``CLOSE_TOKEN_REVOKED`` the node's token was removed (SIGHUP reload);
``CLOSE_IDLE`` no traffic or pong within the idle timeout.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "CLOSE_IDLE",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_PROTOCOL",
    "CLOSE_REPLACED",
    "CLOSE_TOKEN_REVOKED",
    "CLOSE_TOO_SLOW",
    "CONNECT_PATH",
    "JOIN_PATH",
    "MAX_NAMEPLATE",
    "MAX_PLATES_PER_NODE",
    "MAX_RENDEZVOUS_BYTES",
    "MAX_RENDEZVOUS_MESSAGES",
    "RENDEZVOUS_S",
    "FRAME_OVERHEAD",
    "MAX_WELCOME_BYTES",
    "NODE_ID_HEADER",
    "NODE_KEY_HEADER",
    "NONCE_BYTES",
    "Batch",
    "Challenge",
    "Claim",
    "Claimed",
    "Close",
    "Data",
    "Draining",
    "Frame",
    "Hello",
    "HelloReply",
    "Joined",
    "Left",
    "Open",
    "Presence",
    "Proof",
    "Release",
    "Rendezvous",
    "Reset",
    "Unreachable",
    "Welcome",
    "Window",
    "decode",
    "encode",
    "proof_message",
]

CONNECT_PATH = "/v1/connect"
#: ``JOIN_PATH + str(nameplate)``: where a machine with a join code meets its inviter (no token).
JOIN_PATH = "/v1/join/"
#: The largest message either side of a join-code channel sends.
MAX_RENDEZVOUS_BYTES = 8 * 1024
#: Messages a joining machine sends on one channel, and how long a channel lives.
MAX_RENDEZVOUS_MESSAGES = 4
RENDEZVOUS_S = 180.0  # past a confirmation the inviter may be asked for (join.CONFIRM_S)
#: Nameplates one member holds at once, and the highest nameplate.
MAX_PLATES_PER_NODE = 16
MAX_NAMEPLATE = 999
NODE_ID_HEADER = "X-Quorum-Node-Id"
NODE_KEY_HEADER = "X-Quorum-Node-Key"
NONCE_BYTES = 32
# A frame the relay delivers may be this much longer than the sender's (``peer`` rewritten to the source's id).
FRAME_OVERHEAD = 64
# What a node accepts before the ``Welcome`` (it lists who is online: ~40 bytes a node).
MAX_WELCOME_BYTES = 1024 * 1024

CLOSE_UNAUTHORIZED = 4001
CLOSE_PROTOCOL = 4002
CLOSE_TOO_SLOW = 4008
CLOSE_REPLACED = 4009
CLOSE_TOKEN_REVOKED = 4010
CLOSE_IDLE = 4011


class _F(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag=True):
    """Base of every frame."""


class Presence(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    node_id: str
    since: float  # wall-clock seconds when it connected
    # It is stopping: it finishes its streams, new ones go elsewhere (added later; older nodes skip it).
    draining: bool = False


class Challenge(_F, frozen=True, kw_only=True):
    """Relay → node, first frame: sign this (``proof_message``) to prove you hold your key."""

    nonce: bytes


class Proof(_F, frozen=True, kw_only=True):
    """Node → relay, first frame: the Ed25519 signature of ``proof_message`` for the ``Challenge``."""

    signature: bytes


def proof_message(nonce: bytes, node_id: str, sign_key: bytes) -> bytes:
    """What a node signs to prove its key: a label, the relay's nonce, the key and the id (fixed lengths first)."""
    if len(nonce) != NONCE_BYTES or len(sign_key) != 32:
        raise ValueError("a nonce and a key are 32 bytes")
    return b"quorum-relay/v1/proof\x00" + nonce + sign_key + node_id.encode("ascii", "replace")


class Welcome(_F, frozen=True, kw_only=True):
    """Relay → node, first frame: the session and who is online."""

    session: str
    node_id: str
    peers: tuple[Presence, ...] = ()
    max_frame_bytes: int = 0
    max_streams: int = 0
    # Bytes the relay queues towards this node before closing it with CLOSE_TOO_SLOW: keep the
    # credit granted on all streams together below it. (Added after the first draft; 0 = unknown.)
    send_queue_bytes: int = 0
    # This relay forwards ``Batch`` frames (a node must not send them to one that does not).
    batch: bool = False
    # This relay knows ``Draining`` (a node must not send it to one that does not).
    drain: bool = False
    # This relay applies ``Batch.opens`` / ``Batch.closes`` to its stream table.
    batch_streams: bool = False
    # This relay carries join codes (``Claim``, ``Rendezvous``; a node must not send them to one that does not).
    rendezvous: bool = False


class Joined(_F, frozen=True, kw_only=True):
    """Relay → node: a peer of the namespace came online, or began to drain (``peer.draining``)."""

    peer: Presence


class Left(_F, frozen=True, kw_only=True):
    """Relay → node: a peer went offline."""

    node_id: str


class Draining(_F, frozen=True, kw_only=True):
    """Node → relay: the sender is stopping; the relay tells the namespace (``Joined``, ``Presence.draining``)."""


class Unreachable(_F, frozen=True, kw_only=True):
    """Relay → node: the destination of a frame is not online (``stream`` 0 for ``Hello``)."""

    peer: str
    stream: int = 0


class Hello(_F, frozen=True, kw_only=True):
    """Node ↔ node: first handshake message (opaque to the relay)."""

    peer: str
    payload: bytes


class HelloReply(_F, frozen=True, kw_only=True):
    """Node ↔ node: handshake answer (opaque to the relay)."""

    peer: str
    payload: bytes


class Open(_F, frozen=True, kw_only=True):
    """Node ↔ node: opens ``stream``; ``payload`` (encrypted) is the request head."""

    peer: str
    stream: int
    payload: bytes


class Data(_F, frozen=True, kw_only=True):
    peer: str
    stream: int
    payload: bytes


class Batch(_F, frozen=True, kw_only=True):
    """Node ↔ node: several streams' data and credit for one peer in one message (opaque to the relay).

    ``payload`` is one encrypted message holding many stream items, so a busy
    link pays one WebSocket message, one relay hop and one AEAD operation for
    many small frames. The relay routes it by ``peer`` and counts the streams
    it opens (``opens``) and ends (``closes``: the sender's half) as it would
    ``Open`` and ``Close`` frames; it sees nothing else of them.
    """

    peer: str
    payload: bytes
    opens: tuple[int, ...] = ()
    closes: tuple[int, ...] = ()


class Window(_F, frozen=True, kw_only=True):
    """Node ↔ node: the sender may send ``credit`` more payload bytes on ``stream``."""

    peer: str
    stream: int
    credit: int


class Close(_F, frozen=True, kw_only=True):
    """Node ↔ node: the sender's half of ``stream`` is finished (``payload``: encrypted trailer, may be empty)."""

    peer: str
    stream: int
    payload: bytes = b""


class Reset(_F, frozen=True, kw_only=True):
    """Either way: ``stream`` is aborted; the relay sends one too (``too_many_streams``, ``peer_gone``)."""

    peer: str
    stream: int
    code: str


class Claim(_F, frozen=True, kw_only=True):
    """Node → relay: hold a nameplate for a join code (``nameplate`` 0: any free one)."""

    ref: int
    nameplate: int = 0


class Claimed(_F, frozen=True, kw_only=True):
    """Relay → node: the answer to the ``Claim`` with this ``ref``: the nameplate held (0: none free)."""

    ref: int
    nameplate: int


class Release(_F, frozen=True, kw_only=True):
    """Node → relay: the code of this nameplate is used, burnt or expired; the relay frees it."""

    nameplate: int


class Rendezvous(_F, frozen=True, kw_only=True):
    """Either way: one message of a join-code channel (opaque to the relay; empty from the node: it ends)."""

    nameplate: int
    channel: int
    payload: bytes


Frame = (
    Welcome
    | Joined
    | Left
    | Draining
    | Unreachable
    | Hello
    | HelloReply
    | Open
    | Data
    | Batch
    | Window
    | Close
    | Reset
    | Challenge
    | Proof
    | Claim
    | Claimed
    | Release
    | Rendezvous
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Frame] = msgspec.msgpack.Decoder(Frame)


def encode(frame: Frame) -> bytes:
    return _encoder.encode(frame)


def decode(raw: bytes) -> Frame:
    """One frame; raises ``msgspec.DecodeError`` (a ``ValueError``) if it is not one."""
    return _decoder.decode(raw)
