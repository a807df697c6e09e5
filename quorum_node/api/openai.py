"""The OpenAI surface: /v1/models, chat, completions, embeddings, health."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import structlog
from aiohttp import web

from ..backends.base import JsonReply, Op, StreamReply
from ..errors import ApiError, NotFound, StreamBroken, Unavailable
from ..router import Opened
from .body import read_body
from .keys import INFLIGHT, NODE, PEER, REQUEST_ID, ROUTER, cluster_models
from .validate import check_chat, check_completions, check_embeddings, parse_body

__all__ = ["routes"]

log = structlog.get_logger("quorum_node.request")
_encode = msgspec.json.Encoder().encode

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _SSEResponse(web.StreamResponse):
    # Send the head together with the first event (one packet, not two); an
    # aiohttp knob, harmless if it goes away.
    _send_headers_immediately = False


def _frame(batch: list[bytes]) -> bytes:
    if len(batch) == 1:
        return b"data: " + batch[0] + b"\n\n"
    return b"".join(b"data: " + ev + b"\n\n" for ev in batch)


async def _read(request: web.Request) -> dict[str, Any]:
    return parse_body(await read_body(request))


async def chat(request: web.Request) -> web.StreamResponse:
    body = await _read(request)
    check_chat(body)
    return await _serve(request, "chat", body)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _read(request)
    check_completions(body)
    return await _serve(request, "completions", body)


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await _read(request)
    check_embeddings(body)
    return await _serve(request, "embeddings", body)


def _error_event(message: str, code: str | None, type_: str = "server_error") -> bytes:
    return b"data: " + _encode({"error": {"message": message, "type": type_, "param": None, "code": code}}) + b"\n\n"


async def _serve(request: web.Request, op: Op, body: dict[str, Any]) -> web.StreamResponse:
    t0 = time.perf_counter()
    request_id = request[REQUEST_ID]
    model = body["model"]
    stream = op != "embeddings" and body.get("stream") is True
    opts = body.get("stream_options")
    want_usage = stream and isinstance(opts, dict) and bool(opts.get("include_usage"))
    if not stream:
        body.pop("stream_options", None)  # vLLM rejects it on non-streamed requests
    forwarded = request.get(PEER) is not None  # signed by a peer: serve here, never forward on
    router = request.app[ROUTER]
    inflight = request.app[INFLIGHT]
    task = inflight.enter()
    status = 200
    opened: Opened | None = None
    error: str | None = None
    attempts = 0
    try:
        try:
            opened = await router.open(op, model, body, stream=stream, want_usage=want_usage, forwarded=forwarded)
        except asyncio.CancelledError:
            if inflight.is_cut(task):
                raise Unavailable("This node is shutting down; try again", code="node_stopping") from None
            raise
        headers = {
            "X-Quorum-Node": opened.target.node,
            "X-Quorum-Route": opened.target.route,
            "X-Request-Id": request_id,
        }
        reply = opened.reply
        if isinstance(reply, JsonReply):
            opened.target.end(True, opened.ttft_s)
            return web.Response(body=_encode(reply.payload), content_type="application/json", headers=headers)
        assert isinstance(reply, StreamReply)
        resp = _SSEResponse(headers={**SSE_HEADERS, **headers})
        ok: bool | None = None  # None: the client went away
        tail = b""
        try:
            await resp.prepare(request)
            if opened.first:
                await resp.write(_frame(opened.first))
            async for batch in reply:
                await resp.write(_frame(batch))
            tail = b"data: [DONE]\n\n"
            ok = True
        except StreamBroken as e:
            ok = False
            status, error = 502, e.message
            tail = _error_event(e.message, e.code)
        except ConnectionError:  # the client went away; the engine request is closed below
            status, error = 499, "client disconnected"
            return resp
        except asyncio.CancelledError:
            if not inflight.is_cut(task):
                status, error = 499, "client disconnected"
                raise
            status, error = 503, "cut by shutdown"
            tail = _error_event("This node is shutting down; the answer was cut short", "node_stopping",
                                "unavailable_error")
        except Exception as e:  # never a second response inside this one: end it with the error event
            log.exception("stream_failed", request_id=request_id)
            ok = False
            status, error = 500, f"{type(e).__name__}: {e}"
            tail = _error_event("Internal error in quorum-node (see its log)", "internal_error")
        finally:
            await reply.aclose()
            opened.target.end(ok, opened.ttft_s)
        try:
            await resp.write_eof(tail)  # the last event and the end of the body in one write
        except ConnectionError:
            status, error = 499, "client disconnected"
        return resp
    except ApiError as e:
        status, error = e.status, e.message
        attempts = getattr(e, "attempts", 0)  # the router says how many holders it tried
        raise
    except asyncio.CancelledError:
        status, error = 499, "client disconnected"
        raise
    except Exception as e:
        status, error = 500, f"{type(e).__name__}: {e}"
        raise
    finally:
        inflight.leave(task)
        usage = None
        if opened is not None:
            usage = opened.reply.usage if isinstance(opened.reply, JsonReply) else opened.reply.stats.usage
        log.info(
            "request",
            request_id=request_id,
            op=op,
            model=model,
            engine=opened.target.engine if opened else None,
            node=opened.target.node if opened else None,
            route=opened.target.route if opened else None,
            status=status,
            stream=stream,
            attempts=opened.attempts if opened else attempts,
            ttft_ms=round(opened.ttft_s * 1000, 2) if opened and opened.ttft_s is not None else None,
            tokens_in=usage.get("prompt_tokens") if isinstance(usage, dict) else None,
            tokens_out=(
                usage.get("completion_tokens")
                if isinstance(usage, dict)
                else (opened.reply.stats.chunks if opened and isinstance(opened.reply, StreamReply) else None)
            ),
            duration_ms=round((time.perf_counter() - t0) * 1000, 2),
            error=error,
        )


def _model_card(mid: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    first = entries[0]
    ctx = max((e["context_length"] for e in entries if e.get("context_length")), default=None)
    loaded = [e["loaded"] for e in entries if e.get("loaded") is not None]
    return {
        "id": mid,
        "object": "model",
        "created": first.get("created") or 0,
        "owned_by": first.get("owned_by") or "quorum",
        "context_length": ctx,
        "loaded": any(loaded) if loaded else None,
        "engines": sorted({e["engine"] for e in entries}),
        "nodes": sorted({e["node"] for e in entries}),
        "aliases": sorted({a for e in entries for a in e.get("aliases", ())} - {mid}),
        **({k: first[k] for k in ("family", "parameter_size", "quantization") if first.get(k)}),
    }


def _cards(request: web.Request) -> dict[str, dict[str, Any]]:
    by_id: dict[str, list[dict[str, Any]]] = {}
    for entry in cluster_models(request.app):
        by_id.setdefault(entry["id"], []).append(entry)
    return {mid: _model_card(mid, entries) for mid, entries in sorted(by_id.items())}


async def list_models(request: web.Request) -> web.Response:
    cards = list(_cards(request).values())
    return web.Response(body=_encode({"object": "list", "data": cards}), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    cards = _cards(request)
    card = cards.get(name) or next((c for c in cards.values() if name in c["aliases"]), None)
    if card is None:
        raise NotFound(
            f"The model `{name}` does not exist. Available models: {', '.join(cards) or 'none'}",
            param="model",
            code="model_not_found",
        )
    return web.Response(body=_encode(card), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response({
        "status": "ok", "node": node.name,
        # for soak tests and monitoring: what a leak would make grow
        "in_flight": len(node.inflight), "connections": node.limits.open_connections(),
        "tasks": len(asyncio.all_tasks()),
    })


async def ready(request: web.Request) -> web.Response:
    registry = request.app[NODE].registry
    engines = [
        {"name": b.name, "kind": b.kind, "state": b.state.value, "models": len(b.models), "load": b.load,
         "error": b.last_error}
        for b in registry.backends.values()
    ] + [{"name": name, "kind": "llamacpp", "state": "starting", "models": 0, "error": None} for name in registry.pending]
    if registry.ready():
        return web.json_response({"status": "ready", "engines": engines})
    return web.json_response(
        {"status": "not_ready", "engines": engines,
         "error": {"message": "No engine is ready yet", "type": "unavailable_error", "param": None, "code": "not_ready"}},
        status=503,
        headers={"Retry-After": "2"},
    )


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/models", list_models),
        web.get("/v1/models/{model:.+}", get_model),
        web.post("/v1/chat/completions", chat),
        web.post("/v1/completions", completions),
        web.post("/v1/embeddings", embeddings),
        web.get("/health", health),
        web.get("/ready", ready),
    ]

