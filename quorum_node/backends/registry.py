"""The engines of this machine: configured, detected and embedded, kept fresh.

A background loop re-reads every engine's health and model list and re-probes
the engines' default ports every ``probe_interval_s``, so an engine started
later appears and one that stops disappears with its models.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import aiohttp
import structlog

from ..settings import BackendSpec, Settings
from .base import Backend, BackendState, Model, Timeouts
from .detect import probe
from .ollama import OllamaBackend
from .openai_compat import MAX_MODELS_PER_ENGINE, OpenAICompatBackend

__all__ = ["Registry", "make_backend"]

log = structlog.get_logger(__name__)

#: A port where something that is no engine answers is asked again after this long, then twice as long each
#: time, up to ``NOT_ENGINE_MAX_S``: one identification (a few requests) every few minutes, not every round.
NOT_ENGINE_FIRST_S = 60.0
NOT_ENGINE_MAX_S = 300.0


def make_backend(
    kind: str,
    url: str,
    session: aiohttp.ClientSession,
    *,
    api_key: str | None = None,
    name: str | None = None,
    timeouts: Timeouts,
    detected: bool = False,
    max_models: int = MAX_MODELS_PER_ENGINE,
) -> Backend:
    """The one place that knows which adapter serves which kind."""
    if kind == "ollama":
        return OllamaBackend(
            url, session, api_key=api_key, name=name, timeouts=timeouts, detected=detected, max_models=max_models
        )
    return OpenAICompatBackend(
        kind, url, session, api_key=api_key, name=name, timeouts=timeouts, detected=detected, max_models=max_models
    )


class Registry:
    """Owns the engine session and every local backend."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.timeouts = Timeouts.from_settings(settings)
        self.backends: dict[str, Backend] = {}  # by url
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._refreshed = asyncio.Event()
        # Called after a refresh that changed an engine, its state or its models (any fact of one: /api/ps lists
        # which are loaded); the catalog (catalog.py) is rebuilt from it.
        self.on_change: list[Callable[[], None]] = []
        self.on_refresh: list[Callable[[], None]] = []  # after every refresh: what engines say of their load is new
        # Engines being prepared (the embedded one builds and loads before it has a URL).
        self.pending: set[str] = set()
        self._digest: tuple[object, ...] = ()
        self._detected_once = False
        # Ports where something that is no engine answers (a web app on 8080): url -> (next ask, wait after it).
        # Asked again rarely, the wait doubling, so its access log is not filled with our probes.
        self._not_engines: dict[str, tuple[float, float]] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "registry not started"
        return self._session

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, headers={"Accept-Encoding": "identity"}
        )
        for spec in self.settings.backends:
            self.add(spec)
        await self.refresh_once()
        self._task = asyncio.create_task(self._loop(), name="registry-refresh")

    def add(self, spec: BackendSpec, *, detected: bool = False) -> Backend:
        url = spec.url.rstrip("/").removesuffix("/v1")
        backend = make_backend(
            spec.kind,
            url,
            self.session,
            api_key=spec.api_key,
            name=spec.name,
            timeouts=self.timeouts,
            detected=detected,
            max_models=self.settings.max_models_per_engine,
        )
        self.backends[url] = backend
        log.info("engine_added", engine=backend.name, kind=spec.kind, url=url, detected=detected)
        return backend

    def remove(self, url: str) -> None:
        b = self.backends.pop(url, None)
        if b is not None:
            log.info("engine_removed", engine=b.name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
            # its connections' sockets close on the loop's next turn: take it, so that a stopped node
            # holds no socket (a caller that stops the loop right after would leak them)
            await asyncio.sleep(0)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            try:
                await self.refresh_once()
            except Exception:  # task root: log and go on
                log.exception("registry_refresh_failed")

    async def refresh_once(self) -> None:
        """Probe for new engines, then refresh every known one, concurrently."""
        if self.settings.detect:
            await self._detect()
        await asyncio.gather(*(self._refresh(url, b) for url, b in list(self.backends.items())))
        # Whole models, not only ids: a model that loads or unloads changes what /api/ps lists.
        digest = tuple((b.name, b.state, tuple(b.models)) for b in self.backends.values())
        if digest != self._digest:
            self._digest = digest
            for cb in self.on_change:
                cb()
        for cb in self.on_refresh:
            cb()
        self._refreshed.set()

    async def _refresh(self, url: str, backend: Backend) -> None:
        await backend.refresh()
        if backend.detected and backend.state is BackendState.DOWN:
            self.remove(url)  # at once, so no one sees a detected engine without its models

    async def _detect(self) -> None:
        host = self.settings.detect_host
        urls = [f"http://{host}:{p}" for p in self.settings.detect_ports]
        now = time.monotonic()
        todo = [u for u in urls if u not in self.backends and self._not_engines.get(u, (0.0, 0.0))[0] <= now]
        if not todo:
            return
        # The first pass runs as the node starts, when the machine may be busy: it allows longer, as an
        # engine's first probe does (``refresh``), so an engine that is there is found at start.
        timeout_s = self.settings.probe_timeout_s * (1 if self._detected_once else 4)
        self._detected_once = True
        found = await asyncio.gather(*(probe(self.session, u, timeout_s=timeout_s) for u in todo))
        now = time.monotonic()
        for url, (kind, answered) in zip(todo, found, strict=True):
            if kind is not None:
                self._not_engines.pop(url, None)
                self.add(BackendSpec(kind=kind, url=url), detected=True)
            elif answered:  # something is there and it is no engine: ask again after a while, then rarer
                wait = min(self._not_engines.get(url, (0.0, NOT_ENGINE_FIRST_S / 2))[1] * 2, NOT_ENGINE_MAX_S)
                if url not in self._not_engines:
                    log.info("detect_not_an_engine", url=url, again_in_s=wait)
                self._not_engines[url] = (now + wait, wait)
            else:  # nobody there (any more): looked at every round, as before
                self._not_engines.pop(url, None)

    def not_engines(self) -> list[str]:
        """Default ports where something answers that is no engine (``quorum-node doctor`` says so)."""
        return sorted(self._not_engines)

    # -- questions the router asks ---------------------------------------

    def holders(self, name: str) -> list[tuple[Backend, Model]]:
        """Local engines holding ``name`` (by id, engine id or alias), best first."""
        found: list[tuple[Backend, Model]] = []
        for b in self.backends.values():
            for m in b.models:
                if name == m.id or name == m.engine_id or name in m.aliases:
                    found.append((b, m))
                    break
        # healthier first, then less loaded, then a loaded model before a cold one
        found.sort(key=lambda bm: (bm[0].state is not BackendState.READY, bm[0].load, bm[1].loaded is False))
        return found

    def models(self) -> list[tuple[Backend, Model]]:
        return [(b, m) for b in self.backends.values() for m in b.models]

    def resting(self) -> list[tuple[Backend, Model]]:
        """The models engines that are down for now last held (they are expected back)."""
        return [(b, m) for b in self.backends.values() if b.state is BackendState.DOWN for m in b.last_models]

    def loading(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.state is BackendState.LOADING]

    def ready(self) -> bool:
        return any(b.state is BackendState.READY for b in self.backends.values())
