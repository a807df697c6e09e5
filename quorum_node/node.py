"""The quorum-node process: engines, router, cluster and HTTP server, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from .api.app import create_app
from .api.server import ConnectionLimits, InFlight, NodeRunner, raise_fd_limit
from .backends.openai_compat import EMBEDDED_ENGINE
from .backends.budget import ByteBudget
from .backends.registry import Registry
from .catalog import Catalog, cluster_stamp, entries_of
from .errors import ConfigError
from .records import Records
from .router import Router
from .settings import BackendSpec, Settings

if TYPE_CHECKING:
    from .cluster.identity import NodeIdentity
    from .cluster.members import MemberStore
    from .cluster.membership import Cluster
    from .cluster.service import ClusterService
    from .control.ledger import Ledger
    from .control.metrics import NodeMetrics
    from .embedded.supervisor import LlamaServerProcess

__all__ = ["Node", "serve_forever"]

log = structlog.get_logger(__name__)


class Node:
    """One quorum-node. ``await start()``, then ``await stop()`` (idempotent)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.name
        self.registry = Registry(settings)
        self.router = Router(self.registry, self.name, max_attempts=settings.max_attempts)
        # The cluster's models, as every list reads them: rebuilt when the registry's or a peer's models change.
        self.catalog = Catalog(lambda: entries_of(self.registry, self.name, self.cluster),
                               stamp=lambda: cluster_stamp(self.cluster))
        self.registry.on_change.append(self.catalog.changed)
        self.router.catalog = self.catalog
        # Whole answers held in memory at once, node-wide (backends/budget.py)
        self.answer_budget = ByteBudget(settings.max_buffered_answers_bytes)
        self.cluster: ClusterService | None = None
        self.embedded: LlamaServerProcess | None = None
        self._embedded_task: asyncio.Task[None] | None = None
        self._runner: NodeRunner | None = None
        self.inflight = InFlight()
        self.records = Records()  # every request's record goes to its sinks (log line, ledger, metrics)
        self.ledger: Ledger | None = None  # opened in start (control/ledger.py)
        self.metrics: NodeMetrics | None = None
        if settings.metrics:
            from .control.metrics import NodeMetrics

            metrics = self.metrics = NodeMetrics(self)
            self.records.add(metrics.observe)
            self.records.add_refusal(lambda reason: metrics.refused.labels(reason).inc())
        self.admin_token: bytes | None = None  # <data_dir>/admin.token, read or made in start (control/admin_token.py)
        self.limits = ConnectionLimits(
            header_timeout_s=settings.header_timeout_s, keepalive_timeout_s=settings.keepalive_timeout_s,
            max_per_address=settings.max_connections_per_address,
        )
        self.port: int = 0
        self.ollama_port: int | None = None  # the second listener (--ollama-port), once bound
        self.peer_port: int = 0  # the peers' listener (mutual TLS), once bound; 0 in no cluster
        self._stopped = False
        from .cluster.identity import load_or_create_identity
        from .control.keys import open_keystore

        data_dir = Path(settings.data_dir)
        try:
            self.identity: NodeIdentity = load_or_create_identity(data_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"node identity in {data_dir}: {e}") from None
        membership = _membership(settings, data_dir)
        members = membership[1] if membership is not None else None
        # API keys (control/keys.py): hashed, in the data dir, replicated to peers by the cluster service, each
        # record signed by the member that wrote it
        from .cluster.members_sync import RecordSigner

        self.keys = open_keystore(data_dir, RecordSigner(self.identity, members),
                                  tombstone_retention_s=settings.key_tombstone_retention_days * 86400)
        if membership is not None:
            from .cluster.service import ClusterService

            self.cluster = ClusterService(self, membership[0], self.identity, membership[1])

    @property
    def url(self) -> str:
        """Where this node answers, for a client on this machine."""
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        if self.admin_token is None:
            from .control.admin_token import load_or_create

            self.admin_token = await asyncio.to_thread(load_or_create, Path(self.settings.data_dir))
        if self.settings.ledger and self.ledger is None:
            from .control.ledger import LEDGER_FILE, Ledger

            ledger = Ledger(Path(self.settings.data_dir) / LEDGER_FILE,
                            retention_days=self.settings.ledger_retention_days)
            await ledger.open()
            self.ledger = ledger
            self.records.add_durable(ledger.write)
        await self.registry.start()
        if self.cluster is not None:
            self.router.peer_planner = self.cluster.plan
            self.router.peer_models = self.cluster.model_names
            self.router.retry_gate = self.cluster.retry_allowed
        raise_fd_limit()
        app = create_app(self)
        # In-flight requests are drained by ``stop`` itself; by the time the runner
        # cleans up, only idle connections are left to close.
        self._runner = NodeRunner(app, limits=self.limits, handler_cancellation=True, access_log=None,
                                  shutdown_timeout=0.5)
        await self._runner.setup()
        self.http_server = self._runner.server  # makes connection protocols: cluster/pipe.py serves through it
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port, backlog=1024, reuse_address=True)
        await site.start()
        server = site._server  # the bound port is only known after binding (port 0 in tests)
        assert server is not None
        sockets: list[socket.socket] = list(getattr(server, "sockets", ()))
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.port
        if self.settings.ollama_port is not None:  # the same app on a second port (tools that hard-code Ollama's)
            extra = web.TCPSite(self._runner, self.settings.host, self.settings.ollama_port, backlog=1024,
                                reuse_address=True)
            await extra.start()
            bound = list(getattr(extra._server, "sockets", ()))
            self.ollama_port = bound[0].getsockname()[1] if bound else self.settings.ollama_port
        if self.cluster is not None:
            s = self.settings
            want = s.peer_port if s.peer_port is not None else (s.port + 1 if s.port else 0)
            from .cluster.tls_transport import PeerSite

            peers = PeerSite(self._runner, s.host, want, ssl_context=self.cluster.tls.server, backlog=1024,
                             reuse_address=True)
            await peers.start()
            self.peer_port = peers.bound_port
            await self.cluster.start()
        if self._wants_embedded():
            self._embedded_task = asyncio.create_task(self._start_embedded(), name="embedded-engine")
        log.info("node_started", node=self.name, host=self.settings.host, port=self.port,
                 engines=[b.name for b in self.registry.backends.values()])

    def _wants_embedded(self) -> bool:
        s = self.settings
        return s.detect and s.embedded_engine and not s.backends and not self.registry.backends

    async def _start_embedded(self) -> None:
        """No engine on this machine: run the bundled llama-server with the tiny model."""
        cache = Path(self.settings.cache_dir)
        log.info("embedded_engine_preparing", cache=str(cache))
        self.registry.pending.add(EMBEDDED_ENGINE)
        try:
            await self._run_embedded(cache)
        finally:
            self.registry.pending.discard(EMBEDDED_ENGINE)

    async def _run_embedded(self, cache: Path) -> None:
        from .embedded.fetch import EngineFetchError, ensure_llama_server, ensure_model
        from .embedded.supervisor import EngineStartError, LlamaServerProcess

        try:
            binary = await asyncio.to_thread(ensure_llama_server, cache, progress=True)
            model = await asyncio.to_thread(ensure_model, cache, progress=True)
        except EngineFetchError as e:
            log.error("embedded_engine_unavailable", error=str(e))
            return
        engine = LlamaServerProcess(binary, model, host="127.0.0.1", port=0)
        self.embedded = engine
        try:
            await engine.start()
            await engine.wait_ready(timeout_s=120)
        except EngineStartError as e:
            log.error("embedded_engine_failed", error=str(e))
            return
        self.registry.add(BackendSpec(kind="llamacpp", url=engine.url, name=EMBEDDED_ENGINE))
        await self.registry.refresh_once()
        log.info("embedded_engine_ready", url=engine.url, model=str(model))

    async def stop(self) -> None:
        """Stop in order (DESIGN.md, lifecycle): goodbye, stop accepting, drain, close upstreams.

        Peers are told first (mDNS goodbye, the relay's draining presence), so
        they send no new requests. Streams that end within ``drain_timeout_s``
        complete, including those a peer serves for us and those we serve a
        peer through the relay (its connection closes, 1001, only after the
        drain); the rest end with an SSE error event. Returns within the drain
        deadline plus about a second.
        """
        if self._stopped:
            return
        self._stopped = True
        log.info("node_stopping", node=self.name, in_flight=len(self.inflight))
        if self.cluster is not None:
            await self.cluster.stop_announcing()  # goodbye and draining presence first, so peers stop sending
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()  # stop accepting
            if self._runner.server is not None:
                self._runner.server.pre_shutdown()  # no keep-alive after the current answer; idle ones close
            cut = await self.inflight.drain(self.settings.drain_timeout_s)
            if cut:
                log.warning("drain_deadline_passed", cut=cut, drain_timeout_s=self.settings.drain_timeout_s)
            await self._runner.cleanup()
        if self.cluster is not None:
            await self.cluster.stop()  # peer sessions and the relay connection (1001) close only after the drain
        if self._embedded_task is not None:
            self._embedded_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._embedded_task
        if self.embedded is not None:
            await self.embedded.stop()
        await self.registry.close()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.keys.save)  # with this node's last-used times
        if self.ledger is not None:  # last: every record of the drained requests is in it
            self.records.remove_durable(self.ledger.write)
            await self.ledger.close()
        log.info("node_stopped", node=self.name)


def _membership(settings: Settings, data_dir: Path) -> tuple[Cluster, MemberStore] | None:
    """The cluster this node belongs to and its membership records, from the data dir (None: no cluster)."""
    from .cluster.members import MemberStore, decode_records
    from .cluster.membership import legacy_cluster, load_cluster, load_member_records

    try:
        cluster = load_cluster(data_dir)
        if cluster is None:
            if settings.cluster or legacy_cluster(data_dir) is not None:
                log.error("cluster_needs_migration", data_dir=str(data_dir),
                          hint="a shared secret no longer makes a node a member: run `quorum-node cluster "
                               "migrate` on one node and `quorum-node join` with its invite on the others "
                               "(README: Migrating a cluster of the shared-secret days)")
            return None
        store = MemberStore(cluster.root, decode_records(load_member_records(data_dir)))
    except (ValueError, OSError) as e:  # msgspec's errors are ValueErrors
        raise ConfigError(f"cluster membership in {data_dir}: {e}") from None
    return cluster, store


# The cyclic collector's first threshold (CPython's default is 700 allocations). A node under load allocates
# a few hundred objects per request and per streamed event; at 700 the collector ran every few events and,
# every ~100 runs, a full pass over the whole heap (~25 ms with 256 streams open, every stream stalled).
GC_THRESHOLD = (10_000, 20, 10)


def _tune_gc() -> None:
    """Collect less often, and never again over what the node built at start (modules, app, settings).

    ``gc.freeze`` moves every object alive now to a generation the collector skips; the young ones a
    request leaves behind are still collected, only in fewer, larger passes.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def serve_forever(settings: Settings) -> int:
    """Run a node until SIGINT or SIGTERM; return the exit code."""
    node = Node(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except OSError as e:
        log.error("listen_failed", host=settings.host, port=settings.port, error=e.strerror or str(e))
        await node.stop()
        return 1
    _tune_gc()
    try:
        await stop.wait()
    finally:
        await node.stop()
    return 0
