"""One record per request (DESIGN.md, Seams): the facts of a request, computed once.

Every request that reaches the node ends as one ``Record``. The request log
line, the usage ledger and the metrics are *sinks* of that record; none of
them computes a fact of its own. The outermost middleware opens a ``Draft``
for every request (``request[DRAFT]``); the auth layer fills in who called,
the surface handler what was asked, the request path where it was served and
what it cost; the draft is sealed exactly once, either by the request path just
before the answer's last byte (so a durable sink has the record before the
client has the answer) or by the middleware when the request ended otherwise.

Which requests are recorded: every request to an API surface (``surface`` set
by its handler), and every request of any kind that was refused or failed
(status >= 400). A 200 on ``/health`` or a dashboard asset is not a record.
Nor is a request refused as unauthenticated (401: no key, a wrong key or
admin token, not a member): anyone who reaches the port can send those as fast
as they like, and a ledger row and a log line each would fill the disk. They
are counted (``refuse``: the refusal sinks, the metrics) and sampled into the
log (``RefusalLog``: at most one line a second, with the number passed over).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

__all__ = ["Draft", "Record", "Records", "RefusalLog", "outcome_for"]

log = structlog.get_logger("quorum_node.request")


class _Facts(msgspec.Struct, kw_only=True):
    """The facts of a request: filled in as it runs (``Draft``), then sealed (``Record``)."""

    time: float = 0.0  # wall-clock seconds when it arrived
    request_id: str = ""  # the same on the entry node and on the node that served it
    node: str = ""  # this node's name (where the record was made)
    method: str = ""
    path: str = ""
    surface: str | None = None  # "openai", "ollama", "responses", "anthropic", "peer"; None: not an API request
    operation: str | None = None  # "chat", "completions", "embeddings", "generate", "messages", "models", ...
    model: str | None = None
    stream: bool = False
    key_id: str | None = None  # the API key that authorised it (its id, never the key)
    key_name: str | None = None
    peer: str | None = None  # node id of the peer that forwarded it here (None: this node is the entry node)
    remote: str | None = None
    serving_node: str | None = None  # the node whose engine generated the answer
    route: str | None = None  # "local" | "lan" | "relay"
    engine: str | None = None
    status: int = 0  # HTTP status; 499 client went away; a broken stream's status is its error's
    outcome: str = "ok"  # "ok" | "rejected" (4xx) | "failed" (5xx, broken stream) | "cancelled" (client left)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_estimated: bool = False  # the engine gave no usage: completion tokens are counted chunks
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    attempts: int = 0
    error: str | None = None


_FACTS = _Facts.__struct_fields__


class Record(_Facts, frozen=True, kw_only=True):
    """What one request was, where it was served and what it cost."""

    @property
    def entry(self) -> bool:
        """Whether this is the entry node's record (a cluster counts each request once, by these)."""
        return self.peer is None


def outcome_for(status: int) -> str:
    if status == 499:
        return "cancelled"
    if status >= 500:
        return "failed"
    if status >= 400:
        return "rejected"
    return "ok"


_wall_clock = time.time
_perf_counter = time.perf_counter


class Draft(_Facts, kw_only=True, eq=False):
    """A record being filled in while its request runs (mutable, one per request): its fields are the
    record's, set by name (``draft.model = …``), so a misspelt one is an error where it is set."""

    time: float = msgspec.field(default_factory=_wall_clock)
    t0: float = msgspec.field(default_factory=_perf_counter)
    sealed: Record | None = None

    def asked(self, surface: str, operation: str, model: str | None = None) -> None:
        """What the request asks: the surface that took it, the operation, the model it names."""
        self.surface = surface
        self.operation = operation
        self.model = model

    def build(self, status: int) -> Record:
        if not self.status:
            self.status = status
        return Record(
            **{name: getattr(self, name) for name in _FACTS if name not in _SEALED},
            status=self.status,
            outcome=outcome_for(self.status),
            duration_ms=round((time.perf_counter() - self.t0) * 1000, 3),
        )


_SEALED = frozenset({"status", "outcome", "duration_ms"})


Sink = Callable[[Record], None]
DurableSink = Callable[[Record], Awaitable[None]]
StartSink = Callable[[Draft], None]
RefusalSink = Callable[[str], None]  # called with the reason of each unauthenticated refusal


class RefusalLog:
    """Which unauthenticated refusals get a log line: at most one every ``interval_s``, carrying how many
    were passed over since the last one. Pure logic, constant memory whoever sends them."""

    __slots__ = ("interval_s", "_next", "_passed")

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._next = float("-inf")
        self._passed = 0

    def take(self, now: float) -> int | None:
        """None: no line for this refusal; else log it, with this many passed over before it."""
        if now < self._next:
            self._passed += 1
            return None
        self._next = now + self.interval_s
        passed, self._passed = self._passed, 0
        return passed


class Records:
    """Where sealed records go: the log line, the metrics, the ledger (each a sink).

    ``add(sink)``: called on the event loop for each record, right after the
    step of the request path that sealed it (``loop.call_soon``: after the
    answer's last write, before the loop polls its sockets again); it must be
    cheap and never raise into the request. ``add_durable(sink)``: an
    awaitable sink (the ledger); ``seal`` awaits it, so a record is stored
    before the answer it describes has ended.
    """

    def __init__(self) -> None:
        self._sinks: list[Sink] = [log_line]
        self._durable: list[DurableSink] = []
        self._starts: list[StartSink] = []
        self._refusals: list[RefusalSink] = []
        self.refusal_log = RefusalLog()
        self.live: set[Draft] = set()
        """Drafts of requests the request path is serving now (``started``, not yet sealed): the
        dashboard's "in flight"."""

    def add(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def remove(self, sink: Sink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def add_start(self, sink: StartSink) -> None:
        """Called (synchronously, cheap, never raising) when the request path starts serving a draft."""
        self._starts.append(sink)

    def remove_start(self, sink: StartSink) -> None:
        if sink in self._starts:
            self._starts.remove(sink)

    def started(self, draft: Draft) -> None:
        """The request path took ``draft`` on (its surface, operation and model are set): it is live
        until sealed."""
        self.live.add(draft)
        _each(self._starts, draft)

    def add_refusal(self, sink: RefusalSink) -> None:
        """Called (synchronously, cheap, never raising) with the reason of each unauthenticated refusal."""
        self._refusals.append(sink)

    def refuse(self, draft: Draft, reason: str, *, now: float | None = None) -> None:
        """``draft``'s request is refused as unauthenticated (401): sealed without a record, counted, sampled.

        ``reason`` is one of a few words of the node's own (``missing_key``, ``invalid_key``,
        ``admin_token``, ``peer_claim``, ``not_a_member``): it becomes a metric label.
        """
        self.live.discard(draft)
        if draft.sealed is not None:
            return
        draft.sealed = draft.build(401)  # sealed, so the middleware records nothing; no sink sees it
        _each(self._refusals, reason)
        passed = self.refusal_log.take(time.monotonic() if now is None else now)
        if passed is not None:
            path = draft.path
            log.warning(
                "unauthenticated_request", remote=draft.remote, path=path[:200], reason=reason, passed_over=passed
            )

    def add_durable(self, sink: DurableSink) -> None:
        self._durable.append(sink)

    def remove_durable(self, sink: DurableSink) -> None:
        if sink in self._durable:
            self._durable.remove(sink)

    def _emit(self, record: Record) -> None:
        # Just after the request path's current step: that step goes on to write the answer's end, so the
        # log line and the metrics (tens of microseconds) are not in the client's latency; every sink still
        # has the record before the loop reads the next request from any socket.
        try:
            asyncio.get_running_loop().call_soon(_each, self._sinks, record)
        except RuntimeError:  # no loop (a tool, a test)
            _each(self._sinks, record)

    async def seal(self, draft: Draft, status: int) -> Record | None:
        """Seal ``draft`` (once): build the record, hand it to every sink, await the durable ones.

        Returns the record, or None if the draft was sealed already.
        """
        self.live.discard(draft)
        if draft.sealed is not None:
            return None
        record = draft.sealed = draft.build(status)
        self._emit(record)
        for sink in self._durable:
            try:
                await sink(record)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("record_sink_failed", sink=getattr(sink, "__qualname__", repr(sink)))
        return record

    def seal_nowait(self, draft: Draft, status: int) -> Record | None:
        """``seal`` for a request that ended without an answer worth waiting for (refused, failed,
        cancelled): durable sinks get the record, but nobody waits for them."""
        self.live.discard(draft)
        if draft.sealed is not None:
            return None
        record = draft.sealed = draft.build(status)
        self._emit(record)
        for sink in self._durable:
            task = asyncio.ensure_future(sink(record))
            task.add_done_callback(_log_failure)
        return record


def _each(sinks: list[Any], arg: Any) -> None:
    for sink in sinks:
        try:
            sink(arg)
        except Exception:  # a sink's bug never fails a request
            log.exception("record_sink_failed", sink=getattr(sink, "__qualname__", repr(sink)))


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("record_sink_failed", error=str(task.exception()))


def log_line(r: Record) -> None:
    """The request log line: one per record, with the record's own facts."""
    if r.surface is None and r.status < 400:
        return
    log.info(
        "request",
        request_id=r.request_id,
        surface=r.surface,
        op=r.operation,
        model=r.model,
        key=r.key_name,
        engine=r.engine,
        node=r.serving_node,
        route=r.route,
        peer=r.peer,
        status=r.status,
        outcome=r.outcome,
        stream=r.stream,
        attempts=r.attempts,
        ttft_ms=r.ttft_ms,
        tokens_in=r.prompt_tokens,
        tokens_out=r.completion_tokens,
        duration_ms=r.duration_ms,
        error=r.error,
        **({"path": r.path} if r.surface is None else {}),
    )
