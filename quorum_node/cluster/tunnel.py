"""A TCP stream carried through the peer link: ``rpc-server``'s, from a leader's engine to a helper (issue 22).

On the LAN the peer link is HTTPS with mutual TLS (``tls.py``) and the tunnel a
WebSocket upgrade on it (``GET /quorum/v1/shards/tunnel?shard=…``): the
helper's trust middleware proves the member before a byte flows, and every
byte is inside that TLS session, so a stranger can neither open one nor
replay one. Through the relay it is a stream of the Noise session the relay
link already holds with the member (``relay/link.py``, ``TUNNEL``), which the
relay forwards and cannot read. Either way each side joins the tunnel (a
``Duplex``) to a loopback TCP stream: the helper to its ``rpc-server``, the
leader to the connection its ``llama-server`` opened to the local listener
that stands for the helper.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import aiohttp
from aiohttp import web

__all__ = ["CHUNK", "MAX_MESSAGE", "Counted", "Duplex", "WebSocketDuplex", "join"]

#: How much one read from the TCP side carries in one message.
CHUNK = 256 * 1024
#: The largest message either side accepts (a peer sending more is cut off).
MAX_MESSAGE = 2 * CHUNK


class Duplex(Protocol):
    """A byte stream both ways, message by message: a WebSocket, or a relay stream."""

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes:
        """The next bytes; b"" once the other side ended (or anything but bytes came)."""
        ...

    async def close(self) -> None: ...


class WebSocketDuplex:
    """A WebSocket (aiohttp's, client or server side) as a ``Duplex``: binary messages only."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse | web.WebSocketResponse) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def recv(self) -> bytes:
        msg = await self.ws.receive()
        return msg.data if msg.type is aiohttp.WSMsgType.BINARY and msg.data else b""

    async def close(self) -> None:
        await self.ws.close()


class Counted:
    """Bytes carried: ``sent`` into the tunnel, ``received`` out of it."""

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


async def join(tunnel: Duplex, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: Counted) -> None:
    """Carry bytes both ways until either side ends; then close both."""

    async def outward() -> None:
        while chunk := await reader.read(CHUNK):
            await tunnel.send(chunk)
            count.sent += len(chunk)

    async def inward() -> None:
        while data := await tunnel.recv():
            writer.write(data)
            count.received += len(data)
            await writer.drain()

    tasks = [asyncio.create_task(outward()), asyncio.create_task(inward())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        writer.close()  # first, before anything awaits: a cancellation in what follows must not leave it open
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, ConnectionError, OSError):
                await t
        with contextlib.suppress(aiohttp.ClientError, ConnectionError, OSError, RuntimeError):
            await tunnel.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
