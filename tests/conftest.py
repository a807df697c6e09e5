"""Shared fixtures: in-process nodes on 127.0.0.1 (port 0), fake engines, the real openai SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from quorum_node.node import Node
from quorum_node.settings import load_settings
from tests.fakes.engines import FakeEngine, start_fake

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]


def node_settings(tmp: Path, index: int, **overrides: Any):
    """Settings of the test node ``index``; ``cluster=NAME, cluster_secret=S`` make it a member of the test
    cluster those two name (``tests/members_support.py``: keys and signed membership in its data dir)."""
    cluster, secret = overrides.pop("cluster", None), overrides.pop("cluster_secret", None)
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "name": f"node{index}",
        "data_dir": str(tmp / f"node{index}"),
        "detect": False,
        "embedded_engine": False,
        "mdns": False,
        "probe_interval_s": 0.2,
        "probe_timeout_s": 0.3,
        "health_interval_s": 0.3,
        "log_format": "json",
    }
    base.update(overrides)
    if cluster and secret:
        from tests.members_support import enrol

        enrol(tmp, cluster, secret, Path(base["data_dir"]), base["name"])
    return load_settings(base, env={})


@pytest.fixture
async def start_node(tmp_path: Path) -> AsyncIterator[StartNode]:
    """Start nodes with test-friendly settings; every one is stopped afterwards."""
    nodes: list[Node] = []

    async def _start(**overrides: Any) -> Node:
        node = Node(node_settings(tmp_path, len(nodes), **overrides))
        nodes.append(node)
        await node.start()
        return node

    yield _start
    for node in reversed(nodes):
        await node.stop()


@pytest.fixture
async def fake() -> AsyncIterator[StartFake]:
    """Start fake engines (real aiohttp servers speaking each engine's wire format)."""
    engines: list[FakeEngine] = []

    async def _start(kind: str, **kw: Any) -> FakeEngine:
        eng = await start_fake(kind, **kw)
        engines.append(eng)
        return eng

    yield _start
    for eng in engines:
        await eng.close()


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., openai.AsyncOpenAI]]:
    """The real openai SDK pointed at a node (no retries unless asked for)."""
    clients: list[openai.AsyncOpenAI] = []

    def _make(node: Node, *, max_retries: int = 0, **kw: Any) -> openai.AsyncOpenAI:
        c = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=max_retries, **kw)
        clients.append(c)
        return c

    yield _make
    for c in clients:
        await c.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A raw aiohttp client, for wire-level facts (headers, exact SSE bytes)."""
    async with aiohttp.ClientSession() as session:
        yield session


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 5.0, what: str = "") -> None:
    """Poll ``check`` until it holds, failing the test after ``timeout_s`` (never a fixed sleep)."""

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what or check}")
        await asyncio.sleep(0.02)
