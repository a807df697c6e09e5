"""The aiohttp application: routes, the trust rule, errors in the OpenAI shape."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from ..cluster.messages import HOP_HEADER, KEY_HEADER
from ..control import admin_token
from ..control.admin_token import ADMIN_HEADER
from ..errors import ApiError, NotFound, PayloadTooLarge, Unauthorized
from ..names import is_loopback
from ..records import Draft
from . import admin, admin_keys, anthropic, cors, dashboard, ollama, openai, peer, responses
from .auth import charge, grant_for, is_admin_route, presented_key, require_admin
from .state import (
    ADDRESS,
    ANSWER_BUDGET,
    API_KEY,
    CATALOG,
    CLUSTER,
    DRAFT,
    INFLIGHT,
    KEYS,
    LEDGER,
    LIMITS,
    METRICS,
    NAME,
    PEER,
    PREPARED,
    RECORDS,
    REGISTRY,
    REQUEST_ID,
    ROUTER,
    SETTINGS,
    SHARDING,
    TRUSTED,
    Parts,
    request_id_for,
)
from .surface import OPENAI, surface_of

__all__ = ["create_app", "error_response", "is_loopback"]

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        return ApiError(
            f"Method {request.method} is not allowed on {request.path}",
            status=405,
            type_="invalid_request_error",
            code="method_not_allowed",
            headers={"Allow": allowed} if allowed else None,
        )
    if e.status == 413:
        limit = request.app[SETTINGS].max_body_bytes
        return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes", code="body_too_large")
    return ApiError(e.reason, status=e.status, type_="invalid_request_error")


def make_errors_middleware(parts: Parts) -> Middleware:
    records = parts.records
    name = parts.name

    @web.middleware
    async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure leaves in its surface's error envelope; no traceback reaches a client.

        Outermost: it names the request (``X-Request-Id``, the client's own if
        it sent a sane one), so every answer, errors included, carries its id;
        and it opens the request's record draft and seals it if the request
        path did not (refusals, failures, answers that are not served ones).
        """
        rid = request[REQUEST_ID] = request_id_for(request.headers.get("X-Request-Id"))
        draft = request[DRAFT] = Draft(
            time=time.time(),
            t0=time.perf_counter(),
            request_id=rid,
            node=name,
            method=request.method,
            path=request.path,
            remote=request.remote,
        )
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except ApiError as e:
            status = e.status
            draft.error = e.message
            return error_response(e, request)
        except web.HTTPException as e:
            if e.status < 400:
                status = e.status
                raise
            err = _http_error(request, e)
            status = err.status
            draft.error = err.message
            return error_response(err, request)
        except (ConnectionError, asyncio.CancelledError):
            status = 499
            raise
        except Exception as e:
            log.exception("handler_crashed", path=request.path, request_id=rid)
            draft.error = f"{type(e).__name__}: {e}"
            return _internal_error(request)
        finally:
            if draft.sealed is None and (draft.surface is not None or status >= 400):
                records.seal_nowait(draft, status)

    return errors_middleware


def make_trust_middleware(parts: Parts) -> Middleware:
    keys = parts.keys
    require_key = parts.settings.require_key
    cluster = parts.cluster
    own_token = parts.admin_token

    @web.middleware
    async def trust_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Who may call: members by their link, apps by API key, loopback without one (unless --require-key).

        A member is whoever its link proved: the TLS client certificate on the
        peer port (a current member's, ``cluster/tls.py``), or the Noise session
        a relayed request came through (``cluster/pipe.py``). Its requests are
        never forwarded on; its ``X-Quorum-Key`` says which key the entry node
        served it for. On the peer port nobody else gets further than asking to
        join; on the public port a request that claims to be a peer's is refused.
        A key (``Authorization: Bearer`` or ``x-api-key``) is checked and charged
        against its rate here; its model scopes are checked in ``serve``. Every
        route under ``/quorum/admin/`` is for the node's admins only (trusted
        loopback callers, admin keys, and the node's own user with its admin
        token, ``X-Quorum-Admin``, from loopback only): checked here, for all
        of them at once. A 401 here is no record (``_refused``).
        """
        headers = request.headers
        if cluster is not None:
            peer = cluster.peer_of(request)  # the member its link proved: TLS certificate, or Noise session
            if peer is not None:
                request[PEER] = peer
                draft = request[DRAFT]
                draft.peer = peer
                key_id = headers.get(KEY_HEADER, "")
                if key_id and _KEY_ID_RE.fullmatch(key_id):
                    draft.key_id = key_id
                    draft.key_name = keys.name_of(key_id)
                if is_admin_route(request):
                    require_admin(request)
                return await handler(request)
            if cluster.peer_port_tls(request) is not None:
                # no member's certificate: a machine with an invite, or one introducing a member's records
                if request.method == "POST" and request.path in _OPEN_PEER_PATHS:
                    return await handler(request)
                raise _refused(request, "This port is for the cluster's members", reason="not_a_member")
        if HOP_HEADER in headers or _NODE_ID_HEADER in headers:
            raise _refused(request, "Requests between nodes go to the peer port, over mutual TLS", reason="peer_claim")
        if getattr(request.match_info.handler, "public", False) and request.method in ("GET", "HEAD"):
            return await handler(request)  # the dashboard's page and assets: no data, they ask for the key
        loopback = is_loopback(request.remote)
        token = headers.get(ADMIN_HEADER)
        if (
            token is not None
            and loopback
            and own_token is not None
            and is_admin_route(request)
            and admin_token.matches(own_token, token)
        ):
            request[TRUSTED] = True
            return await handler(request)  # the node's own user: only it can read the token's file
        trusted = not require_key and loopback and local_host(headers.get("Host"))
        secret = presented_key(request)
        if secret is not None:
            try:
                grant = grant_for(keys, secret, loopback_trusted=trusted)
            except Unauthorized as e:
                raise _refused(request, e.message, reason="invalid_key", error=e) from None
            if grant is not None:
                request[API_KEY] = grant
                request[TRUSTED] = True
                draft = request[DRAFT]
                draft.key_id = grant.id
                draft.key_name = grant.name
                charge(grant, keys)
                if is_admin_route(request):
                    require_admin(request)
                return await handler(request)
        if trusted:
            request[TRUSTED] = True
            return await handler(request)  # a trusted loopback caller is the node's admin
        if request.method == "GET" and request.path == "/health":
            return await handler(request)  # a stranger learns that the node is alive, nothing else
        if token is not None:
            raise _refused(
                request,
                "The admin token (X-Quorum-Admin) is not this node's, or was sent from another "
                "machine or for a path outside /quorum/admin/",
                reason="admin_token",
            )
        raise _refused(
            request,
            "This node requires an API key (Authorization: Bearer qk_...) from every caller"
            if require_key
            else "This request needs an API key (Authorization: Bearer qk_...); quorum-node accepts "
            "requests without one only from loopback",
            reason="missing_key",
        )

    return trust_middleware


def _own_names() -> frozenset[str]:
    """``localhost`` and this machine's own names: its host name and FQDN, each with its first label."""
    names = {"localhost"}
    for name in (socket.gethostname(), socket.getfqdn()):
        name = name.strip().lower().rstrip(".")
        names.update((name, name.split(".", 1)[0]))
    names.discard("")
    return frozenset(names)


_LOCAL_NAMES = _own_names()


@functools.lru_cache(maxsize=4096)  # bounded: a hostile client sending endless names only evicts
def local_host(host: str | None) -> bool:
    """Whether a loopback caller addressed this machine by a local name (DNS rebinding guard).

    A web page whose own host name an attacker re-points at 127.0.0.1 makes the
    browser send requests from loopback, but with the attacker's name in
    ``Host``. Loopback trust goes only to requests for an IP address, for
    ``localhost`` (and ``*.localhost``), or for this machine's own name. Not
    to any other name of one label (``mybox``): LLMNR, mDNS and NetBIOS answer
    for those, and anyone on the LAN can answer first.
    """
    if not host:
        return True  # HTTP/1.0 without Host: no browser sends that
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    if name in _LOCAL_NAMES or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


_KEY_ID_RE = re.compile(r"k_[0-9a-f]{12}")
_NODE_ID_HEADER = "X-Quorum-Node-Id"
# a machine with an invite (its token, or a short code: cluster/codes.py), or one introducing a member's records
_OPEN_PEER_PATHS = frozenset(
    {"/quorum/v1/join", "/quorum/v1/members", "/quorum/v1/join/code/start", "/quorum/v1/join/code/finish"}
)


def _refused(
    request: web.Request, message: str, *, reason: str | None = None, error: ApiError | None = None
) -> ApiError:
    """The 401 for a caller that proved nothing (``error``, else one saying ``message``).

    Not a record: counted by ``reason`` and sampled into the log (``Records.refuse``),
    so a stranger sending them as fast as it can costs no disk.
    """
    if error is None:
        claims_peer = HOP_HEADER in request.headers or _NODE_ID_HEADER in request.headers
        error = Unauthorized(message, code="unauthorized" if claims_peer else "missing_api_key")
        error.headers["Connection"] = "close"  # its body is never read
    if reason is None:
        reason = "peer_claim" if HOP_HEADER in request.headers or _NODE_ID_HEADER in request.headers else "missing_key"
    request.app[RECORDS].refuse(request[DRAFT], reason)
    return error


def create_app(parts: Parts) -> web.Application:
    """The node's one application: every surface, the peer protocol, the admin API and the dashboard."""
    settings = parts.settings
    app = web.Application(
        # CORS before trust: a preflight is answered, and an unlisted Origin never gets loopback trust
        middlewares=[
            make_errors_middleware(parts),
            cors.make_cors_middleware(settings.cors_origins),
            make_trust_middleware(parts),
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[NAME] = parts.name
    app[ROUTER] = parts.router
    app[REGISTRY] = parts.registry
    app[CATALOG] = parts.catalog
    app[INFLIGHT] = parts.inflight
    app[LIMITS] = parts.limits
    app[RECORDS] = parts.records
    app[KEYS] = parts.keys
    app[CLUSTER] = parts.cluster
    app[LEDGER] = parts.ledger
    app[METRICS] = parts.metrics
    app[SHARDING] = parts.sharding
    app[ADDRESS] = parts.address
    app[ANSWER_BUDGET] = parts.answer_budget
    app.router.add_routes(openai.routes())
    app.router.add_routes(admin_keys.routes())  # /quorum/admin/keys
    responses.setup(app)  # /v1/responses (the Responses API) and its store
    anthropic.setup(app)  # /v1/messages (the Anthropic Messages API)
    app.router.add_routes(ollama.routes())  # the Ollama surface (/api/*, and / as Ollama answers it)
    app.router.add_routes(admin.routes(cluster=parts.cluster is not None))  # usage, recent records, members; /metrics
    if parts.cluster is not None:
        app.router.add_routes(peer.routes(parts.cluster))  # the peer protocol (/quorum/v1/*)
    dashboard.setup(app)  # the page; after the surfaces (``/`` is theirs)
    name = parts.name

    async def provenance(request: web.Request, response: web.StreamResponse) -> None:
        h = response.headers
        if "X-Quorum-Node" not in h:
            h["X-Quorum-Node"] = name
            h["X-Quorum-Route"] = "local"
        if "X-Request-Id" not in h:
            h["X-Request-Id"] = request.get(REQUEST_ID) or request_id_for(None)
        request[PREPARED] = True

    app.on_response_prepare.append(provenance)
    cors.setup(app)
    return app
