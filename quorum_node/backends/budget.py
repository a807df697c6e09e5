"""The node-wide budget for whole (non-streamed) answers held in memory (``max_buffered_answers_bytes``).

Each whole answer is bounded on its own (``upstream.MAX_ANSWER_BYTES``); this
bounds them together. A request holds a share (``Hold``) that grows as its
answer is read from an engine or a peer (``upstream.read_whole``) and is
given back, all at once, when the request is over (its answer written to the
client, or failed). A read that would take the budget past its limit stops
and its request gets a retryable 503 (``errors.NodeBusy``).

The request's hold travels in a context variable (``ANSWER_HOLD``), set by
the request path (``api/surface.serve``), so every reader of a whole answer
(an engine adapter, the peer client) counts against it without being handed
it. Where none is set (a probe, a test), reads are not counted.

Pure logic: no I/O, nothing awaits.
"""

from __future__ import annotations

import contextvars

__all__ = ["ANSWER_HOLD", "ByteBudget", "Hold"]


class ByteBudget:
    """Bytes that may be held at once, node-wide; ``used`` now, ``peak`` ever, ``refused`` takes."""

    __slots__ = ("limit", "used", "peak", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.refused = 0

    def take(self, n: int) -> bool:
        """Take ``n`` bytes if they fit under the limit; else take nothing and say so."""
        if self.used + n > self.limit:
            self.refused += 1
            return False
        self.used += n
        if self.used > self.peak:
            self.peak = self.used
        return True

    def give(self, n: int) -> None:
        self.used -= n


class Hold:
    """One request's share of a ``ByteBudget``."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.size = 0

    def grow(self, n: int) -> bool:
        """Take ``n`` more bytes; False (nothing taken) if the budget has no room for them."""
        if not self.budget.take(n):
            return False
        self.size += n
        return True

    def shrink_to(self, size: int) -> None:
        """Give back what was taken past ``size`` (a read that failed gives back what it took)."""
        if size < self.size:
            self.budget.give(self.size - size)
            self.size = size

    def release(self) -> None:
        """Give everything back (idempotent)."""
        self.shrink_to(0)


#: The hold of the request being served in this context (None: reads are not counted).
ANSWER_HOLD: contextvars.ContextVar[Hold | None] = contextvars.ContextVar("answer_hold", default=None)
