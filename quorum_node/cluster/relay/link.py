"""The relay link: peer requests as encrypted, multiplexed streams over one WebSocket to ``quorum-relay``.

This is the asyncio driver of ``protocol.py`` (where every rule of the link
lives, and nothing awaits): it dials out to the relay (``quorum_relay/wire.py``
is the protocol), reconnects with jittered backoff, feeds the protocol what
arrives, sends what it queues (one writer task: frames are sealed in the order
they go), fires its timers, and turns its events into futures for callers
(``request``) and tasks for relayed requests (``serve``).

One peer request is one stream: ``Open`` carries the request head, ``Data``
frames the body and then the answer (its head first, then its body in pieces
of at most ``CHUNK`` bytes), ``Close`` ends each side, ``Reset`` aborts.

An incoming request is served by the node's own HTTP server, as if it had come
over the LAN (same trust check, same handlers), in memory (``pipe.py``), as
the request of the member whose session carried it (``serve``'s ``peer_id``):
the link is a transport, nothing above it knows which one carried a request.

What a relay can make a node hold is bounded: a message is at most the
relay's frame limit (``Welcome.max_frame_bytes``, plus ``wire.FRAME_OVERHEAD``;
``wire.MAX_WELCOME_BYTES`` before the ``Welcome``), checked before it is read.

A node that begins to stop calls ``drain``: the relay tells the namespace it is
draining (its peers send it no new requests), new streams opened to it are
reset with ``draining``, and the streams it has finish over the open
connection until ``close``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from quorum_relay import wire

from ...backoff import Backoff
from ..identity import NodeIdentity
from ..tunnel import Counted, join
from .body import RelayAnswer, RelayBody
from .messages import (
    HOP_BY_HOP,
    MAX_FRAME_BYTES,
    TUNNEL,
    AnswerHead,
    OpenHead,
    RelayLinkError,
    SessionLost,
    encode,
)
from .protocol import ProtocolError, RelayProtocol
from .streams import Stream

__all__ = ["RelayLink", "RelayTunnel"]

log = structlog.get_logger(__name__)

Serve = Callable[[str, str, str, list[tuple[str, str]], bytes], Awaitable[Any]]
#: ``open_tunnel(peer_id, path)``: the loopback stream a member's tunnel at ``path`` goes to (None: none there).
OpenTunnel = Callable[[str, str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]]
#: ``on_rendezvous(nameplate, message)``: the answer to a joining machine's message (``cluster/codes.py``).
OnRendezvous = Callable[[int, bytes], Awaitable[bytes]]
#: Joining machines' messages answered at once (more are answered with the end of their channel).
_RENDEZVOUS_TASKS = 16


def _limit_incoming(ws: ClientConnection, max_bytes: int) -> None:
    """Bound the size of the messages ``ws`` accepts from now on (websockets checks each frame's
    declared length before reading it, so a larger one closes the connection with 1009 unread)."""
    protocol: Any = ws.protocol
    if hasattr(protocol, "max_message_size"):  # websockets >= 15
        protocol.max_message_size = max_bytes
    else:
        protocol.max_size = max_bytes


class _Sender:
    """Waits for a stream's credit (``on_credit``) while data is sent on it."""

    __slots__ = ("_credit",)

    def __init__(self) -> None:
        self._credit = asyncio.Event()
        self._credit.set()

    def on_credit(self) -> None:
        self._credit.set()

    def on_failed(self, error: RelayLinkError) -> None:
        self._credit.set()  # a sender waiting for credit wakes and sees the stream is gone


class _Request(_Sender):
    """A stream we opened: its answer's head, then its body."""

    __slots__ = ("head", "body")

    def __init__(self, on_consumed: Callable[[int], None], on_abort: Callable[[], None]) -> None:
        super().__init__()
        self.head: asyncio.Future[AnswerHead] = asyncio.get_running_loop().create_future()
        self.body = RelayBody(on_consumed, on_abort)

    def on_head(self, head: AnswerHead) -> None:
        if not self.head.done():
            self.head.set_result(head)

    def on_data(self, data: bytes) -> None:
        self.body.feed_data(data)

    def on_end(self) -> None:
        self.body.feed_eof()

    def on_failed(self, error: RelayLinkError) -> None:
        self._credit.set()
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: nobody may be waiting
        self.body.broke(str(error))


class _Tunneled(_Request):
    """A tunnel a peer opened to us: its data as it comes (``body``), and the task that serves it."""

    __slots__ = ("task",)

    def __init__(self, on_consumed: Callable[[int], None], on_abort: Callable[[], None]) -> None:
        super().__init__(on_consumed, on_abort)
        self.task: asyncio.Task[None] | None = None

    def on_failed(self, error: RelayLinkError) -> None:
        super().on_failed(error)
        if self.task is not None:
            self.task.cancel()


class RelayTunnel:
    """One end of a tunnel through the relay, ours or served (``RelayLink.tunnel``, ``_tunnel``): a ``Duplex``
    (``cluster/tunnel.py``). Closing it ends the stream: a close where the other end has closed, else a reset."""

    def __init__(self, link: RelayLink, stream: Stream, handler: _Request) -> None:
        self._link = link
        self._stream = stream
        self._handler = handler

    async def send(self, data: bytes) -> None:
        await self._link._send(self._stream, self._handler, data)

    async def recv(self) -> bytes:
        try:
            return await self._handler.body.readany()
        except (RelayLinkError, ConnectionError):
            return b""

    async def close(self) -> None:
        stream = self._stream
        if not stream.ended:
            if stream.got_close:
                self._link.protocol.close(stream)
            else:
                self._link.protocol.reset(stream, "closed")


class _Served(_Sender):
    """A stream a peer opened to us: the task that serves it."""

    __slots__ = ("task",)

    def __init__(self) -> None:
        super().__init__()
        self.task: asyncio.Task[None] | None = None

    def on_head(self, head: AnswerHead) -> None:
        pass

    def on_data(self, data: bytes) -> None:
        pass

    def on_end(self) -> None:
        pass

    def on_failed(self, error: RelayLinkError) -> None:
        self._credit.set()
        if self.task is not None:
            self.task.cancel()


class RelayLink:
    """One node's connection to one relay (reconnecting), and every stream over it.

    ``identity`` is this node's (its id, the Ed25519 key it proves that id
    with, the X25519 key of its Noise sessions). ``peer_key(node_id)`` is the
    X25519 public key membership has for a current member, None for anyone
    else. ``on_presence(node_id, online)`` is called as members come and go
    on the relay, ``on_draining(node_id)`` when one says it is stopping;
    ``serve(peer_id, method, path, headers, body) -> PipeResponse`` answers an
    incoming request of the member ``peer_id`` (authenticated by its session).
    ``introduction`` and ``introduce`` are the protocol's (``protocol.py``).
    ``protocol`` is the state machine, for what it counts.
    """

    def __init__(
        self,
        *,
        url: str,
        token: str,
        identity: NodeIdentity,
        peer_key: Callable[[str], bytes | None],
        on_presence: Callable[[str, bool], None],
        serve: Serve,
        on_draining: Callable[[str], None] = lambda node_id: None,
        connect_timeout_s: float = 5.0,
        max_request_bytes: int = 32 * 1024 * 1024,
        max_peers: int = 256,
        introduction: Callable[[], bytes] | None = None,
        introduce: Callable[[str, bytes], object] | None = None,
        open_tunnel: OpenTunnel | None = None,
        on_rendezvous: OnRendezvous | None = None,
    ) -> None:
        self.base_url = url.rstrip("/")
        self.url = self.base_url + wire.CONNECT_PATH
        self._open_tunnel = open_tunnel
        self._on_rendezvous = on_rendezvous
        self._claims: dict[int, asyncio.Future[int]] = {}  # ref -> the relay's answer to our Claim
        self._refs = itertools.count(1)
        self.plates: set[int] = set()  # nameplates the relay holds for our join codes (claimed again on return)
        self._answering: set[asyncio.Task[None]] = set()
        self._token = token
        self._identity = identity
        self.node_id = identity.node_id
        self._on_presence = on_presence
        self._on_draining = on_draining
        self._serve = serve
        self._connect_timeout_s = connect_timeout_s
        self.protocol = RelayProtocol(
            identity=identity,
            peer_key=peer_key,
            listener=self._Events(self),
            max_peers=max_peers,
            max_request_bytes=max_request_bytes,
            introduction=introduction,
            introduce=introduce,
        )
        self.online = self.protocol.online  # member id -> since (at most ``max_peers``)
        self.state = "connecting"  # connecting | up | refused | down
        self.last_error: str | None = None
        self.connected_at: float | None = None
        self.messages_sent = 0
        self._ws: ClientConnection | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._ready: dict[str, asyncio.Future[None]] = {}  # peer -> its session, being handshaken
        self._output: asyncio.Future[None] | None = None  # the writer waits on it for something to send
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._closing = False

    # What the protocol counts, for the node's status and for tests (read only).
    @property
    def refused_hellos(self) -> int:
        return self.protocol.refused_hellos

    @property
    def send_budget(self) -> int:
        return self.protocol.streams.send_budget

    @property
    def unacked_bytes(self) -> int:
        return self.protocol.streams.unacked_bytes

    @property
    def serving(self) -> int:
        return self.protocol.streams.serving

    @property
    def open_streams(self) -> int:
        return len(self.protocol.streams)

    @property
    def batching(self) -> bool:
        return self.protocol.outbox.batching

    @property
    def batch_streams(self) -> bool:
        return self.protocol.outbox.batch_streams

    @property
    def batches_sent(self) -> int:
        return self.protocol.outbox.batches_sent

    @property
    def batched_items(self) -> int:
        return self.protocol.outbox.batched_items

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="relay-link")

    def drain(self) -> None:
        """This node begins to stop: its relay peers are told at once, new streams to it are refused.

        The connection stays open, so the streams it has finish; ``close`` ends it.
        """
        self.protocol.drain()

    async def close(self) -> None:
        """Close the relay connection (1001) and end every stream; idempotent."""
        self._closing = True
        log.info(
            "relay_link_closing",
            messages_sent=self.messages_sent,
            batches_sent=self.batches_sent,
            batched_items=self.batched_items,
        )
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

    async def claim(self, timeout_s: float = 5.0) -> int | None:
        """A nameplate the relay holds for one of our join codes (``wire.Claim``); None where the relay is
        not up, carries no join codes, or has none free."""
        if self.state != "up" or not self.protocol.rendezvous:
            return None
        ref = next(self._refs)
        answer = self._claims[ref] = asyncio.get_running_loop().create_future()
        self.protocol.claim(ref)
        try:
            async with asyncio.timeout(timeout_s):
                plate = await answer
        except TimeoutError:
            return None
        finally:
            self._claims.pop(ref, None)
        if plate:
            self.plates.add(plate)
        return plate or None

    def release(self, plate: int) -> None:
        """The code of ``plate`` is used, burnt or expired: the relay may give the nameplate to another."""
        if plate in self.plates:  # the answer that used it still reaches the machine (the relay's channels)
            self.plates.discard(plate)
            if self.state == "up":
                self.protocol.release(plate)

    async def _answer_rendezvous(self, plate: int, channel: int, payload: bytes) -> None:
        answer = b""
        try:
            if self._on_rendezvous is not None:
                answer = await self._on_rendezvous(plate, payload)
        except Exception:  # task root: the joining machine hears the end of its channel
            log.exception("rendezvous_failed", nameplate=plate)
        if self.state == "up":
            self.protocol.rendezvous_answer(plate, channel, answer)

    def forget_peer(self, node_id: str) -> None:
        """``node_id`` is no longer a member (evicted): end its session and reset every stream with it, now
        (``RelayProtocol.forget_peer``)."""
        self.protocol.forget_peer(node_id)

    def members_changed(self) -> None:
        """Membership changed: forget the online peers that are no longer members, take up the ones that now are."""
        self.protocol.members_changed()

    async def _run(self) -> None:
        backoff = Backoff(0.2, max_s=3.0)  # back within 5 s of the relay's return, however long it was away
        while not self._closing:
            try:
                async with connect(
                    self.url,
                    additional_headers={
                        "Authorization": f"Bearer {self._token}",
                        wire.NODE_ID_HEADER: self.node_id,
                        wire.NODE_KEY_HEADER: base64.b64encode(self._identity.sign_key).decode("ascii"),
                    },
                    compression=None,
                    proxy=None,
                    open_timeout=self._connect_timeout_s,
                    ping_interval=15,
                    ping_timeout=15,
                    close_timeout=2,
                    max_size=wire.MAX_WELCOME_BYTES,
                    max_queue=64,
                ) as ws:
                    self._ws = ws
                    backoff.reset()
                    await self._connection(ws)
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
                if unauthorized and e.rcvd is not None:  # it did not take our proof: our key is not our id's
                    log.warning("relay_refused", url=self.url, code=e.rcvd.code, reason=e.rcvd.reason)
                else:
                    log.info("relay_disconnected", url=self.url, error=self.last_error)
            except InvalidStatus as e:
                status = e.response.status_code
                self.state = "refused" if status in (401, 403) else "down"
                self.last_error = f"relay refused the connection: HTTP {status}"
                log.warning("relay_refused", url=self.url, status=status)
            except (OSError, WebSocketException, TimeoutError) as e:
                self.state = "down"
                self.last_error = f"{type(e).__name__}: {e}"
                log.info("relay_disconnected", url=self.url, error=self.last_error)
            except Exception:  # task root
                self.state = "down"
                log.exception("relay_link_failed", url=self.url)
            finally:
                self._ws = None
                self._up.clear()
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self.protocol.lost("the relay connection was lost")
            if self._closing:
                return
            await asyncio.sleep(backoff.next_delay())

    async def _connection(self, ws: ClientConnection) -> None:
        writer = asyncio.create_task(self._writer(ws), name="relay-writer")
        loop = asyncio.get_running_loop()
        receive = self.protocol.receive
        try:
            async for raw in ws:
                if isinstance(raw, str):
                    raise ConnectionError("the relay sent a text message")
                try:
                    receive(raw, loop.time())
                except ProtocolError as e:
                    await ws.close(e.code, e.reason)
                    return
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _writer(self, ws: ClientConnection) -> None:
        """The only sender: what the protocol queued, sealed and batched, in order (Noise nonces must)."""
        protocol = self.protocol
        outbox = protocol.outbox
        loop = asyncio.get_running_loop()
        last = float("-inf")
        try:
            while True:
                while not outbox:
                    self._output = loop.create_future()
                    await self._output
                wait = protocol.send_at(last) - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                for raw in protocol.frames_to_send():
                    self.messages_sent += 1
                    await ws.send(raw)
                last = loop.time()
        except ConnectionClosed:
            pass
        except Exception:  # task root: a link that cannot send must not look alive
            log.exception("relay_writer_failed")
            await ws.close(1011, "writer failed")

    def _arm(self) -> None:
        """Fire the protocol's timer at its next deadline."""
        at = self.protocol.next_deadline()
        if at is None or (self._timer is not None and self._timer.when() <= at):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(at, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.protocol.tick(asyncio.get_running_loop().time())
        self._arm()

    class _Events:
        """The protocol's listener: its events, turned into futures, tasks and callbacks."""

        __slots__ = ("link",)

        def __init__(self, link: RelayLink) -> None:
            self.link = link

        def welcomed(self, welcome: wire.Welcome) -> None:
            link = self.link
            if link._ws is not None:  # from now on, messages as large as its frames, no larger
                limit = welcome.max_frame_bytes or link.protocol.max_frame_bytes
                _limit_incoming(link._ws, min(limit, MAX_FRAME_BYTES) + wire.FRAME_OVERHEAD)
            link.state = "up"
            link.last_error = None
            link.connected_at = time.time()
            link._up.set()
            log.info("relay_connected", url=link.url, session=welcome.session, peers=len(welcome.peers))
            if welcome.rendezvous:  # the nameplates of our codes, held again (ref 0: nobody waits)
                for plate in link.plates:
                    link.protocol.claim(0, plate)

        def claimed(self, ref: int, nameplate: int) -> None:
            link = self.link
            answer = link._claims.get(ref)
            if answer is not None and not answer.done():
                answer.set_result(nameplate)
            elif ref == 0 and nameplate and nameplate not in link.plates:  # ours went to another meanwhile
                link.protocol.release(nameplate)

        def rendezvous(self, nameplate: int, channel: int, payload: bytes) -> None:
            link = self.link
            if nameplate not in link.plates or len(link._answering) >= _RENDEZVOUS_TASKS:
                link.protocol.rendezvous_answer(nameplate, channel, b"")
                return
            task = asyncio.create_task(link._answer_rendezvous(nameplate, channel, payload), name="relay-rendezvous")
            link._answering.add(task)
            task.add_done_callback(link._answering.discard)

        def presence(self, peer: str, online: bool) -> None:
            self.link._on_presence(peer, online)

        def draining(self, peer: str) -> None:
            self.link._on_draining(peer)

        def session_ready(self, peer: str) -> None:
            ready = self.link._ready.pop(peer, None)
            if ready is not None and not ready.done():
                ready.set_result(None)

        def session_failed(self, peer: str, error: RelayLinkError) -> None:
            ready = self.link._ready.pop(peer, None)
            if ready is not None and not ready.done():
                ready.set_exception(error)
                ready.exception()  # retrieved: nobody may be waiting

        def serve(self, stream: Stream, head: OpenHead, body: bytes) -> None:
            served = _Served()
            stream.handler = served
            served.task = asyncio.create_task(self.link._answer(stream, served, head, body), name="relay-serve")

        def tunnel(self, stream: Stream, head: OpenHead) -> None:
            protocol = self.link.protocol
            served = _Tunneled(lambda n: protocol.consumed(stream, n), lambda: protocol.reset(stream, "cancel"))
            stream.handler = served
            served.task = asyncio.create_task(self.link._tunnel(stream, served, head), name="relay-tunnel")

        def output(self) -> None:
            link = self.link
            w, link._output = link._output, None
            if w is not None and not w.done():
                w.set_result(None)

        def room(self) -> None:
            self.link._room.set()

    # -- requesting ----------------------------------------------------------------

    async def _session_with(self, peer: str) -> None:
        if self.protocol.hello(peer, asyncio.get_running_loop().time()):
            return
        self._arm()
        ready = self._ready.get(peer)
        if ready is None:
            ready = self._ready[peer] = asyncio.get_running_loop().create_future()
        await asyncio.shield(ready)

    async def request(
        self, peer: str, method: str, path: str, headers: dict[str, str], body: bytes, *, timeout_s: float
    ) -> RelayAnswer:
        """Send one request to ``peer`` and wait (up to ``timeout_s``) for its answer's head.

        If the peer had lost the session the stream was opened in, the request
        is sent once more in a fresh one (nothing of it was served).
        """
        async with asyncio.timeout(timeout_s):
            try:
                return await self._request(peer, method, path, headers, body)
            except SessionLost:
                return await self._request(peer, method, path, headers, body)

    def _open(self, peer: str, method: str, path: str, headers: dict[str, str]) -> tuple[Stream, _Request]:
        """Open a stream to ``peer`` (its session ready) with a request's head; its owner, which reads the answer."""
        protocol = self.protocol
        stream: Stream | None = None
        exchange = _Request(
            lambda n: protocol.consumed(stream, n) if stream is not None else None,
            lambda: protocol.reset(stream, "cancel") if stream is not None else None,
        )
        head = OpenHead(
            method=method,
            path=path,
            body=b"",
            headers=[(str(k), str(v)) for k, v in headers.items() if k.lower() not in HOP_BY_HOP],
        )
        stream = protocol.open(peer, head, exchange)
        return stream, exchange

    async def _request(self, peer: str, method: str, path: str, headers: dict[str, str], body: bytes) -> RelayAnswer:
        await self._session_with(peer)
        protocol = self.protocol
        stream, exchange = self._open(peer, method, path, headers)
        try:
            await self._send(stream, exchange, body)  # in credit-sized pieces, like any data
            protocol.close(stream)
            answer = await exchange.head
        except BaseException:
            if not stream.ended:
                protocol.reset(stream, "cancel")
            raise
        return RelayAnswer(answer.status, answer.headers, exchange.body)

    async def tunnel(self, peer: str, path: str, headers: dict[str, str], *, timeout_s: float) -> RelayTunnel:
        """Open a tunnel to ``peer`` at ``path`` (a ``TUNNEL`` stream): once its answer's head is 200, bytes go
        both ways on it until either end closes. ``RelayLinkError`` if it cannot be opened."""
        async with asyncio.timeout(timeout_s):
            await self._session_with(peer)
        protocol = self.protocol
        stream, exchange = self._open(peer, TUNNEL, path, headers)
        try:
            async with asyncio.timeout(timeout_s):
                answer = await exchange.head
        except BaseException:
            if not stream.ended:
                protocol.reset(stream, "cancel")
            raise
        if answer.status != 200:
            if not stream.ended:
                protocol.reset(stream, "refused")
            raise RelayLinkError(f"peer {peer} refused the tunnel ({answer.status})")
        return RelayTunnel(self, stream, exchange)

    async def _send(self, stream: Stream, sender: _Sender, data: bytes) -> None:
        """Send ``data`` on ``stream`` as its credit and the link's budget allow, waiting for more as needed."""
        view = memoryview(data)
        send = self.protocol.send
        while view:
            n = send(stream, view)  # raises once the stream has ended
            view = view[n:]
            if not n:
                if stream.credit <= 0:
                    sender._credit.clear()
                    await sender._credit.wait()
                else:
                    self._room.clear()
                    await self._room.wait()

    # -- serving -------------------------------------------------------------------

    async def _tunnel(self, stream: Stream, served: _Tunneled, head: OpenHead) -> None:
        """A member's tunnel: joined to the loopback stream ``open_tunnel`` gives for its path (404: none)."""
        protocol = self.protocol
        opened = None
        try:
            if self._open_tunnel is not None:
                opened = await self._open_tunnel(stream.peer, head.path)
            if opened is None:
                await self._send(stream, served, encode(AnswerHead(status=404, headers=[])))
                protocol.close(stream)
                return
            reader, writer = opened
            await self._send(stream, served, encode(AnswerHead(status=200, headers=[])))
            await join(RelayTunnel(self, stream, served), reader, writer, Counted())
        except asyncio.CancelledError:
            if opened is not None:
                opened[1].close()
            raise
        except (OSError, RelayLinkError) as e:
            log.warning("relay_tunnel_failed", peer=stream.peer, path=head.path, error=str(e))
            if opened is not None:
                opened[1].close()
            if not stream.ended:
                protocol.reset(stream, "tunnel_failed")

    async def _answer(self, stream: Stream, served: _Served, head: OpenHead, body: bytes) -> None:
        """Serve an incoming request with the node's own HTTP server; stream the answer back."""
        protocol = self.protocol
        resp: Any = None
        try:
            resp = await self._serve(stream.peer, head.method, head.path, head.headers, body)
            out_headers = [(str(k), v) for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP]
            await self._send(stream, served, encode(AnswerHead(status=resp.status, headers=out_headers)))
            content = resp.content
            set_sink = getattr(content, "set_sink", None)
            sending = False  # a chunk of ours is on its way (waiting for credit): writes queue behind it
            send_now = protocol.send_now

            def sink(data: bytes) -> bool:
                return not sending and send_now(stream, data)

            while chunk := await content.readany():
                sending = True
                await self._send(stream, served, chunk)
                sending = False
                if set_sink is not None:
                    set_sink(sink)  # from now on each write is sent as it is made, while there is room
            protocol.close(stream)
        except asyncio.CancelledError:
            raise  # the requester reset the stream: closing our request cancels the work below
        except (aiohttp.ClientError, OSError, RelayLinkError, ValueError) as e:
            log.warning("relay_serve_failed", peer=stream.peer, path=head.path, error=str(e))
            protocol.reset(stream, "serve_failed")
        except Exception:  # task root: the requester must hear of it
            log.exception("relay_serve_crashed", peer=stream.peer, path=head.path)
            protocol.reset(stream, "serve_failed")
        finally:
            if resp is not None:
                resp.close()
