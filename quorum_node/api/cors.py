"""Browsers: CORS for an allow-list of origins, and no loopback trust for any other page.

A node trusts loopback callers without a key. A web page open in a browser
on the same machine is a loopback caller too, so without care any site could
drive the node from its visitors' browsers. This middleware runs before the
trust middleware and refuses (403) every request whose ``Origin`` is not in
``cors_origins`` — from loopback too — as well as browser requests that say
they come from another site (``Sec-Fetch-Site``) without an ``Origin``.
Requests without either header (SDKs, curl, peers) are not affected, nor
are the node's own pages (an ``Origin`` that is the node itself, addressed
by an IP literal or ``localhost``: never a host name, which a site could
DNS-rebind to 127.0.0.1).

For a listed origin it answers preflights (``OPTIONS`` with
``Access-Control-Request-Method``) itself, with 204 and the allow headers,
and adds ``Access-Control-Allow-Origin`` (the origin itself, with ``Vary:
Origin``) and ``Access-Control-Expose-Headers`` to every answer, streamed or
not. ``*`` allows every origin: any page the machine's browser opens may use
the node's loopback trust, as ``OLLAMA_ORIGINS=*`` does for Ollama.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..errors import ApiError

__all__ = ["make_cors_middleware", "setup"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOWED: web.RequestKey[str] = web.RequestKey("cors_origin", str)  # this request's allowed Origin
_METHODS = "GET, POST, DELETE, OPTIONS"
_EXPOSE = "X-Quorum-Node, X-Quorum-Route, X-Request-Id, Retry-After"
_DEFAULT_HEADERS = "Authorization, Content-Type, X-Api-Key, Anthropic-Version, X-Request-Id"
_MAX_AGE = "600"


def _same_origin(request: web.Request, origin: str) -> bool:
    """Whether ``origin`` is the node itself, as addressed by an IP literal or ``localhost``.

    A host *name* could be DNS-rebound to 127.0.0.1 by any site, so a page
    served under one is never taken for the node's own.
    """
    host = request.host
    if origin != f"{request.scheme}://{host}":
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _forbidden(message: str) -> ApiError:
    return ApiError(message, status=403, type_="permission_error", code="origin_not_allowed", retryable=False)


def make_cors_middleware(origins: Iterable[str]) -> Middleware:
    allowed = frozenset(origins)
    any_origin = "*" in allowed

    @web.middleware
    async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            site = request.headers.get("Sec-Fetch-Site")
            if site in ("cross-site", "same-site") and not any_origin:
                raise _forbidden(
                    "Requests from other sites' pages are refused; list the page's origin in "
                    "cors_origins (--cors-origins) to allow it"
                )
            return await handler(request)
        if origin not in allowed and _same_origin(request, origin):
            return await handler(request)  # the node's own pages (the dashboard): not cross-origin
        if not (any_origin or origin in allowed):
            raise _forbidden(
                f"Origin {origin!r} is not allowed; list it in cors_origins (--cors-origins) "
                "to let that page use this node"
            )
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            asked = request.headers.get("Access-Control-Request-Headers")
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": _METHODS,
                    # the origin is trusted: whatever headers its client sends (the SDKs add their own)
                    "Access-Control-Allow-Headers": asked or _DEFAULT_HEADERS,
                    "Access-Control-Max-Age": _MAX_AGE,
                    "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
                },
            )
        request[ALLOWED] = origin
        return await handler(request)

    return cors_middleware


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.get(ALLOWED)
    if origin is not None:
        h = response.headers
        h["Access-Control-Allow-Origin"] = origin
        h["Access-Control-Expose-Headers"] = _EXPOSE
        h.add("Vary", "Origin")


def setup(app: web.Application) -> None:
    """The response half: the CORS headers on every answer to an allowed origin, streamed ones too."""
    app.on_response_prepare.append(_add_headers)
