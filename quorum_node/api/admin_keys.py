"""The admin API for keys (the CLI and the dashboard use it).

- ``GET /quorum/admin/keys`` → ``{"keys": [KeyInfo, ...]}`` (never a key or its hash)
- ``POST /quorum/admin/keys`` ``{name, models?, expires?, rate?, admin?}`` →
  ``{"key": "qk_...", "info": KeyInfo}``: the only time the key is shown.
  ``expires`` is seconds or a duration (``"30d"``, ``"12h"``); ``rate`` is
  requests a minute.
- ``DELETE /quorum/admin/keys/{name_or_id}`` → ``{"info": KeyInfo}`` (revoked)

Allowed to loopback callers the node trusts (not with ``--require-key``), to
keys made with ``admin`` and to the node's admin token from loopback, like
every ``/quorum/admin/`` route (the trust middleware checks that,
``auth.require_admin``). A change is pushed to the peers at once.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import structlog
from aiohttp import web

from ..control.keys import MAX_PATTERNS, parse_duration
from ..errors import BadRequest
from .body import read_body
from .state import KEYS

__all__ = ["routes"]

log = structlog.get_logger(__name__)
_encode = msgspec.json.Encoder().encode


class CreateKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(max_length=256)]
    models: Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]], msgspec.Meta(max_length=MAX_PATTERNS)] = []
    expires: float | Annotated[str, msgspec.Meta(max_length=64)] | None = None
    rate: int | None = None
    admin: bool = False


_decode_create = msgspec.json.Decoder(CreateKey).decode


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=_encode(data), status=status, content_type="application/json")


async def list_keys(request: web.Request) -> web.Response:
    return _json({"keys": request.app[KEYS].list()})


async def create_key(request: web.Request) -> web.Response:
    try:
        body = _decode_create(await read_body(request))
    except msgspec.DecodeError as e:  # ValidationError included
        raise BadRequest(f"Invalid key request: {e}", code="invalid_request") from None
    except UnicodeDecodeError as e:  # msgspec's, for a string that is not UTF-8
        raise BadRequest(f"Invalid key request: not UTF-8 (byte {e.start})", code="invalid_request") from None
    expires_s: float | None = None
    if body.expires is not None:
        try:
            expires_s = parse_duration(str(body.expires))
        except ValueError as e:
            raise BadRequest(str(e), param="expires", code="invalid_expiry") from None
    info, secret = request.app[KEYS].create(
        body.name, models=body.models, expires_s=expires_s, rate_per_min=body.rate, admin=body.admin
    )
    log.info("api_key_created", key=info.name, key_id=info.id, models=info.models, admin=info.admin)
    return _json({"key": secret, "info": info}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    info = request.app[KEYS].revoke(request.match_info["name_or_id"])
    log.info("api_key_revoked", key=info.name, key_id=info.id)
    return _json({"info": info})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/quorum/admin/keys", list_keys),
        web.post("/quorum/admin/keys", create_key),
        web.delete("/quorum/admin/keys/{name_or_id}", revoke_key),
    ]
