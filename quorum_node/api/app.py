"""The aiohttp application: routes, the trust rule, errors in the OpenAI shape."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from ..cluster.signing import HEADER_SIGNATURE, HOP_HEADER
from ..control import metrics, usage
from ..errors import ApiError, NotFound, PayloadTooLarge, Unauthorized
from ..records import Draft
from . import admin_keys, anthropic, cors, ollama, openai, responses
from .auth import charge, grant_for, is_admin_route, presented_key, require_admin
from .body import PEER_AUTH
from .keys import API_KEY, DRAFT, INFLIGHT, NODE, PEER, PREPARED, REQUEST_ID, ROUTER, SETTINGS, request_id_for
from .surface import OPENAI, surface_of

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["create_app", "error_response", "is_loopback"]

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@functools.lru_cache(maxsize=4096)  # asked several times per request, of a handful of addresses
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


def error_response(e: ApiError, request: web.Request | None = None) -> web.Response:
    """An ``ApiError`` as the answer, in the envelope of the surface the request was for."""
    return (surface_of(request) if request is not None else OPENAI).error_response(e)


def _internal_error(request: web.Request) -> web.StreamResponse:
    if request.get(PREPARED):
        # Part of the answer is on the wire: a second response would corrupt it. Close instead.
        raise ConnectionResetError("the handler failed after its response began")
    resp = error_response(ApiError("Internal error in quorum-node (see its log)", code="internal_error"), request)
    resp.headers.pop("x-should-retry", None)
    return resp


def _http_error(request: web.Request, e: web.HTTPException) -> ApiError:
    if e.status == 404:
        return NotFound(f"Unknown path: {request.method} {request.path}", code="unknown_path")
    if e.status == 405:
        allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
        return ApiError(f"Method {request.method} is not allowed on {request.path}", status=405,
                        type_="invalid_request_error", code="method_not_allowed",
                        headers={"Allow": allowed} if allowed else None)
    if e.status == 413:
        limit = request.app[SETTINGS].max_body_bytes
        return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes", code="body_too_large")
    return ApiError(e.reason, status=e.status, type_="invalid_request_error")


def make_errors_middleware(node: Node) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    records = node.records

    @web.middleware
    async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure leaves in its surface's error envelope; no traceback reaches a client.

        Outermost: it names the request (``X-Request-Id``, the client's own if
        it sent a sane one), so every answer, errors included, carries its id;
        and it opens the request's record draft and seals it if the request
        path did not (refusals, failures, answers that are not served ones).
        """
        rid = request[REQUEST_ID] = request_id_for(request.headers.get("X-Request-Id"))
        draft = request[DRAFT] = Draft(request_id=rid, node=node.name, method=request.method, path=request.path,
                                       surface=None, operation=None, remote=request.remote)
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except ApiError as e:
            status = e.status
            draft.set(error=e.message)
            return error_response(e, request)
        except web.HTTPException as e:
            if e.status < 400:
                status = e.status
                raise
            err = _http_error(request, e)
            status = err.status
            draft.set(error=err.message)
            return error_response(err, request)
        except (ConnectionError, asyncio.CancelledError):
            status = 499
            raise
        except Exception as e:
            log.exception("handler_crashed", path=request.path, request_id=rid)
            draft.set(error=f"{type(e).__name__}: {e}")
            return _internal_error(request)
        finally:
            if draft.sealed is None and (draft.get("surface") is not None or status >= 400):
                records.seal_nowait(draft, status)

    return errors_middleware


def make_trust_middleware(node: Node) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    keys = node.keys
    require_key = node.settings.require_key

    @web.middleware
    async def trust_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Who may call: peers by signature, apps by API key, loopback without one (unless --require-key).

        A request that claims to be a peer's (signature or hop header) is always
        verified, from loopback too: forwarded requests are never forwarded on;
        its signed ``X-Quorum-Key`` says which key the entry node served it for.
        A key (``Authorization: Bearer`` or ``x-api-key``) is checked and charged
        against its rate here; its model scopes are checked in ``serve``. Every
        route under ``/quorum/admin/`` is for the node's admins only (trusted
        loopback callers, admin keys): checked here, for all of them at once.
        """
        headers = request.headers
        claims_peer = HEADER_SIGNATURE in headers or HOP_HEADER in headers
        if getattr(request.match_info.handler, "public", False) and request.method in ("GET", "HEAD"):
            return await handler(request)  # the dashboard's page and assets: no data, they ask for the key
        if claims_peer:
            if node.cluster is not None:
                result = node.cluster.authenticate(request)  # from the head alone: no body is read for strangers
                if result.ok:
                    request[PEER] = result.node_id
                    request[PEER_AUTH] = result
                    draft = request[DRAFT]
                    draft.set(peer=result.node_id)
                    if result.key_id:
                        draft.set(key_id=result.key_id, key_name=keys.name_of(result.key_id))
                    if is_admin_route(request):
                        require_admin(request)
                    return await handler(request)
            raise _refused(request, "This request needs a valid cluster signature")
        trusted = not require_key and is_loopback(request.remote) and local_host(headers.get("Host"))
        secret = presented_key(request)
        if secret is not None:
            grant = grant_for(keys, secret, loopback_trusted=trusted)
            if grant is not None:
                request[API_KEY] = grant
                request[DRAFT].set(key_id=grant.id, key_name=grant.name)
                charge(grant, keys)
                if is_admin_route(request):
                    require_admin(request)
                return await handler(request)
        if trusted or (request.method == "GET" and request.path == "/health"):
            return await handler(request)  # a trusted loopback caller is the node's admin
        raise _refused(request, "This node requires an API key (Authorization: Bearer qk_...) from every caller"
                       if require_key else
                       "This request needs an API key (Authorization: Bearer qk_...); quorum-node accepts "
                       "requests without one only from loopback")

    return trust_middleware


_LOCAL_NAMES = frozenset({"localhost", socket.gethostname().lower(), socket.getfqdn().lower()})


@functools.lru_cache(maxsize=4096)  # bounded: a hostile client sending endless names only evicts
def local_host(host: str | None) -> bool:
    """Whether a loopback caller addressed this machine by a local name (DNS rebinding guard).

    A web page whose own host name an attacker re-points at 127.0.0.1 makes the
    browser send requests from loopback, but with the attacker's name in
    ``Host``. Loopback trust goes only to requests for an IP address, for
    ``localhost`` (and ``*.localhost``), for this machine's own name, or for a
    name of one label (``mybox``: no registered domain).
    """
    if not host:
        return True  # HTTP/1.0 without Host: no browser sends that
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    if name in _LOCAL_NAMES or name.endswith(".localhost") or "." not in name:
        return True  # a rebinding attacker's name is a registered domain: it has a dot
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _refused(request: web.Request, message: str) -> ApiError:
    log.warning("unauthenticated_request", remote=request.remote, path=request.path)
    e = Unauthorized(message, code="missing_api_key" if HEADER_SIGNATURE not in request.headers else "unauthorized")
    e.headers["Connection"] = "close"  # its body is never read
    return e


def create_app(node: Node) -> web.Application:
    app = web.Application(
        # CORS before trust: a preflight is answered, and an unlisted Origin never gets loopback trust
        middlewares=[make_errors_middleware(node), cors.make_cors_middleware(node.settings.cors_origins),
                     make_trust_middleware(node)],
        client_max_size=node.settings.max_body_bytes,
    )
    app[NODE] = node
    app[ROUTER] = node.router
    app[SETTINGS] = node.settings
    app[INFLIGHT] = node.inflight
    app.router.add_routes(openai.routes())
    app.router.add_routes(admin_keys.routes())  # /quorum/admin/keys (api/admin_keys.py)
    responses.setup(app)  # /v1/responses (the Responses API) and its store
    anthropic.setup(app)  # /v1/messages (the Anthropic Messages API)
    app.router.add_routes(ollama.routes())  # the Ollama surface (/api/*, and / as Ollama answers it)
    app.router.add_routes([*usage.routes(), *metrics.routes()])  # the usage ledger's endpoints, /metrics
    if node.cluster is not None:
        app.router.add_routes(node.cluster.routes())
    from ..dashboard import setup as dashboard_setup  # the page; after the surfaces (``/`` is theirs)

    dashboard_setup(app)

    async def provenance(request: web.Request, response: web.StreamResponse) -> None:
        h = response.headers
        if "X-Quorum-Node" not in h:
            h["X-Quorum-Node"] = node.name
            h["X-Quorum-Route"] = "local"
        if "X-Request-Id" not in h:
            h["X-Request-Id"] = request.get(REQUEST_ID) or request_id_for(None)
        request[PREPARED] = True

    app.on_response_prepare.append(provenance)
    cors.setup(app)
    return app
