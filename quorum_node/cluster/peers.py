"""The peer table: which other nodes exist, whether they work, what they hold.

Pure logic, fed by events from the I/O side (mDNS browser, health prober,
catalog fetcher, router) with ``now`` in monotonic seconds. Methods that can
change what the rest of the node should do return a list of ``PeerEvent`` for
the driver to act on (fetch a catalog, log, refresh the UI).

Peer states::

    (new) ──health ok──► up ──2 failed checks, or no ok for suspect_after_s──► suspect
                          ▲                                                      │
                          └───────────────────health ok──────────────────────────┘
    any ──no ok for down_after_s──► down ──health ok──► up
    down (discovered, not static) ──no sign of life for forget_after_s──► removed
    any ──goodbye──► removed at once (or, if the relay still reaches it, draining)

A new peer starts ``suspect`` (seen, not yet confirmed) and carries no traffic
until its first good health check. Only ``up`` peers whose circuit breaker is
not open are offered by ``holders``.

A peer that said it is stopping (the relay's draining presence, or an mDNS
goodbye while the relay still reaches it) is *draining*, whatever its state:
it finishes what it was sent, carries no new request, and its models are
unavailable for now (503, not 404), until a health check sent after that
answers (it restarted) or it leaves.

Static peers (``--peer HOST:PORT``) are known by address until a health answer
tells their node id (``on_identified``); they are never forgotten, and after a
goodbye their address stays on the probe list so a restarted node is found again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

import msgspec

from quorum_node.breaker import Breakers, BreakerState, CircuitBreaker
from quorum_node.cluster.messages import NodeLoad

__all__ = [
    "CatalogChanged",
    "CatalogWanted",
    "Outcome",
    "Peer",
    "PeerAdded",
    "PeerDown",
    "PeerDraining",
    "PeerEvent",
    "PeerInfo",
    "PeerRemoved",
    "PeerState",
    "PeerSuspect",
    "PeerTable",
    "PeerUp",
    "ProbeTarget",
]


class PeerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a peer says about itself (mDNS TXT record or health answer)."""

    node_id: str
    name: str = ""
    address: str = ""
    """``host:port`` to reach it over HTTP (empty for relay-only peers)."""
    route: str = "lan"
    fingerprint: str = ""
    proto: int = 1
    catalog_digest: str = ""


class PeerState(enum.StrEnum):
    """Health of a peer as this node sees it."""

    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"


class Outcome(enum.StrEnum):
    """How a request to a peer ended, for its circuit breaker."""

    SUCCESS = "success"
    FAILURE = "failure"
    ABANDONED = "abandoned"
    """No verdict: the client went away, or the router gave up for its own reasons."""


# Events -----------------------------------------------------------------


class PeerAdded(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A peer entered the table."""

    node_id: str


class PeerUp(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A peer passed a health check and can take traffic."""

    node_id: str


class PeerSuspect(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An up peer missed health checks; it carries no new traffic for now."""

    node_id: str


class PeerDraining(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A peer said it is stopping: it carries no new requests (those it has finish)."""

    node_id: str


class PeerDown(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """No good health check for ``down_after_s``."""

    node_id: str


class PeerRemoved(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A peer left the table; ``reason`` is ``goodbye``, ``forgotten`` or ``replaced``."""

    node_id: str
    reason: str


class CatalogWanted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The driver should fetch this peer's model list (new peer, or digest changed)."""

    node_id: str
    address: str


class CatalogChanged(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The set of models a peer holds changed."""

    node_id: str
    models: tuple[str, ...]


PeerEvent = PeerAdded | PeerUp | PeerSuspect | PeerDraining | PeerDown | PeerRemoved | CatalogWanted | CatalogChanged


class ProbeTarget(msgspec.Struct, frozen=True, kw_only=True):
    """An address the health prober should check; ``node_id`` is None until identified."""

    address: str
    node_id: str | None


# Peer -------------------------------------------------------------------


class Peer:
    """Mutable state of one peer. Read it freely; change it through ``PeerTable``."""

    def __init__(self, info: PeerInfo, now: float, breaker: CircuitBreaker) -> None:
        self.info = info
        self.state = PeerState.SUSPECT
        self.static = False
        self.models: frozenset[str] = frozenset()
        self.resting: frozenset[str] = frozenset()
        """Models it holds whose engine is down for now: unavailable, not unknown."""
        self.relay = False
        """Online on our relay right now (reachable through it)."""
        self.catalog_digest: str | None = None
        """Digest of the catalog we actually fetched (None: never fetched)."""
        self.breaker = breaker
        self.in_flight = 0
        self.health_failures = 0
        """Consecutive failed health checks."""
        self.ewma_rtt_s: float | None = None
        self.ewma_ttft_s: float | None = None
        self.last_ttft_at: float | None = None
        self.added_at = now
        self.last_seen = now
        """Last sign of life of any kind (discovery, health ok, catalog)."""
        self.last_ok: float | None = None
        """Last good health check."""
        self.up_since: float | None = None
        """When it came up (``now`` of the health check that made it up); None while it has not, and again
        once it has gone down: a peer that comes back is online since its return. A suspect spell keeps it."""
        self.load: NodeLoad | None = None
        """What its last health answer said about its load (None: not said, or an older peer)."""
        self.draining_at: float | None = None
        """When it said it is stopping (None: it did not): it takes no new requests."""

    @property
    def node_id(self) -> str:
        """The peer's stable node id."""
        return self.info.node_id

    @property
    def draining(self) -> bool:
        return self.draining_at is not None

    @property
    def serving(self) -> bool:
        """Up and not draining: it may be sent new requests, and what it holds is listed."""
        return self.state is PeerState.UP and self.draining_at is None

    @property
    def routes(self) -> list[str]:
        """How it can be reached, preferred first: the LAN, then the relay."""
        return (["lan"] if self.info.address else []) + (["relay"] if self.relay else [])

    def __repr__(self) -> str:
        return (
            f"Peer(node_id={self.node_id!r}, address={self.info.address!r}, state={self.state.value}, "
            f"in_flight={self.in_flight}, models={len(self.models)})"
        )


def _ewma(old: float | None, sample: float, alpha: float) -> float:
    return sample if old is None else old + alpha * (sample - old)


class PeerTable:
    """All peers of this node's cluster, keyed by node id.

    ``is_member`` says which node ids are members of this cluster now
    (``members.MemberStore.is_member``): anyone else is ignored, whatever it
    announces, as is this node's own id. At most ``max_peers`` are kept.
    """

    def __init__(
        self,
        *,
        self_id: str,
        is_member: Callable[[str], bool],
        max_peers: int = 256,
        down_after_s: float = 10.0,
        suspect_after_s: float = 5.0,
        suspect_after_failures: int = 2,
        forget_after_s: float = 300.0,
        ewma_alpha: float = 0.3,
        breaker_threshold: int = 3,
        breaker_reset_s: float = 5.0,
        model_breakers: Breakers | None = None,
    ) -> None:
        self.self_id = self_id
        self.is_member = is_member
        self.max_peers = max_peers
        self.refused = 0  # peers not taken because the table was full (logged by the caller)
        self.down_after_s = down_after_s
        self.suspect_after_s = suspect_after_s
        self.suspect_after_failures = suspect_after_failures
        self.forget_after_s = forget_after_s
        self.ewma_alpha = ewma_alpha
        self._breaker_threshold = breaker_threshold
        self._breaker_reset_s = breaker_reset_s
        self._peers: dict[str, Peer] = {}
        self._static: dict[str, str | None] = {}  # address -> node id once identified
        # One breaker per (peer, model): a peer whose engine keeps failing one model is ejected for that model
        # only. The peer's own breaker counts what says nothing of its models: its links failing.
        self.model_breakers = model_breakers if model_breakers is not None else Breakers()

    # Lookup -------------------------------------------------------------

    def get(self, node_id: str) -> Peer | None:
        """The peer with this id, if known."""
        return self._peers.get(node_id)

    def all(self) -> list[Peer]:
        """Every known peer, sorted by node id."""
        return [self._peers[k] for k in sorted(self._peers)]

    def __len__(self) -> int:
        return len(self._peers)

    def holders(self, model: str, now: float) -> list[Peer]:
        """Up peers holding ``model`` whose breaker would let a request through."""
        return [
            p
            for p in self.all()
            if p.serving
            and model in p.models
            and p.breaker.available(now)
            and self.model_breakers.available((p.node_id, model), now)
        ]

    def unavailable_for_s(self, model: str, now: float) -> float | None:
        """For a model whose holders are all out for now: seconds until the soonest may take it again.

        Counts the peers holding ``model`` that ``holders`` leaves out only for
        the moment: up with an open breaker (until it half-opens), suspect
        after having been up (until its next good health check, taken as a
        second), or draining (a restart takes a few seconds). None if no such
        peer holds it (down, never confirmed, or none): then the model is not
        temporarily unavailable, it is not there.
        """
        waits: list[float] = []
        for p in self._peers.values():
            if p.draining and model in p.models | p.resting:
                waits.append(2.0)
                continue
            if model in p.resting and p.state is PeerState.UP:
                waits.append(2.0)  # its engine is down: the peer's next catalog will tell when it is back
                continue
            if model not in p.models:
                continue
            if p.state is PeerState.UP:
                waits.append(max(p.breaker.retry_in_s(now), self.model_breakers.retry_in_s((p.node_id, model), now)))
            elif p.state is PeerState.SUSPECT and p.last_ok is not None:
                waits.append(max(1.0, p.breaker.retry_in_s(now)))
        return min(waits) if waits else None

    def models(self) -> dict[str, list[str]]:
        """Model id -> node ids of up peers holding it."""
        out: dict[str, list[str]] = {}
        for p in self.all():
            if p.serving:
                for m in p.models:
                    out.setdefault(m, []).append(p.node_id)
        return {m: out[m] for m in sorted(out)}

    def probe_targets(self) -> list[ProbeTarget]:
        """Addresses the health prober should check, static ones included."""
        targets = {
            p.info.address: ProbeTarget(address=p.info.address, node_id=p.node_id) for p in self.all() if p.info.address
        }
        for address, node_id in self._static.items():
            if address not in targets:
                targets[address] = ProbeTarget(address=address, node_id=node_id if node_id in self._peers else None)
        return [targets[a] for a in sorted(targets)]

    # Discovery ----------------------------------------------------------

    def _accepts(self, info: PeerInfo) -> bool:
        return info.node_id != self.self_id and self.is_member(info.node_id)

    def _room_for(self, node_id: str) -> bool:
        if node_id in self._peers or len(self._peers) < self.max_peers:
            return True
        self.refused += 1
        return False

    def forget(self, node_id: str) -> list[PeerEvent]:
        """Drop a peer at once and for good (it was removed from the cluster): no address of it is probed."""
        for address, nid in list(self._static.items()):
            if nid == node_id:
                self._static[address] = None
        if self._peers.pop(node_id, None) is None:
            return []
        self._prune_model_breakers()
        return [PeerRemoved(node_id=node_id, reason="removed")]

    def _prune_model_breakers(self) -> None:
        """Forget the breakers of models no peer holds any more (and of peers that are gone)."""
        self.model_breakers.keep({(p.node_id, m) for p in self._peers.values() for m in p.models})

    def on_discovered(self, info: PeerInfo, now: float) -> list[PeerEvent]:
        """A peer announced itself (or re-announced with new details)."""
        if not self._accepts(info):
            return []
        peer = self._peers.get(info.node_id)
        events: list[PeerEvent] = []
        if peer is None:
            if not self._room_for(info.node_id):
                return []
            peer = Peer(
                info,
                now,
                CircuitBreaker(self._breaker_threshold, self._breaker_reset_s),
            )
            self._peers[info.node_id] = peer
            events.append(PeerAdded(node_id=info.node_id))
        else:
            peer.info = info
            peer.last_seen = now
        if peer.info.address and (peer.catalog_digest is None or peer.catalog_digest != info.catalog_digest):
            events.append(CatalogWanted(node_id=info.node_id, address=peer.info.address))
        return events

    def on_relay(self, node_id: str, online: bool, now: float) -> list[PeerEvent]:
        """A peer came online on our relay, or left it.

        The relay's namespace is not proof of membership: a relay peer carries
        traffic only once a health check through the relay (signed, inside the
        end-to-end session only cluster members can open) has answered.
        """
        if node_id == self.self_id or not self.is_member(node_id):
            return []
        peer = self._peers.get(node_id)
        if online:
            events: list[PeerEvent] = []
            if peer is None:
                if not self._room_for(node_id):
                    return []
                info = PeerInfo(node_id=node_id, route="relay")
                peer = Peer(info, now, CircuitBreaker(self._breaker_threshold, self._breaker_reset_s))
                self._peers[node_id] = peer
                events.append(PeerAdded(node_id=node_id))
            if not peer.relay:  # a new relay connection of it: a draining one says so again at once
                peer.draining_at = None
            peer.relay = True
            peer.last_seen = now
            return events
        if peer is None:
            return []
        peer.relay = False
        if not peer.info.address and not peer.static:
            del self._peers[node_id]
            return [PeerRemoved(node_id=node_id, reason="left_relay")]
        return []

    def relay_probe_targets(self) -> list[str]:
        """Peers only the relay reaches, for the health prober."""
        return [p.node_id for p in self.all() if p.relay and not p.info.address]

    def on_draining(self, node_id: str, now: float) -> list[PeerEvent]:
        """A peer said it is stopping: no new requests go to it; those it has finish."""
        peer = self._peers.get(node_id)
        if peer is None or peer.draining_at is not None:
            return []
        peer.draining_at = now
        return [PeerDraining(node_id=node_id)]

    def on_goodbye(self, node_id: str, now: float) -> list[PeerEvent]:
        """A peer said it is leaving the LAN: drop it at once.

        If the relay still reaches it, it is kept for that route, draining: a
        goodbye is what a stopping node says first, and the relay route must
        not carry its new requests meanwhile. (A goodbye that was only the
        LAN's records expiring ends at the next health check through the relay.)
        """
        peer = self._peers.get(node_id)
        if peer is None:
            return []
        if peer.relay:
            peer.info = msgspec.structs.replace(peer.info, address="", route="relay")
            return self.on_draining(node_id, now)
        del self._peers[node_id]
        return [PeerRemoved(node_id=node_id, reason="goodbye")]

    def add_static(self, address: str) -> None:
        """Probe ``host:port`` even without mDNS; its id is learnt from its health answer."""
        if not address or ":" not in address:
            raise ValueError(f"static peer must be HOST:PORT, got {address!r}")
        self._static.setdefault(address, None)

    def on_identified(self, address: str, info: PeerInfo, now: float) -> list[PeerEvent]:
        """A static address answered a health check with ``info`` (its id and details).

        Call ``on_health_ok`` for the same answer as well. A foreign-cluster
        answer leaves the address unidentified.
        """
        if address not in self._static or not self._accepts(info):
            return []
        events: list[PeerEvent] = []
        previous = self._static[address]
        if previous is not None and previous != info.node_id and previous in self._peers:
            # A different node now lives at this address (reinstalled, or moved).
            old = self._peers[previous]
            old.static = False
            if old.info.address == address:
                del self._peers[previous]
                events.append(PeerRemoved(node_id=previous, reason="replaced"))
        self._static[address] = info.node_id
        if info.address != address:
            info = msgspec.structs.replace(info, address=address)
        events.extend(self.on_discovered(info, now))
        self._peers[info.node_id].static = True
        return events

    # Health -------------------------------------------------------------

    def on_health_ok(self, node_id: str, rtt_s: float, now: float, load: NodeLoad | None = None) -> list[PeerEvent]:
        """A health check answered well in ``rtt_s`` seconds (saying ``load``, where the peer tells it)."""
        peer = self._peers.get(node_id)
        if peer is None:
            return []
        peer.load = load
        if peer.draining_at is not None and now - rtt_s > peer.draining_at:
            peer.draining_at = None  # asked after it said it was stopping, and it answered: it is back
        if peer.up_since is None:
            peer.up_since = now
        peer.last_ok = now
        peer.last_seen = now
        peer.health_failures = 0
        peer.ewma_rtt_s = _ewma(peer.ewma_rtt_s, rtt_s, self.ewma_alpha)
        if peer.state is PeerState.UP:
            return []
        peer.state = PeerState.UP
        return [PeerUp(node_id=node_id)]

    def on_health_fail(self, node_id: str, now: float) -> list[PeerEvent]:
        """A health check failed (refused, timed out, bad answer)."""
        peer = self._peers.get(node_id)
        if peer is None:
            return []
        peer.health_failures += 1
        if peer.state is PeerState.UP and peer.health_failures >= self.suspect_after_failures:
            peer.state = PeerState.SUSPECT
            return [PeerSuspect(node_id=node_id)]
        return []

    def on_catalog(
        self, node_id: str, models: Iterable[str], digest: str, now: float, resting: Iterable[str] = ()
    ) -> list[PeerEvent]:
        """The peer's model list was fetched; ``digest`` is the one it was served with.

        ``resting`` are models it holds whose engine is down for now.
        """
        peer = self._peers.get(node_id)
        if peer is None:
            return []
        peer.catalog_digest = digest
        peer.last_seen = now
        peer.resting = frozenset(resting)
        new = frozenset(models)
        if new == peer.models:
            return []
        peer.models = new
        self._prune_model_breakers()
        return [CatalogChanged(node_id=node_id, models=tuple(sorted(new)))]

    def tick(self, now: float) -> list[PeerEvent]:
        """Apply timeouts: suspect, down, forgotten. Call every second or so."""
        events: list[PeerEvent] = []
        for peer in self.all():
            since_ok = now - (peer.last_ok if peer.last_ok is not None else peer.added_at)
            if peer.state is not PeerState.DOWN and since_ok >= self.down_after_s:
                peer.state = PeerState.DOWN
                peer.up_since = None
                peer.load = None
                events.append(PeerDown(node_id=peer.node_id))
            elif peer.state is PeerState.UP and since_ok >= self.suspect_after_s:
                peer.state = PeerState.SUSPECT
                events.append(PeerSuspect(node_id=peer.node_id))
            if (
                peer.state is PeerState.DOWN
                and not peer.static
                and now - max(peer.last_seen, peer.last_ok or 0.0) >= self.forget_after_s
            ):
                del self._peers[peer.node_id]
                self._prune_model_breakers()
                events.append(PeerRemoved(node_id=peer.node_id, reason="forgotten"))
        return events

    # Requests -----------------------------------------------------------

    def begin_request(self, node_id: str, now: float, model: str | None = None) -> bool:
        """Claim a slot for a request to this peer (for ``model``); False if it must not be sent.

        This is where the breakers' half-open probes are taken, so call it right
        before dispatching, and pair every True with ``end_request``.
        """
        peer = self._peers.get(node_id)
        if peer is None or peer.state is PeerState.DOWN or peer.draining_at is not None or not peer.breaker.allow(now):
            return False
        if model is not None and not self.model_breakers.get((node_id, model)).allow(now):
            peer.breaker.release(now)
            return False
        peer.in_flight += 1
        return True

    def on_first_token(self, node_id: str, ttft_s: float, now: float) -> None:
        """The first byte of the answer arrived after ``ttft_s``: the peer works."""
        peer = self._peers.get(node_id)
        if peer is None:
            return
        peer.ewma_ttft_s = _ewma(peer.ewma_ttft_s, ttft_s, self.ewma_alpha)
        peer.last_ttft_at = now
        peer.last_seen = now
        peer.breaker.on_success(now)

    def end_request(
        self,
        node_id: str,
        now: float,
        outcome: Outcome = Outcome.SUCCESS,
        *,
        model: str | None = None,
        answered: bool = False,
    ) -> bool:
        """Release the slot taken by ``begin_request`` and tell the breakers how it went.

        A failure the peer ``answered`` (its engine failed ``model``) counts against the peer for that model
        only: its link worked. One that got no answer counts against the peer. True when this failure
        ejected the peer for ``model``.
        """
        peer = self._peers.get(node_id)
        if peer is None:
            return False
        peer.in_flight = max(0, peer.in_flight - 1)
        held = self.model_breakers.get((node_id, model)) if model is not None else None
        match outcome:
            case Outcome.SUCCESS:
                peer.last_seen = now
                peer.breaker.on_success(now)
                if held is not None:
                    held.on_success(now)
            case Outcome.FAILURE if held is not None and answered:
                peer.last_seen = now
                peer.breaker.on_success(now)
                was = held.state(now)
                held.on_failure(now)
                return was is not BreakerState.OPEN and held.state(now) is BreakerState.OPEN
            case Outcome.FAILURE:
                peer.breaker.on_failure(now)
                if held is not None:
                    held.release(now)
            case Outcome.ABANDONED:
                peer.breaker.release(now)
                if held is not None:
                    held.release(now)
        return False
