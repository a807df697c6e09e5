"""Requests passed through, in the client's own API, to the engines that speak it.

The Responses and Messages surfaces translate every request to Chat
Completions (so every engine can answer it); where an engine of this
machine that holds the model serves the API itself (``Router.speaks``: its
adapter probed the route, ``backends/native.py``), the call also carries the
client's own request (``Call.native``). The router gives each engine the
form it serves best, so a retry may still land on an engine that does not
speak the API, or on a peer, and be translated. What a native engine answers
comes back checked by its adapter (model named by its public id, ids and
usage well formed, errors in the error tree: the same failure contract as a
translated answer), and the surface writes it as it came, through its
``native_answer`` / ``native_encoder``.

Passing through changes which engine's code reads the request, never which
requests are accepted: the surface checks and refuses a request exactly as
when it translates it, before it knows which form will be used.

Peers always get the translation: a peer's catalog does not say which APIs
its engines speak, and a forwarded request is Chat Completions.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from ..backends.base import Op
from ..backends.native import EVENT_TYPE
from ..errors import StreamBroken
from .state import ROUTER
from .surface import Native, StreamEncoder

__all__ = ["NativeStream", "frame", "native_form"]

_decode = msgspec.json.Decoder().decode


class _Kind(msgspec.Struct):
    type: str = "message"  # Responses and Messages events all name their type; SSE's default event name


_kind = msgspec.json.Decoder(_Kind).decode


def native_form(request: web.Request, op: Op, model: str, raw: bytes, edit: Any = None) -> Native | None:
    """The client's request (``raw``, already checked) for engines that serve ``op``; None if none holds ``model``.

    ``edit``: a function that changes the decoded body in place (the node's own state, e.g. a conversation).
    """
    if not request.app[ROUTER].speaks(model, op):
        return None
    body = _decode(raw)
    if edit is not None:
        edit(body)
    return Native(op=op, body=body)


def frame(raw: bytes, kind: str | None = None) -> bytes:
    """One native event (its JSON) as a server-sent event named by its ``type`` (``kind``, where known).

    The adapter has checked the type already (``backends/native.py``); one that is still no token (a
    newline in it would forge the events after it) ends the stream as a broken one: the client gets the
    surface's error event, never a forged one nor a silently shortened answer (the failure contract).
    """
    name = kind or _kind(raw).type
    if not EVENT_TYPE.match(name):
        raise StreamBroken(
            f"the engine sent an event whose type is no event name: {name[:100]!r}", code="malformed_event"
        )
    return b"event: " + name.encode() + b"\ndata: " + raw + b"\n\n"


class NativeStream(StreamEncoder):
    """A native stream, written as it came: the engine's events are the whole stream, start to end.

    Subclasses add the tail of a stream that broke, in their API's words.
    """

    def batch(self, events: list[bytes]) -> bytes:
        return b"".join(frame(raw) for raw in events)

    def done(self, stats: Any) -> bytes:
        return b""
