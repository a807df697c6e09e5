"""The cluster's usage: totals from every node's ledger (the HTTP endpoints are in ``api/usage.py``).

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
from typing import TYPE_CHECKING, Annotated

import aiohttp
import msgspec
import structlog

from ..errors import EngineUnavailable
from .ledger import UsageRow

if TYPE_CHECKING:
    from ..cluster.context import ClusterContext
    from ..cluster.peers import Peer
    from .ledger import Ledger

__all__ = [
    "MAX_RECENT",
    "MAX_SERIES_BUCKETS",
    "ClusterUsage",
    "UsageAnswer",
    "cluster_usage",
    "merge_rows",
    "parse_since",
]

log = structlog.get_logger(__name__)

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
    return [
        UsageRow(group=g, requests=t[0], prompt_tokens=t[1], completion_tokens=t[2], errors=t[3], estimated=t[4])
        for g, t in sorted(acc.items())
    ]


async def _ask_peer(svc: ClusterContext, peer: Peer, since: float | None, by: str, timeout_s: float) -> UsageAnswer:
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


async def cluster_usage(
    ledger: Ledger,
    name: str,
    cluster: ClusterContext | None,
    since: float | None,
    by: str,
    *,
    timeout_s: float = PEER_TIMEOUT_S,
) -> ClusterUsage:
    """This node's entry rows plus every known peer's, summed; the peers that did not answer, named."""
    parts = [await ledger.query(since, by, entry_only=True)]
    nodes = [name]
    unreachable: list[Unreachable] = []
    if cluster is not None:
        peers = cluster.table.all()
        results = await asyncio.gather(
            *(_ask_peer(cluster, p, since, by, timeout_s) for p in peers), return_exceptions=True
        )
        for p, res in zip(peers, results, strict=True):
            name = p.info.name or p.node_id
            if isinstance(res, UsageAnswer):
                parts.append(res.rows)
                nodes.append(res.node or name)
            elif isinstance(res, BaseException):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                error = (
                    "no answer within the timeout" if isinstance(res, TimeoutError) else str(res) or type(res).__name__
                )
                unreachable.append(Unreachable(node=name, error=error[:300]))
                log.info("cluster_usage_peer_unreachable", peer=p.node_id, error=error[:300])
    return ClusterUsage(by=by, since=since, rows=merge_rows(parts), nodes=nodes, unreachable=unreachable)
