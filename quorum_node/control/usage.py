"""Usage over HTTP: the admin endpoints on a node, and the cluster's totals from every node's ledger.

Admin endpoints (for the node's admins: trusted loopback callers and admin keys, as every
``/quorum/admin/`` route; the trust middleware checks it):

- ``GET /quorum/admin/usage?since=&by=&cluster=1``: totals per group;
  with ``cluster=1`` summed over every reachable node, naming the ones that
  were not.
- ``GET /quorum/admin/usage/series?since=&bucket=&by=``: totals per time bucket.
- ``GET /quorum/admin/recent?limit=``: this node's latest records.

Peer endpoint (signed): ``GET /quorum/v1/usage?since=&by=`` answers a node's
rows for the requests it was the *entry* node of. A forwarded request has a
record on both nodes, but only the entry node's counts here, so the sum over
nodes counts every request once; "by node" groups by the node that served it.

``since`` everywhere: a duration back from now (``90s``, ``15m``, ``1h``,
``7d``, ``2w``), an ISO date or date-time (UTC unless it says otherwise), or
epoch seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from typing import TYPE_CHECKING, Annotated, Any

import aiohttp
import msgspec
import structlog
from aiohttp import web

from ..api.state import NODE, PEER
from ..errors import BadRequest, EngineUnavailable, Unauthorized, Unavailable
from .ledger import BY, UsageRow

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["ClusterUsage", "UsageAnswer", "cluster_usage", "merge_rows", "parse_since", "peer_usage", "routes"]

log = structlog.get_logger(__name__)
_encode = msgspec.json.Encoder().encode

PEER_TIMEOUT_S = 3.0
MAX_RECENT = 1000
MAX_SERIES_BUCKETS = 10_000
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """A peer's answer to ``/quorum/v1/usage`` (decoded, bounded)."""

    node: Annotated[str, msgspec.Meta(max_length=256)]
    rows: Annotated[list[UsageRow], msgspec.Meta(max_length=100_000)]


_decode_answer = msgspec.json.Decoder(UsageAnswer).decode


class Unreachable(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    error: str


class ClusterUsage(msgspec.Struct, frozen=True, kw_only=True):
    by: str
    since: float | None
    rows: list[UsageRow]
    nodes: list[str]  # the nodes whose ledgers are in the totals
    unreachable: list[Unreachable] = []


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """``since`` as epoch seconds (None: everything). Raises ValueError with a sentence a user can act on."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    now = time.time() if now is None else now
    m = _DURATION.fullmatch(text.lower())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"since: {text!r} is not a time")
        return value
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"since: {text!r} is neither a duration (1h, 7d) nor a date (2025-05-01)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _by(request: web.Request) -> str:
    by = request.query.get("by", "model")
    if by not in BY:
        raise BadRequest(f"by: expected one of {', '.join(BY)}, got {by[:64]!r}", param="by", code="invalid_by")
    return by


def _since(request: web.Request) -> float | None:
    try:
        return parse_since(request.query.get("since"))
    except ValueError as e:
        raise BadRequest(str(e)[:300], param="since", code="invalid_since") from None


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {raw[:64]!r}", param=name) from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: must be between {lo} and {hi}", param=name)
    return value


def _ledger(node: Node) -> Any:
    ledger = getattr(node, "ledger", None)
    if ledger is None:
        raise Unavailable("The usage ledger is off on this node (it runs with --no-ledger)", code="ledger_off")
    return ledger


def merge_rows(parts: list[list[UsageRow]]) -> list[UsageRow]:
    """Rows of several nodes, summed per group."""
    acc: dict[str, list[int]] = {}
    for rows in parts:
        for r in rows:
            t = acc.setdefault(r.group, [0, 0, 0, 0, 0])
            t[0] += r.requests
            t[1] += r.prompt_tokens
            t[2] += r.completion_tokens
            t[3] += r.errors
            t[4] += r.estimated
    return [UsageRow(group=g, requests=t[0], prompt_tokens=t[1], completion_tokens=t[2], errors=t[3],
                     estimated=t[4]) for g, t in sorted(acc.items())]


async def _ask_peer(node: Node, peer: Any, since: float | None, by: str, timeout_s: float) -> UsageAnswer:
    svc = node.cluster
    assert svc is not None
    path = f"/quorum/v1/usage?by={by}" + (f"&since={since:.3f}" if since is not None else "")
    links = svc.links(peer)
    if not links:
        raise EngineUnavailable("no route to it", engine=peer.node_id)
    last: Exception | None = None
    async with asyncio.timeout(timeout_s):
        for link in links:
            try:
                return _decode_answer(await svc._get(link, path, peer.node_id, timeout_s))
            except (aiohttp.ClientError, OSError, ValueError, EngineUnavailable) as e:  # msgspec errors too
                last = e
    raise last if last is not None else EngineUnavailable("no answer", engine=peer.node_id)


async def cluster_usage(node: Node, since: float | None, by: str, *, timeout_s: float = PEER_TIMEOUT_S) -> ClusterUsage:
    """This node's entry rows plus every known peer's, summed; the peers that did not answer, named."""
    ledger = _ledger(node)
    parts = [await ledger.query(since, by, entry_only=True)]
    nodes = [node.name]
    unreachable: list[Unreachable] = []
    if node.cluster is not None:
        peers = node.cluster.table.all()
        results = await asyncio.gather(*(_ask_peer(node, p, since, by, timeout_s) for p in peers),
                                       return_exceptions=True)
        for p, res in zip(peers, results, strict=True):
            name = p.info.name or p.node_id
            if isinstance(res, UsageAnswer):
                parts.append(res.rows)
                nodes.append(res.node or name)
            elif isinstance(res, BaseException):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                error = "no answer within the timeout" if isinstance(res, TimeoutError) else str(res) or type(res).__name__
                unreachable.append(Unreachable(node=name, error=error[:300]))
                log.info("cluster_usage_peer_unreachable", peer=p.node_id, error=error[:300])
    return ClusterUsage(by=by, since=since, rows=merge_rows(parts), nodes=nodes, unreachable=unreachable)


# -- handlers -----------------------------------------------------------------------


def _json(obj: Any) -> web.Response:
    return web.Response(body=_encode(obj), content_type="application/json")


async def admin_usage(request: web.Request) -> web.Response:
    node = request.app[NODE]
    by, since = _by(request), _since(request)
    if request.query.get("cluster") in ("1", "true", "yes"):
        return _json(await cluster_usage(node, since, by))
    rows = await _ledger(node).query(since, by, entry_only=True)
    return _json(ClusterUsage(by=by, since=since, rows=rows, nodes=[node.name]))


async def admin_series(request: web.Request) -> web.Response:
    node = request.app[NODE]
    by = _by(request)
    since = _since(request)
    bucket = _int(request, "bucket", 3600, 1, 366 * 86400)
    now = time.time()
    if since is None:
        since = now - 86400
    if (now - since) / bucket > MAX_SERIES_BUCKETS:
        raise BadRequest(f"bucket: at most {MAX_SERIES_BUCKETS} buckets per series; use a larger bucket",
                         param="bucket")
    points = await _ledger(node).series(since, bucket, by)
    return _json({"by": by, "since": since, "bucket": bucket, "points": points})


async def admin_recent(request: web.Request) -> web.Response:
    node = request.app[NODE]
    limit = _int(request, "limit", 50, 0, MAX_RECENT)
    return _json({"records": await _ledger(node).recent(limit)})


async def peer_usage(request: web.Request) -> web.Response:
    """``/quorum/v1/usage`` (signed): this node's entry rows, for a peer summing the cluster."""
    if request.get(PEER) is None:
        raise Unauthorized("This endpoint is for the cluster's members", code="unauthorized")
    node = request.app[NODE]
    by, since = _by(request), _since(request)
    rows = await _ledger(node).query(since, by, entry_only=True)
    return _json(UsageAnswer(node=node.name, rows=rows))


def routes() -> list[web.RouteDef]:
    return [
        web.get("/quorum/admin/usage", admin_usage),
        web.get("/quorum/admin/usage/series", admin_series),
        web.get("/quorum/admin/recent", admin_recent),
    ]
