"""One view of the fleet, for ``GET /quorum/admin/fleet``, the dashboard and its live events.

The fleet is this node and every peer it knows: online or not, since when,
by which routes, with which engines and models and how busy; and the models
of the cluster with the nodes that hold each. Built from the peer table and
the registry as they are now; nothing here does I/O.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["fleet"]

# Admin endpoints of other parts the page uses when they are there (it says "not available" otherwise).
FEATURES = {"keys": "/quorum/admin/keys", "usage": "/quorum/admin/usage/series", "recent": "/quorum/admin/recent"}


def _self_entry(node: Node, started_at: float) -> dict[str, Any]:
    engines = [{"name": b.name, "kind": b.kind, "state": b.state.value, "load": b.load, "models": len(b.models)}
               for b in node.registry.backends.values()]
    engines += [{"name": n, "kind": "llamacpp", "state": "starting", "load": 0, "models": 0}
                for n in sorted(node.registry.pending)]
    cluster = node.cluster
    return {
        "id": cluster.node_id if cluster is not None else None,
        "name": node.name,
        "self": True,
        "online": True,
        "state": "up",
        "since": round(started_at, 3),
        "routes": ["local"],
        "address": f"{node.settings.host}:{node.port}",
        "engines": engines,
        "models": sorted({m.id for _, m in node.registry.models()}),
        "load": {"in_flight": len(node.inflight), "engines": sum(e["load"] for e in engines)},
        "rtt_ms": None,
    }


def fleet(node: Node, started_at: float, features: dict[str, bool] | None = None) -> dict[str, Any]:
    """The fleet as this node sees it (see the module docstring)."""
    me = _self_entry(node, started_at)
    nodes = [me]
    holders: dict[str, dict[str, set[str]]] = {}
    for b, m in node.registry.models():
        h = holders.setdefault(m.id, {"holders": set(), "engines": set()})
        h["holders"].add(node.name)
        h["engines"].add(b.kind)
    relay = None
    cluster = node.cluster
    if cluster is not None:
        now = time.monotonic()
        for p in cluster.table.all():
            entries = cluster.catalogs.get(p.node_id, [])
            online = p.state.value == "up"
            name = p.info.name or p.node_id
            if p.load is not None:
                engines = [{"name": e.name, "kind": e.kind, "state": e.state, "load": e.load, "models": e.models}
                           for e in p.load.engines]
                load = {"in_flight": p.load.in_flight, "engines": sum(e.load for e in p.load.engines)}
            else:  # an older peer: its engine kinds from its catalog, its load unknown
                engines = [{"name": k, "kind": k, "state": "", "load": 0, "models": 0}
                           for k in sorted({e["engine"] for e in entries})]
                load = None
            models = sorted({e["id"] for e in entries})
            nodes.append({
                "id": p.node_id, "name": name, "self": False, "online": online, "state": p.state.value,
                "since": cluster.wall_clock(p.up_since, now), "routes": p.routes, "address": p.info.address,
                "engines": engines, "models": models, "load": load, "in_flight_to": p.in_flight,
                "rtt_ms": round(p.ewma_rtt_s * 1000, 1) if p.ewma_rtt_s is not None else None,
            })
            if online:
                for e in entries:
                    h = holders.setdefault(e["id"], {"holders": set(), "engines": set()})
                    h["holders"].add(name)
                    h["engines"].add(e["engine"])
        if cluster.relay is not None:
            relay = {"url": cluster.settings.relay, "state": cluster.relay.state, "error": cluster.relay.last_error,
                     "online": sorted(cluster.relay.online)}
    models = [{"id": mid, "holders": sorted(h["holders"]), "engines": sorted(h["engines"])}
              for mid, h in sorted(holders.items())]
    return {
        "self": me,
        "cluster": cluster.membership.name if cluster is not None else None,
        "nodes": nodes,
        "models": models,
        "relay": relay,
        "in_flight": len(node.inflight),
        "features": features or {},
    }

