"""Live events for the dashboard: ``GET /quorum/admin/events`` (Server-Sent Events).

What a subscriber gets, each as one SSE event (``event: NAME``, ``data: JSON``):

- ``hello``: at once on connecting: the fleet, the requests in flight.
- ``start``: the request path took a request on (``Records.started``).
- ``record``: a request ended; its sealed ``Record`` (``records.py``).
- ``tick``: every ``interval_s``: how many requests are in flight, and which.
- ``fleet``: the fleet (``fleet.py``), whenever it changed since the last one.
- ``dropped``: this subscriber was too slow and lost ``count`` events (refetch).

Every subscriber has a bounded queue: one that does not read falls behind and
loses events, never costs unbounded memory or slows a request (the sinks only
``put_nowait``). Subscribers are removed when they disconnect, and ``close``
(the app's shutdown) ends every stream at once, so a browser left open never
holds up a stopping node.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import web

from ...errors import Unavailable

if TYPE_CHECKING:
    from ...control.recorder import Records
    from ...records import Draft, Record

__all__ = ["EventHub", "live_entry"]

log = structlog.get_logger(__name__)
_encode = msgspec.json.Encoder().encode

_LIVE_FIELDS = (
    "request_id",
    "surface",
    "operation",
    "model",
    "stream",
    "key_name",
    "serving_node",
    "route",
    "engine",
    "peer",
    "remote",
    "time",
)
_MAX_LIVE = 200  # a tick lists at most this many requests in flight (the count is always exact)


def live_entry(draft: Draft, now: float) -> dict[str, Any]:
    """A request in flight, for people: what it is, where it is served, for how long so far."""
    out: dict[str, Any] = {k: getattr(draft, k) for k in _LIVE_FIELDS}
    out["age_ms"] = round((now - draft.t0) * 1000, 1)
    return out


class _Subscriber:
    __slots__ = ("queue", "dropped")

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(size)
        self.dropped = 0

    def offer(self, event: bytes) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    def end(self) -> None:
        while not self.queue.empty():  # make room for the end marker; what was queued is moot now
            self.queue.get_nowait()
        self.queue.put_nowait(None)


def _sse(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


class EventHub:
    """The subscribers of ``/quorum/admin/events`` and what feeds them (record sinks, a 1 s ticker)."""

    def __init__(
        self,
        records: Records,
        fleet: Callable[[], dict[str, Any]],
        *,
        queue_size: int = 256,
        max_subscribers: int = 32,
        interval_s: float = 1.0,
    ) -> None:
        self.records = records
        self._fleet = fleet
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self.interval_s = interval_s
        self.subscribers: set[_Subscriber] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._last_fleet = b""
        self._closed = False
        records.add(self.on_record)
        records.add_start(self.on_start)

    # -- sinks (on the loop, per request: nothing to do without subscribers) ------------------

    def on_record(self, record: Record) -> None:
        if self.subscribers:
            self._publish(_sse("record", _encode(record)))

    def on_start(self, draft: Draft) -> None:
        if self.subscribers:
            self._publish(_sse("start", _encode(live_entry(draft, time.perf_counter()))))

    def _publish(self, event: bytes) -> None:
        for s in self.subscribers:
            s.offer(event)

    # -- snapshots -------------------------------------------------------------------------

    def live(self) -> dict[str, Any]:
        now = time.perf_counter()
        drafts = sorted(self.records.live, key=lambda d: d.t0)[:_MAX_LIVE]
        return {
            "in_flight": len(self.records.live),
            "requests": [live_entry(d, now) for d in drafts],
            "time": time.time(),
        }

    async def _tick(self) -> None:
        try:
            while self.subscribers and not self._closed:
                await asyncio.sleep(self.interval_s)
                self._publish(_sse("tick", _encode(self.live())))
                fleet = _encode(self._fleet())
                if fleet != self._last_fleet:
                    self._last_fleet = fleet
                    self._publish(_sse("fleet", fleet))
        except Exception:  # task root
            log.exception("dashboard_ticker_failed")
        finally:
            self._ticker = None

    # -- the stream ------------------------------------------------------------------------

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if self._closed:
            raise Unavailable("This node is shutting down", code="node_stopping")
        if len(self.subscribers) >= self.max_subscribers:
            raise Unavailable(
                f"Too many dashboards are watching this node (at most {self.max_subscribers})",
                code="too_many_subscribers",
                retry_after_s=5,
            )
        sub = _Subscriber(self.queue_size)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        self.subscribers.add(sub)
        try:
            await resp.prepare(request)
            fleet = _encode(self._fleet())
            await resp.write(
                b"retry: 2000\n\n" + _sse("hello", b'{"fleet":' + fleet + b',"live":' + _encode(self.live()) + b"}")
            )
            if self._ticker is None:
                self._ticker = asyncio.create_task(self._tick(), name="dashboard-ticker")
            while True:
                event = await sub.queue.get()
                if event is None:
                    break
                if sub.dropped:
                    event = _sse("dropped", b'{"count":%d}' % sub.dropped) + event
                    sub.dropped = 0
                await resp.write(event)
        except ConnectionError:
            return resp  # the browser went away
        finally:  # also when cancelled (the browser went away, aiohttp's handler cancellation)
            self.subscribers.discard(sub)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    async def close(self) -> None:
        """End every stream now (the node is stopping); idempotent."""
        self._closed = True
        self.records.remove(self.on_record)
        self.records.remove_start(self.on_start)
        for s in list(self.subscribers):
            s.end()
        task = self._ticker
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
