"""Relay fixtures: an in-process relay on 127.0.0.1 port 0 and real websockets clients speaking relay/wire.

A test names its nodes by labels ("a", "b", …); each label has its own
Ed25519 key (``key``), made from the label, and so its own node id (``nid``):
the id is the key's, as the relay requires. The keys are picked so that ids
sort as their labels do (the stream-id parity rule depends on that order).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from quorum_relay.identity import node_id_for
from quorum_relay.server import Relay
from quorum_relay.settings import Settings
from quorum_relay.wire import (
    CONNECT_PATH,
    NODE_ID_HEADER,
    NODE_KEY_HEADER,
    Challenge,
    Frame,
    Joined,
    Proof,
    Welcome,
    decode,
    encode,
    proof_message,
)

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


@functools.cache
def key(label: str) -> Ed25519PrivateKey:
    """The key of the test node ``label``: its id begins with the label's first character in hex."""
    prefix = label.encode()[:1].hex()
    for n in range(1 << 16):
        k = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"{label}/{n}".encode()).digest())
        if node_id_for(public(k)).startswith(prefix):
            return k
    raise AssertionError("no key found")


def public(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def nid(label: str) -> str:
    """The node id of the test node ``label``."""
    return node_id_for(public(key(label)))


def headers(label: str | None, token: str | None, *, node_id: str | None = None) -> dict[str, str]:
    """Handshake headers for the test node ``label``: its id and key (``node_id`` claims another id)."""
    h: dict[str, str] = {}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if label is not None:
        h[NODE_ID_HEADER] = node_id if node_id is not None else nid(label)
        h[NODE_KEY_HEADER] = base64.b64encode(public(key(label))).decode()
    elif node_id is not None:
        h[NODE_ID_HEADER] = node_id
    return h


async def prove(ws: ClientConnection, label: str, *, node_id: str | None = None) -> None:
    """Answer the relay's challenge as the test node ``label`` does (signed with its key)."""
    async with asyncio.timeout(WAIT_S):
        challenge = decode(await ws.recv())
    assert isinstance(challenge, Challenge), challenge
    k = key(label)
    await ws.send(encode(Proof(signature=k.sign(proof_message(challenge.nonce, node_id or nid(label), public(k))))))


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

    async def _join(relay: Relay, label: str, token: str = TOKEN_A, **kw: Any) -> Node:
        kw.setdefault("max_size", None)
        kw.setdefault("ping_interval", None)
        ws = await connect(
            relay.url + CONNECT_PATH,
            additional_headers=headers(label, token),
            compression=None,
            open_timeout=WAIT_S,
            **kw,
        )
        nodes.append(ws)
        await prove(ws, label)
        async with asyncio.timeout(WAIT_S):
            welcome = decode(await ws.recv())
        assert isinstance(welcome, Welcome)
        return Node(ws, welcome)

    yield _join
    for ws in nodes:  # abort: a node a test left unread may never read the relay's close frame
        ws.transport.abort()
        await ws.wait_closed()


async def joined(node: Node, *labels: str) -> None:
    """Read ``Joined`` frames for exactly these nodes, in order."""
    for label in labels:
        frame = await node.expect(Joined)
        assert frame.peer.node_id == nid(label)
