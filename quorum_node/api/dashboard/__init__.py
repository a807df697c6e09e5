"""The web dashboard: a page served by the node, and the admin endpoints it reads.

- ``GET /dashboard``: the page (``static/index.html``). ``GET /`` is the Ollama
  surface's ("Ollama is running"); it sends a browser (``Accept: text/html``) here.
- ``GET /dashboard/static/{name}``: its script, style sheet and icon. The
  assets ship inside the package: the page works offline, no CDN.
- ``GET /quorum/admin/fleet``: the fleet as JSON (``fleet.py``).
- ``GET /quorum/admin/events``: live events, SSE (``events.py``).

The page and its assets are public (they hold no data): off loopback the page
loads, then asks for a key, which it sends as ``Authorization: Bearer`` to the
admin endpoints. Those are behind the node's auth like every API, and like
every ``/quorum/admin/`` route (the trust middleware checks it for all) they
are for trusted loopback callers and admin keys only. The page is
served with a Content-Security-Policy that allows only its own origin, and no
inline script or style.
"""

from __future__ import annotations

import hashlib
import time
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web

from ..state import RECORDS
from .events import EventHub
from .fleet import FEATURES, fleet

__all__ = ["EVENTS", "setup"]

EVENTS: web.AppKey[EventHub] = web.AppKey("dashboard_events", EventHub)
_STARTED: web.AppKey[float] = web.AppKey("dashboard_started", float)
_encode = msgspec.json.Encoder().encode

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


class _Asset(msgspec.Struct, frozen=True):
    body: bytes
    content_type: str
    etag: str


def _load_assets() -> dict[str, _Asset]:
    out = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = entry.name[entry.name.rfind(".") :]
        if entry.is_file() and suffix in _TYPES:
            body = entry.read_bytes()
            out[entry.name] = _Asset(body, _TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    return out


_ASSETS = _load_assets()


def public(handler: Any) -> Any:
    """Mark a handler as needing no key or signature (the page and its assets hold no data)."""
    handler.public = True
    return handler


def _asset_response(request: web.Request, asset: _Asset) -> web.Response:
    headers = {**_PAGE_HEADERS, "ETag": asset.etag}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=asset.body,
        headers=headers,
        content_type=asset.content_type,
        charset="utf-8" if asset.content_type != "image/svg+xml" else None,
    )


@public
async def page(request: web.Request) -> web.Response:
    return _asset_response(request, _ASSETS["index.html"])


@public
async def static(request: web.Request) -> web.Response:
    asset = _ASSETS.get(request.match_info["name"])
    if asset is None or asset.content_type == "text/html":
        raise web.HTTPNotFound()
    return _asset_response(request, asset)


def _features(app: web.Application) -> dict[str, bool]:
    paths = {getattr(r, "canonical", "") for r in app.router.resources()}
    return {name: path in paths for name, path in FEATURES.items()}


async def fleet_handler(request: web.Request) -> web.Response:
    app = request.app
    body = fleet(app, app[_STARTED], _features(app))
    return web.Response(body=_encode(body), content_type="application/json", headers={"Cache-Control": "no-store"})


async def events_handler(request: web.Request) -> web.StreamResponse:
    return await request.app[EVENTS].stream(request)


def setup(app: web.Application) -> None:
    """Add the dashboard to the node's app (after the surfaces: ``/`` is theirs if they answer it)."""
    app[_STARTED] = time.time()
    features: dict[str, bool] = {}

    def fleet_now() -> dict[str, Any]:
        if not features:
            features.update(_features(app))
        return fleet(app, app[_STARTED], features)

    hub = app[EVENTS] = EventHub(app[RECORDS], fleet_now)
    app.router.add_routes(
        [
            web.get("/dashboard", page),
            web.get("/dashboard/", page),
            web.get("/dashboard/static/{name}", static),
            web.get("/quorum/admin/fleet", fleet_handler),
            web.get("/quorum/admin/events", events_handler),
        ]
    )

    async def close_events(app: web.Application) -> None:
        await hub.close()

    app.on_shutdown.append(close_events)
