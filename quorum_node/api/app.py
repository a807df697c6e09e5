"""The aiohttp application: routes, the trust rule, errors in the OpenAI shape."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from ..errors import ApiError, NotFound, PayloadTooLarge, Unauthorized, error_body
from . import openai
from .keys import NODE, ROUTER, SETTINGS

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["HOP_HEADER", "SIGNATURE_HEADER", "create_app", "is_loopback"]

HOP_HEADER = "X-Quorum-Hop"
SIGNATURE_HEADER = "X-Quorum-Signature"

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _error_response(e: ApiError) -> web.Response:
    return web.Response(status=e.status, body=e.body(), content_type="application/json", headers=e.headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI error body; no traceback reaches a client."""
    try:
        return await handler(request)
    except ApiError as e:
        return _error_response(e)
    except web.HTTPException as e:
        if e.status == 404:
            return _error_response(NotFound(f"Unknown path: {request.method} {request.path}", code="unknown_path"))
        if e.status == 405:
            allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
            return web.Response(
                status=405,
                body=error_body(f"Method {request.method} is not allowed on {request.path}", "invalid_request_error",
                                None, "method_not_allowed"),
                content_type="application/json",
                headers={"Allow": allowed} if allowed else None,
            )
        if e.status == 413:
            limit = request.app[SETTINGS].max_body_bytes
            return _error_response(PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes",
                                                   code="body_too_large"))
        if e.status < 400:
            raise
        return web.Response(status=e.status, body=error_body(e.reason, "invalid_request_error"),
                            content_type="application/json")
    except (ConnectionError, TimeoutError) as e:
        if request.get("prepared"):
            raise
        log.warning("request_failed", path=request.path, error=str(e))
        return web.Response(status=500, body=error_body("Internal error", "server_error"),
                            content_type="application/json")
    except Exception:
        log.exception("handler_crashed", path=request.path)
        return web.Response(status=500, body=error_body("Internal error in quorum-node (see its log)", "server_error"),
                            content_type="application/json")


def make_trust_middleware(node: Node) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def trust_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Loopback needs no key; any other caller must prove membership (or is refused).

        A request that claims to be a peer's (signature or hop header) is always
        verified, from loopback too: forwarded requests are never forwarded on.
        """
        claims_peer = SIGNATURE_HEADER in request.headers or HOP_HEADER in request.headers
        if not claims_peer and is_loopback(request.remote):
            return await handler(request)
        if node.cluster is not None:
            peer = await node.cluster.authenticate(request)
            if peer is not None:
                request["peer"] = peer
                return await handler(request)
        log.warning("unauthenticated_request", remote=request.remote, path=request.path)
        raise Unauthorized(
            "This request needs a valid cluster signature; quorum-node accepts unauthenticated requests "
            "only from loopback",
            code="unauthorized",
        )

    return trust_middleware


def create_app(node: Node) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, make_trust_middleware(node)],
        client_max_size=node.settings.max_body_bytes,
    )
    app[NODE] = node
    app[ROUTER] = node.router
    app[SETTINGS] = node.settings
    app.router.add_routes(openai.routes())
    if node.cluster is not None:
        app.router.add_routes(node.cluster.routes())

    async def provenance(request: web.Request, response: web.StreamResponse) -> None:
        h = response.headers
        if "X-Quorum-Node" not in h:
            h["X-Quorum-Node"] = node.name
            h["X-Quorum-Route"] = "local"

    app.on_response_prepare.append(provenance)
    return app
