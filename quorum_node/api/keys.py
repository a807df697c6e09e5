"""Application state keys, and the one view of the cluster's models the API shows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from ..node import Node
    from ..router import Router
    from ..settings import Settings

__all__ = ["NODE", "ROUTER", "SETTINGS", "cluster_models"]

NODE: web.AppKey[Node] = web.AppKey("node")
ROUTER: web.AppKey[Router] = web.AppKey("router")
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")


def cluster_models(app: web.Application) -> list[dict[str, Any]]:
    """Every (model, holder) pair in the cluster: this node's engines, then its peers'."""
    node = app[NODE]
    out: list[dict[str, Any]] = []
    for b, m in node.registry.models():
        out.append(
            {
                "id": m.id,
                "aliases": m.aliases,
                "created": m.created,
                "owned_by": m.owned_by,
                "context_length": m.context_length,
                "loaded": m.loaded,
                "family": m.family,
                "parameter_size": m.parameter_size,
                "quantization": m.quantization,
                "engine": b.kind,
                "node": node.name,
            }
        )
    if node.cluster is not None:
        out.extend(node.cluster.model_entries())
    return out
