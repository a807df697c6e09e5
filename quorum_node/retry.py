"""How hard to retry: a budget that caps retries to a fraction of requests (pure logic; ``now`` is
monotonic seconds). The router spends it for engines, the cluster for peers (``cluster/scoring.py``)."""

from __future__ import annotations

__all__ = ["RetryBudget"]


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
