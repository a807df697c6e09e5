"""One view of the fleet, for ``GET /quorum/admin/fleet``, the dashboard and its live events.

The fleet is this node and every peer it knows: online or not, since when,
by which routes, with which engines and models and how busy; and the models
of the cluster with the nodes that hold each. Built from the peer table and
the registry as they are now; nothing here does I/O.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from ..state import ADDRESS, CATALOG, CLUSTER, INFLIGHT, NAME, REGISTRY, ROUTER

__all__ = ["fleet"]

# Admin endpoints of other parts the page uses when they are there (it says "not available" otherwise).
FEATURES = {"keys": "/quorum/admin/keys", "usage": "/quorum/admin/usage/series", "recent": "/quorum/admin/recent"}


def _waiting(app: web.Application) -> int:
    """Requests waiting on this node for a holder with room (its admission queue)."""
    admission = app[ROUTER].admission
    return admission.depth() if admission is not None else 0


def _self_entry(app: web.Application, started_at: float) -> dict[str, Any]:
    registry = app[REGISTRY]
    engines = [
        {"name": b.name, "kind": b.kind, "state": b.state.value, "load": b.load, "models": len(b.models)}
        for b in registry.backends.values()
    ]
    engines += [
        {"name": n, "kind": "llamacpp", "state": "starting", "load": 0, "models": 0} for n in sorted(registry.pending)
    ]
    cluster = app[CLUSTER]
    return {
        "id": cluster.node_id if cluster is not None else None,
        "name": app[NAME],
        "self": True,
        "online": True,
        "state": "up",
        "since": round(started_at, 3),
        "routes": ["local"],
        "address": app[ADDRESS](),
        "engines": engines,
        "models": sorted({m.id for _, m in registry.models()}),
        "load": {
            "in_flight": len(app[INFLIGHT]),
            "engines": sum(e["load"] for e in engines),
            "waiting": _waiting(app),
        },
        "rtt_ms": None,
    }


def fleet(app: web.Application, started_at: float, features: dict[str, bool] | None = None) -> dict[str, Any]:
    """The fleet as this node sees it (see the module docstring)."""
    me = _self_entry(app, started_at)
    nodes = [me]
    relay = None
    cluster = app[CLUSTER]
    if cluster is not None:
        now = time.monotonic()
        for p in cluster.table.all():
            cards = cluster.catalogs.get(p.node_id, [])
            if p.load is not None:
                engines = [
                    {"name": e.name, "kind": e.kind, "state": e.state, "load": e.load, "models": e.models}
                    for e in p.load.engines
                ]
                load = {
                    "in_flight": p.load.in_flight,
                    "engines": sum(e.load for e in p.load.engines),
                    "waiting": p.load.waiting,
                }
            else:  # an older peer: its engine kinds from its catalog, its load unknown
                engines = [
                    {"name": k, "kind": k, "state": "", "load": 0, "models": 0}
                    for k in sorted({c.engine for c in cards})
                ]
                load = None
            nodes.append(
                {
                    "id": p.node_id,
                    "name": p.info.name or p.node_id,
                    "self": False,
                    "online": p.state.value == "up",
                    "state": p.state.value,
                    "since": cluster.wall_clock(p.up_since, now),
                    "routes": p.routes,
                    "address": p.info.address,
                    "engines": engines,
                    "models": sorted({c.id for c in cards}),
                    "load": load,
                    "in_flight_to": p.in_flight,
                    "rtt_ms": round(p.ewma_rtt_s * 1000, 1) if p.ewma_rtt_s is not None else None,
                }
            )
        relay = cluster.relay_status()
    # the cluster's models and who holds them: the catalog's view (this node's engines, its serving peers')
    models = [
        {
            "id": mid,
            "holders": sorted({c.node for c in cards}),
            "engines": sorted({c.engine for c in cards}),
            # a sharded holder (cluster/sharding.py): its leader, and the members whose memory holds its layers
            "sharded": {c.node: sorted(c.helpers) for c in cards if c.helpers},
        }
        for mid, cards in app[CATALOG].view().by_id.items()
    ]
    return {
        "self": me,
        "cluster": cluster.membership.name if cluster is not None else None,
        "nodes": nodes,
        "models": models,
        "relay": relay,
        "in_flight": len(app[INFLIGHT]),
        "features": features or {},
    }
