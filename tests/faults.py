"""A fault-injecting TCP proxy for the reliability tests.

`FaultProxy` listens on 127.0.0.1 (port 0, read back after binding) and
forwards every connection to a target, turning the network bad on demand::

    async with FaultProxy("127.0.0.1", eng.port) as proxy:
        ...  # point the node at proxy.url instead of eng.url
        proxy.latency_s = 0.05
        proxy.stall = True
        await proxy.wait_until(lambda p: p.bytes_down > 0)

Knobs are plain attributes that tests change at any time; each is read per
forwarded piece, so a change reaches open connections too:

- `latency_s`, `jitter_s`: every chunk read is forwarded `latency_s` plus a
  random `0..jitter_s` after it arrived (both directions; order kept, so a chunk
  never overtakes the one before it).  FIN is delayed the same way.
- `bandwidth_bps`: at most this many bytes per second, per connection and
  direction (None: unlimited).
- `stall`: forward nothing (FIN included) while True; sockets stay open and
  forwarding resumes where it stopped once it is False again.
- `reset_after_bytes`, `close_after_bytes`: after exactly this many bytes have
  gone *to the client* on a connection, cut it with an RST (SO_LINGER 0) or a
  FIN.  Before an RST the sent bytes get `settle_s` to be read, because Linux
  throws away unread data when an RST arrives.  `reset_all()` RSTs every open
  connection at once, with no such grace.
- `slow_close_s`: when the target closes, wait this long before passing the
  FIN on to the client.
- `slice_bytes`: forward in writes of at most this many bytes (1: byte by
  byte), yielding to the event loop between writes.
- `refuse`: accept each new connection, then RST it at once.  For "connection
  refused" proper, `await stop_listening()` (the port stays bound) and
  `await resume_listening()`.

Bookkeeping: `connections` (open now), `accepted` (ever), `bytes_up` (client to
target) and `bytes_down` (target to client), counted as forwarded.  A target
that refuses shows as an RST to the client.

Memory stays bounded: each direction reads at most `QUEUE_CHUNKS` chunks ahead
of what the other side has taken (asyncio streams then stop reading the socket),
and writes wait for the transport to drain.  Every task is owned by the proxy
and cancelled by `close()`, which is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "hard_reset"]

READ_SIZE = 64 * 1024
QUEUE_CHUNKS = 16
#: bandwidth pacing granularity: one write carries at most this long's worth of bytes
PACE_QUANTUM_S = 0.02
_LINGER_RST = struct.pack("ii", 1, 0)


def hard_reset(transport: asyncio.BaseTransport) -> None:
    """Close with an RST, not a FIN: SO_LINGER 0, then abort (unsent data is dropped)."""
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class _Cut(Exception):
    """A connection cut on purpose (reset_after_bytes / close_after_bytes): not an error."""


@dataclass(eq=False)
class _Link:
    """One proxied connection: the accepted client side and, once connected, the upstream."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    sent_down: int = 0  # bytes forwarded to the client on this connection
    free_at: dict[bool, float] = field(default_factory=lambda: {True: 0.0, False: 0.0})
    due: dict[bool, float] = field(default_factory=lambda: {True: 0.0, False: 0.0})

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]

    def reset(self) -> None:
        for w in self.writers():
            hard_reset(w.transport)

    def abort(self) -> None:
        for w in self.writers():
            w.transport.abort()

    def close(self) -> None:
        for w in self.writers():
            w.close()


class FaultProxy:
    """A TCP proxy in front of `target_host:target_port` whose faults tests switch on and off."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        # knobs
        self.latency_s: float = 0.0
        self.jitter_s: float = 0.0
        self.bandwidth_bps: float | None = None
        self.reset_after_bytes: int | None = None
        self.close_after_bytes: int | None = None
        self.settle_s: float = 0.01
        self.slow_close_s: float = 0.0
        self.slice_bytes: int | None = None
        self.refuse: bool = False
        # bookkeeping
        self.connections: int = 0
        self.accepted: int = 0
        self.bytes_up: int = 0
        self.bytes_down: int = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None  # bound, not listening (between stop/resume)
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False

    # ----------------------------------------------------------------- knobs

    @property
    def stall(self) -> bool:
        return not self._flowing.is_set()

    @stall.setter
    def stall(self, value: bool) -> None:
        if value:
            self._flowing.clear()
        else:
            self._flowing.set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> FaultProxy:
        self._sock = self._bind(0)
        self.port = self._sock.getsockname()[1]
        await self.resume_listening()
        return self

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def stop_listening(self) -> None:
        """Refuse new connections (the port stays bound); open ones carry on."""
        if self._server is None or self._closed:
            return
        self._server.close()  # closes the listening socket now
        self._server = None
        self._sock = self._bind(self.port)

    async def resume_listening(self) -> None:
        """Accept connections again, on the same port."""
        if self._server is not None or self._closed:
            return
        if self._sock is None:
            self._sock = self._bind(self.port)
        sock, self._sock = self._sock, None
        try:
            self._server = await asyncio.start_server(self._on_accept, sock=sock, limit=READ_SIZE)
        except BaseException:
            sock.close()
            raise

    def reset_all(self) -> None:
        """RST every open connection, both sides, now (stalled ones too)."""
        for link in list(self._links):
            link.reset()
            if link.task is not None:
                link.task.cancel()

    async def close(self) -> None:
        """Stop listening, cut every connection and cancel every task; idempotent."""
        if self._closed:
            return
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for link in list(self._links):
            link.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ bookkeeping

    async def wait_until(self, predicate: Callable[[FaultProxy], bool]) -> None:
        """Wait, without polling, until `predicate(self)` holds (checked on each count change)."""
        loop = asyncio.get_running_loop()
        while not predicate(self):
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    def _notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    # ------------------------------------------------------------ forwarding

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback (not a coroutine), so the only task is the one we own.
        self.accepted += 1
        if self.refuse or self._closed:
            hard_reset(writer.transport)
            self._notify()
            return
        link = _Link(client=writer)
        self._links.add(link)
        self.connections += 1
        task = asyncio.get_running_loop().create_task(self._serve(link, reader))
        link.task = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._finished(link, t))
        self._notify()

    def _finished(self, link: _Link, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._links.discard(link)
        link.abort()  # no-op unless the task died before it could close them
        self.connections -= 1
        self._notify()

    async def _serve(self, link: _Link, creader: asyncio.StreamReader) -> None:
        try:
            ureader, link.upstream = await asyncio.open_connection(self.target_host, self.target_port, limit=READ_SIZE)
        except OSError:
            hard_reset(link.client.transport)  # target down: the client sees a reset
            return
        try:
            async with asyncio.TaskGroup() as tg:
                for up, reader, writer in ((True, creader, link.upstream), (False, ureader, link.client)):
                    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(QUEUE_CHUNKS)
                    tg.create_task(self._pump_in(link, reader, queue, up=up))
                    tg.create_task(self._pump_out(link, queue, writer, up=up))
        except* _Cut:
            pass  # already cut, the way the knob asked
        except* (OSError, asyncio.IncompleteReadError, RuntimeError):
            # RuntimeError: uvloop's answer to a write on a transport reset_all() just aborted
            link.reset()  # one side failed: pass the failure on as an RST
        link.close()
        for w in link.writers():
            with contextlib.suppress(OSError):
                await w.wait_closed()

    async def _pump_in(
        self, link: _Link, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes | None]], *, up: bool
    ) -> None:
        """Read chunks and stamp each with its due time; the bounded queue is the backpressure."""
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(READ_SIZE)
            delay = self.latency_s + (random.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0)
            # never earlier than the chunk before: order is kept whatever the jitter
            link.due[up] = max(link.due[up], loop.time() + delay)
            await queue.put((link.due[up], data or None))
            if not data:
                return

    async def _pump_out(
        self, link: _Link, queue: asyncio.Queue[tuple[float, bytes | None]], writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if data is None:
                if not up and self.slow_close_s > 0:
                    await asyncio.sleep(self.slow_close_s)
                await self._flowing.wait()
                if writer.can_write_eof() and not writer.transport.is_closing():
                    writer.write_eof()
                return
            await self._forward(link, writer, data, up=up)

    async def _forward(self, link: _Link, writer: asyncio.StreamWriter, data: bytes, *, up: bool) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            await self._flowing.wait()
            n = len(view)
            if self.slice_bytes:
                n = min(n, max(1, self.slice_bytes))
            bps = self.bandwidth_bps
            if bps:
                n = min(n, max(1, int(bps * PACE_QUANTUM_S)))
                if (wait := link.free_at[up] - loop.time()) > 0:
                    await asyncio.sleep(wait)
                    await self._flowing.wait()
            if not up:
                cut = self._cut_point()
                if cut is not None:
                    room = cut[0] - link.sent_down
                    if room <= 0:
                        await self._cut(link, writer, rst=cut[1])
                    n = min(n, room)
            piece, view = view[:n], view[n:]
            writer.write(piece)
            await writer.drain()
            if bps:
                link.free_at[up] = max(link.free_at[up], loop.time()) + n / bps
            if up:
                self.bytes_up += n
            else:
                self.bytes_down += n
                link.sent_down += n
            self._notify()
            if not up and (cut := self._cut_point()) is not None and link.sent_down >= cut[0]:
                await self._cut(link, writer, rst=cut[1])
            if self.slice_bytes:
                await asyncio.sleep(0)

    def _cut_point(self) -> tuple[int, bool] | None:
        """(bytes, rst) of the nearest cut the knobs ask for; an RST wins a tie."""
        points = []
        if self.reset_after_bytes is not None:
            points.append((self.reset_after_bytes, 0, True))
        if self.close_after_bytes is not None:
            points.append((self.close_after_bytes, 1, False))
        if not points:
            return None
        at, _, rst = min(points)
        return at, rst

    async def _cut(self, link: _Link, writer: asyncio.StreamWriter, *, rst: bool) -> None:
        if rst:
            # Flush to the kernel, then let the peer read it before the RST discards it.
            writer.transport.set_write_buffer_limits(high=0)
            await writer.drain()
            if self.settle_s > 0:
                await asyncio.sleep(self.settle_s)
            link.reset()
        else:
            link.close()  # FIN once the buffers are flushed
        raise _Cut
