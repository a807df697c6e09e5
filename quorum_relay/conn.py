"""One node's connection: its bounded send queue and the tasks that serve it.

``send`` never blocks and never fails: it appends to the queue and wakes the
writer task, which drains the queue into the WebSocket. A node that does not
read makes its queue grow; past ``send_queue_bytes`` the queue is dropped and
the hub is told (it closes the node with ``CLOSE_TOO_SLOW``). So a slow node
costs at most its queue limit plus websockets' write buffer, and it never
stalls the reader loop of anyone who sends to it.

Each task here is owned by the connection's handler (``server``), which
awaits them in ``finish``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from .metrics import Stats
from .splice import encode_peer
from .tokens import Admission

if TYPE_CHECKING:
    from .hub import Link

__all__ = ["Conn", "close_with_deadline"]

log = structlog.get_logger(__name__)


async def close_with_deadline(ws: ServerConnection, code: int, reason: str, timeout_s: float) -> None:
    """Close ``ws`` with ``code``; abort the TCP connection if that takes longer than ``timeout_s``.

    websockets' own ``close`` first waits for the write buffer to drain, which
    a node that stopped reading never lets happen; hence the outer deadline.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await ws.close(code, reason)
    except TimeoutError:
        ws.transport.abort()


class Conn:
    """A connected node, as the hub sees it (``node_id``, ``since``, ``send``, ``close_soon``)."""

    __slots__ = (
        "_closer",
        "_on_overflow",
        "_pinged_at",
        "_pinger",
        "_stats",
        "_wake",
        "_writer",
        "address",
        "admission",
        "close_timeout_s",
        "closing",
        "draining",
        "gone",
        "last_rx",
        "limit",
        "node_id",
        "peer_bytes",
        "peers",
        "queue",
        "queued",
        "session",
        "since",
        "ws",
    )

    def __init__(
        self,
        ws: ServerConnection,
        *,
        node_id: str,
        admission: Admission,
        session: str,
        address: str,
        send_queue_bytes: int,
        close_timeout_s: float,
        stats: Stats,
        on_overflow: Callable[[Conn], None],
    ) -> None:
        self.ws = ws
        self.node_id = node_id
        self.admission = admission
        self.session = session
        self.address = address
        self.since = time.time()
        self.peer_bytes = encode_peer(node_id)  # spliced into every frame this node sends
        self.peers: dict[str, Link] = {}  # the namespace's live member dict, set by the hub
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.limit = send_queue_bytes
        self.close_timeout_s = close_timeout_s
        self.closing = False  # no more sends: the connection is being closed
        self.gone = False  # no longer registered: frames it still sends are ignored
        self.draining = False  # the node said it is stopping (``Draining``): the others were told
        self.last_rx = time.monotonic()
        self._stats = stats
        self._on_overflow = on_overflow
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._pinged_at = 0.0

    @property
    def namespace(self) -> str:
        return self.admission.namespace

    def __repr__(self) -> str:
        return f"Conn({self.node_id!r}, session={self.session!r})"

    # sending

    def send(self, data: bytes) -> None:
        """Queue one encoded frame; never blocks."""
        if self.closing:
            return
        self.queue.append(data)
        self.queued += len(data)
        if self.queued > self.limit:
            self.closing = True
            self.queue.clear()
            self.queued = 0
            self._on_overflow(self)
            return
        self._wake.set()

    def start(self) -> None:
        self._writer = self._spawn(self._write_loop())

    async def _write_loop(self) -> None:
        ws, queue, wake, stats = self.ws, self.queue, self._wake, self._stats
        try:
            while not self.closing:
                if not queue:
                    wake.clear()
                    await wake.wait()
                    continue
                data = queue.popleft()
                self.queued -= len(data)
                await ws.send(data)  # suspends only while the write buffer is over its limit
                stats.frames_out += 1
                stats.bytes_out += len(data)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("writer_failed", node_id=self.node_id)
            self.close_soon(1011, "internal error")

    # keepalive

    def ping_soon(self, now: float, interval_s: float) -> None:
        """Send a ping unless one is in flight or was sent less than ``interval_s`` ago."""
        if self.closing or now - self._pinged_at < interval_s:
            return
        if self._pinger is not None and not self._pinger.done():
            return
        self._pinged_at = now
        self._pinger = self._spawn(self._ping())

    async def _ping(self) -> None:
        try:
            pong = await self.ws.ping()
            await pong
        except ConnectionClosed:
            return
        self.last_rx = time.monotonic()

    # closing

    def close_soon(self, code: int, reason: str) -> None:
        """Stop sending and close the WebSocket with ``code`` (once; later calls do nothing)."""
        if self._closer is not None:
            return
        self.closing = True
        self.queue.clear()
        self.queued = 0
        self._wake.set()
        self._closer = self._spawn(close_with_deadline(self.ws, code, reason, self.close_timeout_s))

    async def finish(self, code: int, reason: str) -> None:
        """The handler's last step: close (unless already closing) and wait for this connection's tasks."""
        self.close_soon(code, reason)
        tasks = [t for t in (self._writer, self._pinger) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        assert self._closer is not None
        await asyncio.wait([*tasks, self._closer])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro)
