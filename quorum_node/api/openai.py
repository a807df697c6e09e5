"""The OpenAI surface: /v1/models, chat, completions, embeddings, health."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from ..backends.base import Op
from ..catalog import CatalogView, ModelCard, model_not_found
from .body import read_body
from .state import DRAFT, INFLIGHT, LIMITS, NAME, PEER, REGISTRY, TRUSTED, visible_catalog
from .surface import OPENAI, Call, serve
from .validate import check_chat, check_completions, check_embeddings, parse_body

__all__ = ["routes"]

_encode = msgspec.json.Encoder().encode


async def _read(request: web.Request) -> dict[str, Any]:
    return parse_body(await read_body(request))


def call_for(op: Op, body: dict[str, Any]) -> Call:
    """An OpenAI request body as the surface-neutral call (the OpenAI body *is* the neutral shape)."""
    stream = op != "embeddings" and body.get("stream") is True
    opts = body.get("stream_options")
    want_usage = stream and isinstance(opts, dict) and bool(opts.get("include_usage"))
    if not stream:
        body.pop("stream_options", None)  # vLLM rejects it on non-streamed requests
    return Call(op=op, model=body["model"], body=body, stream=stream, want_usage=want_usage)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await _read(request)
    check_chat(body)
    return await serve(request, OPENAI, call_for("chat", body))


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _read(request)
    check_completions(body)
    return await serve(request, OPENAI, call_for("completions", body))


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await _read(request)
    check_embeddings(body)
    return await serve(request, OPENAI, call_for("embeddings", body))


def _model_card(mid: str, entries: list[ModelCard]) -> dict[str, Any]:
    """A model of the catalog as ``/v1/models`` lists it: the OpenAI fields, and where it is held."""
    first = entries[0]
    ctx = max((e.context_length for e in entries if e.context_length), default=None)
    loaded = [e.loaded for e in entries if e.loaded is not None]
    described = {"family": first.family, "parameter_size": first.parameter_size, "quantization": first.quantization}
    return {
        "id": mid,
        "object": "model",
        "created": first.created or 0,
        "owned_by": first.owned_by or "quorum",
        "context_length": ctx,
        "loaded": any(loaded) if loaded else None,
        "engines": sorted({e.engine for e in entries}),
        "nodes": sorted({e.node for e in entries}),
        "aliases": sorted({a for e in entries for a in e.names()} - {mid}),
        "holders": sorted(
            (
                {"node": e.node, "engine": e.holder or e.engine, "id": e.id}
                | ({"helpers": list(e.helpers)} if e.helpers else {})  # a sharded holder (cluster/sharding.py)
                for e in entries
            ),
            key=lambda h: (h["node"], h["engine"], h["id"]),
        ),
        **{k: v for k, v in described.items() if v},
        **_grouped(entries),
    }


def _grouped(entries: list[ModelCard]) -> dict[str, Any]:
    """Why the holders are one model, where they call it differently (``lineage.py``): what they agree on."""
    lineages = [e.lineage for e in entries if e.lineage is not None]
    if len({e.id for e in entries}) < 2 or not lineages:
        return {}
    first = lineages[0]
    return {
        "lineage": {
            "family": first.family,
            "size": first.size,
            "variant": first.variant,
            "quantizations": sorted({q.quantization or q.format or "unknown" for q in lineages}),
            "why": "each holder's engine reports this family, size and variant (lineage.py)",
        }
    }


def _cards(view: CatalogView) -> dict[str, dict[str, Any]]:
    return {mid: _model_card(mid, entries) for mid, entries in view.by_id.items()}


def _list_body(view: CatalogView) -> bytes:
    return _encode({"object": "list", "data": list(view.memo("openai.cards", _cards).values())})


async def list_models(request: web.Request) -> web.Response:
    """The catalog's cards, encoded once per catalog change (and per scope set: a scoped key sees its own)."""
    request[DRAFT].asked(OPENAI.name, "models")
    body = visible_catalog(request).memo("openai.models", _list_body)
    return web.Response(body=body, content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    request[DRAFT].asked(OPENAI.name, "model", name)
    view = visible_catalog(request)
    mid = view.find(name)
    if mid is None:  # a model a scoped key may not use: as if it did not exist
        raise model_not_found(name, view)
    return web.Response(body=_encode(view.memo("openai.cards", _cards)[mid]), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """Alive. The node's name and load only for a caller it knows (``TRUSTED``, a peer): a stranger is
    let in here without a key, and learns nothing else."""
    if not request.get(TRUSTED) and request.get(PEER) is None:
        return web.json_response({"status": "ok"})
    app = request.app
    return web.json_response(
        {
            "status": "ok",
            "node": app[NAME],
            # for soak tests and monitoring: what a leak would make grow
            "in_flight": len(app[INFLIGHT]),
            "connections": app[LIMITS].open_connections(),
            "tasks": len(asyncio.all_tasks()),
        }
    )


async def ready(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    engines = [
        {
            "name": b.name,
            "kind": b.kind,
            "state": b.state.value,
            "models": len(b.models),
            "load": b.load,
            "error": b.last_error,
        }
        for b in registry.backends.values()
    ] + [
        {"name": name, "kind": "llamacpp", "state": "starting", "models": 0, "error": None} for name in registry.pending
    ]
    if registry.ready():
        return web.json_response({"status": "ready", "engines": engines})
    return web.json_response(
        {
            "status": "not_ready",
            "engines": engines,
            "error": {
                "message": "No engine is ready yet",
                "type": "unavailable_error",
                "param": None,
                "code": "not_ready",
            },
        },
        status=503,
        headers={"Retry-After": "2"},
    )


def routes() -> list[web.RouteDef]:
    return [
        OPENAI.route("GET", "/v1/models", list_models),
        OPENAI.route("GET", "/v1/models/{model:.+}", get_model),
        OPENAI.route("POST", "/v1/chat/completions", chat),
        OPENAI.route("POST", "/v1/completions", completions),
        OPENAI.route("POST", "/v1/embeddings", embeddings),
        web.get("/health", health),
        web.get("/ready", ready),
        # base_url set without /v1 (a common mistake llama-server forgives): the same answers
        OPENAI.route("GET", "/models", list_models),
        OPENAI.route("GET", "/models/{model:.+}", get_model),
        OPENAI.route("POST", "/chat/completions", chat),
        OPENAI.route("POST", "/completions", completions),
        OPENAI.route("POST", "/embeddings", embeddings),
    ]
