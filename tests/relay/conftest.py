"""Relay fixtures: an in-process relay on 127.0.0.1 port 0 and real websockets clients speaking relay/wire."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from relay.server import Relay
from relay.settings import Settings
from relay.wire import CONNECT_PATH, NODE_ID_HEADER, Frame, Joined, Welcome, decode, encode

TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-0123456789abcdef"
WAIT_S = 5.0

F = TypeVar("F")


def relay_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "tokens": (TOKEN_A, TOKEN_B), "log_format": "json"}
    base.update(overrides)
    return Settings(**base)


class Node:
    """A test node: one real WebSocket to the relay, frames in and out."""

    def __init__(self, ws: ClientConnection, welcome: Welcome) -> None:
        self.ws = ws
        self.welcome = welcome

    @property
    def node_id(self) -> str:
        return self.welcome.node_id

    async def send(self, frame: Frame) -> None:
        await self.ws.send(encode(frame))

    async def send_raw(self, raw: bytes | str) -> None:
        await self.ws.send(raw)

    async def recv_raw(self, timeout: float = WAIT_S) -> bytes:
        async with asyncio.timeout(timeout):
            raw = await self.ws.recv()
        assert isinstance(raw, bytes)
        return raw

    async def recv(self, timeout: float = WAIT_S) -> Frame:
        return decode(await self.recv_raw(timeout))

    async def expect(self, kind: type[F], timeout: float = WAIT_S) -> F:
        frame = await self.recv(timeout)
        assert isinstance(frame, kind), f"expected {kind.__name__}, got {frame!r}"
        return frame

    async def closed_with(self, timeout: float = WAIT_S) -> int | None:
        """Read until the relay closes this connection; the close code it sent."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    await self.ws.recv()
            except ConnectionClosed:
                pass
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


def headers(node_id: str | None, token: str | None) -> dict[str, str]:
    h: dict[str, str] = {}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if node_id is not None:
        h[NODE_ID_HEADER] = node_id
    return h


@pytest.fixture(autouse=True)
def _no_leaked_sockets() -> Iterator[None]:
    """Collect garbage after each test, so a socket it leaked fails it (ResourceWarning is an error)."""
    yield
    gc.collect()


StartRelay = Callable[..., Awaitable[Relay]]
Connect = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_relay() -> AsyncIterator[StartRelay]:
    relays: list[Relay] = []

    async def _start(**overrides: Any) -> Relay:
        relay = Relay(relay_settings(**overrides))
        relays.append(relay)
        await relay.start()
        return relay

    yield _start
    for relay in relays:
        await relay.stop()


@pytest.fixture
async def relay(start_relay: StartRelay) -> Relay:
    return await start_relay()


@pytest.fixture
async def join() -> AsyncIterator[Connect]:
    """Connect a node and read its Welcome; every node is closed afterwards."""
    nodes: list[ClientConnection] = []

    async def _join(relay: Relay, node_id: str, token: str = TOKEN_A, **kw: Any) -> Node:
        kw.setdefault("max_size", None)
        kw.setdefault("ping_interval", None)
        ws = await connect(relay.url + CONNECT_PATH, additional_headers=headers(node_id, token),
                           compression=None, open_timeout=WAIT_S, **kw)
        nodes.append(ws)
        async with asyncio.timeout(WAIT_S):
            welcome = decode(await ws.recv())
        assert isinstance(welcome, Welcome)
        return Node(ws, welcome)

    yield _join
    for ws in nodes:  # abort: a node a test left unread may never read the relay's close frame
        ws.transport.abort()
        await ws.wait_closed()


async def joined(node: Node, *ids: str) -> None:
    """Read ``Joined`` frames for exactly these ids, in order."""
    for node_id in ids:
        frame = await node.expect(Joined)
        assert frame.peer.node_id == node_id
