"""A leader's side of a sharded model: one ``llama-server`` whose layers live on other members (issue 22).

``quorum-node shard MODEL --across N`` (or a ``[[shards]]`` entry of the
config) makes this node the leader of a model too big for one machine. It

1. picks N members that are up, reachable (on the LAN, or through the relay)
   and say they have memory to lend (their health's ``memory``), most free first;
2. asks each for a worker over the signed peer API (``lending.py``): an
   ``rpc-server`` on the helper's loopback, on a lease this node renews every
   ``lease_s / 3``;
3. opens, per helper, a loopback listener that stands for it: every
   connection ``llama-server`` makes to it is carried to the helper's worker
   through a tunnel on the peer link (``tunnel.py``: a WebSocket on the mutual-TLS
   peer port, or a stream of the relay link's Noise session), so ``rpc-server``
   is never reachable by anyone but this node;
4. starts ``llama-server --rpc <those listeners> -ngl 999 --tensor-split …``,
   the layers split in proportion to each helper's free memory;
5. adds it to the registry as an engine like any other (``shard:<model>``),
   its models marked as sharded across the helpers: the catalog publishes it
   and the scheduler treats it as one holder.

It then watches: the engine dying (a helper that died takes it down with it),
a lease that cannot be renewed, or a helper's tunnel that cannot be opened
ends the build; it is torn down (engine stopped, leases released), and built
again over the members that can lend now, with a growing back-off. Stopping
the leader releases every lease; a leader killed outright leaves leases that
run out on their own within ``lease_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import msgspec
import structlog

from ..embedded.supervisor import EngineStartError, LlamaServerProcess
from ..resources import Memory
from .context import PeerCallError
from .lending import LEND_PATH, RELEASE_PATH, RENEW_PATH, TUNNEL_PATH, LendAnswer
from .tunnel import MAX_MESSAGE, Counted, Duplex, join

__all__ = ["Lender", "Shard", "ShardContext", "ShardError", "Sharding", "shard_id"]

log = structlog.get_logger("quorum.sharding")

_encode = msgspec.json.Encoder().encode
_READY_TIMEOUT_S = 300.0  # the first load sends every layer through the tunnels
_CALL_TIMEOUT_S = 20.0  # a lend starts a process on the helper
_BACKOFF_MAX_S = 30.0
_LEAVING_POLL_S = 0.25
_DRAIN_S = 10.0  # the longest a going helper's requests under way are given to finish
_SPLIT_GRAIN = 1 << 30  # free memory counts in whole GiB for the split: the same split for the same machines
_GOING_S = 60.0  # a helper that said it is stopping is not asked again for this long (unless it is back)


class ShardError(Exception):
    """Why a build of a sharded model failed, or ended."""


@dataclass(frozen=True)
class Lender:
    """A member that could lend, and what it has free (reached on the LAN, or through the relay)."""

    node_id: str
    name: str
    memory: Memory
    route: str = "lan"  # how it is reached first: "lan" | "relay"


class ShardContext(Protocol):
    """What a leader needs of the cluster (``ClusterService``)."""

    node_id: str

    def lenders(self) -> list[Lender]: ...

    async def call(self, node_id: str, path: str, body: bytes, *, timeout_s: float) -> bytes:
        """POST a message to that member (its LAN link first, then the relay): the body of its 200
        answer; ``PeerCallError`` for another answer, ``ConnectionError`` where no link carried it."""
        ...

    async def shard_tunnel(self, node_id: str, path: str) -> Duplex:
        """A tunnel to that member's ``path`` (``tunnel.py``): on the LAN, else through the relay."""
        ...

    def leaving(self, node_id: str) -> bool:
        """Whether that member is going: removed, gone from the peer table, or draining (it said it stops)."""
        ...


class Busy(Protocol):
    """The published engine, as far as a drain reads it (``backends.base.Backend``)."""

    in_flight: int


def shard_id(model: Path) -> str:
    """The shard's name on the helpers: the model file's stem, cut to what a shard id allows."""
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in model.stem).lstrip("._-") or "model"
    return stem[:64]


@dataclass
class _Helper:
    lender: Lender
    share: float
    server: asyncio.Server | None = None
    port: int = 0
    count: Counted = field(default_factory=Counted)
    tunnels: set[asyncio.Task[None]] = field(default_factory=set)
    renewed_at: float = 0.0


class Shard:
    """One sharded model this node leads: built, watched, rebuilt. ``start()``; ``await stop()``."""

    def __init__(
        self,
        model: Path,
        across: int,
        ctx: ShardContext,
        *,
        binary: Callable[[], Path | None],
        publish: Callable[[str, str, tuple[str, ...]], Awaitable[Busy]],
        withdraw: Callable[[str], Awaitable[None]],
        lease_s: float = 15.0,
        ctx_size: int = 2048,
        threads: int | None = None,
        alias: str | None = None,
    ) -> None:
        self.model = model
        self.across = across
        self.ctx = ctx
        self._binary = binary
        self._publish = publish
        self._withdraw = withdraw
        self.lease_s = lease_s
        self.ctx_size = ctx_size
        self.threads = threads
        self.alias = alias
        self.id = shard_id(model)
        self.engine_name = f"shard:{alias or self.id}"
        self.state = "starting"  # starting | building | up | down
        self.error: str | None = None
        self.builds = 0
        self.helpers: list[_Helper] = []
        self.engine: LlamaServerProcess | None = None
        self._url: str | None = None
        self._published: Busy | None = None
        self.told_leaving: dict[str, float] = {}  # helpers that said they are stopping: node id -> when
        self._built_at = 0.0
        self._ever_up = False  # it has served: a rebuild may go over fewer helpers than asked
        self._task: asyncio.Task[None] | None = None

    # -- what people read ----------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "engine": self.engine_name,
            "across": self.across,
            "state": self.state,
            "error": self.error,
            "builds": self.builds,
            "helpers": [
                {
                    "node": h.lender.name,
                    "node_id": h.lender.node_id,
                    "share": round(h.share, 3),
                    "bytes_sent": h.count.sent,
                    "bytes_received": h.count.received,
                }
                for h in self.helpers
            ],
        }

    def bytes_sent(self) -> int:
        return sum(h.count.sent for h in self.helpers)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"shard-{self.id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._teardown()
        self.state = "down"

    async def _run(self) -> None:
        """Task root: build, watch, and build again after a failure, with a growing back-off."""
        backoff = 1.0
        while True:
            try:
                await self._build()
                backoff = 1.0
                await self._watch()
            except ShardError as e:
                self.error = str(e)
                log.warning("shard_down", shard=self.id, error=str(e))
            except Exception as e:  # task root: log and build again
                self.error = f"{type(e).__name__}: {e}"
                log.exception("shard_failed", shard=self.id)
            self.state = "down"
            await self._teardown()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _build(self) -> None:
        self.state = "building"
        self.builds += 1
        binary = self._binary()
        if binary is None:
            raise ShardError("this node has no llama-server built with RPC; run `quorum-node engine fetch`")
        if not self.model.is_file():
            raise ShardError(f"no model file at {self.model}")
        self._built_at = now = time.monotonic()
        going = {nid for nid, t in self.told_leaving.items() if now - t < _GOING_S}  # still stopping, surely
        lenders = [lender for lender in self.ctx.lenders() if lender.node_id not in going][: self.across]
        # The devices in one order every build (by node id, not by what is free this minute): each helper then
        # gets the same tensors again, and its rpc-server cache has them (a second load sends almost nothing)
        lenders.sort(key=lambda lender: lender.node_id)
        if not lenders:
            raise ShardError("no member can lend memory now (up, reachable, with memory to spare)")
        if len(lenders) < self.across and not self._ever_up:  # the first build waits for as many as asked;
            # a rebuild after a helper was lost serves over those that remain
            raise ShardError(f"only {len(lenders)} of the {self.across} members asked for can lend now")
        # the split, in proportion to what each has free, rounded so that small changes keep the same layers
        free = [max(1, round(lender.memory.free / _SPLIT_GRAIN)) for lender in lenders]
        self.helpers = [_Helper(lender, f / sum(free)) for lender, f in zip(lenders, free, strict=True)]
        for h in self.helpers:
            answer = await self._call(h.lender, LEND_PATH, {"shard": self.id, "lease_s": self.lease_s})
            if msgspec.json.decode(answer, type=LendAnswer).shard != self.id:
                raise ShardError(f"{h.lender.name} lent a worker for another shard")
            h.renewed_at = time.monotonic()
            h.server = await asyncio.start_server(functools.partial(self._carry, h), "127.0.0.1", 0, limit=MAX_MESSAGE)
            h.port = h.server.sockets[0].getsockname()[1]
        split = ",".join(f"{h.share:.4f}" for h in self.helpers)
        rpc = ",".join(f"127.0.0.1:{h.port}" for h in self.helpers)
        extra = ["--rpc", rpc, "--n-gpu-layers", "999", "--tensor-split", split]
        if self.alias:
            extra += ["--alias", self.alias]
        engine = LlamaServerProcess(
            binary, self.model, ctx_size=self.ctx_size, threads=self.threads, extra_args=extra, restart=False
        )
        self.engine = engine
        log.info("shard_building", shard=self.id, helpers=[h.lender.name for h in self.helpers], split=split)
        try:
            await engine.start()
            await engine.wait_ready(_READY_TIMEOUT_S)
        except EngineStartError as e:
            raise ShardError(f"its engine did not start: {e}") from None
        self._url = engine.url
        self._published = await self._publish(engine.url, self.engine_name, tuple(h.lender.name for h in self.helpers))
        self.state = "up"
        self._ever_up = True
        self.error = None
        log.info(
            "shard_up",
            shard=self.id,
            url=engine.url,
            helpers=[h.lender.name for h in self.helpers],
            bytes_sent=self.bytes_sent(),
        )

    async def _watch(self) -> None:
        """Until the build breaks: its engine exits, or a helper's lease cannot be renewed."""
        engine = self.engine
        assert engine is not None
        ended = asyncio.create_task(engine.ended.wait())
        renewing = asyncio.create_task(self._renew_leases())
        leaving = asyncio.create_task(self._helper_leaving())
        tasks = (ended, renewing, leaving)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if leaving in done and ended not in done:
                await self._drain()  # the leases are still renewed meanwhile
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        if ended in done:
            raise ShardError("its engine exited (a helper gone?)")
        if leaving in done:
            raise ShardError(f"helper {leaving.result()} is leaving; built again without it")
        renewing.result()  # raises its ShardError

    async def _helper_leaving(self) -> str:
        """Until a helper says it is going (or is gone from the peer table): its name."""
        while True:
            for h in self.helpers:
                told = self.told_leaving.get(h.lender.node_id)
                if (told is not None and told >= self._built_at) or self.ctx.leaving(h.lender.node_id):
                    return h.lender.name
            await asyncio.sleep(_LEAVING_POLL_S)

    async def _drain(self) -> None:
        """A helper is going: no new request for the engine; those under way finish (within ``_DRAIN_S``)."""
        if self._url is not None:
            url, self._url = self._url, None
            await self._withdraw(url)  # out of the catalog: the engine itself still runs what it has
        deadline = time.monotonic() + _DRAIN_S
        while self._published is not None and self._published.in_flight > 0 and time.monotonic() < deadline:
            if self.engine is None or self.engine.ended.is_set():
                break
            await asyncio.sleep(0.05)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            for h in self.helpers:
                try:
                    await self._call(h.lender, RENEW_PATH, {"shard": self.id})
                    h.renewed_at = time.monotonic()
                except ShardError as e:
                    if time.monotonic() - h.renewed_at > self.lease_s * 2 / 3:  # its lease is about to lapse
                        raise ShardError(f"helper {h.lender.name} is gone: {e}") from None
                    log.warning("shard_renew_failed", shard=self.id, helper=h.lender.name, error=str(e))

    async def _teardown(self) -> None:
        if self._url is not None:
            url, self._url = self._url, None
            await self._withdraw(url)
        self._published = None
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.stop()
        for h in self.helpers:
            if h.server is not None:
                h.server.close()
            for t in list(h.tunnels):
                t.cancel()
        for h in self.helpers:
            for t in list(h.tunnels):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            with contextlib.suppress(ShardError):  # best effort: an unreleased lease runs out by itself
                await self._call(h.lender, RELEASE_PATH, {"shard": self.id}, timeout_s=3.0)

    # -- the peer calls and the tunnels ----------------------------------------

    async def _call(
        self, lender: Lender, path: str, body: dict[str, Any], *, timeout_s: float = _CALL_TIMEOUT_S
    ) -> bytes:
        """POST a shard message to ``lender``; its answer, or ``ShardError``."""
        try:
            return await self.ctx.call(lender.node_id, path, _encode(body), timeout_s=timeout_s)
        except PeerCallError as e:
            raise ShardError(f"{lender.name} answered {path} with {e}") from None
        except (ConnectionError, OSError, TimeoutError, aiohttp.ClientError) as e:
            raise ShardError(f"{lender.name} did not answer {path}: {type(e).__name__}: {e}") from None

    async def _carry(self, h: _Helper, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection of the engine to ``h``'s listener: carried to its worker through a tunnel."""
        task = asyncio.current_task()
        assert task is not None
        h.tunnels.add(task)
        joined = False
        try:
            try:
                tunnel = await self.ctx.shard_tunnel(h.lender.node_id, f"{TUNNEL_PATH}?shard={self.id}")
            except (ConnectionError, OSError, TimeoutError, aiohttp.ClientError) as e:
                log.warning("shard_tunnel_refused", shard=self.id, helper=h.lender.name, error=str(e))
                return
            joined = True
            await join(tunnel, reader, writer, h.count)  # closes both, however it ends
        finally:
            h.tunnels.discard(task)
            if not joined:  # the engine's connection is closed here, also when the tunnel was cancelled
                writer.close()


class Sharding:
    """The sharded models this node leads (``[[shards]]`` and ``quorum-node shard``)."""

    def __init__(self, make: Callable[[Path, int, str | None], Shard]) -> None:
        self._make = make
        self.shards: dict[str, Shard] = {}

    def lead(self, model: Path, across: int, alias: str | None = None) -> Shard:
        """Lead ``model`` across ``across`` helpers (the same model again: its shard as it is)."""
        shard = self._make(model, across, alias)
        have = self.shards.get(shard.id)
        if have is not None:
            return have
        self.shards[shard.id] = shard
        shard.start()
        return shard

    async def drop(self, sid: str) -> bool:
        shard = self.shards.pop(sid, None)
        if shard is None:
            return False
        await shard.stop()
        return True

    def status(self) -> list[dict[str, Any]]:
        return [s.status() for s in self.shards.values()]

    def helper_leaving(self, node_id: str, sid: str) -> bool:
        """Member ``node_id`` says it is stopping: the shard it helps is built again without it (whether it
        helps ``sid``)."""
        shard = self.shards.get(sid)
        if shard is None or not any(h.lender.node_id == node_id for h in shard.helpers):
            return False
        shard.told_leaving[node_id] = time.monotonic()
        return True

    async def close(self) -> None:
        for sid in list(self.shards):
            await self.drop(sid)
