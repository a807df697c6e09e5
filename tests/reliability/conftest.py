"""The reliability tier: every test here is marked ``reliability`` and gets a tight timeout.

Fixtures beyond the shared ones (``tests/conftest.py``): ``proxy``, fault-injecting
TCP proxies (``tests.faults.FaultProxy``) closed after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import StartFake, StartNode
from tests.faults import FaultProxy
from tests.reliability.support import Builder

HERE = Path(__file__).resolve().parent
#: What a test of this tier may take at most (a hang fails it, never the tier).
TEST_TIMEOUT_S = 15

MakeProxy = Callable[..., Awaitable[FaultProxy]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue  # this hook sees the whole session's items
        item.add_marker(pytest.mark.reliability)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


@pytest.fixture
async def proxy() -> AsyncIterator[MakeProxy]:
    """Start a `FaultProxy` in front of ``127.0.0.1:port`` (knobs set from keywords); closed afterwards."""
    proxies: list[FaultProxy] = []

    async def _make(port: int, **knobs: Any) -> FaultProxy:
        p = FaultProxy("127.0.0.1", port)
        for name, value in knobs.items():
            if not hasattr(p, name):
                raise TypeError(f"FaultProxy has no knob {name!r}")
            setattr(p, name, value)
        proxies.append(p)
        return await p.start()

    yield _make
    for p in proxies:
        await p.close()


@pytest.fixture
def build(start_node: StartNode, fake: StartFake, proxy: MakeProxy, http: aiohttp.ClientSession) -> Builder:
    """`support.Builder`: the holders of one model on a route (see `support`)."""
    return Builder(start_node, fake, proxy, http)
