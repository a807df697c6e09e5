"""Exponential backoff with jitter, for anything that retries (engine restarts, reconnects)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with jitter: attempt n waits about ``base_s * factor**n``, capped at ``max_s``.

    The wait is drawn from ``[cap * (1 - jitter), cap]`` so that nodes restarting
    together spread out, yet never retry with no pause at all. ``rand`` returns
    a float in [0, 1); inject one for deterministic tests.
    """

    def __init__(
        self,
        base_s: float = 0.1,
        *,
        factor: float = 2.0,
        max_s: float = 30.0,
        jitter: float = 0.5,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if base_s <= 0 or factor < 1 or max_s < base_s or not 0 <= jitter <= 1:
            raise ValueError("need 0 < base_s <= max_s, factor >= 1 and 0 <= jitter <= 1")
        self.base_s = base_s
        self.factor = factor
        self.max_s = max_s
        self.jitter = jitter
        self._rand = rand
        self.attempt = 0

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (0-based)."""
        # Compare in logs: factor**attempt overflows floats long before attempts run out.
        if attempt * math.log(self.factor) >= math.log(self.max_s / self.base_s):
            cap = self.max_s
        else:
            cap = self.base_s * self.factor**attempt
        return cap * (1.0 - self.jitter * self._rand())

    def next_delay(self) -> float:
        """The wait before the next attempt; advances the attempt counter."""
        value = self.delay(self.attempt)
        self.attempt += 1
        return value

    def reset(self) -> None:
        """Start over (call after a success)."""
        self.attempt = 0
