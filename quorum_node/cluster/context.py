"""What the parts of the cluster service are handed: the service seen from inside (a Protocol).

The membership and key replicators, the join handler and the usage summer
(``members_sync``, ``join``, ``control/replication``, ``control/usage``) ask
peers things and keep background tasks through the cluster service; they see
only this, so none of them imports the service, and it imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import aiohttp

    from ..settings import Settings
    from .identity import NodeIdentity
    from .links import PeerLink
    from .members import MemberStore
    from .membership import Cluster
    from .peers import Peer, PeerTable

__all__ = ["ClusterContext", "PeerCallError", "RecordSync"]


class PeerCallError(Exception):
    """A member answered a call (``ClusterService.call``) with something other than 200."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class ClusterContext(Protocol):
    settings: Settings
    node_id: str
    identity: NodeIdentity
    membership: Cluster
    members: MemberStore
    table: PeerTable

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP client of the LAN links."""
        ...

    def links(self, peer: Peer) -> list[PeerLink]:
        """The ways to reach ``peer``, preferred first."""
        ...

    async def _get(self, link: PeerLink, path: str, to: str | None, timeout_s: float) -> bytes:
        """A peer endpoint's body (ValueError / EngineUnavailable otherwise)."""
        ...

    async def _post(self, link: PeerLink, path: str, data: bytes, to: str, what: str) -> bool:
        """POST JSON to a peer endpoint; whether it answered 200 (failures logged, never raised)."""
        ...

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``coro`` as one of the service's tasks (cancelled when it stops)."""
        ...

    def saver(self, snapshot: Callable[[], bytes], write: Callable[[bytes], None], what: str) -> Callable[[], None]:
        """A function that persists ``snapshot()`` off the event loop, the latest state winning."""
        ...

    def probe_soon(self, address: str, node_id: str) -> None:
        """Ask the member at ``address`` how it is now."""
        ...


class RecordSync(Protocol):
    """A set of records kept in agreement with every peer (the API keys': ``control/replication.py``)."""

    @property
    def digest(self) -> str: ...

    def start(self) -> None: ...

    def close(self) -> None: ...

    def on_peer_digest(self, node_id: str, digest: str) -> None: ...

    def on_peer_up(self, node_id: str) -> None: ...

    def answer(self) -> bytes: ...

    def accept(self, raw: bytes, peer: str) -> bytes: ...
