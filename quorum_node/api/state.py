"""Application state keys, and the one view of the cluster's models the API shows."""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from ..catalog import CatalogView
    from ..control.keys import Grant
    from ..node import Node
    from ..records import Draft
    from ..router import Router
    from ..settings import Settings
    from .server import InFlight

__all__ = ["API_KEY", "DRAFT", "INFLIGHT", "NODE", "PEER", "PREPARED", "REQUEST_ID", "ROUTER", "SETTINGS", "TRUSTED",
           "cluster_models", "request_id_for", "visible_catalog"]

NODE: web.AppKey[Node] = web.AppKey("node")
ROUTER: web.AppKey[Router] = web.AppKey("router")
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
INFLIGHT: web.AppKey[InFlight] = web.AppKey("inflight")
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


def cluster_models(app: web.Application) -> list[dict[str, Any]]:
    """Every (model, holder) pair in the cluster: this node's engines, then its peers' (the cached
    catalog's entries: read them, never change them)."""
    return app[NODE].catalog.view().entries


def visible_catalog(request: web.Request) -> CatalogView:
    """The catalog as the caller may see it: all of it, or only the models a scoped key may use."""
    catalog = request.app[NODE].catalog
    grant = request.get(API_KEY)
    if grant is None or not grant.info.models:
        return catalog.view()
    return catalog.scoped(tuple(grant.info.models), grant.allows)
