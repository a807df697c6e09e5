"""One request path, several surfaces (DESIGN.md, Seams).

A *surface* is an API a client speaks: OpenAI (``/v1/chat/completions`` …),
Ollama (``/api/chat`` …), the Responses and Messages APIs. Its handler
decodes the client's body and turns it into one surface-neutral ``Call``
(operation, model, an OpenAI-shaped body, stream or not); ``serve`` takes the
call through the router (local engine, LAN peer, relay peer), and hands back
what the engine said to the surface's *encoder*, which writes it in the
surface's own wire format. Below ``serve`` nothing knows which API the client
spoke.

What a surface provides:

- ``name``: goes into the request's record (``surface``).
- ``error_response(e)``: an ``ApiError`` in the surface's own error envelope.
  The errors middleware uses it for every error of a request to one of the
  surface's routes, including refusals that happen before its handler runs
  (401, 413, 429).
- ``answer(call, payload, headers)``: a whole (non-streamed) answer, from the
  OpenAI-shaped payload the engine gave.
- ``encoder(call)``: a ``StreamEncoder`` for one streamed answer: its headers,
  how a batch of OpenAI chunk events is written, the tail of a stream that
  ended well (it gets the stream's stats: usage, chunks) and the tail of one
  that broke after its first byte (which the surface's clients must recognise
  as an error, never as a short success).
- ``native_answer`` and ``native_encoder``: the same, for an answer an engine
  gave in the surface's own API, where the call carried the client's request
  in it (``Call.native``) and the router chose an engine that speaks it
  (``api/passthrough.py``). ``Opened.op`` tells which of the two came back.

Routes are bound to their surface with ``surface.route(...)``, so the errors
middleware can find the envelope from the matched handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import msgspec
import structlog
from aiohttp import web

from ..affinity import SESSION_HEADER, conversation_key
from ..backends.base import Caller, JsonReply, Op, StreamReply, StreamStats
from ..backends.budget import ANSWER_HOLD, Hold
from ..cluster.messages import AFFINITY_HEADER
from ..control import tokens
from ..errors import ApiError, StreamBroken, Unavailable
from ..names import safe_name
from ..records import Draft
from .auth import check_scope
from .state import ANSWER_BUDGET, API_KEY, DRAFT, INFLIGHT, PEER, RECORDS, REQUEST_ID, ROUTER, visible_catalog

__all__ = ["Call", "Native", "OpenAISurface", "OPENAI", "StreamEncoder", "Surface", "serve", "surface_of"]

_KEY_RE = re.compile(r"[0-9a-f]{32}")  # a conversation key, as affinity.conversation_key makes it

log = structlog.get_logger(__name__)
_encode = msgspec.json.Encoder().encode

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Native(msgspec.Struct, frozen=True, kw_only=True):
    """A request in the client's own API, for the engines that serve it (``backends.base.NATIVE_OPS``)."""

    op: Op  # "responses" | "messages" | "count_tokens"
    body: dict[str, Any]


class Call(msgspec.Struct, kw_only=True):
    """A request as the router sees it, whatever API the client spoke."""

    op: Op
    model: str
    body: dict[str, Any]  # OpenAI-shaped (Chat Completions, Completions or Embeddings)
    stream: bool = False
    want_usage: bool = False  # the client's OpenAI stream wants its usage chunk
    operation: str | None = None  # the surface's own name for it ("generate", "messages"); default: op
    native: Native | None = None  # the client's own request, passed through to an engine that speaks it


class StreamEncoder:
    """How one streamed answer is written: OpenAI SSE, the identity encoder."""

    headers: ClassVar[dict[str, str]] = {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    }

    def start(self) -> bytes:
        """Bytes before the first event (the Responses API's ``response.created``)."""
        return b""

    def batch(self, events: list[bytes]) -> bytes:
        """A batch of OpenAI chunk payloads (JSON bytes) as the surface's bytes."""
        if len(events) == 1:
            return b"data: " + events[0] + b"\n\n"
        return b"".join(b"data: " + ev + b"\n\n" for ev in events)

    def done(self, stats: StreamStats) -> bytes:
        """The tail of a stream that ended well."""
        return b"data: [DONE]\n\n"

    def error(self, message: str, code: str | None, type_: str) -> bytes:
        """The tail of a stream that broke after its first byte: an error the clients recognise."""
        return (
            b"data: " + _encode({"error": {"message": message, "type": type_, "param": None, "code": code}}) + b"\n\n"
        )


class Surface:
    """An API a client speaks. This base is the OpenAI surface; others override what differs."""

    name = "openai"

    def error_response(self, e: ApiError) -> web.Response:
        headers = dict(e.headers)
        close = headers.pop("Connection", None) == "close"
        if not e.retryable:
            headers["x-should-retry"] = "false"
        resp = web.Response(status=e.status, body=self.error_body(e), content_type="application/json", headers=headers)
        if close:
            resp.force_close()
        return resp

    def error_body(self, e: ApiError) -> bytes:
        return e.body()

    def answer(self, call: Call, payload: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        return web.Response(body=_encode(payload), content_type="application/json", headers=headers)

    def encoder(self, call: Call) -> StreamEncoder:
        return _SSE

    def native_answer(self, call: Call, payload: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        """A whole answer an engine gave to ``call.native``, in the surface's own API."""
        return web.Response(body=_encode(payload), content_type="application/json", headers=headers)

    def native_encoder(self, call: Call) -> StreamEncoder:
        """The encoder for a stream an engine gave to ``call.native`` (only surfaces that pass through have one)."""
        raise NotImplementedError(f"the {self.name} surface passes nothing through")

    def route(self, method: str, path: str, handler: Handler) -> web.RouteDef:
        """A route of this surface: its errors are answered in this surface's envelope."""
        return web.route(method, path, bind(self, handler))


def bind(surface: Surface, handler: Handler) -> Handler:
    async def bound(request: web.Request) -> web.StreamResponse:
        return await handler(request)

    bound.__name__ = getattr(handler, "__name__", "handler")
    bound.surface = surface  # type: ignore[attr-defined]
    return bound


class OpenAISurface(Surface):
    pass


OPENAI = OpenAISurface()
_SSE = StreamEncoder()

# Paths whose errors are in a surface's envelope even when no route matched
# (an unknown /api/... path is answered the way Ollama would). Filled in by
# the surfaces as they are added to the app.
PREFIXES: list[tuple[str, Surface]] = []


def surface_of(request: web.Request) -> Surface:
    handler = getattr(request.match_info, "handler", None)
    surface = getattr(handler, "surface", None)  # set by ``bind``: always a Surface
    if isinstance(surface, Surface):
        return surface
    path = request.path
    for prefix, s in PREFIXES:
        if path.startswith(prefix):
            return s
    return OPENAI


class _SSEResponse(web.StreamResponse):
    # Send the head together with the first event (one packet, not two); an
    # aiohttp knob, harmless if it goes away.
    _send_headers_immediately = False


def _affinity(request: web.Request, call: Call, forwarded: bool) -> str | None:
    """The request's conversation key (``affinity.py``): the entry node's, for a request a peer forwarded."""
    if forwarded:
        given = request.headers.get(AFFINITY_HEADER, "")
        if _KEY_RE.fullmatch(given):
            return given
    return conversation_key(call.body, request.headers.get(SESSION_HEADER))


async def serve(request: web.Request, surface: Surface, call: Call) -> web.StreamResponse:
    """Take ``call`` through the router and answer it through ``surface``.

    Fills the request's record draft with everything the request path knows
    (where it was served, tokens, time to first token, outcome) and seals it
    before the answer's last byte is written.
    """
    app = request.app
    draft = request[DRAFT]
    draft.surface = surface.name
    draft.operation = call.operation or call.op
    draft.model = call.model
    draft.stream = call.stream
    check_scope(request, call.model)  # 403 for a key scoped to other models (api/auth.py)
    forwarded = request.get(PEER) is not None  # signed by a peer: serve here, never forward on
    router = app[ROUTER]
    affinity = _affinity(request, call, forwarded) if router.affinity_bound is not None else None
    caller = Caller(request_id=request[REQUEST_ID], key_id=draft.key_id, affinity=affinity)
    inflight = app[INFLIGHT]
    records = app[RECORDS]
    records.started(draft)  # live until sealed (the dashboard's requests in flight)
    task = inflight.enter()
    # This request's share of the node's budget for whole answers (backends/budget.py): what reading
    # its answer takes is held until the answer is written, then given back, in the finally below.
    hold = Hold(app[ANSWER_BUDGET])
    held = ANSWER_HOLD.set(hold)
    try:
        try:
            native = (call.native.op, call.native.body) if call.native is not None else None
            grant = request.get(API_KEY)
            visible = visible_catalog(request) if grant is not None and grant.info.models else None
            opened = await router.open(
                call.op,
                call.model,
                call.body,
                stream=call.stream,
                want_usage=call.want_usage,
                forwarded=forwarded,
                caller=caller,
                native=native,
                visible=visible,
            )
        except asyncio.CancelledError:
            if inflight.is_cut(task):
                raise Unavailable("This node is shutting down; try again", code="node_stopping") from None
            raise
        except ApiError as e:
            draft.attempts = getattr(e, "attempts", 0)
            draft.error = e.message
            waited = getattr(e, "waited_s", None)  # refused by the admission queue, after waiting this long
            draft.queue_ms = round(waited * 1000, 3) if waited else None
            raise
        target = opened.target
        draft.serving_node = target.node
        draft.route = target.route
        draft.engine = target.engine
        draft.helpers = target.helpers
        draft.attempts = opened.attempts
        draft.queue_ms = round(opened.queued_s * 1000, 3) if opened.queued_s else None
        draft.ttft_ms = round(opened.ttft_s * 1000, 3) if opened.ttft_s is not None else None
        # A name that is no header value (a peer's, from its answer) must not cost the answer: names.py
        headers = {
            "X-Quorum-Node": safe_name(target.node, "unknown"),
            "X-Quorum-Route": target.route,
            "X-Request-Id": request[REQUEST_ID],
        }
        reply = opened.reply
        passed = opened.op != call.op  # the engine answered the client's own request (Call.native)
        if isinstance(reply, JsonReply):
            opened.finish(True, opened.ttft_s)
            _tokens(draft, reply.usage, None, call, reply.payload)
            resp = (surface.native_answer if passed else surface.answer)(call, reply.payload, headers)
            await records.seal(draft, resp.status)
            if hold.size:  # written here, so that its bytes are held until the client has them
                try:
                    await resp.prepare(request)
                    await resp.write_eof()
                except ConnectionError:
                    pass  # the client went away: nothing more to write
            return resp
        assert isinstance(reply, StreamReply)
        enc = surface.native_encoder(call) if passed else surface.encoder(call)
        resp = _SSEResponse(headers={**enc.headers, **headers})
        ok: bool | None = None  # None: the client went away
        status = 200
        tail = b""
        try:
            await resp.prepare(request)
            head = enc.start()
            if opened.first:
                head += enc.batch(opened.first)
            if head:
                await resp.write(head)
            async for batch in reply:
                out = enc.batch(batch)
                if out:
                    await resp.write(out)
            last = reply.stats.tail
            tail = (enc.batch(last) if last else b"") + enc.done(reply.stats)
            ok = True
        except StreamBroken as e:
            ok = False
            status = 502
            draft.error = e.message
            tail = enc.error(e.message, e.code, "server_error")
        except ConnectionError:  # the client went away; the engine request is closed below
            draft.error = "client disconnected"
            status = 499
        except asyncio.CancelledError:
            if not inflight.is_cut(task):
                draft.error = "client disconnected"
                records.seal_nowait(draft, 499)
                raise
            status = 503
            draft.error = "cut by shutdown"
            tail = enc.error(
                "This node is shutting down; the answer was cut short", "node_stopping", "unavailable_error"
            )
        except Exception as e:  # never a second response inside this one: end it with the error event
            log.exception("stream_failed", request_id=request[REQUEST_ID])
            ok = False
            status = 500
            draft.error = f"{type(e).__name__}: {e}"
            tail = enc.error("Internal error in quorum-node (see its log)", "internal_error", "server_error")
        finally:
            await reply.aclose()
            opened.finish(ok, opened.ttft_s)
        _tokens(draft, reply.stats.usage, reply.stats, call)
        if status == 499:
            records.seal_nowait(draft, 499)
            return resp
        await records.seal(draft, status)  # stored before the client sees the end
        with contextlib.suppress(ConnectionError):
            await resp.write_eof(tail)  # the last event and the end of the body in one write
        return resp
    finally:
        ANSWER_HOLD.reset(held)
        hold.release()
        inflight.leave(task)


def _tokens(
    draft: Draft, usage: Any, stats: StreamStats | None, call: Call, payload: dict[str, Any] | None = None
) -> None:
    """The record's tokens: the engine's usage, else an estimate, marked as one (``control/tokens.py``)."""
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        draft.prompt_tokens = p if isinstance(p, int) and not isinstance(p, bool) else None
        draft.completion_tokens = c if isinstance(c, int) and not isinstance(c, bool) else None
        return
    draft.prompt_tokens = tokens.prompt_tokens(call.op, call.body)
    draft.completion_tokens = stats.chunks if stats is not None else tokens.answer_tokens(call.op, payload or {})
    draft.tokens_estimated = True
