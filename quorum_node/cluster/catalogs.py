"""The peers' catalogs: the models each member's engines hold, fetched when its catalog digest changes.

A peer's health answer carries its catalog digest; a digest other than the one
we hold means its models changed (``peers.CatalogWanted``), and its catalog is
fetched once (one fetch per peer at a time), decoded and bounded
(``messages.decode_catalog``). Models it lists as unavailable (their engine is
down for now) are not held, but the peer table learns their names, so that a
request for one is answered 503 rather than "no such model".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
import msgspec
import structlog

from ..catalog import ModelCard
from ..errors import EngineUnavailable
from .messages import decode_catalog

if TYPE_CHECKING:
    from .context import ClusterContext
    from .peers import PeerEvent

__all__ = ["CATALOG_PATH", "PeerCatalogs"]

log = structlog.get_logger(__name__)

CATALOG_PATH = "/quorum/v1/catalog"


class PeerCatalogs:
    """What each serving peer holds (``by_peer``), for the catalog's merge and the router's names."""

    def __init__(self, service: ClusterContext, *, on_catalog: Callable[[list[PeerEvent]], None]) -> None:
        self.service = service
        self.on_catalog = on_catalog  # the peer table's events of a new catalog
        self.by_peer: dict[str, list[ModelCard]] = {}  # replaced, never changed: the catalog stamps it by identity
        self._fetching: set[str] = set()
        self._holders: dict[str, tuple[list[ModelCard], dict[str, tuple[str, ...]]]] = {}  # per peer, see holders

    def names(self) -> list[str]:
        """Every model id a serving peer holds."""
        svc = self.service
        return sorted({e.id for p in svc.table.all() if p.serving for e in self.by_peer.get(p.node_id, ())})

    def entries(self) -> list[ModelCard]:
        """The cards of every serving peer's models, each naming its holder."""
        replace = msgspec.structs.replace
        return [
            replace(e, node=p.info.name or p.node_id)
            for p in self.service.table.all()
            if p.serving
            for e in self.by_peer.get(p.node_id, ())
        ]

    def holders(self, node_id: str, model: str) -> tuple[str, ...]:
        """The names of ``node_id``'s engines that hold ``model`` (none known: an older peer's catalog).

        Indexed once per catalog the peer sends (the list is replaced, never changed), not per request."""
        cards = self.by_peer.get(node_id)
        if cards is None:
            return ()
        indexed = self._holders.get(node_id)
        if indexed is None or indexed[0] is not cards:
            index: dict[str, set[str]] = {}
            for e in cards:
                if e.holder:
                    for name in e.names():
                        index.setdefault(name, set()).add(e.holder)
            indexed = self._holders[node_id] = (cards, {k: tuple(sorted(v)) for k, v in index.items()})
        return indexed[1].get(model, ())

    def forget(self, node_id: str) -> None:
        self.by_peer.pop(node_id, None)
        self._holders.pop(node_id, None)

    def keep(self, is_member: Callable[[str], bool]) -> None:
        """Drop the catalogs of nodes that are members no more."""
        for nid in [n for n in self.by_peer if not is_member(n)]:
            del self.by_peer[nid]
            self._holders.pop(nid, None)

    def want(self, node_id: str) -> None:
        """Fetch ``node_id``'s catalog (unless a fetch of it is under way)."""
        if node_id not in self._fetching:
            self._fetching.add(node_id)
            self.service._spawn(self._fetch(node_id), "peer-catalog")

    async def _fetch(self, node_id: str) -> None:
        svc = self.service
        try:
            peer = svc.table.get(node_id)
            links = svc.links(peer) if peer is not None else []
            if not links:
                return
            answer = decode_catalog(
                await svc._get(links[0], CATALOG_PATH, node_id, 5.0),
                max_models=svc.settings.max_models_per_peer,
                peer=node_id,
            )
            available = [e for e in answer.models if e.available]
            self.by_peer[node_id] = available
            names = {e.id for e in available} | {a for e in available for a in e.aliases}
            resting = {n for e in answer.models if not e.available for n in (e.id, *e.aliases)} - names
            self.on_catalog(svc.table.on_catalog(node_id, names, answer.digest, time.monotonic(), resting))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, EngineUnavailable) as e:
            log.warning("peer_catalog_failed", peer=node_id, error=str(e))
        finally:
            self._fetching.discard(node_id)
