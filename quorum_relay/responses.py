"""Plain HTTP answers given from the WebSocket handshake (refusals, /health, /metrics)."""

from __future__ import annotations

import email.utils
import http

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Response

__all__ = ["error_response", "json_response", "response"]

_json = msgspec.json.Encoder().encode


def response(status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> Response:
    h = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-store"),
        ]
    )
    for k, v in (headers or {}).items():
        h[k] = v
    return Response(status, http.HTTPStatus(status).phrase, h, body)


def json_response(status: int, obj: object, headers: dict[str, str] | None = None) -> Response:
    return response(status, _json(obj), "application/json", headers)


def error_response(
    status: int,
    message: str,
    type_: str,
    *,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The error envelope ``{"error": {"message", "type", "param", "code"}}`` the node also speaks."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return json_response(status, body, headers)
