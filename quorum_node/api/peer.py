"""The peer protocol's endpoints: what members ask each other (``cluster/`` holds the logic).

The same messages on every link (HTTP over mutual TLS on the peer port, or a
stream through the relay); the trust middleware has set ``PEER`` to the
member the link proved, and each endpoint here is for members only, except:

- ``POST /quorum/v1/join``: a new machine with an invite, on the peer port only
  (``cluster/join.py``);
- ``POST /quorum/v1/members``: also an introduction on the peer port from a
  node without a certificate yet (``cluster/members_sync.py``);
- ``GET /quorum/v1/peers``: also for this node's own loopback callers.

- ``POST /quorum/v1/doctor`` → a member's doctor: its ports dialled back, and our clock
- ``GET /quorum/v1/health``  → who the node is, its load, catalog, keys and members digests
- ``GET /quorum/v1/catalog`` → the models its engines hold
- ``GET|POST /quorum/v1/keys`` → the API key records (``control/replication.py``)
- ``GET|POST /quorum/v1/members`` → the membership records
- ``GET /quorum/v1/usage`` → this node's ledger rows, for a peer summing the cluster
- ``POST /quorum/v1/shards/lend|renew|release`` → a worker lent to a leader's sharded model
  (``cluster/lending.py``); ``GET /quorum/v1/shards/tunnel?shard=`` → the WebSocket that carries the
  leader's engine's stream to it (``cluster/tunnel.py``), on the peer port only, for the member that leased it
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, TypeVar

import msgspec
from aiohttp import web

from ..cluster.codes import CODE_FINISH_PATH, CODE_START_PATH, MAX_CODE_BYTES, CodeError, CodeFinish, CodeStart
from ..cluster.join import JOIN_PATH, MAX_JOIN_BYTES
from ..cluster.lending import (
    LEAVING_PATH,
    LEND_PATH,
    MAX_SHARD_BYTES,
    RELEASE_PATH,
    RENEW_PATH,
    TUNNEL_PATH,
    Lending,
    LendRefused,
    LendRequest,
    ShardRef,
)
from ..cluster.members_sync import MAX_MEMBERS_BYTES, MEMBERS_PATH
from ..cluster.tunnel import MAX_MESSAGE, Counted, WebSocketDuplex
from ..cluster.tunnel import join as join_streams
from ..control.doctor import DOCTOR_PATH, DialBack, DialedBack, Dialled, dial
from ..control.replication import KEYS_PATH, MAX_KEYS_BYTES
from ..control.usage import UsageAnswer
from ..errors import ApiError, BadRequest, Forbidden, NotFound, PayloadTooLarge, Unauthorized
from ..names import is_loopback
from .admin import ledger_of, query_by, query_since
from .body import read_body
from .state import NAME, PEER

if TYPE_CHECKING:
    from ..cluster.context import RecordSync
    from ..cluster.service import ClusterService

__all__ = ["routes"]

_encode = msgspec.json.Encoder().encode
_T = TypeVar("_T")


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


def _member(request: web.Request) -> str:
    """The member the request's link proved; 401 for anyone else."""
    peer = request.get(PEER)  # aiohttp types ``Request.get`` as Any, even for a RequestKey
    if not isinstance(peer, str):
        raise Unauthorized("This endpoint is for the cluster's members", code="unauthorized")
    return peer


async def _capped_body(request: web.Request, limit: int, what: str) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"{what} are limited to {limit} bytes", code="body_too_large")
    raw = await read_body(request)
    if len(raw) > limit:
        raise PayloadTooLarge(f"{what} are limited to {limit} bytes", code="body_too_large")
    return raw


def peers_answer(cluster: ClusterService) -> bytes:
    """``GET /quorum/v1/peers``: the peer table as this node sees it, and the relay link."""
    now = time.monotonic()
    peers = [
        {
            "node_id": p.node_id,
            "name": p.info.name,
            "address": p.info.address,
            "route": p.info.route,
            "state": p.state.value,
            "models": sorted({e.id for e in cluster.catalogs.get(p.node_id, ())}),
            "in_flight": p.in_flight,
            "last_seen_s": round(now - p.last_seen, 3),
            "rtt_ms": round(p.ewma_rtt_s * 1000, 3) if p.ewma_rtt_s is not None else None,
            "static": p.static,
            "routes": p.routes,
            "draining": p.draining,
            "since": cluster.wall_clock(p.up_since, now),  # online since (epoch seconds), None while not up
            "load": p.load.in_flight if p.load is not None else None,
        }  # what it says it is answering
        for p in cluster.table.all()
    ]
    relay = cluster.relay_status()
    me = {**msgspec.structs.asdict(cluster.identity_message()), "cluster": cluster.membership.root}
    del me["load"], me["fingerprint"]
    return _encode({"node": me, "peers": peers, "relay": relay})


def routes(cluster: ClusterService) -> list[web.RouteDef]:
    """The peer protocol of ``cluster``'s node."""

    async def health(request: web.Request) -> web.Response:
        _member(request)
        return _json(cluster.health())

    async def catalog(request: web.Request) -> web.Response:
        _member(request)
        return _json(cluster.catalog_answer())

    async def peers(request: web.Request) -> web.Response:
        if request.get(PEER) is None and not is_loopback(request.remote):
            _member(request)
        return _json(peers_answer(cluster))

    def key_sync() -> RecordSync:
        """The key records' replicator (the node attaches one to every cluster it runs)."""
        sync = cluster.key_sync
        if sync is None:
            raise NotFound("This node replicates no key records", code="no_key_sync")
        return sync

    async def get_keys(request: web.Request) -> web.Response:
        _member(request)
        return _json(key_sync().answer())

    async def post_keys(request: web.Request) -> web.Response:
        peer = _member(request)
        sync = key_sync()
        return _json(sync.accept(await _capped_body(request, MAX_KEYS_BYTES, "Key records"), peer))

    async def get_members(request: web.Request) -> web.Response:
        _member(request)
        return _json(cluster.member_sync.answer())

    async def post_members(request: web.Request) -> web.Response:
        # a member's push, or an introduction on the peer port (no certificate yet)
        member = request.get(PEER)
        if member is None and cluster.peer_port_tls(request) is None:
            raise Unauthorized("This endpoint is for the cluster's members", code="unauthorized")
        raw = await _capped_body(request, MAX_MEMBERS_BYTES, "Membership records")
        return _json(cluster.member_sync.accept(raw, member, request.remote))

    async def join(request: web.Request) -> web.Response:
        if cluster.peer_port_tls(request) is None:
            raise Forbidden("Join over the peer port (`quorum-node join` does)", code="not_peer_port", retryable=False)
        if request.content_length is not None and request.content_length > MAX_JOIN_BYTES:
            raise BadRequest("A join request is small", code="bad_join")
        raw = await read_body(request)
        if len(raw) > MAX_JOIN_BYTES:
            raise BadRequest("A join request is small", code="bad_join")
        return _json(await cluster.joins.admit(raw, request.remote))

    async def code_message(request: web.Request, kind: type[_T]) -> _T:
        if cluster.peer_port_tls(request) is None and request.get(PEER) is None:
            raise Forbidden("Join over the peer port (`quorum-node join` does)", code="not_peer_port", retryable=False)
        raw = await _capped_body(request, MAX_CODE_BYTES, "Join code messages")
        try:
            return msgspec.json.decode(raw, type=kind)
        except msgspec.DecodeError as e:
            raise BadRequest(f"Not a join code message: {e}", code="bad_code_message") from None

    def code_refused(e: CodeError) -> ApiError:
        log_refusal = {403: "wrong_code", 404: "no_invitation"}.get(e.status, "bad_code_message")
        return ApiError(e.message, status=e.status, type_="invalid_request_error", code=log_refusal, retryable=False)

    async def code_start(request: web.Request) -> web.Response:
        ask = await code_message(request, CodeStart)
        try:
            session, message = cluster.codes.start(ask.nameplate, ask.message)
        except CodeError as e:
            raise code_refused(e) from None
        return _json(_encode({"session": session, "message": message}))

    async def code_finish(request: web.Request) -> web.Response:
        ask = await code_message(request, CodeFinish)
        try:
            sealed = cluster.codes.finish(ask.nameplate, ask.session, ask.proof)
        except CodeError as e:
            raise code_refused(e) from None
        return _json(_encode({"token": sealed}))

    async def doctor(request: web.Request) -> web.Response:
        """A member's doctor (``control/doctor.py``): open its ports at the address its request came from
        (on the LAN link only: through the relay that address is nobody's), and say our clock."""
        peer = _member(request)
        raw = await _capped_body(request, 1024, "Doctor messages")
        try:
            ask = msgspec.json.decode(raw, type=DialBack)
        except msgspec.DecodeError as e:
            raise BadRequest(f"Not a doctor message: {e}", code="bad_doctor_message") from None
        address = request.remote if cluster.peer_port_tls(request) is not None else None
        dialled: list[Dialled] = []
        if address:
            said = await asyncio.gather(*(dial(address, port) for port in ask.ports))
            dialled = [Dialled(port=port, error=why) for port, why in zip(ask.ports, said, strict=True)]
        relay = cluster.relay
        on_relay = peer in relay.online if relay is not None and relay.state == "up" else None
        return _json(_encode(DialedBack(now=time.time(), address=address, dialled=dialled, on_relay=on_relay)))

    async def usage(request: web.Request) -> web.Response:
        _member(request)
        by, since = query_by(request), query_since(request)
        rows = await ledger_of(request).query(since, by, entry_only=True)
        return _json(_encode(UsageAnswer(node=request.app[NAME], rows=rows)))

    def lending() -> Lending:
        if cluster.lending is None:
            raise NotFound("This node lends no memory (`lend = false`)", code="no_lending")
        return cluster.lending

    async def shard_message(request: web.Request, kind: type[_T]) -> tuple[str, _T]:
        peer = _member(request)
        raw = await _capped_body(request, MAX_SHARD_BYTES, "Shard messages")
        try:
            return peer, msgspec.json.decode(raw, type=kind)
        except msgspec.DecodeError as e:
            raise BadRequest(f"Not a shard message: {e}", code="bad_shard_message") from None

    async def lend(request: web.Request) -> web.Response:
        peer, req = await shard_message(request, LendRequest)
        try:
            answer = await lending().lend(peer, req)
        except LendRefused as e:
            raise ApiError(e.message, status=e.status, type_="server_error", code="cannot_lend") from None
        return _json(_encode(answer))

    async def renew(request: web.Request) -> web.Response:
        peer, ref = await shard_message(request, ShardRef)
        if not lending().renew(peer, ref.shard):
            raise NotFound(f"No worker for shard {ref.shard!r} here (its lease ran out?)", code="no_worker")
        return _json(b"{}")

    async def release(request: web.Request) -> web.Response:
        peer, ref = await shard_message(request, ShardRef)
        await lending().release(peer, ref.shard)
        return _json(b"{}")

    async def leaving(request: web.Request) -> web.Response:
        peer, ref = await shard_message(request, ShardRef)
        sharding = cluster.sharding
        if sharding is None or not sharding.helper_leaving(peer, ref.shard):
            raise NotFound(f"{ref.shard!r} is no shard of this node's that you help", code="no_shard")
        return _json(b"{}")

    async def tunnel(request: web.Request) -> web.StreamResponse:
        peer = _member(request)
        if cluster.peer_port_tls(request) is None:
            raise Forbidden("A tunnel is opened on the peer port", code="not_peer_port", retryable=False)
        shard = request.query.get("shard", "")
        port = lending().port(peer, shard)
        if port is None:
            raise NotFound(f"No worker for shard {shard!r} here", code="no_worker")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, autoping=True)
        if not ws.can_prepare(request).ok:
            raise BadRequest("A tunnel is a WebSocket upgrade", code="not_websocket")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MAX_MESSAGE)
        except OSError as e:
            raise ApiError(f"The worker is not answering: {e}", status=503, type_="server_error") from None
        try:
            await ws.prepare(request)
        except BaseException:
            writer.close()  # never joined: the worker's side is closed here
            raise
        with contextlib.suppress(ConnectionError):
            await join_streams(WebSocketDuplex(ws), reader, writer, Counted())  # closes both, however it ends
        return ws

    return [
        web.post(LEND_PATH, lend),
        web.post(RENEW_PATH, renew),
        web.post(RELEASE_PATH, release),
        web.post(LEAVING_PATH, leaving),
        web.get(TUNNEL_PATH, tunnel),
        web.get("/quorum/v1/health", health),
        web.get("/quorum/v1/catalog", catalog),
        web.get("/quorum/v1/peers", peers),
        web.get(KEYS_PATH, get_keys),
        web.post(KEYS_PATH, post_keys),
        web.get(MEMBERS_PATH, get_members),
        web.post(MEMBERS_PATH, post_members),
        web.post(JOIN_PATH, join),
        web.post(CODE_START_PATH, code_start),
        web.post(CODE_FINISH_PATH, code_finish),
        web.get("/quorum/v1/usage", usage),
        web.post(DOCTOR_PATH, doctor),
    ]
