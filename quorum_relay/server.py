"""The relay process: a websockets server, admission at the handshake, one handler per node.

``Relay`` is the whole relay as an object (tests start one in-process)::

    relay = Relay(Settings(host="127.0.0.1", port=0, tokens=(TOKEN,)))
    await relay.start()          # relay.port / relay.url / relay.connect_url
    ...
    await relay.stop()           # closes every node with 1001 within close_timeout_s

Admission runs in ``process_request``, before any WebSocket exists: the
per-address handshake bucket (429), the token (401, the same answer for a
missing and a wrong one), the node id (400), the node's key and that the id is
the key's (401), then capacity (503) and connections per address (429).
Once the WebSocket is open, the handler asks the node to prove it holds that
key (``wire.Challenge`` / ``wire.Proof``) before it registers it: a wrong or
missing proof is closed with ``CLOSE_UNAUTHORIZED`` and never displaces the
node whose id it claimed. ``/health`` and ``/metrics`` are answered from the
same hook on the same port.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from typing import Any

import msgspec
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .conn import Conn, close_with_deadline
from .errors import ConfigError, ProtocolViolation
from .hub import Hub
from .identity import decode_key, node_id_for, verify_proof
from .limits import AddressCounts, TokenBuckets, address_key, client_address, parse_networks
from .metrics import CONTENT_TYPE, Stats, build_registry, render
from .responses import error_response, json_response, response
from .settings import Settings, ssl_context
from .tokens import Admission, TokenTable, load_tokens_file
from .wire import (
    CLOSE_IDLE,
    CLOSE_PROTOCOL,
    CLOSE_TOKEN_REVOKED,
    CLOSE_UNAUTHORIZED,
    CONNECT_PATH,
    JOIN_PATH,
    MAX_NAMEPLATE,
    MAX_RENDEZVOUS_BYTES,
    MAX_RENDEZVOUS_MESSAGES,
    NODE_ID_HEADER,
    NODE_KEY_HEADER,
    NONCE_BYTES,
    RENDEZVOUS_S,
    Challenge,
    Proof,
    decode,
    encode,
)

__all__ = ["Relay", "load_token_table", "preflight"]

log = structlog.get_logger(__name__)

NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ATTR = "quorum_relay_admitted"  # set on the websockets connection by process_request (as basic_auth sets .username)
_JOIN_ATTR = "quorum_relay_nameplate"  # a machine with a join code: the nameplate it asks for (``rendezvous``)


def load_token_table(settings: Settings) -> TokenTable:
    """``--token`` tokens plus the tokens file's; ``ConfigError`` if the file is unreadable or wrong."""
    entries: list[tuple[str, str | None]] = [(t, None) for t in settings.tokens]
    if settings.tokens_file:
        entries += load_tokens_file(settings.tokens_file)
    return TokenTable(entries)


def preflight(settings: Settings) -> None:
    """The checks that need files (tokens, TLS), so that the CLI can refuse before anything starts."""
    if not len(load_token_table(settings)):
        raise ConfigError("no tokens: give --token or --tokens-file (nodes need one to join)")
    ssl_context(settings)


class _Admitted(msgspec.Struct, frozen=True):
    admission: Admission
    node_id: str
    address: str
    key: bytes  # the node's Ed25519 public key, until it has proved it holds it


def _bearer(headers: Headers) -> str | None:
    values = headers.get_all("Authorization")
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class Relay:
    """quorum-relay, in-process. ``start``/``stop`` (idempotent), ``reload_tokens`` (what SIGHUP does)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.hub = Hub(
            max_streams_per_node=settings.max_streams_per_node,
            max_frame_bytes=settings.max_frame_bytes,
            send_queue_bytes=settings.send_queue_bytes,
            stats=self.stats,
        )
        self.registry = build_registry(self.stats, self._gauges)
        self._tokens = TokenTable(())
        self._buckets = TokenBuckets(settings.handshake_rate_per_s, settings.handshake_burst)
        self._per_address = AddressCounts(settings.max_connections_per_address)
        self._admitted = 0  # handshakes admitted whose TCP connection is still open
        self._trusted = parse_networks(settings.trusted_proxies)
        self._metrics_digest = (
            hashlib.sha256(settings.metrics_token.encode()).digest() if settings.metrics_token else None
        )
        self._conns: set[Conn] = set()
        self._proving: set[ServerConnection] = set()  # open, not yet registered: their node is proving its key
        self._joining: set[ServerConnection] = set()  # machines with a join code, talking to its holder
        self._server: Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._started_at = 0.0
        self._port = 0

    # lifecycle

    async def start(self) -> None:
        s = self.settings
        preflight(s)
        self._tokens = load_token_table(s)
        self._server = await serve(
            self._handler,
            s.host,
            s.port,
            process_request=self._process_request,
            ssl=ssl_context(s),
            compression=None,  # payloads are encrypted, so incompressible; deflate would cost ~64 KiB a node
            max_size=s.max_frame_bytes,
            ping_interval=None,  # one sweeper pings everyone (and closes with CLOSE_IDLE, not 1011)
            ping_timeout=None,
            open_timeout=s.open_timeout_s,
            close_timeout=s.close_timeout_s,
            server_header="quorum-relay",
        )
        self._started_at = time.monotonic()
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        log.info(
            "relay_started",
            host=s.host,
            port=self.port,
            tls=s.tls,
            tokens=len(self._tokens),
            namespaces=len(self._tokens.namespaces()),
        )

    async def stop(self) -> None:
        """Stop accepting, close every node with 1001, wait for the handlers (bounded by ``close_timeout_s``)."""
        if self._server is None:
            return
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        assert self._server is not None
        log.info("relay_stopping", connections=len(self._conns))
        self._stopping = True
        self.hub.quiet = True  # n nodes leaving would be n² Left frames nobody reads
        self._server.close(close_connections=False)  # stop listening; handshakes in flight get 503
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper])
        for conn in list(self._conns):
            self.stats.closes["shutdown"] += 1
            conn.close_soon(1001, "relay shutting down")
        closing = [  # nodes still proving their key: nobody knows of them yet
            asyncio.ensure_future(close_with_deadline(ws, 1001, "relay shutting down", self.settings.close_timeout_s))
            for ws in self._proving | self._joining
        ]
        # Each close aborts its socket at close_timeout_s. What may remain is a TCP connection that
        # never sent its handshake request (bounded by open_timeout_s); on Python >= 3.13 abort those
        # too rather than wait, since asyncio's wait_closed waits for every accepted socket on 3.12+.
        if closing:
            await asyncio.wait(closing)
        waiter = asyncio.ensure_future(self._server.wait_closed())
        done, _ = await asyncio.wait([waiter], timeout=self.settings.close_timeout_s + 0.5)
        if not done:
            abort = getattr(self._server.server, "abort_clients", None)
            if abort is not None:
                abort()
            await waiter
        log.info("relay_stopped")

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (read back: ``port=0`` picks a free one)."""
        assert self._server is not None, "not started"
        return self._port

    @property
    def url(self) -> str:
        """``ws(s)://host:port`` (the wildcard host as loopback)."""
        host = self.settings.host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        if ":" in host:
            host = f"[{host}]"
        return f"{'wss' if self.settings.tls else 'ws'}://{host}:{self.port}"

    @property
    def connect_url(self) -> str:
        return self.url + CONNECT_PATH

    @property
    def connections(self) -> int:
        return len(self._conns)

    def queued_bytes(self) -> int:
        """Bytes waiting in all send queues now."""
        return sum(c.queued for c in self._conns)

    # tokens

    def reload_tokens(self) -> int:
        """Re-read the tokens (SIGHUP); close nodes whose token no longer admits them. Returns how many.

        ``ConfigError`` (a bad tokens file) leaves the tokens in force as they were.
        """
        table = load_token_table(self.settings)
        self._tokens = table
        revoked = [c for c in self._conns if not c.gone and not table.still_admits(c.admission)]
        for conn in revoked:
            self.hub.evict(conn, CLOSE_TOKEN_REVOKED, "token revoked", "token_revoked")
        log.info("tokens_reloaded", tokens=len(table), namespaces=len(table.namespaces()), revoked=len(revoked))
        return len(revoked)

    # the handshake

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == CONNECT_PATH:
            return self._admit(connection, request)
        if path.startswith(JOIN_PATH):
            return self._admit_joiner(connection, request, path[len(JOIN_PATH) :])
        if path == "/health":
            return self._health()
        if path == "/metrics":
            return self._metrics(request)
        return error_response(404, f"no such path: {path}", "invalid_request_error", code="not_found")

    def _refuse(self, reason: str, status: int, message: str, type_: str, **kw: Any) -> Response:
        self.stats.rejections[reason] += 1
        return error_response(status, message, type_, code=reason, **kw)

    def _rate(self, connection: ServerConnection, request: Request) -> tuple[str, str, Response | None]:
        """The caller's address, its key for the per-address limits, and a 429 where it has made too many
        handshakes lately."""
        peer_ip = str(connection.remote_address[0]) if connection.remote_address else ""
        ip = client_address(peer_ip, request.headers.get("X-Forwarded-For"), self._trusted)
        key = address_key(ip)
        now = time.monotonic()
        if self._buckets.take(key, now):
            return ip, key, None
        retry = max(1, round(self._buckets.retry_after_s(key, now) + 0.5))
        return (
            ip,
            key,
            self._refuse(
                "handshake_rate",
                429,
                "too many handshakes from this address",
                "rate_limit_error",
                headers={"Retry-After": str(retry)},
            ),
        )

    def _too_many_connections(self) -> Response:
        return self._refuse(
            "too_many_connections",
            429,
            "too many connections from this address",
            "rate_limit_error",
            headers={"Retry-After": "5"},
        )

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        if self._stopping:
            return self._refuse("shutting_down", 503, "the relay is shutting down", "unavailable_error")
        s = self.settings
        ip, key, refused = self._rate(connection, request)
        if refused is not None:
            return refused
        token = _bearer(request.headers)
        admission = self._tokens.admit(token) if token is not None else None
        if admission is None:
            log.info("handshake_refused", reason="unauthorized", address=ip)
            return self._refuse(
                "unauthorized",
                401,
                "missing or invalid relay token (Authorization: Bearer <token>)",
                "authentication_error",
            )
        node_ids = request.headers.get_all(NODE_ID_HEADER)
        if len(node_ids) != 1 or not NODE_ID_RE.fullmatch(node_ids[0]):
            return self._refuse(
                "bad_node_id",
                400,
                f"{NODE_ID_HEADER} must be one id of [A-Za-z0-9._-]{{1,64}}",
                "invalid_request_error",
                param=NODE_ID_HEADER,
            )
        keys = request.headers.get_all(NODE_KEY_HEADER)
        sign_key = decode_key(keys[0]) if len(keys) == 1 else None
        if sign_key is None or not hmac.compare_digest(node_id_for(sign_key), node_ids[0]):
            log.info("handshake_refused", reason="bad_node_key", address=ip)
            return self._refuse(
                "bad_node_key",
                401,
                f"{NODE_KEY_HEADER} must be the node's Ed25519 public key (32 bytes, base64), and "
                f"{NODE_ID_HEADER} the id derived from it",
                "authentication_error",
                param=NODE_KEY_HEADER,
            )
        if self._admitted >= s.max_connections:
            return self._refuse("capacity", 503, "the relay is full", "unavailable_error", headers={"Retry-After": "5"})
        if not self._per_address.acquire(key):
            return self._too_many_connections()
        self._admitted += 1
        # Released when the TCP connection ends, whether or not the WebSocket handshake completes.
        connection.connection_lost_waiter.add_done_callback(lambda _: self._release(key))
        setattr(connection, _ATTR, _Admitted(admission, node_ids[0], ip, sign_key))
        return None

    def _admit_joiner(self, connection: ServerConnection, request: Request, plate_text: str) -> Response | None:
        """A machine with a join code: no token, a nameplate somebody holds (``rendezvous``)."""
        if self._stopping:
            return self._refuse("shutting_down", 503, "the relay is shutting down", "unavailable_error")
        _, key, refused = self._rate(connection, request)  # a guesser's tries cost what handshakes cost
        if refused is not None:
            return refused
        plate = int(plate_text) if plate_text.isdigit() and len(plate_text) <= 3 else 0
        if not 1 <= plate <= MAX_NAMEPLATE or self.hub.plates.holder(plate) is None:
            return self._refuse(
                "no_nameplate",
                404,
                "no invitation with that number on this relay (used, burnt or expired?)",
                "invalid_request_error",
            )
        if not self._per_address.acquire(key):
            return self._too_many_connections()
        connection.connection_lost_waiter.add_done_callback(lambda _: self._per_address.release(key))
        setattr(connection, _JOIN_ATTR, plate)
        return None

    async def _joiner(self, ws: ServerConnection, plate: int) -> None:
        """Carry one joining machine's messages to its nameplate's holder and the answers back, bounded in
        number, size and time; the relay reads none of them."""
        channel = self.hub.plates.open(plate) if not self._stopping else None
        if channel is None:
            self.stats.rejections["no_nameplate"] += 1
            await close_with_deadline(ws, CLOSE_PROTOCOL, "no such invitation now", self.settings.close_timeout_s)
            return
        protocol: Any = ws.protocol  # what it sends is bounded before it is read (websockets checks the length)
        if hasattr(protocol, "max_message_size"):
            protocol.max_message_size = MAX_RENDEZVOUS_BYTES
        else:
            protocol.max_size = MAX_RENDEZVOUS_BYTES

        async def reads() -> None:
            for _ in range(MAX_RENDEZVOUS_MESSAGES):
                raw = await ws.recv()
                if not isinstance(raw, bytes) or not self.hub.to_holder(channel, raw):
                    return
            await asyncio.sleep(RENDEZVOUS_S)  # no more from it; the answers may still come

        async def writes() -> None:
            while (answer := await channel.answers.get()) is not None:
                await ws.send(answer)

        self._joining.add(ws)
        tasks = [asyncio.ensure_future(reads()), asyncio.ensure_future(writes())]
        try:
            await asyncio.wait(tasks, timeout=RENDEZVOUS_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.hub.plates.close(channel)
            self._joining.discard(ws)
            await close_with_deadline(ws, 1000, "", self.settings.close_timeout_s)

    def _release(self, key: str) -> None:
        self._admitted -= 1
        self._per_address.release(key)

    def _health(self) -> Response:
        status = "stopping" if self._stopping else "ok"
        return json_response(
            503 if self._stopping else 200,
            {
                "status": status,
                "connections": len(self._conns),
                "namespaces": len(self.hub.roster),
                "streams": len(self.hub.streams),
                "uptime_s": round(time.monotonic() - self._started_at, 3),
            },
        )

    def _metrics(self, request: Request) -> Response:
        if self._metrics_digest is not None:
            token = _bearer(request.headers) or ""
            if not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._metrics_digest):
                return error_response(
                    401, "missing or invalid metrics token", "authentication_error", code="unauthorized"
                )
        return response(200, render(self.registry), CONTENT_TYPE)

    def _gauges(self) -> dict[str, float]:
        return {
            "connections": len(self._conns),
            "namespaces": len(self.hub.roster),
            "streams": len(self.hub.streams),
            "send_queue_bytes": self.queued_bytes(),
            "tokens": len(self._tokens),
        }

    # one node

    async def _proven(self, ws: ServerConnection, admitted: _Admitted) -> bool:
        """Challenge the node to sign a fresh nonce with its key; False (and closed) if it does not.

        Until it has answered, the connection is nobody: it is not registered, so a node that
        claims another's id and cannot sign for its key displaces no one.
        """
        nonce = secrets.token_bytes(NONCE_BYTES)
        why = "no_proof"
        try:
            await ws.send(encode(Challenge(nonce=nonce)))
            async with asyncio.timeout(self.settings.open_timeout_s):
                raw = await ws.recv()
            frame = decode(raw) if isinstance(raw, bytes) else None
            if isinstance(frame, Proof):
                if verify_proof(admitted.key, admitted.node_id, nonce, frame.signature):
                    return True
                why = "bad_proof"
        except (TimeoutError, ConnectionClosed, msgspec.DecodeError):
            pass
        if self._stopping:  # closed by the stop, not refused
            return False
        self.stats.rejections[why] += 1
        log.info("handshake_refused", reason=why, node_id=admitted.node_id, address=admitted.address)
        await close_with_deadline(ws, CLOSE_UNAUTHORIZED, "no proof of the node's key", self.settings.close_timeout_s)
        return False

    async def _handler(self, ws: ServerConnection) -> None:
        plate: int | None = getattr(ws, _JOIN_ATTR, None)
        if plate is not None:
            await self._joiner(ws, plate)
            return
        admitted: _Admitted = getattr(ws, _ATTR)
        if not self._stopping:
            self._proving.add(ws)
            try:
                proven = await self._proven(ws, admitted)
            finally:
                self._proving.discard(ws)
            if not proven:
                return
            if not self._tokens.still_admits(admitted.admission):  # revoked while it was proving its key
                self.stats.closes["token_revoked"] += 1
                await close_with_deadline(ws, CLOSE_TOKEN_REVOKED, "token revoked", self.settings.close_timeout_s)
                return
        conn = Conn(
            ws,
            node_id=admitted.node_id,
            admission=admitted.admission,
            session=secrets.token_urlsafe(12),
            address=admitted.address,
            send_queue_bytes=self.settings.send_queue_bytes,
            close_timeout_s=self.settings.close_timeout_s,
            stats=self.stats,
            on_overflow=self.hub.on_overflow,
        )
        code, reason = 1000, ""
        if self._stopping:
            await conn.finish(1001, "relay shutting down")
            return
        self._conns.add(conn)
        try:
            self.hub.join(conn)
            conn.start()
            log.info(
                "node_connected",
                node_id=conn.node_id,
                session=conn.session,
                namespace=conn.namespace,
                address=conn.address,
            )
            code, reason = await self._read(conn)
        finally:
            self.hub.leave(conn)
            self._conns.discard(conn)
            await conn.finish(code, reason)
            log.info(
                "node_disconnected",
                node_id=conn.node_id,
                session=conn.session,
                code=None if ws.close_code is None else int(ws.close_code),
            )

    async def _read(self, conn: Conn) -> tuple[int, str]:
        """Route the node's frames until it goes; the close code and reason to end with."""
        recv, handle, clock = conn.ws.recv, self.hub.handle, time.monotonic
        try:
            while True:
                raw = await recv()
                if conn.gone:
                    return 1000, ""
                conn.last_rx = clock()
                handle(conn, raw)
        except ConnectionClosed as e:
            if e.sent is not None and e.sent.code == 1009:
                self.stats.closes["frame_too_large"] += 1
            return 1000, ""
        except ProtocolViolation as e:
            self.stats.closes["protocol"] += 1
            log.info("protocol_violation", node_id=conn.node_id, session=conn.session, reason=str(e))
            return CLOSE_PROTOCOL, str(e)[:120]

    # keepalive and housekeeping

    async def _sweep_loop(self) -> None:
        s = self.settings
        tick = min(5.0, max(0.02, min(s.ping_interval_s, s.idle_timeout_s) / 4))
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            try:
                self.sweep(now)
                if now - last_prune >= 10.0:
                    self._buckets.prune(now)
                    last_prune = now
            except Exception:
                log.exception("sweep_failed")

    def sweep(self, now: float) -> None:
        """Ping nodes quiet for ``ping_interval_s``; close those quiet for ``idle_timeout_s`` (``CLOSE_IDLE``)."""
        s = self.settings
        for conn in list(self._conns):
            if conn.closing:
                continue
            quiet = now - conn.last_rx
            if quiet >= s.idle_timeout_s:
                self.hub.evict(conn, CLOSE_IDLE, "idle timeout", "idle")
            elif quiet >= s.ping_interval_s:
                conn.ping_soon(now, s.ping_interval_s)
