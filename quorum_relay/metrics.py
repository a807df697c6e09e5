"""The relay's counters and their Prometheus exposition.

The hot path bumps plain ints on ``Stats`` (no locks, no label lookups); a
custom collector turns them, and gauges read from the live state, into metric
families when ``/metrics`` is scraped. Labels never carry a namespace or a
node id: the operator's dashboard learns counts, not who is online.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Gauges", "Stats", "build_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Reasons exported from the start (as 0), so dashboards and alerts need not wait for the first one.
REJECTION_REASONS = (
    "handshake_rate",
    "unauthorized",
    "bad_node_id",
    "bad_node_key",
    "no_proof",
    "bad_proof",
    "capacity",
    "too_many_connections",
    "shutting_down",
    "too_many_streams",
)
CLOSE_REASONS = ("too_slow", "protocol", "frame_too_large", "replaced", "token_revoked", "idle", "shutdown")


class Stats:
    """Monotonic counters, bumped in place."""

    __slots__ = ("bytes_in", "bytes_out", "closes", "dropped", "frames_in", "frames_out", "rejections", "unreachable")

    def __init__(self) -> None:
        self.frames_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.unreachable = 0
        self.dropped = 0  # frames for streams the relay does not know (late after a reset)
        self.rejections: Counter[str] = Counter(dict.fromkeys(REJECTION_REASONS, 0))  # handshakes, Opens
        self.closes: Counter[str] = Counter(dict.fromkeys(CLOSE_REASONS, 0))  # connections the relay closed


Gauges = Callable[[], dict[str, float]]


class _RelayCollector(Collector):
    def __init__(self, stats: Stats, gauges: Gauges) -> None:
        self._stats = stats
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        g = self._gauges()
        for name, doc in (
            ("connections", "Nodes connected now"),
            ("namespaces", "Namespaces with at least one node online"),
            ("streams", "Streams open now"),
            ("send_queue_bytes", "Bytes waiting in send queues now"),
            ("tokens", "Tokens in force"),
        ):
            yield GaugeMetricFamily(f"quorum_relay_{name}", doc, value=g.get(name, 0.0))
        for name, doc, value in (
            ("frames_in", "Frames received from nodes", s.frames_in),
            ("frames_out", "Frames sent to nodes", s.frames_out),
            ("bytes_in", "Frame bytes received from nodes (WebSocket payloads)", s.bytes_in),
            ("bytes_out", "Frame bytes sent to nodes (WebSocket payloads)", s.bytes_out),
            ("unreachable", "Frames answered with Unreachable", s.unreachable),
            ("dropped_frames", "Frames dropped: their stream was no longer open", s.dropped),
        ):
            yield CounterMetricFamily(f"quorum_relay_{name}", doc, value=value)
        rej = CounterMetricFamily(
            "quorum_relay_rejections", "Handshakes and stream opens refused, by reason", labels=["reason"]
        )
        for reason, n in sorted(s.rejections.items()):
            rej.add_metric([reason], n)
        yield rej
        closes = CounterMetricFamily(
            "quorum_relay_disconnects", "Connections closed by the relay, by reason", labels=["reason"]
        )
        for reason, n in sorted(s.closes.items()):
            closes.add_metric([reason], n)
        yield closes


def build_registry(stats: Stats, gauges: Gauges) -> CollectorRegistry:
    """A registry of the relay's own (not the process-global default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RelayCollector(stats, gauges))
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, open fds, CPU
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
