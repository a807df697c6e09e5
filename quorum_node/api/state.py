"""What the API's handlers are handed (``Parts``, one key each), and what a request carries along.

``node.py`` builds the parts and ``create_app`` puts each under its own key;
a handler reads the one it uses (``request.app[CATALOG]``), never the node.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ..backends.budget import ByteBudget
    from ..backends.registry import Registry
    from ..catalog import Catalog, CatalogView
    from ..cluster.service import ClusterService
    from ..cluster.sharding import Sharding
    from ..control.keys import Grant, KeyStore
    from ..control.ledger import Ledger
    from ..control.metrics import NodeMetrics
    from ..control.recorder import Records
    from ..records import Draft
    from ..router import Router
    from ..settings import Settings
    from .server import ConnectionLimits, InFlight

__all__ = [
    "ADDRESS",
    "SHARDING",
    "ANSWER_BUDGET",
    "API_KEY",
    "CATALOG",
    "CLUSTER",
    "DRAFT",
    "INFLIGHT",
    "KEYS",
    "LEDGER",
    "LIMITS",
    "METRICS",
    "NAME",
    "PEER",
    "PREPARED",
    "RECORDS",
    "REGISTRY",
    "REQUEST_ID",
    "ROUTER",
    "SETTINGS",
    "TRUSTED",
    "Parts",
    "request_id_for",
    "visible_catalog",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Parts:
    """The node's parts that its HTTP API uses (built by ``node.py``)."""

    settings: Settings
    name: str
    router: Router
    registry: Registry  # the local engines
    catalog: Catalog  # the cluster's models, as every list reads them
    inflight: InFlight
    limits: ConnectionLimits
    records: Records  # every request's record goes here
    keys: KeyStore
    answer_budget: ByteBudget
    admin_token: bytes | None
    cluster: ClusterService | None  # None: not in a cluster
    ledger: Callable[[], Ledger | None]  # opened as the node starts; None with --no-ledger
    metrics: NodeMetrics | None
    address: Callable[[], str]  # host:port this node answers at (once bound)
    sharding: Sharding | None = None  # the sharded models this node leads (None: not in a cluster)


SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
NAME: web.AppKey[str] = web.AppKey("name", str)
ROUTER: web.AppKey[Router] = web.AppKey("router")
REGISTRY: web.AppKey[Registry] = web.AppKey("registry")
CATALOG: web.AppKey[Catalog] = web.AppKey("catalog")
INFLIGHT: web.AppKey[InFlight] = web.AppKey("inflight")
LIMITS: web.AppKey[ConnectionLimits] = web.AppKey("limits")
RECORDS: web.AppKey[Records] = web.AppKey("records")
KEYS: web.AppKey[KeyStore] = web.AppKey("keys")
CLUSTER: web.AppKey[ClusterService | None] = web.AppKey("cluster")
LEDGER: web.AppKey[Callable[[], Ledger | None]] = web.AppKey("ledger")
SHARDING: web.AppKey[Sharding | None] = web.AppKey("sharding")
METRICS: web.AppKey[NodeMetrics | None] = web.AppKey("metrics")
ANSWER_BUDGET: web.AppKey[ByteBudget] = web.AppKey("answer_budget")  # whole answers held, node-wide
ADDRESS: web.AppKey[Callable[[], str]] = web.AppKey("address")  # host:port, once bound
# What a request carries along (``request[KEY]``).
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
PREPARED: web.RequestKey[bool] = web.RequestKey("prepared", bool)  # its answer has begun
PEER: web.RequestKey[str] = web.RequestKey("peer", str)  # the verified node id of a signed peer request
DRAFT: web.RequestKey[Draft] = web.RequestKey("draft")  # its record, being filled in (records.py)
API_KEY: web.RequestKey[Grant] = web.RequestKey("api_key")  # the key it was authorised with (.info: KeyInfo)
# The trust middleware knows the caller: trusted loopback, a valid key or the admin token (a peer: PEER).
# Not set for a stranger let through to /health.
TRUSTED: web.RequestKey[bool] = web.RequestKey("trusted", bool)

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_for(given: str | None) -> str:
    """The client's ``X-Request-Id`` if it is a sane token, else a fresh one (never echo junk into logs)."""
    if given is not None and _REQUEST_ID_RE.fullmatch(given):
        return given
    return uuid.uuid4().hex[:16]


def visible_catalog(request: web.Request) -> CatalogView:
    """The catalog as the caller may see it: all of it, or only the models a scoped key may use."""
    catalog = request.app[CATALOG]
    grant = request.get(API_KEY)
    if grant is None or not grant.info.models:
        return catalog.view()
    return catalog.scoped(tuple(grant.info.models), grant.allows)
