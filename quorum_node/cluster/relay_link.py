"""The relay link: peer requests as encrypted, multiplexed streams over one WebSocket to ``quorum-relay``.

The node dials out to the relay (``relay/wire.py`` is the protocol), proves
its node id by signing the relay's challenge with its Ed25519 key (so nobody
else can take its place there), reconnects with jittered backoff, and learns
which peers of its namespace are online. To each peer that membership says is
a member (``peer_key``) it talks through an end-to-end Noise session
(``noise.py``, ``Noise_IK``: the initiator knows the responder's static X25519
key from membership; the responder learns the initiator's from message 1 and
accepts only the key membership has for the id the relay says the hello came
from; both node ids and the initiator's relay session are bound into the
prologue), so the relay forwards frames it cannot read, and a node serves only
members, each request as the member its session authenticated. Nobody else
gets a session, nor a request served: a cluster secret grants nothing here.

What a relay can make a node hold is bounded: a message is at most the
relay's frame limit (``Welcome.max_frame_bytes``, plus ``wire.FRAME_OVERHEAD``;
``wire.MAX_WELCOME_BYTES`` before the ``Welcome``); at most ``max_peers``
members are tracked; the presence of non-members is counted and kept in a
bounded set only (in case membership changes: ``members_changed``), and never
handshaken with.

One peer request is one stream: ``Open`` carries the request head and body,
``Data`` frames carry the answer (its head first, then its body in pieces of at
most ``CHUNK`` bytes), ``Close`` ends each side, ``Reset`` aborts. Flow control
is per stream and end to end (yamux-style credit windows): a sender never has
more than ``WINDOW`` unacknowledged bytes on a stream, and a receiver grants
more only as its reader consumes, so one slow client or one huge answer never
stalls the others and nothing is buffered without bound.

An incoming request is served by the node's own HTTP server, as if it had come
over the LAN (same trust check, same handlers), in memory (``pipe.py``), as
the request of the member whose session carried it (``serve``'s ``peer_id``):
the link is a transport, nothing above it knows which one carried a request.

Under load, the writer sends what is queued for one peer together: data and
credit for many streams go as one ``Batch`` frame (one WebSocket message, one
Noise seal, one pass through the relay) when the relay says it forwards them
and the peer said, in its handshake, that it reads them (``_Features``: a peer
of an older version says nothing and gets the plain frames). Where both the
relay (``Welcome.batch_streams``) and the peer (``_Features.streams``) know
how, a batch also opens and ends streams, so a small request is one item
(head, body, end) among many others' in one message instead of three frames.

A node that begins to stop calls ``drain``: the relay tells the namespace it is
draining (its peers send it no new requests), new streams opened to it are
reset with ``draining``, and the streams it has finish over the open
connection until ``close``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from quorum_relay import wire

from ..backoff import Backoff
from .identity import NodeIdentity
from .noise import Handshake, NoiseError, NumberedReceiver, NumberedSender

__all__ = ["CHUNK", "WINDOW", "RelayBody", "RelayLink", "RelayResponse"]

log = structlog.get_logger(__name__)

CHUNK = 16 * 1024
WINDOW = 256 * 1024
_HEAD = msgspec.msgpack.Encoder()
_ITEMS = _HEAD


class _RequestHead(msgspec.Struct, frozen=True, array_like=True):
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


class _ResponseHead(msgspec.Struct, frozen=True, array_like=True):
    status: int
    headers: list[tuple[str, str]]


class _Item(msgspec.Struct, frozen=True, array_like=True):
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


OPEN = 1
FIN = 2


class _Features(msgspec.Struct, frozen=True, kw_only=True):
    """What a node reads beyond the first relay protocol: the payload of its handshake messages (encrypted).

    A map, so that fields a newer peer adds are skipped; a peer of an older
    version sends no payload at all, which decodes as "nothing beyond it".
    """

    v: int = 1
    batch: bool = False  # it decodes ``Batch`` frames
    streams: bool = False  # it reads ``_Item.flags``: batches may open and end its streams
    # The initiator's membership records (as ``members.encode_records`` writes them), sent when the
    # responder may not know it yet: each record is signed by a member, so they speak for themselves.
    intro: bytes = b""


_ENCODE = msgspec.msgpack.Encoder()
_FEATURES = _ENCODE.encode(_Features(batch=True, streams=True))
_decode_features = msgspec.msgpack.Decoder(_Features).decode


def _features(payload: bytes) -> _Features:
    if not payload:
        return _Features()
    try:
        return _decode_features(payload)
    except (msgspec.DecodeError, ValueError):  # authentic (it came in the handshake) but not ours: assume nothing
        log.warning("relay_bad_features", size=len(payload))
        return _Features()


BATCH_BYTES = 64 * 1024  # a batch's plaintext, at most (well below the relay's frame limit)
BATCH_ITEMS = 1024
# A busy link (at least ``COALESCE_STREAMS`` streams open) sends at most one round of messages every
# ``COALESCE_S``: what comes in between waits and leaves together (fewer, larger batches: fewer seals,
# writes and relay passes per event). A link with a few streams sends at once, so a lone request's head
# and first token, and a client's requests one after another, are never held back.
COALESCE_S = 0.002
COALESCE_STREAMS = 8
_decode_request = msgspec.msgpack.Decoder(_RequestHead).decode
_decode_items = msgspec.msgpack.Decoder(list[_Item]).decode
_decode_response = msgspec.msgpack.Decoder(_ResponseHead).decode

# Hop-by-hop headers never cross a link (RFC 9110 §7.6.1), nor do the body framing ones.
_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "host",
     "content-length")
)


INTRODUCE_EVERY_S = 5.0  # at most one introduction taken from (and one refusal sent to) a peer this often
# The largest frame limit a relay may announce (its own settings allow no more); a hostile relay's
# larger claim is not believed.
MAX_FRAME_BYTES = 64 * 1024 * 1024
HANDSHAKE_TIMEOUT_S = 10.0  # a hello with no answer: the session is dropped, the next request tries anew
_WARNED_MAX = 32  # peers whose refused handshake we log (one line each; past it, only counted)


def _limit_incoming(ws: ClientConnection, max_bytes: int) -> None:
    """Bound the size of the messages ``ws`` accepts from now on (websockets checks each frame's
    declared length before reading it, so a larger one closes the connection with 1009 unread)."""
    protocol: Any = ws.protocol
    if hasattr(protocol, "max_message_size"):  # websockets >= 15
        protocol.max_message_size = max_bytes
    else:
        protocol.max_size = max_bytes


class _Presence:
    """Who of the relay's namespace is online, as far as this node keeps track (pure logic).

    Members (``peer_key`` has a key for them) are tracked up to ``max_peers``;
    past it they are refused and counted. Non-members are counted and kept in a
    bounded set (oldest out first), only so that one that becomes a member
    while online is found (``RelayLink.members_changed``).
    """

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


class RelayLinkError(ConnectionError):
    """The relay or the peer could not carry a request (before or during its answer)."""


class SessionLost(RelayLinkError):
    """The peer no longer has the Noise session a stream was opened in (it ended it, or restarted)."""


class RelayBody:
    """An answer's body as it arrives; the subset of ``aiohttp.StreamReader`` the adapters use.

    Reading it is what grants the sender more credit (``on_consumed``).
    """

    __slots__ = ("_chunks", "_eof", "_exc", "_waiter", "total_bytes", "_on_consumed", "_buffered", "_loop")

    def __init__(self, on_consumed: Callable[[int], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.total_bytes = 0
        self._buffered = 0
        self._on_consumed = on_consumed

    @property
    def buffered(self) -> int:
        return self._buffered

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    def feed_data(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.total_bytes += len(data)
            self._buffered += len(data)
            self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake()

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter
        if self._exc is not None:
            raise self._exc
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks.clear()
        self._buffered = 0
        self._on_consumed(len(data))
        return data

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk


class RelayResponse:
    """A peer's answer through the relay; the subset of ``aiohttp.ClientResponse`` the peer code uses."""

    def __init__(self, stream: _Stream, status: int, headers: list[tuple[str, str]]) -> None:
        self._stream = stream
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        assert stream.body is not None
        self.content = stream.body
        self.content_length: int | None = None

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        if not self.content.at_eof():
            self.close()

    def close(self) -> None:
        """Abandon the answer: the peer is told (and stops its engine)."""
        self._stream.link._reset(self._stream, "cancel")

    async def __aenter__(self) -> RelayResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _Stream:
    __slots__ = ("id", "peer", "link", "credit", "credit_event", "body", "head", "task", "sent_close",
                 "got_close", "unacked", "received_in_window", "outgoing", "request", "request_body")

    def __init__(self, link: RelayLink, peer: str, sid: int, *, outgoing: bool) -> None:
        self.id = sid
        self.peer = peer
        self.link = link
        self.outgoing = outgoing  # we opened it (we are the requester)
        self.credit = WINDOW  # bytes we may still send
        self.credit_event = asyncio.Event()
        self.credit_event.set()
        self.body: RelayBody | None = None  # the requester's view of the answer
        self.head: asyncio.Future[_ResponseHead] | None = None
        self.task: asyncio.Task[None] | None = None  # the server side's handler
        self.sent_close = False
        self.got_close = False
        self.unacked = 0  # consumed bytes not yet granted back
        self.received_in_window = 0  # received bytes the sender still counts against our grant
        self.request: _RequestHead | None = None  # the server side: the head, then the body as it arrives
        self.request_body = bytearray()


def _numbered(hs: Handshake) -> tuple[NumberedSender, NumberedReceiver]:
    # The relay may drop frames (those of a stream it saw reset), so nonces travel with the frames.
    send, recv = hs.split()
    return NumberedSender(send), NumberedReceiver(recv)


class _Session:
    """The Noise session with one peer over this relay connection."""

    __slots__ = ("send", "recv", "handshake", "ready", "initiator", "batch", "streams", "opened_after", "timer",
                 "introduced")

    def __init__(self, opened_after: int) -> None:
        self.send: NumberedSender | None = None
        self.recv: NumberedReceiver | None = None
        self.handshake: Handshake | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.initiator = False
        self.batch = False  # the peer said in its handshake that it reads Batch frames
        self.streams = False  # ... and that its batches may open and end streams (``_Item.flags``)
        # Our streams numbered past this (``_new_sid``'s count) were opened in this session, the rest before it.
        self.opened_after = opened_after
        self.timer: asyncio.TimerHandle | None = None  # our hello's answer is awaited until it fires
        self.introduced = False  # our hello carried our membership records

    def learn(self, theirs: _Features) -> None:
        """What the peer said in its handshake it reads."""
        self.batch = theirs.batch
        self.streams = theirs.batch and theirs.streams


class RelayLink:
    """One node's connection to one relay (reconnecting), and every stream over it.

    ``identity`` is this node's (its id, the Ed25519 key it proves that id
    with, the X25519 key of its Noise sessions). ``peer_key(node_id)`` is the
    X25519 public key membership has for a current member, None for anyone
    else: no session is started or accepted with None.
    ``on_presence(node_id, online)`` is called as members come and go on the
    relay, ``on_draining(node_id)`` when one says it is stopping (through the
    relay, or by resetting a new stream with ``draining``);
    ``serve(peer_id, method, path, headers, body) -> PipeResponse`` answers an
    incoming request of the member ``peer_id`` (authenticated by its session;
    the node's own HTTP server, see ``ClusterService``).

    **Introductions** (as on the LAN, ``members_sync``): a member admitted a
    moment ago by another is not known yet to every member. A responder that
    does not know the initiator answers its hello with an empty ``HelloReply``
    (a refusal); the initiator's next hello then carries ``introduction()``
    (its membership records, encrypted to the responder like all of message
    1), which the responder hands to ``introduce(peer_id, records)`` (merge
    them: each must verify, signed by a member) before it checks membership
    again. At most one introduction per peer every ``INTRODUCE_EVERY_S``.
    """

    def __init__(
        self,
        *,
        url: str,
        token: str,
        identity: NodeIdentity,
        peer_key: Callable[[str], bytes | None],
        on_presence: Callable[[str, bool], None],
        serve: Callable[[str, str, str, list[tuple[str, str]], bytes], Awaitable[Any]],
        on_draining: Callable[[str], None] = lambda node_id: None,
        connect_timeout_s: float = 5.0,
        max_request_bytes: int = 32 * 1024 * 1024,
        max_peers: int = 256,
        introduction: Callable[[], bytes] | None = None,
        introduce: Callable[[str, bytes], object] | None = None,
    ) -> None:
        self.url = url.rstrip("/") + wire.CONNECT_PATH
        self._token = token
        self._identity = identity
        self.node_id = identity.node_id
        self._peer_key = peer_key
        self._presence = _Presence(max_peers)
        self._warned: set[str] = set()  # peers whose refused handshake was logged
        self._introduction = introduction
        self._introduce = introduce
        self._introduce_to: set[str] = set()  # peers that did not know us: our next hello introduces us
        self._heard: dict[str, float] = {}  # stranger -> when we last took its introduction or refused it
        self.refused_hellos = 0  # hellos from non-members, or with a key that is not the member's
        self._on_presence = on_presence
        self._on_draining = on_draining
        self._serve = serve
        self._connect_timeout_s = connect_timeout_s
        self.max_request_bytes = max_request_bytes
        self._ws: ClientConnection | None = None
        self.session_id: str | None = None
        self.state = "connecting"  # connecting | up | refused | down
        self.last_error: str | None = None
        self.connected_at: float | None = None
        self.online = self._presence.members  # member id -> since (at most ``max_peers``)
        self.max_frame_bytes = 256 * 1024
        # Streams peers opened to us and still open; at most ``max_streams`` (the relay's limit per node).
        self.serving = 0
        self.max_streams = 1024
        self.batching = False  # the relay forwards Batch frames (Welcome.batch)
        self.batch_streams = False  # ... and counts the streams they open and end (Welcome.batch_streams)
        self.features = _FEATURES  # what this node tells its peers it reads (tests pose as older versions)
        self.relay_drains = False  # the relay knows the Draining frame (Welcome.drain)
        self.draining = False  # this node is stopping: new streams to it are refused (``drain``)
        # Payload bytes sent on all streams and not yet acknowledged by credit: kept below ``send_budget``,
        # so what this node has in flight fits the relay's queue towards a peer (Welcome.send_queue_bytes).
        self.unacked_bytes = 0
        self.send_budget = 4 * 1024 * 1024
        self.ungranted_bytes = 0  # bytes read on all streams and not yet granted back (``_grant``)
        self._room = asyncio.Event()
        self._room.set()
        self.messages_sent = 0
        self.batches_sent = 0  # Batch frames sent, and the stream items in them (for tests and tuning)
        self.batched_items = 0
        self._sessions: dict[str, _Session] = {}
        self._streams: dict[tuple[str, int], _Stream] = {}
        self._next_sid = 0
        # Frames waiting for the writer (a plain deque and one waiter: this is per event on a busy link).
        self._out: deque[tuple[Any, ...]] = deque()
        self._out_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._closing = False
        self._cap_warned = False  # this connection logged its refused peers already

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="relay-link")

    def drain(self) -> None:
        """This node begins to stop: its relay peers are told at once, new streams to it are refused.

        The connection stays open, so the streams it has finish; ``close`` ends it.
        """
        if not self.draining:
            self.draining = True
            if self.relay_drains and self.session_id is not None:
                self._enqueue(("draining", ""))

    async def close(self) -> None:
        """Close the relay connection (1001) and end every stream; idempotent."""
        self._closing = True
        log.info("relay_link_closing", messages_sent=self.messages_sent, batches_sent=self.batches_sent,
                 batched_items=self.batched_items)
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close(1001, "node stopping")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_up(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._up.wait()
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        backoff = Backoff(0.2, max_s=3.0)  # back within 5 s of the relay's return, however long it was away
        while not self._closing:
            try:
                async with connect(
                    self.url,
                    additional_headers={
                        "Authorization": f"Bearer {self._token}", wire.NODE_ID_HEADER: self.node_id,
                        wire.NODE_KEY_HEADER: base64.b64encode(self._identity.sign_key).decode("ascii"),
                    },
                    compression=None, proxy=None, open_timeout=self._connect_timeout_s, ping_interval=15,
                    ping_timeout=15, close_timeout=2, max_size=wire.MAX_WELCOME_BYTES, max_queue=64,
                ) as ws:
                    self._ws = ws
                    backoff.reset()
                    await self._session(ws)
                if not self._closing:  # the relay closed it cleanly (1000, 1001: it is stopping)
                    self.state = "down"
                    self.last_error = f"the relay closed the connection ({ws.close_code})"
                    log.info("relay_disconnected", url=self.url, error=self.last_error)
            except asyncio.CancelledError:
                raise
            except ConnectionClosed as e:
                unauthorized = e.rcvd is not None and e.rcvd.code == wire.CLOSE_UNAUTHORIZED
                self.state = "refused" if unauthorized else "down"
                self.last_error = f"{type(e).__name__}: {e}"
                if unauthorized:  # it did not take our proof: our key is not the one of our id (or a bug)
                    log.warning("relay_refused", url=self.url, code=e.rcvd.code, reason=e.rcvd.reason)
                else:
                    log.info("relay_disconnected", url=self.url, error=self.last_error)
            except InvalidStatus as e:
                status = e.response.status_code
                self.state = "refused" if status in (401, 403) else "down"
                self.last_error = f"relay refused the connection: HTTP {status}"
                log.warning("relay_refused", url=self.url, status=status)
            except (OSError, WebSocketException, TimeoutError, ConnectionClosed) as e:
                self.state = "down"
                self.last_error = f"{type(e).__name__}: {e}"
                log.info("relay_disconnected", url=self.url, error=self.last_error)
            except Exception:  # task root
                self.state = "down"
                log.exception("relay_link_failed", url=self.url)
            finally:
                self._ws = None
                self._up.clear()
                self._drop_all("the relay connection was lost")
            if self._closing:
                return
            await asyncio.sleep(backoff.next_delay())

    async def _session(self, ws: ClientConnection) -> None:
        writer = asyncio.create_task(self._writer(ws), name="relay-writer")
        first = True
        try:
            async for raw in ws:
                if isinstance(raw, str):
                    raise ConnectionError("the relay sent a text message")
                try:
                    frame = wire.decode(raw)
                except (msgspec.DecodeError, ValueError):
                    log.warning("relay_bad_frame", size=len(raw))
                    await ws.close(wire.CLOSE_PROTOCOL, "bad frame")
                    return
                if first and isinstance(frame, wire.Challenge):  # prove our id: sign the relay's nonce
                    first = False
                    await ws.send(wire.encode(self._proof(frame.nonce)))  # (the writer has nothing yet)
                    continue
                first = False
                welcome_due = self.session_id is None  # a Welcome comes once, first (after the challenge)
                if isinstance(frame, wire.Welcome) != welcome_due or isinstance(frame, wire.Challenge | wire.Proof):
                    log.warning("relay_out_of_order", frame=type(frame).__name__)
                    await ws.close(wire.CLOSE_PROTOCOL, "frame out of order")
                    return
                if isinstance(frame, wire.Welcome):  # from now on, messages as large as its frames, no larger
                    limit = frame.max_frame_bytes or self.max_frame_bytes
                    _limit_incoming(ws, min(limit, MAX_FRAME_BYTES) + wire.FRAME_OVERHEAD)
                self._dispatch(frame)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _proof(self, nonce: bytes) -> wire.Proof:
        if len(nonce) != wire.NONCE_BYTES:
            raise ConnectionError("the relay's challenge is malformed")
        message = wire.proof_message(nonce, self.node_id, self._identity.sign_key)
        return wire.Proof(signature=self._identity.sign(message))

    def _drop_all(self, why: str) -> None:
        """The connection is gone: every stream ends, every session with it."""
        for stream in list(self._streams.values()):
            self._fail_stream(stream, RelayLinkError(why))
        self._streams.clear()
        self.serving = 0
        self.unacked_bytes = 0
        self.ungranted_bytes = 0
        for s in self._sessions.values():
            if s.timer is not None:
                s.timer.cancel()
            if not s.ready.done():
                s.ready.set_exception(RelayLinkError(why))
                s.ready.exception()  # retrieved: nobody may be waiting
        self._sessions.clear()
        for peer in list(self.online):
            self._on_presence(peer, False)
        self._presence.clear()
        self.session_id = None
        self._out.clear()

    # -- frames in -----------------------------------------------------------------

    def _dispatch(self, frame: wire.Frame) -> None:
        match frame:
            case wire.Welcome(session=session, peers=peers, max_frame_bytes=max_frame, batch=batch,
                              send_queue_bytes=queue_bytes, drain=drain, batch_streams=batch_streams,
                              max_streams=max_streams):
                self.session_id = session
                self.batching = batch
                self.batch_streams = batch and batch_streams
                self.relay_drains = drain
                if drain and self.draining:  # a new connection while stopping: the namespace hears it again
                    self._enqueue(("draining", ""))
                if queue_bytes:
                    self.send_budget = max(4 * CHUNK, queue_bytes // 2)
                self.state = "up"
                self.last_error = None
                self.connected_at = time.time()
                if max_frame:
                    self.max_frame_bytes = max_frame
                if max_streams:
                    self.max_streams = max_streams
                self._up.set()
                log.info("relay_connected", url=self.url, session=session, peers=len(peers))
                refused, self._cap_warned = self._presence.refused, True  # one warning for the whole Welcome
                for p in peers:
                    self._joined(p.node_id, p.since, p.draining)
                if self._presence.refused > refused:
                    log.warning("relay_peers_refused", refused=self._presence.refused - refused,
                                max_peers=self._presence.max_peers)
                self._cap_warned = self._presence.refused > refused
            case wire.Joined(peer=p):
                self._joined(p.node_id, p.since, p.draining)
            case wire.Left(node_id=nid):
                self._left(nid, "the peer left the relay")
            case wire.Unreachable(peer=peer, stream=sid):
                if sid:
                    stream = self._streams.get((peer, sid))
                    if stream is not None:
                        self._fail_stream(stream, RelayLinkError(f"peer {peer} is not on the relay"))
                else:
                    self._left(peer, "the peer is not on the relay")
            case wire.Hello(peer=peer, payload=payload):
                self._on_hello(peer, payload)
            case wire.HelloReply(peer=peer, payload=payload):
                self._on_hello_reply(peer, payload)
            case wire.Open(peer=peer, stream=sid, payload=payload):
                self._on_open(peer, sid, payload)
            case wire.Data(peer=peer, stream=sid, payload=payload):
                self._on_data(peer, sid, payload)
            case wire.Batch(peer=peer, payload=payload, opens=opens):
                self._on_batch(peer, payload, opens)
            case wire.Window(peer=peer, stream=sid, credit=credit):
                self._on_window(peer, sid, credit)
            case wire.Close(peer=peer, stream=sid, payload=payload):
                self._on_close(peer, sid, payload)
            case wire.Reset(peer=peer, stream=sid, code=code):
                stream = self._forget((peer, sid))
                if code == "no_session" and self._in_current_session(peer, sid):
                    # the next stream handshakes anew; ours still waiting for an answer are asked again in it
                    self._end_session(peer, "the peer has no session with us", retry=True)
                elif code == "draining":  # it is stopping (and we had not heard yet, or the relay cannot tell)
                    self._on_draining(peer)
                if stream is not None:
                    error = SessionLost if code == "no_session" else RelayLinkError
                    self._fail_stream(stream, error(f"stream reset by {peer}: {code}"), remove=False)
            case _:
                pass

    def _in_current_session(self, peer: str, sid: int) -> bool:
        """Our stream ``sid`` was opened in the session we have with ``peer`` now (not in one it replaced)."""
        session = self._sessions.get(peer)
        return session is not None and (sid + 1) // 2 > session.opened_after

    def _joined(self, peer: str, since: float, draining: bool = False) -> None:
        if peer == self.node_id:
            return
        if self._peer_key(peer) is None:  # not a member: counted, remembered in a bounded set, nothing more
            self._presence.stranger(peer, since)
            return
        self._presence.strangers.pop(peer, None)
        fresh = peer not in self.online
        if fresh and len(self.online) >= self._presence.max_peers:
            self._presence.refused += 1
            if not self._cap_warned:
                self._cap_warned = True
                log.warning("relay_peers_refused", refused=1, max_peers=self._presence.max_peers)
            return
        self.online[peer] = since
        if peer in self._sessions and fresh:
            self._end_session(peer, "the peer reconnected to the relay")
        if fresh:
            self._on_presence(peer, True)
        if draining:  # its streams go on; only new requests go elsewhere
            self._on_draining(peer)

    def _left(self, peer: str, why: str) -> None:
        self._end_session(peer, why)
        if self._presence.left(peer):
            self._on_presence(peer, False)

    def forget_peer(self, node_id: str) -> None:
        """``node_id`` is no longer a member (evicted): end its session and reset every stream with it, now.

        The peer is told (a ``Reset`` for each stream, through the relay); if it
        is online, it is reported offline (``on_presence``) and counted as any
        non-member from now on. Call it once membership no longer has its key
        (``peer_key`` returns None for it), or it comes back with the next
        ``members_changed``.
        """
        for (peer, _), stream in list(self._streams.items()):
            if peer == node_id:
                self._reset(stream, "not_a_member")
        self._end_session(node_id, "no longer a member")
        since = self.online.get(node_id)
        if since is not None and self._presence.left(node_id):
            self._presence.stranger(node_id, since, count=False)
            self._on_presence(node_id, False)

    def members_changed(self) -> None:
        """Membership changed: forget the online peers that are no longer members, take up the ones that now are."""
        for node_id in [n for n in self.online if self._peer_key(n) is None]:
            self.forget_peer(node_id)
        for node_id, since in list(self._presence.strangers.items()):
            if self._peer_key(node_id) is not None and len(self.online) < self._presence.max_peers:
                del self._presence.strangers[node_id]
                self._joined(node_id, since)

    def _end_session(self, peer: str, why: str, *, retry: bool = False) -> None:
        """Forget the session with ``peer`` and fail its streams.

        With ``retry`` (the peer said it has no such session: it served nothing
        in it), our requests still waiting for their answer's head fail with
        ``SessionLost``, which ``request`` sends once more in a fresh session.
        """
        session = self._sessions.pop(peer, None)
        if session is not None and session.timer is not None:
            session.timer.cancel()
        if session is not None and not session.ready.done():
            session.ready.set_exception(SessionLost(why) if retry else RelayLinkError(why))
            session.ready.exception()
        for key, stream in list(self._streams.items()):
            if key[0] == peer:
                lost = retry and stream.head is not None and not stream.head.done()
                self._fail_stream(stream, SessionLost(why) if lost else RelayLinkError(why))

    def _prologue(self, initiator: str, responder: str, initiator_session: str) -> bytes:
        return b"\x00".join((b"quorum-relay-noise-v1", initiator.encode(), responder.encode(),
                             initiator_session.encode()))

    def _refuse_hello(self, peer: str, why: str) -> None:
        """Refuse ``peer``'s hello, and say so (an empty ``HelloReply``: one small frame, no crypto), so that
        it does not wait for an answer (a member not known here yet introduces itself in its next hello)."""
        self.refused_hellos += 1
        if peer not in self._warned and len(self._warned) < _WARNED_MAX:  # once a peer: a flood logs nothing more
            self._warned.add(peer)
            log.warning("relay_handshake_refused", peer=peer, reason=why)
        self._enqueue(("hello_reply", peer, b""))

    def _may_hear(self, peer: str) -> bool:
        """Whether to read a hello of ``peer``, online but no member (yet), for its introduction: within a
        budget per peer (two, then one every ``INTRODUCE_EVERY_S``), so a stranger's flood costs no crypto."""
        if peer not in self._presence.strangers:
            return False
        now = time.monotonic()
        if len(self._heard) > 4 * self._presence.max_peers:
            self._heard.clear()
        tokens, at = self._heard.get(peer, (2.0, now))
        tokens = min(2.0, tokens + (now - at) / INTRODUCE_EVERY_S)
        if tokens < 1:
            return False
        self._heard[peer] = (tokens - 1, now)
        return True

    def _introduced(self, peer: str, records: bytes) -> bytes | None:
        """Take ``peer``'s introduction (its membership records); its key if that made it a member we track."""
        if not records or self._introduce is None:
            return None
        try:
            self._introduce(peer, records)
        except Exception as e:  # their records, our membership's verdict: nothing learnt from what fails
            log.warning("relay_introduction_failed", peer=peer, error=str(e))
            return None
        key = self._peer_key(peer)
        if key is None:
            return None
        log.info("relay_peer_introduced", peer=peer)
        since = self._presence.strangers.get(peer)
        if peer not in self.online and since is not None:  # (membership may have told us already)
            self._joined(peer, since)
        return key if peer in self.online else None

    def _on_hello(self, peer: str, payload: bytes) -> None:
        expected = self._peer_key(peer)
        if expected is None and (self._introduce is None or not self._may_hear(peer)):
            self._refuse_hello(peer, "not a member")  # a stranger (past its budget): no crypto at all
            return
        if expected is not None and peer not in self.online:  # a member we do not track (max_peers)
            self._refuse_hello(peer, "not tracked (max_peers)")
            return
        existing = self._sessions.get(peer)
        pending = existing is not None and existing.initiator and not existing.ready.done()
        if pending and self.node_id < peer:
            return  # both said hello at once: the lower id's handshake wins
        sep = payload.find(b"\x00")
        if sep <= 0 or sep > 64:
            log.warning("relay_bad_hello", peer=peer)
            return
        their_session, message = payload[:sep].decode(errors="replace"), payload[sep + 1:]
        hs = Handshake(initiator=False, static=self._identity.dh_private,
                       prologue=self._prologue(peer, self.node_id, their_session))
        try:
            theirs = _features(hs.read_message(message))
            if expected is None:  # a stranger: a member only if its introduction makes it one
                expected = self._introduced(peer, theirs.intro)
                if expected is None:
                    self._refuse_hello(peer, "not a member")
                    return
            # The relay says who sent it; its static key says who wrote it: they must be the same member.
            if hs.remote_static is None or not hmac.compare_digest(hs.remote_static, expected):
                self._refuse_hello(peer, "its key is not the member's")
                return
            reply = hs.write_message(self.features)
        except NoiseError as e:
            log.warning("relay_handshake_failed", peer=peer, error=str(e))
            return
        if existing is not None and pending:
            session = existing  # ours lost the tie: whoever waits on it gets this one
        else:
            if existing is not None:
                self._end_session(peer, "the peer started a new session")
            session = _Session(self._next_sid)
            self._sessions[peer] = session
        session.initiator = False
        session.handshake = None
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        session.learn(theirs)
        session.send, session.recv = _numbered(hs)
        self._enqueue(("hello_reply", peer, reply))
        session.ready.set_result(None)

    def _on_hello_reply(self, peer: str, payload: bytes) -> None:
        session = self._sessions.get(peer)
        if session is None or session.handshake is None or session.ready.done():
            return
        if not payload:  # refused: it does not take us for a member (yet)
            if not session.introduced and self._introduction is not None \
                    and len(self._introduce_to) < self._presence.max_peers:
                self._introduce_to.add(peer)  # our next hello introduces us; what waits is asked again in it
                self._end_session(peer, "the peer does not know us yet", retry=True)
            else:
                log.warning("relay_handshake_refused_by_peer", peer=peer)
                self._end_session(peer, "the peer refused our handshake (it does not take us for a member)")
            return
        try:  # it opens only for the holder of the key we expected (IK: the reply mixes ``es`` and ``se``)
            session.learn(_features(session.handshake.read_message(payload)))
            session.send, session.recv = _numbered(session.handshake)
        except NoiseError as e:
            log.warning("relay_handshake_failed", peer=peer, error=str(e))
            self._end_session(peer, f"handshake failed: {e}")
            return
        session.handshake = None
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        session.ready.set_result(None)

    def _open_payload(self, peer: str, payload: bytes) -> bytes | None:
        session = self._sessions.get(peer)
        if session is None or session.recv is None:
            return None
        try:
            return session.recv.open(payload)
        except NoiseError as e:
            # A tampered, replayed or reordered frame: the session cannot be trusted any more.
            log.warning("relay_frame_rejected", peer=peer, error=str(e))
            self._end_session(peer, "a frame failed authentication")
            return None

    def _on_open(self, peer: str, sid: int, payload: bytes) -> None:
        plain = self._open_payload(peer, payload)
        if plain is None:
            self._enqueue(("reset", peer, sid, "no_session"))
        else:
            self._on_plain_open(peer, sid, plain)

    def _on_plain_open(self, peer: str, sid: int, plain: bytes) -> None:
        try:
            head = _decode_request(plain)
        except (msgspec.DecodeError, ValueError):
            self._enqueue(("reset", peer, sid, "bad_request"))
            return
        if (peer, sid) in self._streams or (sid % 2 == 1) != (peer < self.node_id):
            self._enqueue(("reset", peer, sid, "bad_stream_id"))
            return
        if self._peer_key(peer) is None:  # evicted since its session began (``forget_peer`` not called yet)
            self._enqueue(("reset", peer, sid, "not_a_member"))
            self._end_session(peer, "no longer a member")
            return
        if self.draining:  # stopping: the requester tries another holder (nothing of it was served)
            self._enqueue(("reset", peer, sid, "draining"))
            return
        if self.serving >= self.max_streams:  # what the relay counts, checked here too: a batch's items
            self._enqueue(("reset", peer, sid, "too_many_streams"))  # are the peer's word, not the relay's
            return
        stream = _Stream(self, peer, sid, outgoing=False)
        stream.request = head
        self._streams[(peer, sid)] = stream
        self.serving += 1

    def _on_window(self, peer: str, sid: int, credit: int) -> None:
        stream = self._streams.get((peer, sid))
        if stream is not None and credit > 0:
            back = min(credit, WINDOW - stream.credit)  # never more than it had out (a peer cannot inflate it)
            stream.credit += credit
            self._release(back)
            stream.credit_event.set()

    def _on_batch(self, peer: str, payload: bytes, opens: tuple[int, ...]) -> None:
        plain = self._open_payload(peer, payload)
        if plain is None:  # the streams it opened cannot be served: their requesters try a fresh session
            for sid in opens[:BATCH_ITEMS]:
                self._enqueue(("reset", peer, sid, "no_session"))
            return
        try:
            items = _decode_items(plain)
        except (msgspec.DecodeError, ValueError):  # authentic but malformed: a broken peer
            log.warning("relay_bad_batch", peer=peer, size=len(plain))
            self._end_session(peer, "the peer sent a malformed batch")
            return
        for item in items[:BATCH_ITEMS]:
            flags = item.flags
            if flags & OPEN:
                self._on_plain_open(peer, item.stream, item.data)
            else:
                if item.credit:
                    self._on_window(peer, item.stream, item.credit)
                if item.data:
                    self._on_plain_data(peer, item.stream, item.data)
            if flags & FIN:
                self._on_plain_close(peer, item.stream)

    def _on_data(self, peer: str, sid: int, payload: bytes) -> None:
        plain = self._open_payload(peer, payload)  # always: every sealed frame moves the nonce, even a late one
        if plain is not None:
            self._on_plain_data(peer, sid, plain)

    def _on_plain_data(self, peer: str, sid: int, plain: bytes) -> None:
        stream = self._streams.get((peer, sid))
        if stream is None:
            return
        stream.received_in_window += len(plain)
        if stream.received_in_window > WINDOW:  # more than we granted: a broken or hostile sender
            self._reset(stream, "flow_control")
            return
        if not stream.outgoing:  # the request's body: buffered until its Close, granted as it comes
            stream.request_body += plain
            if len(stream.request_body) > self.max_request_bytes:
                self._reset(stream, "request_too_large")
                return
            self._grant(stream, len(plain))
        elif stream.head is not None and not stream.head.done():
            try:
                stream.head.set_result(_decode_response(plain))
            except (msgspec.DecodeError, ValueError):
                self._reset(stream, "bad_response")
                return
            self._grant(stream, len(plain))
        elif stream.body is not None:
            stream.body.feed_data(plain)

    def _on_close(self, peer: str, sid: int, payload: bytes) -> None:
        opened = self._open_payload(peer, payload)  # always: every sealed frame moves the nonce, even a late one
        if opened is not None:
            self._on_plain_close(peer, sid)

    def _on_plain_close(self, peer: str, sid: int) -> None:
        stream = self._streams.get((peer, sid))
        if stream is None:
            return
        stream.got_close = True
        if not stream.outgoing and stream.request is not None and stream.task is None:
            stream.task = asyncio.create_task(self._answer(stream, stream.request, bytes(stream.request_body)),
                                              name="relay-serve")
            stream.request_body = bytearray()
        if stream.head is not None and not stream.head.done():
            stream.head.set_exception(RelayLinkError(f"peer {peer} closed the stream without an answer"))
            stream.head.exception()
        if stream.body is not None:
            stream.body.feed_eof()
        if stream.sent_close:
            self._forget((peer, sid))

    def _forget(self, key: tuple[str, int]) -> _Stream | None:
        """Remove a stream from the table; what it had out no longer counts against the budget."""
        stream = self._streams.pop(key, None)
        if stream is not None:
            if not stream.outgoing:
                self.serving -= 1
            self._release(max(0, WINDOW - stream.credit))
            stream.credit = WINDOW
            self.ungranted_bytes -= stream.unacked  # its sender stops counting it too
            stream.unacked = 0
        return stream

    def _release(self, n: int) -> None:
        if n > 0:
            self.unacked_bytes = max(0, self.unacked_bytes - n)
            if self.unacked_bytes < self.send_budget:
                self._room.set()

    def _fail_stream(self, stream: _Stream, exc: BaseException, *, remove: bool = True) -> None:
        if remove:
            self._forget((stream.peer, stream.id))
        if stream.head is not None and not stream.head.done():
            stream.head.set_exception(exc)
            stream.head.exception()
        if stream.body is not None:
            stream.body.set_exception(exc)
        if stream.task is not None:
            stream.task.cancel()
        stream.credit_event.set()  # wake a writer waiting for credit; it will see the stream is gone

    # -- frames out ----------------------------------------------------------------

    def _enqueue(self, item: tuple[Any, ...]) -> None:
        self._out.append(item)
        w, self._out_waiter = self._out_waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def _writer(self, ws: ClientConnection) -> None:
        """The only sender: frames are encrypted here, in the order they go out (Noise nonces must).

        It takes everything queued at once: under load many streams' small
        frames to one peer leave as one ``Batch`` (one message, one seal);
        a busy link gathers for up to ``COALESCE_S`` since its last send.
        """
        out = self._out
        loop = asyncio.get_running_loop()
        last = -COALESCE_S
        try:
            while True:
                while not out:
                    self._out_waiter = loop.create_future()
                    await self._out_waiter
                if len(self._streams) >= COALESCE_STREAMS:
                    wait = last + COALESCE_S - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                if len(out) <= BATCH_ITEMS:
                    items = list(out)
                    out.clear()
                else:
                    items = [out.popleft() for _ in range(BATCH_ITEMS)]
                for raw in self._build_all(items):
                    self.messages_sent += 1
                    await ws.send(raw)
                last = loop.time()
        except ConnectionClosed:
            pass
        except Exception:  # task root: a link that cannot send must not look alive
            log.exception("relay_writer_failed")
            await ws.close(1011, "writer failed")

    def _build_all(self, items: list[tuple[Any, ...]]) -> list[bytes]:
        """Frames for ``items``, in order per peer; data and credit per peer gathered into batches.

        Opening and closing a stream go into the batch too where the relay and
        the peer both know how (``_opens_in_batch``); otherwise they are frames of
        their own, and what was gathered for that peer goes before them.
        """
        if not self.batching:
            return [raw for item in items if (raw := self._build(item)) is not None]
        frames: list[bytes] = []
        pending: dict[str, list[tuple[Any, ...]]] = {}
        size: dict[str, int] = {}
        streams_ok: dict[str, bool] = {}
        most = min(BATCH_ITEMS, self.max_streams)  # the relay refuses a batch opening more than its limit
        for item in items:
            kind, peer = item[0], item[1]
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

    def _flush_batch(self, peer: str, group: list[tuple[Any, ...]], frames: list[bytes]) -> None:
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
        entries: list[_Item] = []
        opens: list[int] = []
        closes: list[int] = []
        for kind, _, sid, value in group:
            if kind == "data":
                entries.append(_Item(stream=sid, data=value))
            elif kind == "window":
                entries.append(_Item(stream=sid, credit=value))
            elif kind == "open":
                entries.append(_Item(stream=sid, data=value, flags=OPEN))
                opens.append(sid)
            else:  # close (no trailer: this version sends none): it ends the stream's last item if it can
                closes.append(sid)
                last = entries[-1] if entries else None
                if last is not None and last.stream == sid and not last.flags & FIN:
                    entries[-1] = _Item(stream=sid, data=last.data, credit=last.credit, flags=last.flags | FIN)
                else:
                    entries.append(_Item(stream=sid, flags=FIN))
        try:
            sealed = session.send.seal(_ITEMS.encode(entries))
        except NoiseError:
            self._end_session(peer, "session renewed")
            return
        frames.append(wire.encode(wire.Batch(peer=peer, payload=sealed, opens=tuple(opens), closes=tuple(closes))))
        self.batches_sent += 1
        self.batched_items += len(group)

    def _build(self, item: tuple[Any, ...]) -> bytes | None:
        kind, peer = item[0], item[1]
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
            self._end_session(peer, "session renewed")
            return None
        if kind == "open":
            return wire.encode(wire.Open(peer=peer, stream=item[2], payload=sealed))
        if kind == "data":
            return wire.encode(wire.Data(peer=peer, stream=item[2], payload=sealed))
        return wire.encode(wire.Close(peer=peer, stream=item[2], payload=sealed))

    def _reset(self, stream: _Stream, code: str) -> None:
        if self._forget((stream.peer, stream.id)) is not None:
            self._enqueue(("reset", stream.peer, stream.id, code))
        self._fail_stream(stream, RelayLinkError(f"stream reset: {code}"), remove=False)

    def _grant(self, stream: _Stream, consumed: int) -> None:
        """``consumed`` bytes of ``stream`` were read: grant them back, half a window at a time.

        A sender also counts what it has out on all its streams against one budget (``send_budget``),
        so many streams that each stay below half a window would, together, hold that budget with
        bytes long consumed here, and every stream would wait for credit that never comes. Past a
        quarter of the budget consumed and not yet granted, every stream's share is granted at once.
        """
        if (stream.peer, stream.id) not in self._streams:
            return  # ended: its sender no longer counts what it sent
        stream.unacked += consumed
        self.ungranted_bytes += consumed
        if stream.unacked >= WINDOW // 2:
            self._send_grant(stream)
        elif self.ungranted_bytes >= self.send_budget // 4:
            for s in list(self._streams.values()):
                if s.unacked:
                    self._send_grant(s)

    def _send_grant(self, stream: _Stream) -> None:
        self.ungranted_bytes -= stream.unacked
        stream.received_in_window -= stream.unacked
        self._enqueue(("window", stream.peer, stream.id, stream.unacked))
        stream.unacked = 0

    async def _send_data(self, stream: _Stream, data: bytes) -> None:
        view = memoryview(data)
        key = (stream.peer, stream.id)
        while view:
            if key not in self._streams:
                raise RelayLinkError("the stream ended")
            while stream.credit <= 0:
                stream.credit_event.clear()
                await stream.credit_event.wait()
                if (stream.peer, stream.id) not in self._streams:
                    raise RelayLinkError("the stream ended")
            while self.unacked_bytes >= self.send_budget:
                self._room.clear()
                await self._room.wait()
                if (stream.peer, stream.id) not in self._streams:
                    raise RelayLinkError("the stream ended")
            n = min(len(view), CHUNK, stream.credit)
            stream.credit -= n
            self.unacked_bytes += n
            self._enqueue(("data", stream.peer, stream.id, bytes(view[:n])))
            view = view[n:]

    def _send_close(self, stream: _Stream) -> None:
        stream.sent_close = True
        self._enqueue(("close", stream.peer, stream.id, b""))
        if stream.got_close:
            self._forget((stream.peer, stream.id))

    # -- requesting ----------------------------------------------------------------

    async def _session_with(self, peer: str) -> _Session:
        session = self._sessions.get(peer)
        if session is None:
            if self.session_id is None or self._ws is None:
                raise RelayLinkError("not connected to the relay")
            if peer not in self.online:
                raise RelayLinkError(f"peer {peer} is not on the relay")
            key = self._peer_key(peer)
            if key is None:
                raise RelayLinkError(f"peer {peer} is not a member")
            session = _Session(self._next_sid)
            session.initiator = True
            session.handshake = Handshake(initiator=True, static=self._identity.dh_private, remote_static=key,
                                          prologue=self._prologue(self.node_id, peer, self.session_id))
            self._sessions[peer] = session
            features = self.features  # what we read, told inside the encryption
            if peer in self._introduce_to and self._introduction is not None:
                self._introduce_to.discard(peer)
                features = self._with_introduction(features)
                session.introduced = True
            hello = session.handshake.write_message(features)
            self._enqueue(("hello", peer, self.session_id.encode() + b"\x00" + hello))
            session.timer = asyncio.get_running_loop().call_later(
                HANDSHAKE_TIMEOUT_S, self._unanswered, peer, session)
        await asyncio.shield(session.ready)
        return session

    def _with_introduction(self, features: bytes) -> bytes:
        assert self._introduction is not None
        records = self._introduction()
        if len(records) > self.max_frame_bytes // 2:  # it would not pass the relay: go without
            log.warning("relay_introduction_too_large", size=len(records), max_frame_bytes=self.max_frame_bytes)
            return features
        return _ENCODE.encode(msgspec.structs.replace(_features(features), intro=records))

    def _unanswered(self, peer: str, session: _Session) -> None:
        """Our hello had no answer in time (the peer does not take our key, or it is gone): the next request
        handshakes anew instead of waiting on this one."""
        session.timer = None
        if self._sessions.get(peer) is session and not session.ready.done():
            self._end_session(peer, "the peer did not answer our handshake")

    def _new_sid(self, peer: str) -> int:
        self._next_sid += 1
        return 2 * self._next_sid - (1 if self.node_id < peer else 0)  # the lower id opens odd streams

    async def request(self, peer: str, method: str, path: str, headers: dict[str, str], body: bytes,
                      *, timeout_s: float) -> RelayResponse:
        """Send one request to ``peer`` and wait (up to ``timeout_s``) for its answer's head.

        If the peer had lost the session the stream was opened in, the request
        is sent once more in a fresh one (nothing of it was served).
        """
        async with asyncio.timeout(timeout_s):
            try:
                return await self._request(peer, method, path, headers, body)
            except SessionLost:
                return await self._request(peer, method, path, headers, body)

    async def _request(self, peer: str, method: str, path: str, headers: dict[str, str],
                       body: bytes) -> RelayResponse:
        await self._session_with(peer)
        stream = _Stream(self, peer, self._new_sid(peer), outgoing=True)
        stream.head = asyncio.get_running_loop().create_future()
        stream.body = RelayBody(lambda n: self._grant(stream, n))
        self._streams[(peer, stream.id)] = stream
        try:
            head = _RequestHead(method=method, path=path, body=b"",
                                headers=[(str(k), str(v)) for k, v in headers.items()
                                         if k.lower() not in _HOP_BY_HOP])
            self._enqueue(("open", peer, stream.id, _HEAD.encode(head)))
            await self._send_data(stream, body)  # in credit-sized pieces, like any data
            self._send_close(stream)
            answer = await stream.head
        except BaseException:
            if (peer, stream.id) in self._streams:
                self._reset(stream, "cancel")
            raise
        return RelayResponse(stream, answer.status, answer.headers)

    # -- serving -------------------------------------------------------------------

    async def _answer(self, stream: _Stream, head: _RequestHead, body: bytes) -> None:
        """Serve an incoming request with the node's own HTTP server; stream the answer back."""
        resp: Any = None
        try:
            resp = await self._serve(stream.peer, head.method, head.path, head.headers, body)
            out_headers = [(str(k), v) for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP]
            await self._send_data(stream, _HEAD.encode(_ResponseHead(status=resp.status, headers=out_headers)))
            body = resp.content
            set_sink = getattr(body, "set_sink", None)
            sending = False  # a chunk of ours is on its way (waiting for credit): writes queue behind it
            key = (stream.peer, stream.id)

            def sink(data: bytes) -> bool:
                n = len(data)
                if sending or n > stream.credit or n > CHUNK or self.unacked_bytes + n > self.send_budget \
                        or key not in self._streams:
                    return False
                stream.credit -= n
                self.unacked_bytes += n
                self._enqueue(("data", stream.peer, stream.id, data))
                return True

            while chunk := await body.readany():
                sending = True
                await self._send_data(stream, chunk)
                sending = False
                if set_sink is not None:
                    set_sink(sink)  # from now on each write is sent as it is made, while there is room
            self._send_close(stream)
        except asyncio.CancelledError:
            raise  # the requester reset the stream: closing our request cancels the work below
        except (aiohttp.ClientError, OSError, RelayLinkError, ValueError) as e:
            log.warning("relay_serve_failed", peer=stream.peer, path=head.path, error=str(e))
            self._reset(stream, "serve_failed")
        except Exception:  # task root: the requester must hear of it
            log.exception("relay_serve_crashed", peer=stream.peer, path=head.path)
            self._reset(stream, "serve_failed")
        finally:
            if resp is not None:
                resp.close()
