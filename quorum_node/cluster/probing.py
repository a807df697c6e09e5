"""How members are found and kept checked: health rounds, probes, and what mDNS says.

Every check travels over a link pinned to the member it asks (``tls.py``), so
an answer is that member's: mDNS only says where a member may be. A static
address whose node is not known yet is asked over a link any member can
answer on, and then again pinned to the member it named. A member's new
address is believed only once the node there proved it is that member; a
goodbye (unauthenticated) only once the member no longer answers at its
address. What the checks find goes to the peer table (``peers.py``), whose
events the service handles.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import msgspec
import structlog

from ..errors import EngineUnavailable
from .links import HttpLink, PeerLink, RelayPeerLink
from .messages import decode_identity
from .peers import PeerInfo

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from ..settings import Settings
    from .catalogs import PeerCatalogs
    from .context import RecordSync
    from .mdns import Discovery
    from .members import MemberStore
    from .members_sync import MemberReplicator
    from .peers import PeerEvent, PeerTable
    from .relay import RelayLink
    from .tls import PeerTLS

__all__ = ["GOODBYE_CHECK_S", "HEALTH_PATH", "Prober"]

log = structlog.get_logger(__name__)

HEALTH_PATH = "/quorum/v1/health"
GOODBYE_CHECK_S = 0.5  # how long after a member's mDNS goodbye it is checked before it is dropped


class ProbeContext(Protocol):
    """The cluster service, as the prober uses it."""

    settings: Settings
    node_id: str
    members: MemberStore
    table: PeerTable
    tls: PeerTLS
    relay: RelayLink | None
    discovery: Discovery | None
    member_sync: MemberReplicator
    key_sync: RecordSync | None
    peer_catalogs: PeerCatalogs
    _events: asyncio.Queue[Any]

    @property
    def session(self) -> aiohttp.ClientSession: ...

    async def _get(self, link: PeerLink, path: str, to: str | None, timeout_s: float) -> bytes: ...

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None: ...

    def _handle(self, events: list[PeerEvent]) -> None: ...


class Prober:
    """Finds the members and keeps checking them, for ``svc`` (the cluster service)."""

    def __init__(self, svc: ProbeContext) -> None:
        self.svc = svc

    def lan_link(self, address: str, node_id: str | None) -> HttpLink | None:
        """A link to ``address`` that only the member ``node_id`` can answer on (None: not a member);
        with no id yet (a static peer), one that any member can answer on, the answer naming which."""
        ctx = self.svc.tls.client_for(node_id) if node_id is not None else self.svc.tls.any_member()
        return HttpLink(self.svc.session, address, ctx) if ctx is not None else None

    async def health_loop(self) -> None:
        while True:
            try:
                probes = []
                for t in self.svc.table.probe_targets():
                    link = self.lan_link(t.address, t.node_id)
                    if link is not None:
                        probes.append(self.probe(link, t.node_id, address=t.address))
                    else:  # we know no member there yet: maybe it knows us, once introduced
                        self.svc.member_sync.introduce_soon(t.node_id, t.address)
                if self.svc.relay is not None:
                    probes += [
                        self.probe(RelayPeerLink(self.svc.relay, nid), nid)
                        for nid in self.svc.table.relay_probe_targets()
                    ]
                await asyncio.gather(*probes)
                self.svc._handle(self.svc.table.tick(time.monotonic()))
            except Exception:  # task root
                log.exception("cluster_health_loop_failed")
            await asyncio.sleep(self.svc.settings.health_interval_s)

    def probe_soon(self, address: str, node_id: str) -> None:
        """Ask the member at ``address`` how it is now (it may have just learnt of us)."""
        known = self.svc.table.get(node_id)
        static = any(t.address == address for t in self.svc.table.probe_targets())
        link = self.lan_link(address, node_id)
        if link is not None and (static or known is not None):
            identifying = known is None or known.info.address != address
            self.svc._spawn(self.probe(link, node_id, address=address, identifying=identifying), "peer-probe")

    async def probe(
        self,
        link: PeerLink,
        node_id: str | None,
        *,
        address: str = "",
        moved: PeerInfo | None = None,
        identifying: bool = False,
    ) -> None:
        """Ask a peer how it is, over a link only that member can answer on.

        ``node_id`` None: a static address whose node is not known yet, asked over
        a link any member can answer on; the node it names is then asked again
        over a link pinned to that member (``identifying``), and only that answer
        counts. ``moved``: a member announced a new address; it is believed (the
        table changed) only once the node there proved it is that member, so
        nobody can redirect its traffic."""
        t0 = time.monotonic()
        try:
            ident = decode_identity(await self.svc._get(link, HEALTH_PATH, node_id, 2.0))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, EngineUnavailable) as e:
            if node_id is not None and moved is None:  # msgspec errors are ValueErrors
                self.svc._handle(self.svc.table.on_health_fail(node_id, time.monotonic()))
            if address and moved is None:
                self.svc.member_sync.introduce_soon(node_id, address)  # maybe it does not know us yet
            log.debug("peer_health_failed", route=link.route, address=address, peer=node_id, error=str(e))
            return
        now = time.monotonic()
        if node_id is None:
            pinned = self.lan_link(address, ident.node_id) if address else None
            if pinned is not None:
                await self.probe(pinned, ident.node_id, address=address, identifying=True)
            return
        if ident.node_id != node_id:  # the link proved node_id: a member that says otherwise is confused
            log.warning(
                "peer_identity_mismatch", route=link.route, address=address, expected=node_id, answered=ident.node_id
            )
            return
        if moved is not None:
            self.svc._handle(self.svc.table.on_discovered(moved, now))
        info = PeerInfo(
            node_id=ident.node_id,
            name=ident.name,
            address=address,
            route="lan" if address else "relay",
            proto=ident.proto,
            catalog_digest=ident.catalog_digest,
        )
        if identifying:
            self.svc._handle(self.svc.table.on_identified(address, info, now))
        peer = self.svc.table.get(info.node_id)
        if peer is not None and peer.info.name != info.name:  # its own word, over the authenticated link
            peer.info = msgspec.structs.replace(peer.info, name=info.name)
        self.svc._handle(self.svc.table.on_health_ok(info.node_id, now - t0, now, ident.load))
        if self.svc.key_sync is not None:
            self.svc.key_sync.on_peer_digest(info.node_id, ident.keys_digest)
        self.svc.member_sync.on_peer_digest(info.node_id, ident.members_digest)
        if peer is not None and peer.catalog_digest != info.catalog_digest:
            self.svc.peer_catalogs.want(info.node_id)

    async def event_loop(self) -> None:
        from .mdns import Discovered, Gone, Updated

        while True:
            ev = await self.svc._events.get()
            now = time.monotonic()
            try:
                match ev:
                    case Discovered(info=info) | Updated(info=info):
                        # mDNS says where a member may be, never who: a stranger's announcement is ignored
                        # (never probed, never sent anything); a member's is checked over a pinned link
                        link = self.lan_link(info.address, info.node_id)
                        if link is None:
                            log.debug("mdns_not_a_member", peer=info.node_id, address=info.address)
                            continue
                        peer = self.svc.table.get(info.node_id)
                        if peer is not None and peer.info.address and peer.info.address != info.address:
                            self.svc._spawn(
                                self.probe(link, info.node_id, address=info.address, moved=info), "peer-moved"
                            )
                            continue
                        self.svc._handle(self.svc.table.on_discovered(info, now))
                        if self.svc.table.get(info.node_id) is not None:  # a sign of life: check it now, not in 2 s
                            self.svc._spawn(self.probe(link, info.node_id, address=info.address), "peer-probe")
                    case Gone(node_id=node_id, address=address):
                        peer = self.svc.table.get(node_id)
                        if peer is not None and address and peer.info.address != address:
                            # a goodbye from where the member is not (someone announced its id elsewhere,
                            # and withdrew it): the member itself has not left
                            log.info("mdns_goodbye_ignored", peer=node_id, address=address, at=peer.info.address)
                            continue
                        if peer is None:
                            continue
                        # a goodbye is unauthenticated (anyone on the LAN can send one in a member's name): the
                        # member takes no new request at once, and leaves unless it answers a pinned check
                        self.svc._handle(self.svc.table.on_draining(node_id, now))
                        self.svc._spawn(self._confirm_goodbye(node_id, peer.info.address), "peer-goodbye")
            except Exception:  # task root
                log.exception("cluster_event_failed", event=repr(ev))

    async def _confirm_goodbye(self, node_id: str, address: str) -> None:
        """A member said goodbye on mDNS: it leaves, unless the node at its address, checked over a link
        pinned to its key a moment later (a stopping node closes its peer port right after its goodbye),
        still answers — then the goodbye was someone else's, and the member stays."""
        await asyncio.sleep(GOODBYE_CHECK_S)
        asked = time.monotonic()
        link = self.lan_link(address, node_id) if address else None
        answered = False
        if link is not None:
            try:
                answered = decode_identity(await self.svc._get(link, HEALTH_PATH, node_id, 1.0)).node_id == node_id
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, EngineUnavailable):
                answered = False
        now = time.monotonic()
        if answered:
            log.warning("mdns_goodbye_not_confirmed", peer=node_id, address=address)
            self.svc._handle(self.svc.table.on_health_ok(node_id, now - asked, now))  # asked after the goodbye: back
        else:
            self.svc._handle(self.svc.table.on_goodbye(node_id, now))

    def rediscover_members(self) -> None:
        """Announcements heard before their node was a member (it was admitted elsewhere, or introduced
        itself since) were ignored, and mDNS does not repeat them: offer them again, now that they count."""
        if self.svc.discovery is None:
            return
        from .mdns import Discovered

        for info in self.svc.discovery.known():
            if (
                info.node_id != self.svc.node_id
                and self.svc.members.is_member(info.node_id)
                and self.svc.table.get(info.node_id) is None
            ):
                self.svc._events.put_nowait(Discovered(info=info))
