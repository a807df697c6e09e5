"""Serve a request with the node's own HTTP server, in memory: no socket, no HTTP client.

A request that arrives through the relay is answered by the same server, the
same middlewares (trust, keys, records) and the same handlers as one that came
over the LAN. The relay link has already authenticated the member it came from
(its Noise session); the transport says who that is (``PEER_INFO``), so the
trust middleware takes the request as that member's. It used to get there over a loopback TCP
connection with an HTTP client; that cost two socket writes, two reads and a
client-side HTTP parse for every event of every relayed answer, on the node
that is already the busiest of the route. Here the request's bytes are fed to
one of the server's own connection protocols over an in-memory transport, and
what the server writes is handed back as it comes.

The request goes out as HTTP/1.0, so the answer's body is the bytes after its
head, delimited by the end of the connection (no chunked framing to undo).
Back-pressure is the transport's: when more than ``HIGH`` bytes wait unread,
the protocol is paused (aiohttp's writer then waits in ``drain``), and resumed
below ``LOW``. Closing the response (the requester went away) closes the
transport, which aiohttp sees as the client disconnecting: the handler is
cancelled and the engine request closed.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict

__all__ = ["PEERNAME", "PEER_INFO", "PIPE_INFO", "PipeError", "PipeResponse", "serve_in_memory"]

PEERNAME = "relay-peer"  # the remote address the server sees for requests through the pipe
PIPE_INFO = "quorum_pipe"  # transport extra info: this connection is the in-memory pipe
PEER_INFO = "quorum_peer"  # transport extra info: the member whose request this is (authenticated by the link)
HIGH = 64 * 1024
LOW = 16 * 1024
_MAX_HEAD = 64 * 1024

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHOD = re.compile(r"[A-Z]{1,16}")
_PATH = re.compile(r"/[^\x00-\x20\x7f]*")
_BAD_VALUE = re.compile(r"[\r\n\x00]")


class PipeError(ConnectionError):
    """The request could not be put to the server (malformed), or the server's answer was cut."""


def _check(method: str, path: str, headers: list[tuple[str, str]]) -> None:
    # The head comes from a peer: nothing in it may break out of its line.
    if not _METHOD.fullmatch(method):
        raise PipeError("bad method")
    if not _PATH.fullmatch(path):
        raise PipeError("bad path")
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise PipeError("bad header")


class _Transport(asyncio.Transport):
    """The server's side of the pipe: what it writes is queued for the reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: str) -> None:
        super().__init__()
        self._loop = loop
        self._peer = peer
        self._protocol: asyncio.Protocol | None = None
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._paused = False
        self._closing = False
        self._waiter: asyncio.Future[None] | None = None
        # Takes a write as it is made, when it can (see ``_Body.set_sink``): no buffering, no reader to wake.
        self._sink: Callable[[bytes], bool] | None = None

    def start(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # Not loopback: what came through the relay is trusted as the request of the member the link
        # authenticated (``PEER_INFO``), never for where it seems to come from.
        if name == "peername":
            return (PEERNAME, 0)
        if name == "sockname":
            return ("127.0.0.1", 0)
        if name == PIPE_INFO:
            return True
        if name == PEER_INFO:
            return self._peer
        return default

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if self._sink is not None and not self._chunks and self._sink(bytes(data)):
            return  # taken as it was written (nothing was waiting before it, so order holds)
        self._chunks.append(bytes(data))
        self._size += len(data)
        if self._size > HIGH and not self._paused and self._protocol is not None:
            self._paused = True
            self._protocol.pause_writing()
        self._wake()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return LOW, HIGH

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_reading(self) -> bool:
        return not self._closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake()
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            self._loop.call_soon(protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    async def read(self) -> bytes:
        """Everything written since the last read (b"" once the server closed and all was read)."""
        while not self._chunks:
            if self._closing:
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks.clear()
        self._size = 0
        if self._paused and self._protocol is not None:
            self._paused = False
            self._protocol.resume_writing()
        return data


class _Body:
    """The answer's body as it comes (the ``readany`` the relay link reads)."""

    def __init__(self, transport: _Transport, first: bytes) -> None:
        self._t = transport
        self._first = first

    async def readany(self) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        return await self._t.read()

    def set_sink(self, sink: Callable[[bytes], bool] | None) -> None:
        """Hand each write to ``sink`` as it is made, while nothing is buffered; where ``sink`` returns
        False (no room downstream, or the reader is still sending) it is buffered for ``readany``.

        The relay link uses it to send an answer's events from inside the server's own write: one task
        switch and one buffer less per event, on the busiest node of the relay route.
        """
        self._t._sink = sink


class PipeResponse:
    """The head of the server's answer, and its body to read."""

    def __init__(self, status: int, headers: CIMultiDict[str], transport: _Transport, rest: bytes) -> None:
        self.status = status
        self.headers = headers
        self.content = _Body(transport, rest)
        self._t = transport

    def close(self) -> None:
        self._t.close()


async def serve_in_memory(
    protocol_factory: Callable[[], asyncio.Protocol],
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    peer: str,
) -> PipeResponse:
    """Put one request to the server whose connections ``protocol_factory`` makes; return its answer's head.

    ``peer`` is the node id the relay link authenticated (its Noise session's
    static key is that member's): the server reads it as
    ``transport.get_extra_info("quorum_peer")``, and a request through the pipe
    is that member's, with no signature of its own.
    """
    if not peer:
        raise PipeError("no authenticated peer")
    _check(method, path, headers)
    lines = [f"{method} {path} HTTP/1.0", "Host: quorum-relay"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in ("content-length", "host")]
    lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    transport = _Transport(asyncio.get_running_loop(), peer)
    protocol = protocol_factory()
    transport.start(protocol)
    try:
        protocol.data_received(raw)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await transport.read()
            if not data:
                raise PipeError("the server closed the connection before its answer")
            buf += data
            if len(buf) > _MAX_HEAD and b"\r\n\r\n" not in buf[:_MAX_HEAD]:
                raise PipeError("the server's answer head is too large")
        head, _, rest = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        out: CIMultiDict[str] = CIMultiDict()
        for line in header_lines:
            name, _, value = line.partition(":")
            out.add(name.strip(), value.strip())
        return PipeResponse(status, out, transport, rest)
    except BaseException:
        transport.close()
        raise
