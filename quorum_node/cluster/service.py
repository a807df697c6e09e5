"""The cluster at run time: discovery, health checks, catalogs, membership, forwarding.

Pure decisions live in ``peers`` / ``scoring`` / ``breaker`` / ``members``;
this module drives them from sockets and timers and plugs into the router
(``plan``) and the HTTP server (``peer_of``, ``routes``).

Every peer request travels over a link that authenticates both ends against
the membership records: mutual TLS on the LAN (``tls.py``: the peer port,
each node's certificate pinned through membership), Noise_IK sessions through
the relay (``relay/``). So the sender of a request is the member the
link proved, and an answer comes from the member it was sent to; nothing is
learnt from anyone else. mDNS only says where a member may be.

Peer protocol (the same messages on every link):

- ``GET /quorum/v1/health``  → who the node is, its catalog, keys and members digests
- ``GET /quorum/v1/catalog`` → the models its engines hold
- ``GET|POST /quorum/v1/members`` → the membership records (``members_sync``)
- ``POST /quorum/v1/join`` → a new machine with an invite (``join.py``)
- forwarding is the public API itself (``POST /v1/chat/completions`` …) with
  ``X-Quorum-Hop: 1`` and ``X-Quorum-Origin``; a node never forwards a request
  that came from a peer, so loops are impossible.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import structlog
from aiohttp import web

from ..backends.answer import LinkBroken, RequestHead
from ..backends.base import Backend, Op, Timeouts
from ..backends.upstream import read_capped
from ..breaker import Breakers
from ..catalog import ModelCard, local_cards
from ..errors import EngineUnavailable
from ..resources import Memory
from .catalogs import PeerCatalogs
from .codes import CodeInvites
from .context import PeerCallError, RecordSync
from .forward import PeerTarget
from .identity import NodeIdentity
from .join import JoinHandler
from .lending import MAX_SHARD_BYTES, TUNNEL_PATH, Lending
from .links import HttpLink, PeerLink, RelayPeerLink
from .members import MemberStore, encode_records
from .members_sync import MAX_NEW_INTRODUCED, MemberReplicator
from .membership import Cluster
from .messages import (
    HOP_HEADER,
    KEY_HEADER,
    ORIGIN_HEADER,
    CatalogAnswer,
    EngineLoad,
    Identity,
    NodeLoad,
)
from .peers import (
    CatalogChanged,
    CatalogWanted,
    Peer,
    PeerDown,
    PeerDraining,
    PeerEvent,
    PeerRemoved,
    PeerState,
    PeerSuspect,
    PeerTable,
    PeerUp,
)
from .pipe import PipeError, PipeResponse, serve_in_memory
from .probing import Prober
from .relay import RelayLink
from .scoring import RetryBudget, pick
from .sharding import Lender, Sharding
from .tls import PeerTLS
from .tunnel import MAX_MESSAGE, Duplex, WebSocketDuplex

if TYPE_CHECKING:
    from collections.abc import Sized

    from ..backends.registry import Registry
    from ..router import PeerPlan
    from ..settings import Settings
    from .mdns import Discovery


__all__ = ["HOP_HEADER", "ORIGIN_HEADER", "PROTO_VERSION", "ClusterService"]

log = structlog.get_logger(__name__)
PIPE_PEER = "quorum_peer"  # the in-memory transport's extra info: the member a relayed request came from
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

PROTO_VERSION = 4  # 4: links authenticate both ends against membership (mutual TLS, Noise_IK); no cluster secret
_MAX_PEER_ANSWER = 16 * 1024 * 1024  # a catalog of thousands of models is well under this


class ClusterService:
    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        engines: Registry,
        inflight: Sized,
        membership: Cluster,
        identity: NodeIdentity,
        members: MemberStore,
    ) -> None:
        """``engines``: this node's own (its catalog for peers); ``inflight``: what it is answering now.
        The API key records' replicator is attached by the node (``key_sync``) before ``start``."""
        self.settings = settings
        self.name = name
        self.engines = engines
        self.inflight = inflight
        self.peer_port = 0  # the peers' listener, once bound (``start``)
        self.http_server: Callable[[], asyncio.Protocol] | None = None  # serves relayed requests (``start``)
        self.membership = membership
        self.identity = identity
        self.node_id = identity.node_id
        self.members = members
        self.tls = PeerTLS(identity, members)
        s = self.settings
        self.table = PeerTable(
            self_id=self.node_id,
            is_member=members.is_member,
            max_peers=s.max_peers,
            down_after_s=s.peer_down_after_s,
            suspect_after_s=min(5.0, s.peer_down_after_s / 2),
            model_breakers=Breakers(s.holder_failures, s.holder_reset_s, max_reset_after_s=s.holder_max_reset_s),
        )
        self.budget = RetryBudget(max_tokens=10, initial_tokens=10)  # as after a calm spell
        self.peer_catalogs = PeerCatalogs(self, on_catalog=lambda events: self._handle(events))
        self.catalogs = self.peer_catalogs.by_peer  # node id -> the models it holds (available ones)
        self.timeouts = Timeouts.from_settings(s)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self.discovery: Discovery | None = None
        self.relay: RelayLink | None = None
        self._digest = ""
        self.key_sync: RecordSync | None = None  # API key records, agreed with every peer (attached by the node)
        # How many requests an engine of ours runs at once, as the health answer tells peers (set by the node:
        # the router's ``capacity_of``); by default what the engine says, if it does.
        self.capacity_of: Callable[[Backend], int | None] = lambda b: b.capacity
        self.waiting: Callable[[], int] = lambda: 0  # requests waiting for a holder with room (set by the node)
        # What this node could lend a sharded model, as its health says (set by the node; None: it lends none),
        # and the workers it lends (``lending.py``; set by the node where ``lend`` is on)
        self.memory: Callable[[], Memory | None] = lambda: None
        self.lending: Lending | None = None
        self.sharding: Sharding | None = None  # the sharded models this node leads (set by the node)
        self.member_sync = MemberReplicator(self)  # membership records, the same way
        self.prober = Prober(self)  # health rounds, probes, what mDNS says (probing.py)
        # invites given a short code (codes.py), while this node runs; the relay holds the nameplates of some
        self.codes = CodeInvites(on_gone=lambda plate: self.relay.release(plate) if self.relay is not None else None)
        self.joins = JoinHandler(self, self.codes)  # new machines with an invite or a code
        members.on_change.append(self._members_changed)

    # -- lifecycle -------------------------------------------------------

    async def start(self, *, peer_port: int, http_server: Callable[[], asyncio.Protocol]) -> None:
        """Start discovery, the relay link and the background rounds; ``peer_port`` is the bound peer
        listener, ``http_server`` makes the protocol that serves relayed requests (the node's own server)."""
        self.peer_port = peer_port
        self.http_server = http_server
        connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, headers={"Accept-Encoding": "identity"}
        )
        for address in self.settings.peers:
            self.table.add_static(address)
        self._digest = self.catalog_digest()
        self.engines.on_change.append(self._local_catalog_changed)
        if self.settings.mdns:
            from .mdns import Discovery

            self.discovery = Discovery(
                node_id=self.node_id,
                name=self.name,
                port=self.peer_port,
                fingerprint="",
                proto=PROTO_VERSION,
                catalog_digest=self._digest,
                interfaces=list(self.settings.mdns_interfaces),
                on_event=self._events.put_nowait,
            )
            await self.discovery.start()
        if self.settings.relay and self.settings.relay_token:
            self.relay = RelayLink(
                url=self.settings.relay,
                token=self.settings.relay_token,
                identity=self.identity,
                peer_key=self._member_dh_key,
                on_presence=self._on_relay_presence,
                on_draining=self._on_relay_draining,
                serve=self._serve_relayed,
                max_request_bytes=self.settings.max_body_bytes,
                max_peers=self.table.max_peers,
                introduction=lambda: encode_records(self.members.records()),
                introduce=lambda peer, records: self.member_sync.merge(records, peer, max_new=MAX_NEW_INTRODUCED),
                open_tunnel=self._open_tunnel,
                on_rendezvous=self.joins.rendezvous,
            )
            await self.relay.start()
        self._spawn(self.prober.health_loop(), "cluster-health")
        if self.key_sync is not None:
            self.key_sync.start()  # keys' last uses to the peers, and compaction (control/replication.py)
        self.member_sync.start()
        if self.discovery is not None:  # only mDNS feeds the event queue
            self._spawn(self.prober.event_loop(), "cluster-events")
        log.info(
            "cluster_started",
            cluster=self.membership.name,
            root=self.membership.root,
            node_id=self.node_id,
            members=len(self.members),
            peer_port=self.peer_port,
            mdns=self.settings.mdns,
            static_peers=list(self.settings.peers),
        )

    def saver(self, snapshot: Callable[[], bytes], write: Callable[[bytes], None], what: str) -> Callable[[], None]:
        """A function that persists ``snapshot()`` with ``write`` off the event loop: one write at a time,
        and a change made during a write is written after it (the latest state wins)."""
        dirty = False
        running: list[asyncio.Task[None]] = []

        async def loop() -> None:
            nonlocal dirty
            while dirty:
                dirty = False
                data = snapshot()
                try:
                    await asyncio.to_thread(write, data)
                except OSError as e:
                    log.error("records_save_failed", records=what, error=str(e))

        def soon() -> None:
            nonlocal dirty
            dirty = True
            if not running or running[0].done():
                task = asyncio.ensure_future(loop())
                running[:] = [task]
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        return soon

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop_announcing(self) -> None:
        """Tell the peers we are stopping, so they send us no new requests: the relay's draining presence,
        the mDNS goodbye. Streams in flight, ours and theirs, go on (the relay connection too) until ``stop``."""
        if self.relay is not None:
            self.relay.drain()
        if self.discovery is not None:
            with contextlib.suppress(Exception):
                await self.discovery.close()  # goodbye packets
            self.discovery = None

    async def stop(self) -> None:
        await self.stop_announcing()
        if self.relay is not None:  # 1001 after the drain: the peers knew (draining), streams used it till now
            await self.relay.close()
            self.relay = None
        if self.key_sync is not None:
            self.key_sync.close()
        if self._members_changed in self.members.on_change:
            self.members.on_change.remove(self._members_changed)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    # -- links ---------------------------------------------------------------

    def links(self, peer: Peer) -> list[PeerLink]:
        """The ways to reach ``peer``, preferred first: its LAN address, then the relay."""
        out: list[PeerLink] = []
        if peer.info.address:
            nid = peer.node_id

            def refused() -> None:
                # A refused connection is the same evidence as a failed health check: count it now, so
                # the next requests rank this peer behind its siblings instead of waiting for the prober.
                self._handle(self.table.on_health_fail(nid, time.monotonic()))

            ctx = self.tls.client_for(nid)
            if ctx is not None:
                out.append(HttpLink(self.session, peer.info.address, ctx, refused))
        if peer.relay and self.relay is not None:
            out.append(RelayPeerLink(self.relay, peer.node_id))
        return out

    def lenders(self) -> list[Lender]:
        """Members that could lend a sharded model memory now: up, saying what they have free, reachable on
        the LAN or through the relay; the most free first (``sharding.py``)."""
        out = []
        for peer in self.table.all():
            memory = peer.load.memory if peer.load is not None else None
            if peer.state is not PeerState.UP or peer.draining or memory is None or memory.free <= 0:
                continue
            lan = bool(peer.info.address) and self.tls.client_for(peer.node_id) is not None
            if lan or (peer.relay and self.relay is not None):
                route = "lan" if lan else "relay"
                out.append(Lender(peer.node_id, peer.info.name or peer.node_id, memory, route))
        return sorted(out, key=lambda lender: (-lender.memory.free, lender.node_id))

    async def call(self, node_id: str, path: str, body: bytes, *, timeout_s: float) -> bytes:
        """POST ``body`` to member ``node_id``'s endpoint ``path``, over its first link that carries it (LAN,
        then relay): the body of its 200 answer; ``PeerCallError`` for another answer; ``ConnectionError``
        if none did."""
        peer = self.table.get(node_id)
        if peer is None:
            raise ConnectionError(f"{node_id} is no peer now")
        failed: list[str] = []
        for link in self.links(peer):
            who = peer.info.name or node_id
            try:
                status, raw = await self._exchange(link, "POST", path, body, who, timeout_s, MAX_SHARD_BYTES)
            except (EngineUnavailable, LinkBroken, aiohttp.ClientError, OSError, TimeoutError) as e:
                failed.append(f"{link.route}: {e}")
                continue
            if status == 200 and raw is not None:
                return raw
            said = raw[:300].decode(errors="replace") if raw is not None else "(too large)"
            raise PeerCallError(status, said)  # the member's own answer: no other link changes it
        raise ConnectionError("; ".join(failed) or "no link to it")

    async def shard_tunnel(self, node_id: str, path: str) -> Duplex:
        """A tunnel to member ``node_id`` at ``path`` (``tunnel.py``): a WebSocket upgrade on its peer port
        (mutual TLS), else a tunnel stream of the relay link's Noise session with it."""
        peer = self.table.get(node_id)
        if peer is None:
            raise ConnectionError(f"{node_id} is no peer now")
        ctx = self.tls.client_for(node_id) if peer.info.address else None
        why = "no link to it"
        if ctx is not None:
            try:
                ws = await self.session.ws_connect(
                    f"https://{peer.info.address}{path}",
                    ssl=ctx,
                    headers=self.peer_headers(),
                    max_msg_size=MAX_MESSAGE,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                )
                return WebSocketDuplex(ws)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                why = f"lan: {e}"
        if peer.relay and self.relay is not None:
            return await self.relay.tunnel(node_id, path, self.peer_headers(), timeout_s=10.0)
        raise ConnectionError(why)

    async def _open_tunnel(self, peer: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A member's tunnel through the relay: to the worker this node lends it (``lending.py``), if any."""
        base, _, query = path.partition("?")
        shard = urllib.parse.parse_qs(query).get("shard", [""])[0]
        port = self.lending.port(peer, shard) if self.lending is not None and base == TUNNEL_PATH else None
        if port is None:
            return None
        return await asyncio.open_connection("127.0.0.1", port, limit=MAX_MESSAGE)

    async def tell(self, node_id: str, path: str, body: dict[str, Any], what: str) -> bool:
        """POST a small JSON message to member ``node_id`` over its first link that answers; whether it took it."""
        peer = self.table.get(node_id)
        if peer is None:
            return False
        data = _encode(body)
        for link in self.links(peer):
            if await self._post(link, path, data, peer.info.name or node_id, what):
                return True
        return False

    def leaving(self, node_id: str) -> bool:
        """Whether member ``node_id`` is going: not in the peer table (removed, gone) or draining."""
        peer = self.table.get(node_id)
        return peer is None or peer.draining

    def _members_changed(self) -> None:
        """Membership changed: trust the new members' certificates; a removed member is dropped at once —
        its models, its peer entry, its relay session and every connection it has to this node."""
        self.tls.refresh()
        if not self.members.is_member(self.node_id):
            log.error(
                "this_node_was_removed",
                node_id=self.node_id,
                hint="it was removed from the cluster; its peers refuse it. Join again with a new invite "
                "after `quorum-node cluster leave`",
            )
        for p in self.table.all():
            if not self.members.is_member(p.node_id):
                self._handle(self.table.forget(p.node_id))
        self.peer_catalogs.keep(self.members.is_member)
        if self.relay is not None:
            self.relay.members_changed()
        self._close_connections_of_non_members()
        self.prober.rediscover_members()

    def _close_connections_of_non_members(self) -> None:
        """Close every peer-port connection whose certificate is no current member's (a removed node's)."""
        server = self.http_server
        for handler in list(getattr(server, "connections", ()) if server is not None else ()):
            transport = handler.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
            if ssl_object is None or ssl_object.context is not self.tls.server:
                continue
            if ssl_object.getpeercert(binary_form=True) and self.tls.peer_of(ssl_object) is None:
                handler.force_close()
                transport.abort()

    def _on_relay_draining(self, node_id: str) -> None:
        self._handle(self.table.on_draining(node_id, time.monotonic()))

    def _on_relay_presence(self, node_id: str, online: bool) -> None:
        self._handle(self.table.on_relay(node_id, online, time.monotonic()))
        log.info("relay_peer_" + ("online" if online else "offline"), peer=node_id, route="relay")
        peer = self.table.get(node_id)
        if online and peer is not None and not peer.info.address and self.relay is not None:
            self._spawn(self.prober.probe(RelayPeerLink(self.relay, node_id), node_id), "relay-probe")

    async def _serve_relayed(
        self, peer: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> PipeResponse:
        """A request that came through the relay from the member ``peer`` (its Noise session proved it),
        served by this node's own HTTP server as if from the LAN (same middlewares and handlers), in
        memory (``pipe.py``)."""
        server = self.http_server
        if server is None:
            raise PipeError("this node is not serving yet")
        return await serve_in_memory(server, method, path, headers, body, peer=peer)

    def _member_dh_key(self, node_id: str) -> bytes | None:
        """The X25519 key of the member ``node_id`` for its Noise sessions (None: not a member)."""
        member = self.members.get(node_id)
        return member.dh_key if member is not None and node_id != self.node_id else None

    # -- our own catalog -------------------------------------------------

    def local_entries(self) -> list[ModelCard]:
        """What this node's engines hold, for peers; models of an engine that is down for now are listed
        as unavailable, so that a peer answers 503 for them rather than "no such model"."""
        return local_cards(self.engines, self.name, resting=True)

    def catalog_digest(self) -> str:
        ids = sorted({(e.id, e.aliases, e.available) for e in self.local_entries()})
        return hashlib.sha256(_encode(ids)).hexdigest()[:16]

    def _local_catalog_changed(self) -> None:
        digest = self.catalog_digest()
        if digest != self._digest:
            self._digest = digest
            if self.discovery is not None:
                self._spawn(self.discovery.update_catalog_digest(digest), "mdns-update")

    # -- what the router and API ask ---------------------------------------

    def model_names(self) -> list[str]:
        return self.peer_catalogs.names()

    def model_entries(self) -> list[ModelCard]:
        """The cards of every serving peer's models, each naming its holder (``catalog.entries_of``)."""
        return self.peer_catalogs.entries()

    def plan(self, model: str, op: Op, ids: tuple[str, ...] = ()) -> PeerPlan:
        """The peers to try for ``model``, best first, as the router's ``PeerPlan``.

        With none to try now, its ``wait_s`` says when one that holds the model
        may be tried again (breaker open, peer suspect), so the router answers
        503 with Retry-After rather than "no such model".
        """
        from ..router import PeerPlan  # the router defines the plan; it never imports the cluster service

        now = time.monotonic()
        self.budget.on_request(now)
        targets: list[PeerTarget] = []
        held: dict[str, str] = {}  # peer -> the id it holds the model by (the first of ``ids`` it has)
        for name in ids or (model,):
            for p in self.table.holders(name, now):
                held.setdefault(p.node_id, name)
        by_id = {p.node_id: p for p in self.table.all()}
        for p in pick([by_id[n] for n in held], now):
            name = held[p.node_id]
            engines = self.peer_catalogs.holders(p.node_id, name)
            targets.extend(PeerTarget(self, p, link, model=name, engines=engines) for link in self.links(p))
        if targets:
            return PeerPlan(targets)
        waits = [w for name in ids or (model,) if (w := self.table.unavailable_for_s(name, now)) is not None]
        return PeerPlan(targets, wait_s=min(waits) if waits else None)

    def retry_allowed(self) -> bool:
        return self.budget.on_retry(time.monotonic())

    # -- signed requests ---------------------------------------------------

    def peer_headers(self, *, hop: str = "", origin: str = "", key_id: str = "") -> dict[str, str]:
        """The peer protocol's headers of a forwarded request (the link authenticates who sends it)."""
        headers = {"X-Quorum-Node-Id": self.node_id}
        if hop:
            headers[HOP_HEADER] = hop
        if origin:
            headers[ORIGIN_HEADER] = origin
        if key_id:
            headers[KEY_HEADER] = key_id
        return headers

    def peer_of(self, request: web.Request) -> str | None:
        """The member a request came from, as its link proved it, or None.

        Through the relay: the Noise session's peer (``pipe.py`` puts it on the
        in-memory transport). On the peer port: the TLS client certificate,
        which must be a current member's. Anything else (the public port, a
        certificate of a removed node, no certificate) is nobody's.
        """
        transport = request.transport
        if transport is None:
            return None
        piped = transport.get_extra_info(PIPE_PEER)
        if piped is not None:
            return piped if self.members.is_member(piped) else None
        return self.tls.peer_of(self.peer_port_tls(request))

    def peer_port_tls(self, request: web.Request) -> Any:
        """The TLS object of a request that came to the peer port (None for any other)."""
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        return ssl_object if ssl_object is not None and ssl_object.context is self.tls.server else None

    def identity_message(self) -> Identity:
        """Who this node is and how busy (``GET /quorum/v1/health``; its peers' presence)."""
        load = NodeLoad(
            in_flight=len(self.inflight),
            waiting=self.waiting(),
            engines=[
                EngineLoad(
                    name=b.name,
                    kind=b.kind,
                    state=b.state.value,
                    load=b.load,
                    models=len(b.models),
                    capacity=self.capacity_of(b),
                )
                for b in self.engines.backends.values()
            ],
            memory=self.memory(),
        )
        return Identity(
            node_id=self.node_id,
            name=self.name,
            proto=PROTO_VERSION,
            catalog_digest=self._digest,
            port=self.peer_port,
            load=load,
            keys_digest=self.key_sync.digest if self.key_sync is not None else "",
            members_digest=self.members.digest,
        )

    # -- what the peer endpoints answer (api/peer.py) -------------------------------

    def health(self) -> bytes:
        """``GET /quorum/v1/health``."""
        return _encode(self.identity_message())

    def catalog_answer(self) -> bytes:
        """``GET /quorum/v1/catalog``."""
        return _encode(CatalogAnswer(digest=self._digest, models=self.local_entries()))

    def relay_status(self) -> dict[str, Any] | None:
        """The relay link as people read it (the peers view, the dashboard); None without one."""
        relay = self.relay
        if relay is None:
            return None
        return {
            "url": self.settings.relay,
            "state": relay.state,
            "error": relay.last_error,
            "online": sorted(relay.online),
        }

    @staticmethod
    def wall_clock(t: float | None, now: float) -> float | None:
        """A ``time.monotonic()`` instant of the peer table as epoch seconds (for people)."""
        return None if t is None else round(time.time() - (now - t), 3)

    # -- background work -----------------------------------------------------

    def probe_soon(self, address: str, node_id: str) -> None:
        """Ask the member at ``address`` how it is now (it may have just learnt of us)."""
        self.prober.probe_soon(address, node_id)

    async def _exchange(
        self, link: PeerLink, method: str, path: str, body: bytes, who: str, timeout_s: float, cap: int
    ) -> tuple[int, bytes | None]:
        """One request to a peer endpoint over ``link``: its answer's status, and its body (None: over ``cap``).
        Raises what the link raises (``EngineUnavailable``, ``LinkBroken``, ``TimeoutError``, ...)."""
        headers = self.peer_headers()
        if body:
            headers["Content-Type"] = "application/json"
        deadline = asyncio.get_running_loop().time() + timeout_s
        async with asyncio.timeout_at(deadline):
            answer = await link.open(
                RequestHead(method=method, path=path, headers=headers, body=body),
                self.timeouts,
                deadline=deadline,
                stream=False,
                who=f"peer {who}",
            )
            try:
                return answer.status, await read_capped(answer, cap)
            finally:
                answer.body.abort()

    async def _get(self, link: PeerLink, path: str, to: str | None, timeout_s: float) -> bytes:
        """A GET of a peer endpoint over ``link``: its body, or ValueError / EngineUnavailable."""
        status, raw = await self._exchange(link, "GET", path, b"", to or link.route, timeout_s, _MAX_PEER_ANSWER)
        if status != 200:
            raise ValueError(f"{path} answered {status}")
        if raw is None:
            raise ValueError(f"{path}: answer too large")
        return raw

    async def _post(self, link: PeerLink, path: str, data: bytes, to: str, what: str) -> bool:
        """POST JSON ``data`` to a peer endpoint over ``link`` (5 s); whether it answered 200. Failures are
        logged as ``{what}``'s, never raised (the next round or pull makes up for them)."""
        try:
            status, _ = await self._exchange(link, "POST", path, data, to, 5.0, _MAX_PEER_ANSWER)
        except (aiohttp.ClientError, OSError, TimeoutError, EngineUnavailable) as e:
            log.debug("peer_push_failed", records=what, peer=to, error=str(e))
            return False
        if status != 200:
            log.warning("peer_push_refused", records=what, peer=to, status=status)
        return status == 200

    def _handle(self, events: list[PeerEvent]) -> None:
        for ev in events:
            match ev:
                case CatalogWanted(node_id=nid):
                    self.peer_catalogs.want(nid)
                case PeerUp(node_id=nid):
                    log.info("peer_up", peer=nid, route="lan")
                    if self.key_sync is not None:
                        self.key_sync.on_peer_up(nid)
                case PeerDown(node_id=nid) | PeerSuspect(node_id=nid) | PeerDraining(node_id=nid):
                    log.info("peer_" + type(ev).__name__.removeprefix("Peer").lower(), peer=nid)
                case PeerRemoved(node_id=nid, reason=reason):
                    self.peer_catalogs.forget(nid)
                    log.info("peer_removed", peer=nid, reason=reason)
                case CatalogChanged(node_id=nid, models=models):
                    log.info("peer_catalog", peer=nid, models=len(models))
                case _:
                    pass
