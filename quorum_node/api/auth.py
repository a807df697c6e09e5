"""Who may call: API keys on the request (the trust rule itself is ``app.make_trust_middleware``).

A client presents a key as ``Authorization: Bearer KEY`` (the openai SDK's
``api_key``) or ``x-api-key: KEY`` (the Anthropic SDK's). The key is looked up
by its hash in the node's ``KeyStore`` and never goes further: not into a log
line, not to an engine, not to a peer (a forwarded request carries the key's
*id*, signed). What a key may do is checked where it is known:

- rate (per key, per node: a token bucket of ``rate_per_min``, bursts up to a
  minute's worth) in the trust middleware, for every request → 429;
- model scopes in ``serve`` (``check_scope``), before the router → 403;
- admin rights for every route under ``/quorum/admin/`` (keys, usage, fleet,
  events …): ``require_admin``, called once, by the trust middleware, for
  any route of that prefix → 403.
"""

from __future__ import annotations

import math

from aiohttp import web

from ..control.keys import KEY_PREFIX, Grant, KeyStore
from ..errors import Forbidden, RateLimited, Unauthorized
from .state import API_KEY, PEER

__all__ = ["ADMIN_PREFIX", "check_scope", "grant_for", "is_admin_route", "presented_key", "require_admin"]

ADMIN_PREFIX = "/quorum/admin/"

_REASONS = {
    "unknown": ("This API key is not valid", "invalid_api_key"),
    "expired": ("This API key has expired", "expired_api_key"),
    "revoked": ("This API key has been revoked", "revoked_api_key"),
}


def presented_key(request: web.Request) -> str | None:
    """The key the client sent, if any (``Authorization: Bearer`` first, then ``x-api-key``)."""
    headers = request.headers
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def grant_for(store: KeyStore, secret: str, *, loopback_trusted: bool) -> Grant | None:
    """The grant of a presented key, or None where the caller is trusted without one.

    A caller trusted without a key (loopback, no ``--require-key``) may send
    anything as its SDK's api_key ("sk-no-key-required"): only a string that
    looks like a Quorum key (``qk_…``) is checked, and then it must be valid.
    Raises ``Unauthorized`` (wrong, expired or revoked key) or ``RateLimited``.
    """
    if loopback_trusted and not secret.startswith(KEY_PREFIX):
        return None
    grant, reason = store.lookup(secret)
    if grant is None:
        message, code = _REASONS[reason]
        e = Unauthorized(message, code=code)
        e.headers["Connection"] = "close"  # its body is never read
        raise e
    return grant


def charge(grant: Grant, store: KeyStore) -> None:
    """Spend one request of the key's rate on this node, or refuse with 429 and ``Retry-After``."""
    wait_s = grant.take(store.monotonic())
    if wait_s > 0:
        e = RateLimited(
            f"This API key is over its rate of {grant.info.rate_per_min} requests a minute (on this "
            f"node); retry in {math.ceil(wait_s)} s",
            retry_after_s=math.ceil(wait_s),
        )
        e.headers["Connection"] = "close"  # its body is never read
        raise e


def check_scope(request: web.Request, model: str) -> None:
    """403 if the request's key is scoped to other models (µs: the globs are compiled once per key)."""
    grant = request.get(API_KEY)
    if grant is not None and not grant.allows(model):
        raise Forbidden(
            f"This API key may not use the model {model!r}", param="model", code="model_not_allowed", retryable=False
        )


def is_admin_route(request: web.Request) -> bool:
    """Whether the request matched a route of the admin API (by the route it matched, not the raw path)."""
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical.startswith(ADMIN_PREFIX)


def require_admin(request: web.Request) -> None:
    """The admin API is for the node's admins: loopback callers it trusts, and keys made with ``admin``.

    The trust middleware calls it for every admin route, once the caller is
    known (a handler never has to).
    """
    grant = request.get(API_KEY)
    if grant is not None:
        if not grant.admin:
            raise Forbidden(
                "This API key may not use the admin API (/quorum/admin/...): make one with "
                "`quorum-node keys create --admin` for that",
                code="not_admin",
                retryable=False,
            )
        return
    if request.get(PEER) is not None:
        raise Forbidden("Peers do not use the admin API", code="not_admin", retryable=False)
    # Neither key nor peer: the trust middleware let it in as a trusted loopback caller.
