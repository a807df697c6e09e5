"""Reading an upstream's SSE stream (an engine's or a peer's), event by event, from any ``Body``.

The one stream reader of every engine adapter and of ``PeerTarget``: it
reads the answer's ``Body`` (``answer.py``) and never sees the transport, so
an HTTP answer from aiohttp (``upstream.HttpAnswer``) and a stream through
the relay are read alike. Timing is watched by one cheap timer per stream
(``_Watchdog``), which interrupts the body's pending read when the upstream
has been silent too long.

This is the hot path of every streamed token: one read, one split and one
check per chunk, no timer per read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ..errors import EngineError, EngineUnavailable, StreamBroken
from .answer import Body
from .base import Timeouts
from .errors import map_error_answer
from .native import MessagesEvents, ResponsesEvents
from .sse import EngineErrorEvent, EventSplitter, StreamNormalizer
from .upstream import deadline_for

__all__ = ["TAIL_MAX_BYTES", "TAIL_WAIT_S", "stream_events"]

#: After ``[DONE]``, how long and how much of the rest of the body is read so the connection can be reused.
TAIL_WAIT_S = 0.05  # the end of a chunked body follows [DONE] at once; a body that does not end costs this
TAIL_MAX_BYTES = 64 * 1024


def _before_first_byte(e: StreamBroken, name: str) -> EngineError:
    """A stream that failed before anything reached the client: classify it like an error answer."""
    if isinstance(e, EngineErrorEvent):
        # The engine reported an error instead of its first token, as if it had answered
        # with an error status: with the status the error names, else as a 500.
        status = e.info.status if e.info is not None and e.info.status and e.info.status >= 400 else 500
        return map_error_answer(status, e.data, {}, engine=name)
    return EngineUnavailable(f"engine {name}: {e.message}", status=502, engine=name)


async def stream_events(
    body: Body,
    norm: StreamNormalizer | ResponsesEvents | MessagesEvents,
    t: Timeouts,
    name: str,
    *,
    deadline: float | None = None,
) -> AsyncIterator[list[bytes]]:
    """Read an SSE answer's body event by event; see ``StreamReply`` for the contract.

    ``norm`` checks each event: a chat stream's (``sse.StreamNormalizer``) or a
    native API's (``native.ResponsesEvents``, ``native.MessagesEvents``).

    ``deadline`` (loop time) is when the first event must have come; it is the
    same one the wait for the answer's head ran under (``upstream.send``).
    A failure before any event (silence, a cut connection, a first event that
    is malformed, too large or an error) is raised as a failure before the
    first byte (another holder may serve the request); one after an event,
    as ``StreamBroken`` after the events before it. The body is released
    (read to its end: its connection may carry another request) or aborted
    (the upstream sees the cut and stops generating) before this ends.
    """
    if deadline is None:
        deadline = deadline_for(t, stream=True)
    splitter = EventSplitter()
    first = True
    clean_end = False
    read = body.readany
    watch = _Watchdog(body, deadline, t.idle_s)
    try:
        while True:
            try:
                chunk = await read()
            except _Silent:
                if first:
                    raise EngineUnavailable(
                        f"engine {name} sent no token in {t.first_token_s:g} s", status=504, engine=name
                    ) from None
                raise StreamBroken(f"engine {name} went silent for {t.idle_s:g} s", code="idle_timeout") from None
            batch: list[bytes] = []
            try:
                events = splitter.feed(chunk) if chunk else []
                if not chunk:
                    last = splitter.tail()
                    if last is not None:
                        events.append(last)
                for data in events:
                    if data.startswith(b"[DONE]"):
                        clean_end = True
                        break
                    out = norm.feed(data)
                    if out is not None:
                        batch.append(out)
                    if norm.extra:
                        batch.extend(norm.extra)
                        norm.extra.clear()
                    if norm.ended:  # a native stream's last event (backends/native.py): its [DONE]
                        clean_end = True
                        break
            except StreamBroken as e:
                if first and not batch:  # the first event failed: another engine may still serve it
                    raise _before_first_byte(e, name) from None
                if batch:  # what came before the failure is delivered, then the failure
                    if first:
                        first = False
                        watch.started()
                    yield batch
                raise
            if batch:
                if clean_end and not first:  # the end came with these: the writer sends them with its tail
                    norm.stats.tail = batch
                    break
                if first:
                    first = False
                    watch.started()
                # While the client takes its time with this batch, the engine's silence is not its fault
                # (it may be held back by our own flow control): the idle clock starts when we read again.
                watch.busy = True
                yield batch
                watch.busy = False
            if clean_end or not chunk:
                break
        if clean_end and not body.at_eof():
            await _read_tail(body)
        if first:
            how = "ended its stream" if clean_end else "closed the stream"
            raise EngineUnavailable(f"engine {name} {how} without a token", status=502, engine=name)
        if not clean_end and not norm.stats.finished:
            raise StreamBroken(f"engine {name} closed the stream before it finished", code="stream_truncated")
        norm.stats.finished = True
    except OSError as e:  # LinkBroken (the connection broke mid-read), a transport's own timeout
        if first:
            raise EngineUnavailable(f"engine {name} failed: {e}", engine=name) from None
        raise StreamBroken(f"engine {name} connection lost: {e}", code="engine_disconnected") from None
    finally:
        watch.cancel()
        if clean_end and body.at_eof():
            body.release()  # back to the pool: the next request skips a TCP handshake
        else:
            body.abort()  # the engine sees the disconnect and stops generating


async def _read_tail(body: Body) -> None:
    """Read what follows ``[DONE]`` (normally only the end of the chunked body, a moment later).

    A body not read to its end cannot give its connection back to the pool;
    without this every stream cost the engine and us a new connection. Bounded:
    what does not end within ``TAIL_WAIT_S`` or ``TAIL_MAX_BYTES`` is cut instead.
    """
    left = TAIL_MAX_BYTES
    try:
        async with asyncio.timeout(TAIL_WAIT_S):
            while left > 0 and (chunk := await body.readany()):
                left -= len(chunk)
    except (OSError, _Silent):  # TimeoutError, LinkBroken
        pass


class _Silent(Exception):
    """The engine sent nothing for longer than allowed."""


class _Watchdog:
    """One cheap timer per stream instead of one per read.

    Until the first event: the attempt's deadline, exactly (bytes that are no
    event, such as keep-alive comments, do not move it). After: it wakes four
    times per allowed idle gap and fails the read if the engine sent no byte since.
    """

    __slots__ = ("_body", "_handle", "_idle_s", "_loop", "_quiet_since", "_seen", "_started", "busy")

    def __init__(self, body: Body, deadline: float, idle_s: float) -> None:
        self._body = body
        self._idle_s = idle_s
        self._loop = asyncio.get_running_loop()
        self._started = False
        self._seen = 0
        self._quiet_since = 0.0
        self.busy = False  # the stream's consumer holds it (a slow client): not the engine's silence
        self._handle = self._loop.call_at(deadline, self._first_expired)

    def _first_expired(self) -> None:
        if not self._started:
            self._body.interrupt(_Silent())

    def started(self) -> None:
        """The first event is out: from now on the idle gap is what is watched."""
        self._started = True
        self._handle.cancel()
        self._seen = self._body.total_bytes
        self._quiet_since = self._loop.time()
        self._handle = self._loop.call_later(self._idle_s / 4, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        received = self._body.total_bytes
        if received != self._seen or self.busy:
            self._seen = received
            self._quiet_since = now
        if now - self._quiet_since >= self._idle_s:
            self._body.interrupt(_Silent())
            return
        self._handle = self._loop.call_later(self._idle_s / 4, self._check)

    def cancel(self) -> None:
        self._handle.cancel()
