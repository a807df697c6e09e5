"""The quorum-node process: the one composition root.

``Node`` builds every part and hands each the narrow things it uses (the
registry of local engines, the catalog, the in-flight counter, the key store,
the records hub); no part is handed the node. ``start`` starts them in order
on an ``AsyncExitStack``, so a start that fails half-way unwinds what had
started, and ``stop`` unwinds the same stack in the order of DESIGN.md's
lifecycle: goodbye to the peers → stop accepting → drain → the relay link and
peer sessions → engines → the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import structlog
from aiohttp import web

from .admission import Admission
from .api.app import create_app
from .api.server import ConnectionLimits, InFlight, NodeRunner, raise_fd_limit, stop_accepting
from .api.state import Parts
from .backends.base import EMBEDDED_ENGINE, Backend
from .backends.budget import ByteBudget
from .backends.registry import Registry
from .breaker import Breakers
from .catalog import Catalog, cluster_stamp, entries_of
from .cluster.identity import load_or_create_identity
from .cluster.lending import LEAVING_PATH, Lending
from .cluster.members_sync import RecordSigner
from .cluster.sharding import Shard, Sharding
from .control.admin_token import load_or_create as load_or_create_admin_token
from .control.keys import open_keystore
from .control.recorder import Records
from .errors import ConfigError
from .resources import Resources
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
        settings = _with_stored_relay(settings)
        self.settings = settings
        self.name = settings.name
        self.registry = Registry(settings)
        # a local engine's model that keeps failing is ejected for a while (breaker.py); the others serve
        breakers = Breakers(
            settings.holder_failures, settings.holder_reset_s, max_reset_after_s=settings.holder_max_reset_s
        )
        self.router = Router(self.registry, self.name, max_attempts=settings.max_attempts, breakers=breakers)
        self.registry.on_change.append(
            lambda: breakers.keep({(b.name, m.id) for b, m in self.registry.models()})  # forget what is gone
        )
        self.cluster: ClusterService | None = None
        # The cluster's models, as every list reads them: rebuilt when the registry's or a peer's models change.
        self.catalog = Catalog(
            lambda: entries_of(self.registry, self.name, self.cluster),
            stamp=lambda: cluster_stamp(self.cluster),
            aliases=settings.model_aliases,
        )
        self.registry.on_change.append(self.catalog.changed)
        self.router.catalog = self.catalog
        self.router.affinity_bound = settings.affinity_load_bound if settings.affinity else None
        self.router.concurrency = settings.holder_concurrency or None
        self.router.serve_variants = settings.serve_variants
        self.admission = Admission(max_waiting=settings.queue_max, timeout_s=settings.queue_timeout_s)
        self.router.admission = self.admission
        self.registry.on_refresh.append(self.admission.wake_all)  # an engine that was full may have room now
        # Whole answers held in memory at once, node-wide (backends/budget.py)
        self.answer_budget = ByteBudget(settings.max_buffered_answers_bytes)
        self.embedded: LlamaServerProcess | None = None
        self._embedded_task: asyncio.Task[None] | None = None
        self.app: web.Application | None = None  # the HTTP application, once started
        self._runner: NodeRunner | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self.inflight = InFlight()
        self.records = Records()  # every request's record goes to its sinks (log line, ledger, metrics)
        self.ledger: Ledger | None = None  # opened in start (control/ledger.py)
        self.admin_token: bytes | None = None  # <data_dir>/admin.token, read or made in start (control/admin_token.py)
        self.limits = ConnectionLimits(
            header_timeout_s=settings.header_timeout_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
            max_per_address=settings.max_connections_per_address,
        )
        self.port: int = 0
        self.ollama_port: int | None = None  # the second listener (--ollama-port), once bound
        self.peer_port: int = 0  # the peers' listener (mutual TLS), once bound; 0 in no cluster
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()
        data_dir = Path(settings.data_dir)
        try:
            self.identity: NodeIdentity = load_or_create_identity(data_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"node identity in {data_dir}: {e}") from None
        membership = _membership(settings, data_dir)
        members = membership[1] if membership is not None else None
        # API keys (control/keys.py): hashed, in the data dir, replicated to peers by the cluster service, each
        # record signed by the member that wrote it
        self.keys = open_keystore(
            data_dir,
            RecordSigner(self.identity, members),
            tombstone_retention_s=settings.key_tombstone_retention_days * 86400,
        )
        if membership is not None:
            from .cluster.service import ClusterService
            from .control.replication import KeyReplicator

            cluster = self.cluster = ClusterService(
                settings,
                name=self.name,
                engines=self.registry,
                inflight=self.inflight,
                membership=membership[0],
                identity=self.identity,
                members=membership[1],
            )
            cluster.key_sync = KeyReplicator(cluster, self.keys)  # API key records, agreed with every peer
            self.router.peer_planner = cluster.plan
            self.router.peer_models = cluster.model_names
            self.router.retry_gate = cluster.retry_allowed
            self.router.node_id = cluster.node_id  # holder ids: the same on every node (affinity.py)
            cluster.capacity_of = self.router.capacity_of
            cluster.waiting = self.admission.depth
        # Sharded models (issue 22): what this machine could lend, the workers it lends, the models it leads
        self.resources = Resources()
        self.lending: Lending | None = None
        self.sharding: Sharding | None = None
        if self.cluster is not None:
            self._wire_sharding(self.cluster)
        self.metrics: NodeMetrics | None = None
        if settings.metrics:
            from .control.metrics import NodeMetrics

            metrics = self.metrics = NodeMetrics(
                known=lambda model: self.router.view().find(model) is not None,
                inflight=self.inflight,
                engines=self.registry,
                cluster=self.cluster,
                ledger=lambda: self.ledger,
                admission=self.admission,
            )
            self.records.add(metrics.observe)
            self.records.add_refusal(lambda reason: metrics.refused.labels(reason).inc())

    @property
    def url(self) -> str:
        """Where this node answers, for a client on this machine."""
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @property
    def http_server(self) -> web.Server | None:
        """The HTTP server (it makes the connection protocols; ``cluster/pipe.py`` serves through it)."""
        return self._runner.server if self._runner is not None else None

    async def start(self) -> None:
        """Start every part in order; if one fails, what had started is stopped again and the error raised."""
        if self._stack is not None:
            raise RuntimeError("a node starts once")
        stack = self._stack = contextlib.AsyncExitStack()
        try:
            await self._start(stack)
        except BaseException:
            self._stopped = True
            await stack.aclose()
            raise

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        data_dir = Path(s.data_dir)
        if self.admin_token is None:
            self.admin_token = await asyncio.to_thread(load_or_create_admin_token, data_dir)
        # Unwound last to first: what is registered first is stopped last.
        if s.ledger:
            from .control.ledger import LEDGER_FILE, Ledger

            ledger = Ledger(data_dir / LEDGER_FILE, retention_days=s.ledger_retention_days)
            await ledger.open()
            self.ledger = ledger
            self.records.add_durable(ledger.write)
            stack.push_async_callback(self._close_ledger, ledger)  # last: every drained request's record is in it
        stack.push_async_callback(self._save_keys)  # with this node's last-used times
        await self.registry.start()
        stack.push_async_callback(self.registry.close)
        stack.push_async_callback(self._stop_embedded)
        if self.cluster is not None:  # peer sessions and the relay connection (1001) close only after the drain
            stack.push_async_callback(self.cluster.stop)
            # after the drain, before the peer sessions close: leases released, workers and shard engines stopped
            stack.push_async_callback(self._stop_sharding)
        raise_fd_limit()
        app = self.app = create_app(self.parts())
        # In-flight requests are drained before the runner cleans up; by then only idle connections are left.
        runner = self._runner = NodeRunner(
            app, limits=self.limits, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        stack.push_async_callback(self._drain, runner)
        self.port = await _listen(runner, web.TCPSite(runner, s.host, s.port, backlog=1024, reuse_address=True))
        if s.ollama_port is not None:  # the same app on a second port (tools that hard-code Ollama's)
            self.ollama_port = await _listen(
                runner, web.TCPSite(runner, s.host, s.ollama_port, backlog=1024, reuse_address=True)
            )
        if self.cluster is not None:
            from .cluster.tls_transport import PeerSite

            want = s.peer_port if s.peer_port is not None else (s.port + 1 if s.port else 0)
            peers = PeerSite(
                runner, s.host, want, ssl_context=self.cluster.tls.server, backlog=1024, reuse_address=True
            )
            await peers.start()
            self.peer_port = peers.bound_port
            server = runner.server
            assert server is not None  # runner.setup() made it
            await self.cluster.start(peer_port=self.peer_port, http_server=server)
            stack.push_async_callback(self.cluster.stop_announcing)  # first at stop: peers stop sending
            stack.push_async_callback(self._leave_shards)  # before anything: the leaders it helps move off it
            self._start_sharding()
        if self._wants_embedded():
            self._embedded_task = asyncio.create_task(self._start_embedded(), name="embedded-engine")
        log.info(
            "node_started",
            node=self.name,
            host=s.host,
            port=self.port,
            engines=[b.name for b in self.registry.backends.values()],
        )

    def _wire_sharding(self, cluster: ClusterService) -> None:
        """Lend this machine's memory (``lend``) and lead the ``[[shards]]`` (``cluster/sharding.py``)."""
        from .embedded.fetch import llama_server_path, rpc_server_path

        s = self.settings
        cache = Path(s.cache_dir)

        def built(path: Path) -> Path | None:
            return path if os.access(path, os.X_OK) else None

        if s.lend:
            cluster.memory = lambda: self.resources.memory
            self.lending = cluster.lending = Lending(
                lambda: built(rpc_server_path(cache)),
                Path(s.lend_cache_dir).expanduser() if s.lend_cache_dir else cache / "rpc-cache",
                lambda: self.resources.memory,
                max_workers=s.lend_max_workers,
            )

        async def publish(url: str, name: str, helpers: tuple[str, ...]) -> Backend:
            backend = self.registry.add(BackendSpec(kind="llamacpp", url=url, name=name))
            backend.helpers = helpers
            await self.registry.refresh_once()
            return backend

        async def withdraw(url: str) -> None:
            self.registry.remove(url.rstrip("/"))
            await self.registry.refresh_once()

        self.sharding = cluster.sharding = Sharding(
            lambda model, across, alias: Shard(
                model,
                across,
                cluster,
                binary=lambda: built(llama_server_path(cache)),
                publish=publish,
                withdraw=withdraw,
                lease_s=s.shard_lease_s,
                alias=alias,
            )
        )

    def _start_sharding(self) -> None:
        if self.lending is not None:
            self._tasks.add(asyncio.create_task(self.lending.run(), name="lending"))
        if self.cluster is not None:
            self._tasks.add(asyncio.create_task(self._refresh_resources(), name="resources"))
        if self.sharding is not None:
            for spec in self.settings.shards:
                self.sharding.lead(Path(spec.model).expanduser(), spec.across, spec.alias)

    async def _refresh_resources(self) -> None:
        """Task root: what this machine has free, as its health tells peers, kept fresh."""
        while True:
            try:
                await self.resources.refresh()
            except Exception:  # task root: log and go on
                log.exception("resources_refresh_failed")
            await asyncio.sleep(self.settings.health_interval_s)

    async def _leave_shards(self) -> None:
        """This node is stopping: the leaders of the shards it helps are told, and given the drain deadline to
        let their requests under way end and release its workers (``lending.leave``)."""
        cluster, lending = self.cluster, self.lending
        if cluster is None or lending is None or not len(lending):
            return

        async def tell(leader: str, shard: str) -> bool:
            return await cluster.tell(leader, LEAVING_PATH, {"shard": shard}, "shard_leaving")

        await lending.leave(tell, self.settings.drain_timeout_s)

    async def _stop_sharding(self) -> None:
        if self.sharding is not None:
            await self.sharding.close()
        if self.lending is not None:
            await self.lending.close()
        tasks, self._tasks = self._tasks, set()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def parts(self) -> Parts:
        """What the HTTP API is handed (``api.state.Parts``)."""
        s = self.settings
        return Parts(
            settings=s,
            name=self.name,
            router=self.router,
            registry=self.registry,
            catalog=self.catalog,
            inflight=self.inflight,
            limits=self.limits,
            records=self.records,
            keys=self.keys,
            answer_budget=self.answer_budget,
            admin_token=self.admin_token,
            cluster=self.cluster,
            ledger=lambda: self.ledger,
            metrics=self.metrics,
            address=lambda: f"{s.host}:{self.port}",
            sharding=self.sharding,
        )

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
        # the model's own context unless told (llama-server's --ctx-size 0), one KV cache shared by its slots
        engine = LlamaServerProcess(binary, model, host="127.0.0.1", port=0, ctx_size=self.settings.embedded_ctx_size)
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

    async def _drain(self, runner: NodeRunner) -> None:
        """Stop accepting, let the requests in flight end (the drain deadline), close the connections."""
        await stop_accepting(runner)
        if runner.server is not None:
            runner.server.pre_shutdown()  # no keep-alive after the current answer; idle ones close
        cut = await self.inflight.drain(self.settings.drain_timeout_s)
        if cut:
            log.warning("drain_deadline_passed", cut=cut, drain_timeout_s=self.settings.drain_timeout_s)
        await runner.cleanup()

    async def _stop_embedded(self) -> None:
        if self._embedded_task is not None:
            self._embedded_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._embedded_task
        if self.embedded is not None:
            await self.embedded.stop()

    async def _save_keys(self) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.keys.save)

    async def _close_ledger(self, ledger: Ledger) -> None:
        self.records.remove_durable(ledger.write)
        await ledger.close()

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
        if self._stack is not None:
            await self._stack.aclose()
        log.info("node_stopped", node=self.name)


async def _listen(runner: web.BaseRunner, site: web.TCPSite) -> int:
    """Start ``site``; the port it bound (the one asked for, or the one the system chose for 0)."""
    before = list(runner.addresses)
    await site.start()
    bound = [a for a in runner.addresses if a not in before]
    return int(bound[0][1])


def _with_stored_relay(settings: Settings) -> Settings:
    """The relay a node joined through (``quorum-node join CODE@RELAY`` stores it), where none is set."""
    if settings.relay is not None:
        return settings
    from .cluster.membership import load_relay

    stored = load_relay(Path(settings.data_dir))
    if stored is None:
        return settings
    return msgspec.structs.replace(settings, relay=stored[0], relay_token=stored[1])


def _membership(settings: Settings, data_dir: Path) -> tuple[Cluster, MemberStore] | None:
    """The cluster this node belongs to and its membership records, from the data dir (None: no cluster)."""
    from .cluster.members import MemberStore, decode_records
    from .cluster.membership import legacy_cluster, load_cluster, load_member_records

    try:
        cluster = load_cluster(data_dir)
        if cluster is None:
            if settings.cluster or legacy_cluster(data_dir) is not None:
                log.error(
                    "cluster_needs_migration",
                    data_dir=str(data_dir),
                    hint="a shared secret no longer makes a node a member: run `quorum-node cluster "
                    "migrate` on one node and `quorum-node join` with its invite on the others "
                    "(README: Migrating a cluster of the shared-secret days)",
                )
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
