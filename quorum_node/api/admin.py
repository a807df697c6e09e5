"""The node's admin API beside the keys' (``admin_keys.py``): usage, recent records, members; and ``/metrics``.

For the node's admins, as every ``/quorum/admin/`` route (trusted loopback callers, admin keys and the admin
token; the trust middleware checks it for all of them):

- ``GET /quorum/admin/usage?since=&by=&cluster=1``: totals per group; with
  ``cluster=1`` summed over every reachable node, naming the ones that were not
  (``control/usage.py``).
- ``GET /quorum/admin/usage/series?since=&bucket=&by=``: totals per time bucket.
- ``GET /quorum/admin/recent?limit=``: this node's latest records.
- ``GET|POST /quorum/admin/shards``, ``DELETE /quorum/admin/shards/{shard}``: the sharded models this node
  leads (``cluster/sharding.py``; ``quorum-node shard``), and the workers it lends.
- ``GET /quorum/admin/members``, ``DELETE /quorum/admin/members/{member}``: the
  cluster's members; removing one (the CLI's ``cluster members`` / ``remove``).

``GET /metrics``: the Prometheus exposition (``control/metrics.py``), behind the
node's auth like the API.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from ..cluster.codes import CodeError, code_with_relay
from ..cluster.mdns import lan_addresses
from ..control.doctor import Facts, examine
from ..control.ledger import BY, Ledger
from ..control.metrics import CONTENT_TYPE_LATEST
from ..control.usage import MAX_RECENT, MAX_SERIES_BUCKETS, ClusterUsage, cluster_usage, parse_since
from ..errors import ApiError, BadRequest, NotFound, Unavailable
from ..names import MODEL_ID_PATTERN
from .body import read_body
from .state import ADDRESS, CLUSTER, KEYS, LEDGER, METRICS, NAME, REGISTRY, SETTINGS, SHARDING

if TYPE_CHECKING:
    from ..cluster.sharding import Sharding

_T = TypeVar("_T")

__all__ = ["query_by", "query_since", "routes"]

log = structlog.get_logger(__name__)
_encode = msgspec.json.Encoder().encode


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encode(obj), status=status, content_type="application/json")


def query_by(request: web.Request) -> str:
    """``?by=``: what usage is grouped by."""
    by = request.query.get("by", "model")
    if by not in BY:
        raise BadRequest(f"by: expected one of {', '.join(BY)}, got {by[:64]!r}", param="by", code="invalid_by")
    return by


def query_since(request: web.Request) -> float | None:
    """``?since=``: a duration back from now, a date, or epoch seconds (``usage.parse_since``)."""
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


def ledger_of(request: web.Request) -> Ledger:
    """The node's ledger, or 503 where it runs with ``--no-ledger``."""
    ledger = request.app[LEDGER]()
    if ledger is None:
        raise Unavailable("The usage ledger is off on this node (it runs with --no-ledger)", code="ledger_off")
    return ledger


async def usage(request: web.Request) -> web.Response:
    by, since = query_by(request), query_since(request)
    ledger = ledger_of(request)
    if request.query.get("cluster") in ("1", "true", "yes"):
        return _json(await cluster_usage(ledger, request.app[NAME], request.app[CLUSTER], since, by))
    rows = await ledger.query(since, by, entry_only=True)
    return _json(ClusterUsage(by=by, since=since, rows=rows, nodes=[request.app[NAME]]))


async def series(request: web.Request) -> web.Response:
    by = query_by(request)
    since = query_since(request)
    bucket = _int(request, "bucket", 3600, 1, 366 * 86400)
    now = time.time()
    if since is None:
        since = now - 86400
    if (now - since) / bucket > MAX_SERIES_BUCKETS:
        raise BadRequest(
            f"bucket: at most {MAX_SERIES_BUCKETS} buckets per series; use a larger bucket", param="bucket"
        )
    points = await ledger_of(request).series(since, bucket, by)
    return _json({"by": by, "since": since, "bucket": bucket, "points": points})


async def recent(request: web.Request) -> web.Response:
    limit = _int(request, "limit", 50, 0, MAX_RECENT)
    return _json({"records": await ledger_of(request).recent(limit)})


async def _decoded(request: web.Request, kind: type[_T], what: str, code: str) -> _T:
    """The request's JSON body as ``kind``; 400 ``code`` saying it is not ``what``."""
    try:
        return msgspec.json.decode(await read_body(request), type=kind)
    except msgspec.DecodeError as e:
        raise BadRequest(f"Not {what}: {e}", code=code) from None


def _cluster_of(request: web.Request) -> Any:
    cluster = request.app[CLUSTER]
    if cluster is None:
        raise NotFound("This node is in no cluster", code="no_cluster")
    return cluster


async def members(request: web.Request) -> web.Response:
    cluster = _cluster_of(request)
    return _json(cluster.members.rows(cluster.node_id))


async def remove_member(request: web.Request) -> web.Response:
    cluster = _cluster_of(request)
    who = request.match_info["member"]
    try:
        node_id = cluster.members.find(who)
    except ValueError as e:
        raise NotFound(str(e), code="member_not_found") from None
    if node_id == cluster.node_id:
        raise BadRequest(
            "A node does not remove itself: remove it from another member (or `cluster leave`)", code="remove_self"
        )
    try:
        cluster.members.remove(cluster.identity, node_id, time.time())  # on_change: eviction here, push to peers
    except ValueError as e:
        raise BadRequest(str(e), code="remove_refused") from None
    log.info("member_removed", node_id=node_id, by="admin")
    return _json({"removed": node_id})


class ShardOrder(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /quorum/admin/shards``: lead a model across members' memory (``quorum-node shard``)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    across: Annotated[int, msgspec.Meta(ge=1, le=16)] = 2
    alias: Annotated[str, msgspec.Meta(pattern=MODEL_ID_PATTERN)] | None = None


def _sharding_of(request: web.Request) -> Sharding:
    sharding = request.app[SHARDING]
    if sharding is None:
        raise NotFound("This node is in no cluster: it has no members to shard a model across", code="no_cluster")
    return sharding


def model_file(name: str, cache_dir: Path) -> Path | None:
    """A GGUF file this node has: a path, or the name of one in its model cache (``SmolLM2-135M-Instruct``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    if "/" in name or name.startswith("."):
        return None
    for candidate in (cache_dir / "models" / name, cache_dir / "models" / f"{name}.gguf"):
        if candidate.is_file():
            return candidate
    return None


async def shards(request: web.Request) -> web.Response:
    """``GET /quorum/admin/shards``: the sharded models this node leads, and the workers it lends."""
    sharding = _sharding_of(request)
    cluster = request.app[CLUSTER]
    lending = cluster.lending if cluster is not None else None
    return _json({"leading": sharding.status(), "lending": lending.loans() if lending is not None else None})


async def lead_shard(request: web.Request) -> web.Response:
    sharding = _sharding_of(request)
    order = await _decoded(request, ShardOrder, "a shard order", "bad_shard_order")
    path = model_file(order.model, Path(request.app[SETTINGS].cache_dir))
    if path is None:
        raise NotFound(
            f"No GGUF file {order.model!r} on this node (a path, or a name in its model cache)",
            code="model_file_not_found",
        )
    shard = sharding.lead(path, order.across, order.alias)
    return _json(shard.status(), status=202)


async def drop_shard(request: web.Request) -> web.Response:
    sid = request.match_info["shard"]
    if not await _sharding_of(request).drop(sid):
        raise NotFound(f"This node leads no shard {sid!r}", code="shard_not_found")
    return _json({"stopped": sid})


class CodeOrder(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /quorum/admin/invites/code``: give an invite token a short code (``cluster/codes.py``)."""

    token: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    expires_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)]


async def code_invite(request: web.Request) -> web.Response:
    cluster = _cluster_of(request)
    order = await _decoded(request, CodeOrder, "a code order", "bad_code_order")
    # on a relay that carries join codes, it holds the nameplate, and the code names the relay: a machine on
    # another network joins through it; on the LAN the same code works without the relay part
    relay = cluster.relay
    plate = await relay.claim() if relay is not None else None
    try:
        code = cluster.codes.add(order.token, order.expires_s, nameplate=plate)
    except CodeError as e:
        if plate is not None and relay is not None:
            relay.release(plate)
        raise ApiError(e.message, status=e.status, type_="invalid_request_error", code="too_many_codes") from None
    if plate is not None and relay is not None:
        code = code_with_relay(code, relay.base_url)
        # when it expires unused, the relay frees its number then, not at the next code
        asyncio.get_running_loop().call_later(order.expires_s + 0.05, cluster.codes.sweep)
    return _json({"code": code, "expires_s": order.expires_s, "relay": plate is not None})


async def joins(request: web.Request) -> web.Response:
    """``GET /quorum/admin/joins``: machines waiting for this node's user to confirm them (``invite --admit``)."""
    return _json({"asking": _cluster_of(request).joins.asking()})


class JoinDecision(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    admit: bool


async def decide_join(request: web.Request) -> web.Response:
    """``POST /quorum/admin/joins/{id}`` ``{"admit": true|false}``: the answer for a waiting machine."""
    cluster = _cluster_of(request)
    decision = await _decoded(request, JoinDecision, "a decision", "bad_decision")
    if not cluster.joins.decide(request.match_info["asking"], decision.admit):
        raise NotFound("No machine waits under that id (it gave up, or was answered)", code="no_such_join")
    return _json({"admit": decision.admit})


async def doctor(request: web.Request) -> web.Response:
    """``GET /quorum/admin/doctor``: the node's checks of its own setup (``control/doctor.py``)."""
    settings, cluster = request.app[SETTINGS], request.app[CLUSTER]
    port = int(request.app[ADDRESS]().rpartition(":")[2] or 0)
    facts = Facts(
        settings=settings,
        registry=request.app[REGISTRY],
        cluster=cluster,
        keys=request.app[KEYS],
        port=port,
        peer_port=cluster.peer_port if cluster is not None else 0,
        lan_addresses=await asyncio.to_thread(lan_addresses, settings.mdns_interfaces),
    )
    findings = await examine(facts)
    return _json({"findings": findings, "problems": sum(1 for f in findings if f.status != "ok")})


async def metrics(request: web.Request) -> web.Response:
    node_metrics = request.app[METRICS]
    if node_metrics is None:
        raise NotFound("Metrics are off on this node (it runs with --no-metrics)", code="metrics_off")
    return web.Response(body=node_metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def routes(*, cluster: bool) -> list[web.RouteDef]:
    """The admin routes (the members' only on a node in a cluster), and ``/metrics``."""
    out = [
        web.get("/quorum/admin/usage", usage),
        web.get("/quorum/admin/usage/series", series),
        web.get("/quorum/admin/recent", recent),
        web.get("/metrics", metrics),
        web.get("/quorum/admin/doctor", doctor),
    ]
    if cluster:
        out += [
            web.get("/quorum/admin/members", members),
            web.delete("/quorum/admin/members/{member}", remove_member),
            web.get("/quorum/admin/shards", shards),
            web.post("/quorum/admin/shards", lead_shard),
            web.delete("/quorum/admin/shards/{shard}", drop_shard),
            web.post("/quorum/admin/invites/code", code_invite),
            web.get("/quorum/admin/joins", joins),
            web.post("/quorum/admin/joins/{asking}", decide_join),
        ]
    return out
