"""A TCP stream carried through the peer link: ``rpc-server``'s, from a leader's engine to a helper (issue 22).

The peer link is HTTPS with mutual TLS (``tls.py``); the tunnel is a WebSocket
upgrade on it (``GET /quorum/v1/shards/tunnel?shard=…``), so the helper's
trust middleware proves the member before a byte flows, and every byte is
inside that TLS session: a stranger can neither open one nor replay one.
Each side joins the WebSocket (binary messages) to a loopback TCP stream —
the helper to its ``rpc-server``, the leader to the connection its
``llama-server`` opened to the local listener that stands for the helper.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import aiohttp

__all__ = ["CHUNK", "MAX_MESSAGE", "Counted", "join"]

#: How much one read from the TCP side carries in one message.
CHUNK = 256 * 1024
#: The largest message either side accepts (a peer sending more is cut off).
MAX_MESSAGE = 2 * CHUNK


class _Socket(Protocol):
    """What both ends' WebSocket objects (aiohttp's client and server) offer."""

    async def send_bytes(self, data: bytes) -> None: ...

    async def receive(self, timeout: float | None = None) -> aiohttp.WSMessage: ...

    async def close(self) -> bool: ...


class Counted:
    """Bytes carried: ``sent`` into the WebSocket, ``received`` out of it."""

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


async def join(ws: _Socket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: Counted) -> None:
    """Carry bytes both ways until either side ends; then close both."""

    async def outward() -> None:
        while chunk := await reader.read(CHUNK):
            await ws.send_bytes(chunk)
            count.sent += len(chunk)

    async def inward() -> None:
        while True:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.BINARY:
                return  # closed, an error, or text (no part of the protocol): the end
            writer.write(msg.data)
            count.received += len(msg.data)
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
            await ws.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
