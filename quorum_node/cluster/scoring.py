"""Choosing among peers, and how hard to retry.

- ``pick`` orders holders of a model, best first, by an estimate of how long
  a new request would wait for its first token there.
- ``RetryBudget`` caps retries to a fraction of requests, so a failing cluster
  is not hammered with a retry storm on top of its normal load.

Pure logic; ``now`` is monotonic seconds.
"""

from __future__ import annotations

from collections.abc import Iterable

from quorum_node.cluster.breaker import BreakerState
from quorum_node.cluster.peers import Peer, PeerState

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


class RetryBudget:
    """Token bucket that lets retries be at most ``ratio`` of requests, plus a floor.

    Each request deposits ``ratio`` tokens; time deposits ``min_per_s`` tokens
    per second (so a quiet node can still retry); a retry spends one. The
    balance is capped at ``max_tokens`` so a long calm spell cannot bank a storm.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        *,
        min_per_s: float = 1.0,
        max_tokens: float = 20.0,
        initial_tokens: float | None = None,
    ) -> None:
        if ratio < 0 or min_per_s < 0 or max_tokens < 1:
            raise ValueError("need ratio >= 0, min_per_s >= 0 and max_tokens >= 1")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.max_tokens = max_tokens
        # None: start with the floor's worth; a long-running calm node has a full bucket anyway
        self._tokens = float(initial_tokens) if initial_tokens is not None else min(max_tokens, max(1.0, min_per_s))
        self._at: float | None = None

    @property
    def tokens(self) -> float:
        """Current balance (as of the last call)."""
        return self._tokens

    def _refill(self, now: float) -> None:
        if self._at is None:
            self._at = now
        elif now > self._at:
            self._tokens = min(self.max_tokens, self._tokens + (now - self._at) * self.min_per_s)
            self._at = now

    def on_request(self, now: float) -> None:
        """Count an original (non-retry) request."""
        self._refill(now)
        self._tokens = min(self.max_tokens, self._tokens + self.ratio)

    def can_retry(self, now: float) -> bool:
        """Whether a retry is affordable right now."""
        self._refill(now)
        return self._tokens >= 1.0

    def on_retry(self, now: float) -> bool:
        """Spend one retry; returns False (spending nothing) if the budget is exhausted."""
        self._refill(now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
