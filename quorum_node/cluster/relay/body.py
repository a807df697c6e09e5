"""A peer's answer through the relay, as the link seam hands it up (``backends/answer.py``: ``Answer``, ``Body``).

Reading the body is what grants the sender more credit (``on_consumed``); a
body abandoned before its end resets its stream (``abort``), so the peer stops
its engine. A broken stream raises ``LinkBroken`` from ``readany``, never a
transport's own exception.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

from multidict import CIMultiDict, CIMultiDictProxy

from ...backends.answer import LinkBroken

__all__ = ["RelayAnswer", "RelayBody"]


class RelayBody:
    """An answer's body as it arrives (``answer.Body``)."""

    __slots__ = ("_chunks", "_eof", "_exc", "_waiter", "total_bytes", "_on_consumed", "_on_abort", "_loop")

    def __init__(self, on_consumed: Callable[[int], None], on_abort: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.total_bytes = 0
        self._on_consumed = on_consumed
        self._on_abort = on_abort

    @property
    def content_length(self) -> int | None:
        return None  # a peer's answer comes as it is made: its length is never declared

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    # -- the stream's side ------------------------------------------------------------

    def feed_data(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.total_bytes += len(data)
            self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def broke(self, why: str) -> None:
        """The stream failed: pending and later reads raise ``LinkBroken``."""
        if self._exc is None:
            self.interrupt(LinkBroken(why))

    # -- the reader's side ----------------------------------------------------------

    def interrupt(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake()

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter
        if self._exc is not None:
            raise self._exc
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks.clear()
        self._on_consumed(len(data))
        return data

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    def release(self) -> None:
        if not self.at_eof():
            self.abort()

    def abort(self) -> None:
        """Abandon the answer: the peer is told (and stops its engine)."""
        self._on_abort()


class RelayAnswer:
    """A peer's answer through the relay (``answer.Answer``)."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: RelayBody) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self.body = body

    async def __aenter__(self) -> RelayAnswer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.body.release()
