"""Choosing among peers, and how hard to retry.

- ``pick`` orders holders of a model, best first, by an estimate of how long
  a new request would wait for its first token there.
- ``RetryBudget`` caps retries to a fraction of requests, so a failing cluster
  is not hammered with a retry storm on top of its normal load.

Pure logic; ``now`` is monotonic seconds.
"""

from __future__ import annotations

from collections.abc import Iterable

from quorum_node.breaker import BreakerState
from quorum_node.cluster.peers import Peer, PeerState
from quorum_node.retry import RetryBudget

__all__ = ["RetryBudget", "pick", "score"]

#: First-token time assumed for a peer we have no (recent) measurement of.
DEFAULT_TTFT_S = 0.5
#: A TTFT measurement older than this no longer describes the peer's load.
TTFT_STALE_AFTER_S = 120.0
#: Added per recent failed health check: a peer that just missed one ranks behind its healthy siblings.
HEALTH_FAILURE_PENALTY_S = 5.0
#: A peer whose breaker is half-open gets one probe; rank it after the others.
HALF_OPEN_PENALTY_S = 30.0
#: Peers that are not up (only reach ``pick`` if the caller passes them) go last.
NOT_UP_PENALTY_S = 1000.0


def score(peer: Peer, now: float) -> float:
    """Estimated seconds to first token on ``peer`` for a new request; lower is better.

    Each request already in flight is assumed to cost one more TTFT of queueing
    (engines batch, so this over-counts, but it spreads load, which is the point).
    """
    ttft = peer.ewma_ttft_s
    if ttft is None or peer.last_ttft_at is None or now - peer.last_ttft_at > TTFT_STALE_AFTER_S:
        ttft = DEFAULT_TTFT_S
    value = ttft * (1 + peer.in_flight) + (peer.ewma_rtt_s or 0.0)
    value += HEALTH_FAILURE_PENALTY_S * peer.health_failures
    if peer.breaker.state(now) is BreakerState.HALF_OPEN:
        value += HALF_OPEN_PENALTY_S
    if peer.state is not PeerState.UP:
        value += NOT_UP_PENALTY_S
    return value


def pick(holders: Iterable[Peer], now: float) -> list[Peer]:
    """Order ``holders`` best first; equal scores fall back to node id, so the order is stable."""
    return sorted(holders, key=lambda p: (score(p, now), p.node_id))
