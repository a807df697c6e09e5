"""How busy an engine that schedules as its memory allows says it is: the gauges of its Prometheus ``/metrics``.

vLLM and SGLang run as many requests at once as their KV cache holds, so no
fixed number says how many they take; their ``/metrics`` say how many run and
how many wait (``engines.md`` §6, §7). Where some wait, what runs is all the
engine can take now: its capacity is that many, and a request sent to it
would only queue behind the others in arrival order. Where none wait, it has
room and no capacity is known.

The page is untrusted input: read capped (``MAX_METRICS_BYTES``), parsed by
``prometheus_client``'s parser, and anything it cannot read, or a value that is
not a count, gives nothing rather than an error.
"""

from __future__ import annotations

import math

import msgspec
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["MAX_METRICS_BYTES", "Gauges", "Queueing", "capacity_of", "read_gauges"]

#: A ``/metrics`` page longer than this is not read (vLLM's is some tens of KiB).
MAX_METRICS_BYTES = 1 << 20
#: A count above this is no count.
_MAX_COUNT = 1 << 20


class Gauges(msgspec.Struct, frozen=True):
    """The names of an engine family's two gauges."""

    running: str
    waiting: str


class Queueing(msgspec.Struct, frozen=True):
    """What the gauges said: requests running and waiting (summed over the engine's models and engines)."""

    running: int
    waiting: int


def read_gauges(raw: bytes, names: Gauges) -> Queueing | None:
    """The two gauges from a ``/metrics`` page; None where the page is unreadable or lacks the running one."""
    if len(raw) > MAX_METRICS_BYTES:
        return None
    try:
        text = raw.decode()
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in (names.running, names.waiting):
                    sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    except (UnicodeDecodeError, ValueError, TypeError, IndexError, KeyError):
        return None
    running, waiting = sums.get(names.running), sums.get(names.waiting, 0.0)
    if running is None or not all(math.isfinite(v) and 0 <= v <= _MAX_COUNT for v in (running, waiting)):
        return None
    return Queueing(int(running), int(waiting))


def capacity_of(q: Queueing) -> int | None:
    """How many requests the engine takes at once, as far as ``q`` shows: what runs, where some wait."""
    return q.running if q.waiting > 0 and q.running > 0 else None
