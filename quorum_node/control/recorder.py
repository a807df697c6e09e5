"""Where every request's record goes: the log line, the metrics, the ledger (``records.py`` has the types).

``Records`` is the hub the request path seals drafts into; its sinks read the
sealed ``Record`` and compute nothing of their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ..records import Draft, Record, RefusalLog

__all__ = ["Records", "log_line"]

log = structlog.get_logger("quorum_node.request")

Sink = Callable[[Record], None]
DurableSink = Callable[[Record], Awaitable[None]]
StartSink = Callable[[Draft], None]
RefusalSink = Callable[[str], None]  # called with the reason of each unauthenticated refusal


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
        draft.sealed = draft.build(
            401, time.perf_counter()
        )  # sealed, so the middleware records nothing; no sink sees it
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
        record = draft.sealed = draft.build(status, time.perf_counter())
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
        record = draft.sealed = draft.build(status, time.perf_counter())
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
        **({"queue_ms": r.queue_ms} if r.queue_ms is not None else {}),
        tokens_in=r.prompt_tokens,
        tokens_out=r.completion_tokens,
        duration_ms=r.duration_ms,
        error=r.error,
        **({"path": r.path} if r.surface is None else {}),
    )
