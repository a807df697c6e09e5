"""A helper's side of a sharded model: the ``rpc-server``s this node runs for leaders (issue 22).

A leader (another member) asks over the signed peer API for a worker for one
of its shards; this node starts an ``rpc-server`` bound to loopback and lends
it on a **lease**: the leader renews it every few seconds, and a lease that
runs out (the leader was killed, its link is gone) stops the worker. The only
way to the worker is the tunnel (``GET /quorum/v1/shards/tunnel``, a WebSocket
upgrade on the peer port, ``api/peer.py``; or a ``TUNNEL`` stream of the relay
link, ``relay/link.py``), and only for the member that leased it.

Peer messages (JSON, decoded strictly, bounded):

- ``POST /quorum/v1/shards/lend``    ``{"shard", "lease_s"}`` → ``{"shard", "memory"}``
- ``POST /quorum/v1/shards/renew``   ``{"shard"}`` → 200, or 404 once it is gone
- ``POST /quorum/v1/shards/release`` ``{"shard"}`` → 200
- ``POST /quorum/v1/shards/leaving`` ``{"shard"}`` → 200 (helper to leader: this node is stopping; the
  leader lets the requests under way finish, releases the worker and builds again without it)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import msgspec
import structlog

from ..embedded.rpc import RpcServerProcess
from ..embedded.supervisor import EngineStartError
from ..resources import Memory

__all__ = [
    "LEAVING_PATH",
    "LEND_PATH",
    "MAX_SHARD_BYTES",
    "RELEASE_PATH",
    "RENEW_PATH",
    "TUNNEL_PATH",
    "LendAnswer",
    "LendRefused",
    "LendRequest",
    "Lending",
    "ShardRef",
]

log = structlog.get_logger("quorum.lending")

LEND_PATH = "/quorum/v1/shards/lend"
RENEW_PATH = "/quorum/v1/shards/renew"
RELEASE_PATH = "/quorum/v1/shards/release"
LEAVING_PATH = "/quorum/v1/shards/leaving"
TUNNEL_PATH = "/quorum/v1/shards/tunnel"
#: The largest shard message a node reads.
MAX_SHARD_BYTES = 4096

_ShardId = Annotated[str, msgspec.Meta(pattern=r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")]


class LendRequest(msgspec.Struct, frozen=True, kw_only=True):
    shard: _ShardId
    lease_s: Annotated[float, msgspec.Meta(ge=2.0, le=300.0)] = 15.0


class ShardRef(msgspec.Struct, frozen=True, kw_only=True):
    shard: _ShardId


class LendAnswer(msgspec.Struct, frozen=True, kw_only=True):
    shard: _ShardId
    memory: Memory  # what this node had free when it said yes


class LendRefused(Exception):
    """A lend this node says no to: its HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Loan:
    __slots__ = ("expires", "lease_s", "worker")

    def __init__(self, worker: RpcServerProcess, lease_s: float, now: float) -> None:
        self.worker = worker
        self.lease_s = lease_s
        self.expires = now + lease_s


class Lending:
    """The workers this node lends, by (leader, shard). ``await run()`` reaps; ``await close()`` stops all."""

    def __init__(
        self,
        binary: Callable[[], Path | None],
        cache_dir: Path,
        memory: Callable[[], Memory],
        *,
        max_workers: int = 2,
        threads: int | None = None,
        reap_every_s: float = 0.5,
    ) -> None:
        self._binary = binary
        self.cache_dir = cache_dir
        self._memory = memory
        self.max_workers = max_workers
        self.threads = threads
        self.reap_every_s = reap_every_s
        self._loans: dict[tuple[str, str], _Loan] = {}
        self.stopping = False  # this node is stopping: it lends nothing new
        self._released = asyncio.Event()  # set whenever a worker goes
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._loans)

    def loans(self) -> list[dict[str, object]]:
        """What it lends now, as people read it (the dashboard, ``/quorum/admin/fleet``)."""
        now = time.monotonic()
        return [
            {
                "leader": leader,
                "shard": shard,
                "pid": loan.worker.pid,
                "port": loan.worker.port,  # on this node's loopback only
                "expires_in_s": round(loan.expires - now, 1),
            }
            for (leader, shard), loan in sorted(self._loans.items())
        ]

    async def lend(self, leader: str, req: LendRequest) -> LendAnswer:
        """Start a worker for ``leader``'s shard (or renew the one it has); ``LendRefused`` if it cannot."""
        key = (leader, req.shard)
        async with self._lock:
            loan = self._loans.get(key)
            if loan is not None and loan.worker.alive:
                loan.lease_s = req.lease_s
                loan.expires = time.monotonic() + req.lease_s
                return LendAnswer(shard=req.shard, memory=self._memory())
            if self.stopping:
                raise LendRefused(503, "this node is stopping")
            if len(self._loans) >= self.max_workers:
                raise LendRefused(409, f"this node lends {self.max_workers} workers already")
            binary = self._binary()
            if binary is None:
                raise LendRefused(503, "this node has no rpc-server; run `quorum-node engine fetch` on it")
            worker = RpcServerProcess(binary, cache_dir=self.cache_dir, threads=self.threads)
            try:
                await worker.start()
            except EngineStartError as e:
                raise LendRefused(503, f"rpc-server did not start: {e}") from None
            self._loans[key] = _Loan(worker, req.lease_s, time.monotonic())
        log.info("shard_worker_lent", leader=leader, shard=req.shard, port=worker.port, lease_s=req.lease_s)
        return LendAnswer(shard=req.shard, memory=self._memory())

    def renew(self, leader: str, shard: str) -> bool:
        """Extend the lease; False when there is no such worker (gone: the leader must build again)."""
        loan = self._loans.get((leader, shard))
        if loan is None or not loan.worker.alive:
            return False
        loan.expires = time.monotonic() + loan.lease_s
        return True

    async def release(self, leader: str, shard: str) -> None:
        loan = self._loans.pop((leader, shard), None)
        if loan is not None:
            self._released.set()
            await loan.worker.stop()
            log.info("shard_worker_released", leader=leader, shard=shard)

    def port(self, leader: str, shard: str) -> int | None:
        """The loopback port of ``leader``'s worker for ``shard`` (None: it has none here)."""
        loan = self._loans.get((leader, shard))
        return loan.worker.port if loan is not None and loan.worker.alive else None

    async def run(self) -> None:
        """Task root: stop the workers whose lease ran out, and forget those that died."""
        while True:
            await asyncio.sleep(self.reap_every_s)
            now = time.monotonic()
            for key, loan in list(self._loans.items()):
                if loan.expires <= now or not loan.worker.alive:
                    why = "lease_expired" if loan.worker.alive else "worker_died"
                    self._loans.pop(key, None)
                    self._released.set()
                    await loan.worker.stop()
                    log.warning("shard_worker_ended", leader=key[0], shard=key[1], reason=why)

    async def leave(self, tell: Callable[[str, str], Awaitable[bool]], within_s: float) -> None:
        """This node is stopping: tell each leader (``tell(leader, shard)``), and give them ``within_s`` to let
        the requests under way end and release their workers; what is still lent then is stopped by ``close``."""
        self.stopping = True
        told = [await tell(leader, shard) for leader, shard in list(self._loans)]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while any(told) and self._loans:
                    self._released.clear()
                    await self._released.wait()

    async def close(self) -> None:
        loans, self._loans = list(self._loans.items()), {}
        for (leader, shard), loan in loans:
            await loan.worker.stop()
            log.info("shard_worker_released", leader=leader, shard=shard, reason="node_stopping")
