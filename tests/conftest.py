"""Shared fixtures: in-process nodes on 127.0.0.1 (port 0), fake engines, the real openai SDK; the leak guard.

Every test runs under ``_leak_guard`` (``tests/leaks.py``): a test that leaves a task, a socket
or a file descriptor behind fails at teardown. ``@pytest.mark.leaks_ok("why")`` excuses one test.
``eventually`` (``tests/support.py``) is re-exported here for the modules that import it from here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from quorum_node.node import Node
from quorum_node.settings import load_settings
from tests.fakes.engines import FakeEngine, start_fake
from tests.leaks import LATE, LEAKS, LeakGuard
from tests.members_support import CLUSTER, Member, wait_converged
from tests.support import eventually

__all__ = ["StartCluster", "StartFake", "StartNode", "eventually", "node_settings"]

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]
StartCluster = Callable[..., Awaitable[list[Member]]]


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
async def client_of() -> AsyncIterator[Callable[[Node], ollama.AsyncClient]]:
    """The real ollama client pointed at a node (what Open WebUI and the like use)."""
    clients: list[ollama.AsyncClient] = []

    def _make(node: Node) -> ollama.AsyncClient:
        c = ollama.AsyncClient(host=node.url)
        clients.append(c)
        return c

    yield _make
    for c in clients:
        await c._client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A raw aiohttp client, for wire-level facts (headers, exact SSE bytes)."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def start_cluster(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> StartCluster:
    """Start one node per model list, each with its own fake engine, all peers of each other (``Member``s).

    Returns once every node's /v1/models shows every model with all its holders.
    """

    async def _start(*models: list[str], mesh: bool = True, **overrides: Any) -> list[Member]:
        members = []
        for held in models:
            eng = await fake("openai", models=list(held))
            node = await start_node(backends=[{"kind": "openai", "url": eng.url}], **CLUSTER, **overrides)
            members.append(Member(node, eng))
        if mesh:
            for m in members:
                assert m.node.cluster is not None
                for other in members:
                    if other is not m:
                        m.node.cluster.table.add_static(other.address)
            await wait_converged(http, members)
        return members

    return _start


@pytest.fixture(autouse=True)
async def _leak_guard(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail a test that leaves tasks, sockets or file descriptors behind (see ``tests/leaks.py``).

    Autouse and function-scoped, so it is set up before the test's other function fixtures and torn
    down after them: what it sees is the test's own work, with the event loop and the module- and
    session-scoped fixtures on both sides of the comparison.
    """
    guard = LeakGuard.for_item(request.node)
    if guard is None:
        yield
        return
    await guard.before()
    yield
    await guard.after()


#: Markers that keep a test out of the fast tier: what needs root, a browser or the real engine, and what is slow.
NOT_FAST = ("slow", "integration", "netns", "browser", "reliability")
#: Modules marked ``slow`` as a whole: several nodes or real processes a test, property-based fuzzing, or
#: dozens of node-per-test cases (each ~0.3 s). Together they are what takes the whole run from a minute to many.
#: A single slow test elsewhere carries ``@pytest.mark.slow`` itself. (Measured with ``--durations``.)
SLOW_MODULES = frozenset(
    {
        "test_adapters",
        "test_catalog_limits",
        "test_cli",
        "test_cluster",
        "test_cluster_cli",
        "test_dashboard",
        "test_detect",
        "test_engine_robustness",
        "test_errors",
        "test_fakes",
        "test_fault_tools",
        "test_fuzz_endpoints",
        "test_fuzz_parsers",
        "test_fuzz_surface_translation",
        "test_hostile_clients",
        "test_keys",
        "test_keys_cluster",
        "test_ledger",
        "test_ledger_sigkill",
        "test_lifecycle",
        "test_mdns",
        "test_native_events",
        "test_ollama_surface",
        "test_passthrough",
        "test_peer_availability",
        "test_relay_route",
        "test_responses_surface",
        "test_admission",
        "test_forwarding",
        "test_link",
        "test_tokens_reload",
    }
)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: so before tests/reliability/conftest.py marks its tier too
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``fast`` every test no marker in ``NOT_FAST`` keeps out: ``scripts/test -m fast`` is the edit-test loop."""
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if "reliability" in item.path.parts:
            continue
        if not any(item.get_closest_marker(name) for name in NOT_FAST):
            item.add_marker(pytest.mark.fast)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """List what tests left behind (in ``report`` mode the only place it shows), and, with ``-v``, what closed late."""
    if LEAKS:
        terminalreporter.section(f"leaks ({len({t for t, _ in LEAKS})} tests)")
        for test, leak in LEAKS:
            terminalreporter.line(f"{test}: {leak}")
    if LATE and terminalreporter.config.get_verbosity() > 0:
        terminalreporter.section(f"closed late, after the test's teardown ({len({t for t, _ in LATE})} tests)")
        for test, what in LATE:
            terminalreporter.line(f"{test}: {what}")
