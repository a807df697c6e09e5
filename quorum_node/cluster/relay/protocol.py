"""The relay link's protocol as a state machine: frames and ``now`` in; frames, stream and peer events out.

Nothing here does I/O or awaits (``link.py`` is the asyncio driver that owns
the WebSocket, the writer, reconnection and timers), the way ``websockets``
splits its ``protocol.py`` from its connections: so every rule below is
tested by feeding frames in (``tests/relay/test_protocol.py``).

In: ``receive(raw, now)`` for each message from the relay, ``lost(why)``
when the connection ends, ``tick(now)`` at ``next_deadline()``, and the
commands of the node (``hello``, ``open``, ``send``, ``close``, ``reset``,
``consumed``, ``drain``, ``forget_peer``, ``members_changed``). Out:
``frames_to_send()`` (sealed, batched, in order), ``Listener`` calls (the
connection is up, peers come, go and drain, sessions get ready or fail, a
request is to be served, output is waiting, the budget has room) and each
stream's ``StreamHandler`` calls (the answer's head, its data, its end, a
failure, credit), made synchronously as the frames are read, so no event
object is made per frame.

Sessions, handshakes and introductions are ``handshakes.py``'s; streams and
credit ``streams.py``'s; sealing and batching what goes out ``outbox.py``'s.
What a relay can make a node hold is bounded: at most ``max_peers`` members
are tracked; the presence of non-members is counted and kept in a bounded
set only, and never handshaken with (``sessions.Presence``).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import structlog

from quorum_relay import wire

from ..identity import NodeIdentity
from ..noise import NoiseError
from .handshakes import Handshakes
from .messages import (
    BATCH_ITEMS,
    CHUNK,
    COALESCE_S,
    COALESCE_STREAMS,
    FIN,
    OPEN,
    TUNNEL,
    WINDOW,
    OpenHead,
    RelayLinkError,
    SessionLost,
    decode_answer_head,
    decode_items,
    decode_open_head,
    encode,
)
from .outbox import Outbox
from .sessions import Presence, Session
from .streams import Listener, Outgoing, Stream, StreamHandler, Streams

__all__ = ["Listener", "ProtocolError", "RelayProtocol"]

log = structlog.get_logger(__name__)


class ProtocolError(Exception):
    """The relay broke the protocol: close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RelayProtocol:
    """One node's side of its connection to the relay, and every stream over it (``lost`` ends a connection's
    state; the next connection's ``Welcome`` begins anew).

    ``peer_key(node_id)`` is the X25519 public key membership has for a
    current member, None for anyone else: no session is started or accepted
    with None.
    """

    def __init__(
        self,
        *,
        identity: NodeIdentity,
        peer_key: Callable[[str], bytes | None],
        listener: Listener,
        max_peers: int = 256,
        max_request_bytes: int = 32 * 1024 * 1024,
        introduction: Callable[[], bytes] | None = None,
        introduce: Callable[[str, bytes], object] | None = None,
    ) -> None:
        self.node_id = identity.node_id
        self._identity = identity
        self._peer_key = peer_key
        self._listener = listener
        self.max_request_bytes = max_request_bytes
        self.presence = Presence(max_peers)
        self.online = self.presence.members  # member id -> since (at most ``max_peers``)
        self.sessions: dict[str, Session] = {}
        self.outbox = Outbox(self.sessions, lambda peer: self._end_session(peer, "session renewed"))
        self.streams = Streams(self._push, listener.room)
        self.session_id: str | None = None  # the relay's, from its Welcome
        self.max_frame_bytes = 256 * 1024
        self.relay_drains = False  # the relay knows the Draining frame (Welcome.drain)
        self.rendezvous = False  # the relay carries join codes (Welcome.rendezvous)
        self.draining = False  # this node is stopping: new streams to it are refused (``drain``)
        self._greeted = False  # the first frame (the relay's challenge, or its Welcome) came
        self._next_sid = 0
        self.handshakes = Handshakes(
            identity=identity,
            peer_key=peer_key,
            sessions=self.sessions,
            presence=self.presence,
            listener=listener,
            push=self._push,
            end_session=lambda peer, why, retry: self._end_session(peer, why, retry=retry),
            joined=self._joined,
            introduction=introduction,
            introduce=introduce,
        )
        self._cap_warned = False  # this connection logged its refused peers already
        self._now = 0.0

    # -- the connection ----------------------------------------------------------

    @property
    def refused_hellos(self) -> int:
        """Hellos refused: from non-members, or with a key that is not the member's."""
        return self.handshakes.refused_hellos

    @property
    def up(self) -> bool:
        return self.session_id is not None

    def receive(self, raw: bytes, now: float) -> None:
        """One message from the relay. Raises ``ProtocolError`` where the relay broke the protocol."""
        self._now = now
        try:
            frame = wire.decode(raw)
        except (msgspec.DecodeError, ValueError):
            log.warning("relay_bad_frame", size=len(raw))
            raise ProtocolError(wire.CLOSE_PROTOCOL, "bad frame") from None
        if not self._greeted:
            self._greeted = True
            if isinstance(frame, wire.Challenge):  # prove our id: sign the relay's nonce
                self._push(("raw", wire.encode(self._proof(frame.nonce))))
                return
        welcome_due = self.session_id is None  # a Welcome comes once, first (after the challenge)
        if isinstance(frame, wire.Welcome) != welcome_due or isinstance(frame, wire.Challenge | wire.Proof):
            log.warning("relay_out_of_order", frame=type(frame).__name__)
            raise ProtocolError(wire.CLOSE_PROTOCOL, "frame out of order")
        self._dispatch(frame)

    def _proof(self, nonce: bytes) -> wire.Proof:
        if len(nonce) != wire.NONCE_BYTES:
            raise ProtocolError(wire.CLOSE_PROTOCOL, "the relay's challenge is malformed")
        message = wire.proof_message(nonce, self.node_id, self._identity.sign_key)
        return wire.Proof(signature=self._identity.sign(message))

    def lost(self, why: str) -> None:
        """The connection is gone: every stream ends, every session with it; members go offline."""
        error = RelayLinkError(why)
        streams = list(self.streams.table.values())
        self.streams.clear()
        for stream in streams:
            self._fail(stream, error)
        pending = [peer for peer, s in self.sessions.items() if not s.ready]
        self.sessions.clear()
        self.handshakes.pending.clear()
        for peer in pending:
            self._listener.session_failed(peer, error)
        for peer in list(self.online):
            self._listener.presence(peer, False)
        self.presence.clear()
        self.session_id = None
        self._greeted = False
        self.outbox.queue.clear()

    def drain(self) -> None:
        """This node begins to stop: its relay peers are told at once, new streams to it are refused."""
        if not self.draining:
            self.draining = True
            if self.relay_drains and self.session_id is not None:
                self._push(("draining", ""))

    def frames_to_send(self) -> list[bytes]:
        """What is queued, as frames, sealed and batched, in the order they must be sent."""
        return self.outbox.take()

    def send_at(self, last_sent: float) -> float:
        """When the next round of frames may go: a busy link gathers for ``COALESCE_S`` since its last send."""
        return last_sent + COALESCE_S if len(self.streams) >= COALESCE_STREAMS else last_sent

    def next_deadline(self) -> float | None:
        """When ``tick`` is due next (an unanswered hello), if ever."""
        return min(self.handshakes.pending.values(), default=None)

    def tick(self, now: float) -> None:
        """Our hellos with no answer by now are given up (the peer does not take our key, or it is gone):
        the next request handshakes anew instead of waiting on them."""
        for peer in [p for p, at in self.handshakes.pending.items() if at <= now]:
            del self.handshakes.pending[peer]
            session = self.sessions.get(peer)
            if session is not None and not session.ready:
                self._end_session(peer, "the peer did not answer our handshake")

    # -- join codes (``wire.Claim``, ``wire.Rendezvous``) ----------------------------

    def claim(self, ref: int, nameplate: int = 0) -> None:
        """Ask the relay to hold a nameplate (``nameplate``, or any where 0); ``claimed(ref, …)`` answers."""
        self._push(("raw", wire.encode(wire.Claim(ref=ref, nameplate=nameplate))))

    def release(self, nameplate: int) -> None:
        self._push(("raw", wire.encode(wire.Release(nameplate=nameplate))))

    def rendezvous_answer(self, nameplate: int, channel: int, payload: bytes) -> None:
        """Answer a joining machine (``payload`` empty: the channel ends)."""
        self._push(("raw", wire.encode(wire.Rendezvous(nameplate=nameplate, channel=channel, payload=payload))))

    def _push(self, item: Outgoing) -> None:
        self.outbox.queue.append(item)
        self._listener.output()

    # -- requesting ----------------------------------------------------------------

    def hello(self, peer: str, now: float) -> bool:
        """Make sure there is a session with ``peer``: True if it is ready; else one is being handshaken (the
        listener hears ``session_ready`` or ``session_failed``). Raises ``RelayLinkError`` if none can be."""
        session = self.sessions.get(peer)
        if session is not None:
            return session.ready
        if self.session_id is None:
            raise RelayLinkError("not connected to the relay")
        if peer not in self.online:
            raise RelayLinkError(f"peer {peer} is not on the relay")
        key = self._peer_key(peer)
        if key is None:
            raise RelayLinkError(f"peer {peer} is not a member")
        self.handshakes.start(peer, key, self.session_id, self._next_sid, now, self.max_frame_bytes)
        return False

    def open(self, peer: str, head: OpenHead, handler: StreamHandler) -> Stream:
        """Open a stream to ``peer`` (its session ready) with a request's head; its body follows with ``send``."""
        session = self.sessions.get(peer)
        if session is None or not session.ready:
            raise RelayLinkError(f"no session with {peer}")
        self._next_sid += 1
        sid = 2 * self._next_sid - (1 if self.node_id < peer else 0)  # the lower id opens odd streams
        stream = Stream(peer, sid, outgoing=True, handler=handler)
        self.streams.add(stream)
        self._push(("open", peer, sid, encode(head)))
        return stream

    def send(self, stream: Stream, data: memoryview) -> int:
        """Queue as much of ``data`` as the stream's credit and the link's budget allow now; how much that was.

        0 means wait: for ``on_credit`` if the stream has none, else for the listener's ``room``.
        Raises ``RelayLinkError`` if the stream has ended.
        """
        if stream.ended:
            raise RelayLinkError("the stream ended")
        sent = 0
        streams = self.streams
        while sent < len(data):
            n = streams.room_for(stream, min(len(data) - sent, CHUNK))
            if not n:
                break
            self._push(("data", stream.peer, stream.id, bytes(data[sent : sent + n])))
            sent += n
        return sent

    def send_now(self, stream: Stream, data: bytes) -> bool:
        """Queue ``data`` (at most ``CHUNK`` bytes) as one piece if credit and budget allow it now, else nothing."""
        if len(data) > CHUNK or not self.streams.take(stream, len(data)):
            return False
        self._push(("data", stream.peer, stream.id, data))
        return True

    def close(self, stream: Stream) -> None:
        """Our half of ``stream`` ends (after what was sent)."""
        stream.sent_close = True
        self._push(("close", stream.peer, stream.id, b""))
        if stream.got_close:
            self.streams.forget((stream.peer, stream.id))

    def reset(self, stream: Stream, code: str) -> None:
        """Abort ``stream``: the peer is told (and stops); its handler hears ``on_failed``."""
        if self.streams.forget((stream.peer, stream.id)) is not None:
            self._push(("reset", stream.peer, stream.id, code))
        self._fail(stream, RelayLinkError(f"stream reset: {code}"))

    def consumed(self, stream: Stream, n: int) -> None:
        """``n`` bytes of the answer on ``stream`` were read: the peer may be granted more."""
        self.streams.grant(stream, n)

    def _fail(self, stream: Stream, error: RelayLinkError) -> None:
        stream.ended = True
        if stream.handler is not None:
            stream.handler.on_failed(error)

    def _fail_stream(self, stream: Stream, error: RelayLinkError) -> None:
        self.streams.forget((stream.peer, stream.id))
        self._fail(stream, error)

    # -- membership ----------------------------------------------------------------

    def forget_peer(self, node_id: str) -> None:
        """``node_id`` is no longer a member (evicted): end its session and reset every stream with it, now.

        The peer is told (a ``Reset`` for each stream, through the relay); if it
        is online, it is reported offline and counted as any non-member from now
        on. Call it once membership no longer has its key (``peer_key`` returns
        None for it), or it comes back with the next ``members_changed``.
        """
        for (peer, _), stream in list(self.streams.table.items()):
            if peer == node_id:
                self.reset(stream, "not_a_member")
        self._end_session(node_id, "no longer a member")
        since = self.online.get(node_id)
        if since is not None and self.presence.left(node_id):
            self.presence.stranger(node_id, since, count=False)
            self._listener.presence(node_id, False)

    def members_changed(self) -> None:
        """Membership changed: forget the online peers that are no longer members, take up the ones that now are."""
        for node_id in [n for n in self.online if self._peer_key(n) is None]:
            self.forget_peer(node_id)
        for node_id, since in list(self.presence.strangers.items()):
            if self._peer_key(node_id) is not None and len(self.online) < self.presence.max_peers:
                del self.presence.strangers[node_id]
                self._joined(node_id, since)

    def _joined(self, peer: str, since: float, draining: bool = False) -> None:
        if peer == self.node_id:
            return
        if self._peer_key(peer) is None:  # not a member: counted, remembered in a bounded set, nothing more
            self.presence.stranger(peer, since)
            return
        self.presence.strangers.pop(peer, None)
        fresh = peer not in self.online
        if fresh and len(self.online) >= self.presence.max_peers:
            self.presence.refused += 1
            if not self._cap_warned:
                self._cap_warned = True
                log.warning("relay_peers_refused", refused=1, max_peers=self.presence.max_peers)
            return
        self.online[peer] = since
        if peer in self.sessions and fresh:
            self._end_session(peer, "the peer reconnected to the relay")
        if fresh:
            self._listener.presence(peer, True)
        if draining:  # its streams go on; only new requests go elsewhere
            self._listener.draining(peer)

    def _left(self, peer: str, why: str) -> None:
        self._end_session(peer, why)
        if self.presence.left(peer):
            self._listener.presence(peer, False)

    def _end_session(self, peer: str, why: str, *, retry: bool = False) -> None:
        """Forget the session with ``peer`` and fail its streams.

        With ``retry`` (the peer said it has no such session: it served nothing
        in it), our requests still waiting for their answer's head fail with
        ``SessionLost``, which the driver sends once more in a fresh session.
        """
        session = self.sessions.pop(peer, None)
        self.handshakes.pending.pop(peer, None)
        if session is not None and not session.ready:
            self._listener.session_failed(peer, SessionLost(why) if retry else RelayLinkError(why))
        for key, stream in list(self.streams.table.items()):
            if key[0] == peer:
                lost = retry and stream.outgoing and not stream.answered
                self._fail_stream(stream, SessionLost(why) if lost else RelayLinkError(why))

    def _in_current_session(self, peer: str, sid: int) -> bool:
        """Our stream ``sid`` was opened in the session we have with ``peer`` now (not in one it replaced)."""
        session = self.sessions.get(peer)
        return session is not None and (sid + 1) // 2 > session.opened_after

    # -- frames in -----------------------------------------------------------------

    def _dispatch(self, frame: wire.Frame) -> None:
        match frame:
            case wire.Data(peer=peer, stream=sid, payload=payload):
                plain = self._open_payload(peer, payload)  # always: every sealed frame moves the nonce
                if plain is not None:
                    self._on_data(peer, sid, plain)
            case wire.Batch(peer=peer, payload=payload, opens=opens):
                self._on_batch(peer, payload, opens)
            case wire.Window(peer=peer, stream=sid, credit=credit):
                stream = self.streams.table.get((peer, sid))
                if stream is not None:
                    self.streams.credited(stream, credit)
            case wire.Open(peer=peer, stream=sid, payload=payload):
                plain = self._open_payload(peer, payload)
                if plain is None:
                    self._push(("reset", peer, sid, "no_session"))
                else:
                    self._on_open(peer, sid, plain)
            case wire.Close(peer=peer, stream=sid, payload=payload):
                if self._open_payload(peer, payload) is not None:  # always opened: it moves the nonce
                    self._on_close(peer, sid)
            case wire.Reset(peer=peer, stream=sid, code=code):
                self._on_reset(peer, sid, code)
            case wire.Hello(peer=peer, payload=payload):
                self.handshakes.on_hello(peer, payload, self._next_sid, self._now)
            case wire.HelloReply(peer=peer, payload=payload):
                self.handshakes.on_hello_reply(peer, payload)
            case wire.Welcome():
                self._on_welcome(frame)
            case wire.Joined(peer=p):
                self._joined(p.node_id, p.since, p.draining)
            case wire.Left(node_id=nid):
                self._left(nid, "the peer left the relay")
            case wire.Claimed(ref=ref, nameplate=plate):
                self._listener.claimed(ref, plate)
            case wire.Rendezvous(nameplate=plate, channel=channel, payload=payload):
                if payload and len(payload) <= wire.MAX_RENDEZVOUS_BYTES:
                    self._listener.rendezvous(plate, channel, payload)
            case wire.Unreachable(peer=peer, stream=sid):
                if sid:
                    stream = self.streams.table.get((peer, sid))
                    if stream is not None:
                        self._fail_stream(stream, RelayLinkError(f"peer {peer} is not on the relay"))
                else:
                    self._left(peer, "the peer is not on the relay")
            case _:
                pass

    def _on_welcome(self, welcome: wire.Welcome) -> None:
        self.session_id = welcome.session
        self.outbox.batching = welcome.batch
        self.outbox.batch_streams = welcome.batch and welcome.batch_streams
        self.relay_drains = welcome.drain
        self.rendezvous = welcome.rendezvous
        if welcome.drain and self.draining:  # a new connection while stopping: the namespace hears it again
            self._push(("draining", ""))
        if welcome.send_queue_bytes:
            self.streams.send_budget = max(4 * CHUNK, welcome.send_queue_bytes // 2)
        if welcome.max_frame_bytes:
            self.max_frame_bytes = welcome.max_frame_bytes
        if welcome.max_streams:
            self.outbox.max_streams = welcome.max_streams
        self._listener.welcomed(welcome)
        refused, self._cap_warned = self.presence.refused, True  # one warning for the whole Welcome
        for p in welcome.peers:
            self._joined(p.node_id, p.since, p.draining)
        if self.presence.refused > refused:
            log.warning(
                "relay_peers_refused", refused=self.presence.refused - refused, max_peers=self.presence.max_peers
            )
        self._cap_warned = self.presence.refused > refused

    def _on_reset(self, peer: str, sid: int, code: str) -> None:
        stream = self.streams.forget((peer, sid))
        if code == "no_session" and self._in_current_session(peer, sid):
            # the next stream handshakes anew; ours still waiting for an answer are asked again in it
            self._end_session(peer, "the peer has no session with us", retry=True)
        elif code == "draining":  # it is stopping (and we had not heard yet, or the relay cannot tell)
            self._listener.draining(peer)
        if stream is not None:
            error = SessionLost if code == "no_session" else RelayLinkError
            self._fail(stream, error(f"stream reset by {peer}: {code}"))

    def _open_payload(self, peer: str, payload: bytes) -> bytes | None:
        session = self.sessions.get(peer)
        if session is None or session.recv is None:
            return None
        try:
            return session.recv.open(payload)
        except NoiseError as e:
            # A tampered, replayed or reordered frame: the session cannot be trusted any more.
            log.warning("relay_frame_rejected", peer=peer, error=str(e))
            self._end_session(peer, "a frame failed authentication")
            return None

    def _on_open(self, peer: str, sid: int, plain: bytes) -> None:
        try:
            head = decode_open_head(plain)
        except (msgspec.DecodeError, ValueError):
            self._push(("reset", peer, sid, "bad_request"))
            return
        if (peer, sid) in self.streams.table or (sid % 2 == 1) != (peer < self.node_id):
            self._push(("reset", peer, sid, "bad_stream_id"))
            return
        if self._peer_key(peer) is None:  # evicted since its session began (``forget_peer`` not called yet)
            self._push(("reset", peer, sid, "not_a_member"))
            self._end_session(peer, "no longer a member")
            return
        if self.draining:  # stopping: the requester tries another holder (nothing of it was served)
            self._push(("reset", peer, sid, "draining"))
            return
        if self.streams.serving >= self.outbox.max_streams:  # what the relay counts, checked here too: a
            self._push(("reset", peer, sid, "too_many_streams"))  # batch's items are the peer's word
            return
        stream = Stream(peer, sid, outgoing=False)
        self.streams.add(stream)
        if head.method == TUNNEL:  # served now: its data flows both ways from here on
            stream.tunnel = True
            self._listener.tunnel(stream, head)
            return
        stream.request = head

    def _on_batch(self, peer: str, payload: bytes, opens: tuple[int, ...]) -> None:
        plain = self._open_payload(peer, payload)
        if plain is None:  # the streams it opened cannot be served: their requesters try a fresh session
            for sid in opens[:BATCH_ITEMS]:
                self._push(("reset", peer, sid, "no_session"))
            return
        try:
            items = decode_items(plain)
        except (msgspec.DecodeError, ValueError):  # authentic but malformed: a broken peer
            log.warning("relay_bad_batch", peer=peer, size=len(plain))
            self._end_session(peer, "the peer sent a malformed batch")
            return
        table = self.streams.table
        for item in items[:BATCH_ITEMS]:
            flags = item.flags
            if flags & OPEN:
                self._on_open(peer, item.stream, item.data)
            else:
                if item.credit:
                    stream = table.get((peer, item.stream))
                    if stream is not None:
                        self.streams.credited(stream, item.credit)
                if item.data:
                    self._on_data(peer, item.stream, item.data)
            if flags & FIN:
                self._on_close(peer, item.stream)

    def _on_data(self, peer: str, sid: int, plain: bytes) -> None:
        stream = self.streams.table.get((peer, sid))
        if stream is None:
            return
        stream.received_in_window += len(plain)
        if stream.received_in_window > WINDOW:  # more than we granted: a broken or hostile sender
            self.reset(stream, "flow_control")
            return
        if stream.tunnel:  # to its handler as it comes; granted back as it is consumed (``consumed``)
            if stream.handler is not None:
                stream.handler.on_data(plain)
        elif not stream.outgoing:  # the request's body: buffered until its Close, granted as it comes
            stream.request_body += plain
            if len(stream.request_body) > self.max_request_bytes:
                self.reset(stream, "request_too_large")
                return
            self.streams.grant(stream, len(plain))
        elif stream.answered:
            if stream.handler is not None:
                stream.handler.on_data(plain)
        else:
            try:
                head = decode_answer_head(plain)
            except (msgspec.DecodeError, ValueError):
                self.reset(stream, "bad_response")
                return
            stream.answered = True
            self.streams.grant(stream, len(plain))
            if stream.handler is not None:
                stream.handler.on_head(head)

    def _on_close(self, peer: str, sid: int) -> None:
        stream = self.streams.table.get((peer, sid))
        if stream is None:
            return
        stream.got_close = True
        if stream.sent_close:
            self.streams.forget((peer, sid))
        if stream.outgoing:
            if stream.answered:
                if stream.handler is not None:
                    stream.handler.on_end()
            else:  # ours is reset (if we still send on it): the relay must not hold it half open
                if self.streams.forget((peer, sid)) is not None:
                    self._push(("reset", peer, sid, "cancel"))
                self._fail(stream, RelayLinkError(f"peer {peer} closed the stream without an answer"))
        elif stream.tunnel:
            if stream.handler is not None:
                stream.handler.on_end()
        elif stream.request is not None:
            head, body = stream.request, bytes(stream.request_body)
            stream.request, stream.request_body = None, bytearray()
            self._listener.serve(stream, head, body)
