"""Prometheus metrics of one node (``GET /metrics``), from the request records and the node's live state.

Counters and histograms are a record sink (``node.records.add(metrics.observe)``):
they read the facts the record has, never compute their own. What is a state
rather than an event (in-flight requests, engine, peer and relay states, the
ledger's queue) is read at scrape time by a custom collector.

Each node has its own ``CollectorRegistry`` (tests run several nodes in one
process; the global registry would mix them).

Labels are bounded: ``model`` is a model some holder in the cluster knows
(the request was served, or the name is in the catalog), else ``unknown``,
and at most ``MAX_MODEL_LABELS`` models have series of their own (the models
seen after those count as ``other``: a catalog of 100,000 models must not
make 100,000 series);
``route``, ``surface`` and ``status`` come from the node's own code, and
peer and engine names from the cluster's members and the node's settings.
A client's string never becomes a label of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..backends.base import BackendState
from ..records import Record

if TYPE_CHECKING:
    from ..admission import Admission
    from ..backends.registry import Registry
    from ..cluster.service import ClusterService
    from .ledger import Ledger

__all__ = ["CONTENT_TYPE_LATEST", "NodeMetrics"]

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_MAX_LABEL = 200
#: Models with series of their own; the ones seen after these are counted as "other".
MAX_MODEL_LABELS = 512
_RELAY_STATES = ("connecting", "up", "refused", "down")
_PEER_STATES = ("up", "suspect", "down")


class NodeMetrics:
    """The metrics of one node: ``observe`` is the record sink, ``render`` the exposition."""

    def __init__(
        self,
        *,
        known: Callable[[str], bool],
        inflight: Sized,
        engines: Registry,
        cluster: ClusterService | None,
        ledger: Callable[[], Ledger | None],
        admission: Admission | None = None,
    ) -> None:
        """``known``: whether a model is in the catalog; ``ledger``: the ledger once it is open (or None);
        ``admission``: where requests wait for a holder with room."""
        self._is_known = known
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "quorum_requests",
            "Requests, by surface, model, route and status",
            ("surface", "model", "route", "status"),
            registry=r,
        )
        self.tokens = Counter(
            "quorum_tokens",
            "Tokens, by direction (in: prompt, out: completion) and model",
            ("direction", "model"),
            registry=r,
        )
        self.ttft = Histogram(
            "quorum_time_to_first_token_seconds",
            "Time to the first token (to the whole answer, for a non-streamed one)",
            ("model", "route"),
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.duration = Histogram(
            "quorum_request_duration_seconds",
            "Request duration, arrival to last byte",
            ("model", "route"),
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "quorum_queue_wait_seconds",
            "Time requests waited for a holder with room (admission queue), those that waited at all",
            ("model",),
            buckets=QUEUE_BUCKETS_S,
            registry=r,
        )
        self.refused = Counter(
            "quorum_refused_requests",
            "Requests refused with 401 as unauthenticated (no key, a "
            "wrong key or admin token, not a member), by reason; not in the ledger",
            ("reason",),
            registry=r,
        )
        r.register(_StateCollector(inflight, engines, cluster, ledger, admission))
        self._children: dict[tuple[str, str, str, int], tuple[Any, ...]] = {}
        self._models: set[str] = set()  # the model labels given so far (at most MAX_MODEL_LABELS)

    def _known(self, model: str) -> bool:
        """Whether ``model`` is in the catalog (the cached one: a dictionary lookup)."""
        try:
            return self._is_known(model)
        except Exception:  # noqa: BLE001  (a half-started node: no catalog yet; a scrape never fails for it)
            return False

    def model_label(self, r: Record) -> str:
        m = r.model
        if not m:
            return "none"
        if len(m) > _MAX_LABEL:
            return "unknown"
        # served: a holder accepted it, a catalog name (or one of its aliases); else only a catalog name
        if r.route is None and not self._known(m):
            return "unknown"
        if m not in self._models:
            if len(self._models) >= MAX_MODEL_LABELS:
                return "other"
            self._models.add(m)
        return m

    def observe(self, r: Record) -> None:
        """The record sink: a dictionary lookup and a few additions on the event loop."""
        model = self.model_label(r)
        route = r.route or "none"
        key = (r.surface or "none", model, route, r.status)
        c = self._children.get(key)
        if c is None:  # labels() takes a lock and builds a tuple: once per label set, not per request
            c = self._children[key] = (
                self.requests.labels(key[0], model, route, str(r.status)),
                self.tokens.labels("in", model),
                self.tokens.labels("out", model),
                self.ttft.labels(model, route),
                self.duration.labels(model, route),
            )
        c[0].inc()
        if r.prompt_tokens:
            c[1].inc(r.prompt_tokens)
        if r.completion_tokens:
            c[2].inc(r.completion_tokens)
        if r.ttft_ms is not None:
            c[3].observe(r.ttft_ms / 1000)
        if r.surface is not None:
            c[4].observe(r.duration_ms / 1000)
        if r.queue_ms is not None:
            self.queue_wait.labels(model).observe(r.queue_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """What the node is now, read when Prometheus scrapes."""

    def __init__(
        self,
        inflight: Sized,
        engines: Registry,
        cluster: ClusterService | None,
        ledger: Callable[[], Ledger | None],
        admission: Admission | None,
    ) -> None:
        self.inflight = inflight
        self.engines = engines
        self.cluster = cluster
        self.ledger = ledger
        self.admission = admission

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("quorum_in_flight", "Requests being answered now", value=len(self.inflight))
        admission = self.admission
        if admission is not None:
            stats = admission.stats()
            yield GaugeMetricFamily(
                "quorum_queue_waiting", "Requests waiting for a holder with room now", value=stats.waiting
            )
            refused = CounterMetricFamily(
                "quorum_queue_refused", "Requests the admission queue answered 429, by reason", labels=("reason",)
            )
            refused.add_metric(("full",), stats.refused_full)
            refused.add_metric(("timeout",), stats.timed_out)
            yield refused
        engines = GaugeMetricFamily(
            "quorum_engine_state", "Each engine's state (1: the current one)", labels=("engine", "kind", "state")
        )
        load = GaugeMetricFamily(
            "quorum_engine_in_flight", "Requests each engine is serving now", labels=("engine", "kind")
        )
        for b in list(self.engines.backends.values()):
            for bst in BackendState:
                engines.add_metric((b.name, b.kind, bst.value), 1.0 if b.state is bst else 0.0)
            load.add_metric((b.name, b.kind), float(getattr(b, "in_flight", 0)))
        yield engines
        yield load
        cluster = self.cluster
        if cluster is not None:
            peers = GaugeMetricFamily(
                "quorum_peer_state", "Each peer's state as this node sees it (1: current)", labels=("peer", "state")
            )
            pin = GaugeMetricFamily("quorum_peer_in_flight", "Requests forwarded to each peer now", labels=("peer",))
            for p in cluster.table.all():
                name = (p.info.name or p.node_id)[:_MAX_LABEL]
                for st in _PEER_STATES:
                    peers.add_metric((name, st), 1.0 if p.state.value == st else 0.0)
                pin.add_metric((name,), float(p.in_flight))
            yield peers
            yield pin
            relay = cluster.relay
            if relay is not None:
                rs = GaugeMetricFamily(
                    "quorum_relay_state", "The relay connection's state (1: current)", labels=("state",)
                )
                for st in _RELAY_STATES:
                    rs.add_metric((st,), 1.0 if relay.state == st else 0.0)
                yield rs
                yield GaugeMetricFamily(
                    "quorum_relay_connected",
                    "1 while the relay connection is up",
                    value=1.0 if relay.state == "up" else 0.0,
                )
        ledger = self.ledger()
        if ledger is not None:
            yield GaugeMetricFamily(
                "quorum_ledger_queued",
                "Records in the ledger's journal waiting for the writer to move them into the database",
                value=ledger.queued,
            )
            yield CounterMetricFamily(
                "quorum_ledger_records_written", "Records committed to the ledger's database", value=ledger.written
            )
            yield CounterMetricFamily(
                "quorum_ledger_records_dropped",
                "Records not stored: the writer was too far behind, or the insert failed",
                value=ledger.dropped + ledger.failed,
            )
