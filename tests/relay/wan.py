"""A relay for tests of nodes that reach each other through it, and a tap on its wire."""

from __future__ import annotations

import asyncio
from typing import Any

from quorum_relay.server import Relay
from quorum_relay.settings import Settings as RelaySettings

__all__ = ["TOKEN", "RelayHandle", "Tap"]

TOKEN = "relay-token-0123456789abcdef"


class RelayHandle:
    def __init__(self) -> None:
        self.relay: Relay | None = None
        self.port = 0

    async def start(self, port: int = 0, **settings: Any) -> None:
        self.relay = Relay(RelaySettings(host="127.0.0.1", port=port, tokens=(TOKEN,), log_format="json", **settings))
        await self.relay.start()
        self.port = self.relay.port

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


class Tap:
    """A TCP proxy that keeps every byte it forwards: what someone on the relay's wire would see."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.seen = bytearray()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65536):
                    self.seen += chunk
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        tasks = [asyncio.create_task(pipe(r, uw)), asyncio.create_task(pipe(ur, w))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
