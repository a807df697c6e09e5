"""Circuit breaker for one upstream (a peer, or an engine).

::

    closed ──(failure_threshold consecutive failures)──► open
    open ──(reset timeout elapsed; next allow())──► half_open (one probe out)
    half_open ──probe succeeds──► closed   (reset timeout back to its base)
    half_open ──probe fails────► open      (reset timeout grows ×backoff, capped)

Pure logic: the caller passes ``now`` (monotonic seconds) to every method.

Two ways to ask: ``available(now)`` only looks (use it to filter candidates),
``allow(now)`` commits (use it right before dispatching a request; in
half-open it hands out the single probe slot). A request that ends with no
verdict (the client went away) gives its slot back with ``release(now)``.
"""

from __future__ import annotations

import enum

__all__ = ["BreakerState", "Breakers", "CircuitBreaker"]


class BreakerState(enum.StrEnum):
    """Where a breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops sending requests to an upstream that keeps failing.

    ``probe_timeout_s`` frees a half-open probe slot whose request never
    reported back, so a lost verdict cannot wedge the breaker forever.
    """

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_after_s: float = 5.0,
        *,
        max_reset_after_s: float = 60.0,
        backoff_factor: float = 2.0,
        probe_timeout_s: float = 30.0,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_after_s <= 0 or max_reset_after_s < reset_after_s or backoff_factor < 1:
            raise ValueError("need 0 < reset_after_s <= max_reset_after_s and backoff_factor >= 1")
        self.failure_threshold = failure_threshold
        self.base_reset_after_s = reset_after_s
        self.max_reset_after_s = max_reset_after_s
        self.backoff_factor = backoff_factor
        self.probe_timeout_s = probe_timeout_s
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._reset_after_s = reset_after_s
        self._opened_at = 0.0
        self._probe_since: float | None = None

    @property
    def failures(self) -> int:
        """Consecutive failures counted while closed."""
        return self._failures

    @property
    def reset_after_s(self) -> float:
        """The current open period (grows after failed probes)."""
        return self._reset_after_s

    def state(self, now: float) -> BreakerState:
        """Current state; an open breaker whose timeout has elapsed reads half-open."""
        if self._state is BreakerState.OPEN and now >= self._opened_at + self._reset_after_s:
            return BreakerState.HALF_OPEN
        return self._state

    def _probe_free(self, now: float) -> bool:
        return self._probe_since is None or now - self._probe_since >= self.probe_timeout_s

    def available(self, now: float) -> bool:
        """Whether ``allow(now)`` would say yes, without taking anything."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        return self._state is BreakerState.OPEN or self._probe_free(now)

    def retry_in_s(self, now: float) -> float:
        """Seconds until ``allow`` may say yes again: 0 if it would now.

        While open, the time left until it half-opens; while its half-open probe
        is out, a second (the probe settles it either way, or times out).
        """
        if self.available(now):
            return 0.0
        if self.state(now) is BreakerState.OPEN:
            return max(0.0, self._opened_at + self._reset_after_s - now)
        return 1.0

    def allow(self, now: float) -> bool:
        """Whether a request may go now; in half-open this takes the one probe slot."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        if self._state is BreakerState.OPEN:
            self._state = BreakerState.HALF_OPEN
            self._probe_since = None
        if not self._probe_free(now):
            return False
        self._probe_since = now
        return True

    def on_success(self, now: float) -> None:
        """Record a success; a successful probe closes the breaker."""
        if self._state is BreakerState.OPEN:
            # A straggler from before the breaker opened proves little; wait for a probe.
            return
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._reset_after_s = self.base_reset_after_s
        self._probe_since = None

    def on_failure(self, now: float) -> None:
        """Record a failure; opens after ``failure_threshold`` in a row or a failed probe."""
        if self._state is BreakerState.OPEN:
            return
        if self._state is BreakerState.HALF_OPEN:
            self._reset_after_s = min(self._reset_after_s * self.backoff_factor, self.max_reset_after_s)
            self._open(now)
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._open(now)

    def release(self, now: float) -> None:
        """Give back a probe slot whose request ended without a verdict."""
        if self._state is BreakerState.HALF_OPEN:
            self._probe_since = None

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._failures = 0
        self._probe_since = None

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self._state.value}, failures={self._failures}, reset_after_s={self._reset_after_s})"
        )


class Breakers:
    """A breaker for each of many upstreams (a local engine's model: ``(engine, model)``), made on first use.

    ``keep(keys)`` forgets the breakers of upstreams that are gone, so the set stays as small as what is
    held. The settings of every breaker are the ones given here.
    """

    def __init__(
        self, failure_threshold: int = 3, reset_after_s: float = 5.0, *, max_reset_after_s: float = 60.0
    ) -> None:
        CircuitBreaker(failure_threshold, reset_after_s, max_reset_after_s=max_reset_after_s)  # checks them
        self._args = (failure_threshold, reset_after_s, max_reset_after_s)
        self._by_key: dict[tuple[str, str], CircuitBreaker] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: tuple[str, str]) -> CircuitBreaker:
        breaker = self._by_key.get(key)
        if breaker is None:
            threshold, reset, max_reset = self._args
            breaker = self._by_key[key] = CircuitBreaker(threshold, reset, max_reset_after_s=max_reset)
        return breaker

    def available(self, key: tuple[str, str], now: float) -> bool:
        breaker = self._by_key.get(key)
        return breaker is None or breaker.available(now)

    def retry_in_s(self, key: tuple[str, str], now: float) -> float:
        breaker = self._by_key.get(key)
        return 0.0 if breaker is None else breaker.retry_in_s(now)

    def keep(self, keys: set[tuple[str, str]]) -> None:
        for key in [k for k in self._by_key if k not in keys]:
            del self._by_key[key]
