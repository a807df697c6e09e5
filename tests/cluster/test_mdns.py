"""mDNS discovery: real zeroconf, real multicast, never on the machine's own interfaces.

The in-process tests bind every ``Discovery`` to 127.0.0.1 only: zeroconf then
joins 224.0.0.251 on lo and sends with IP_MULTICAST_IF=127.0.0.1 (and
IP_MULTICAST_LOOP), so the packets loop back on lo and nothing reaches a real
interface — a packet with a loopback source cannot leave on one anyway. The
``netns`` test runs separate processes in network namespaces joined by a bridge
(``scripts/lan``) to prove discovery across hosts with real multicast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from quorum_node.cluster.mdns import (
    NAME_MAX_BYTES,
    SERVICE_TYPE,
    Discovered,
    Discovery,
    DiscoveryEvent,
    Gone,
    Updated,
    pick_address,
    txt_properties,
)
from tests.netns import require_netns
from tests.support import eventually

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = ["127.0.0.1"]


class Node:
    """A Discovery plus the events it reported, in order."""

    def __init__(self, discovery: Discovery, events: asyncio.Queue[DiscoveryEvent]) -> None:
        self.d = discovery
        self.events = events
        self.seen: list[DiscoveryEvent] = []

    @property
    def node_id(self) -> str:
        return self.d.node_id

    async def wait_for(self, match: Callable[[DiscoveryEvent], bool], timeout: float) -> DiscoveryEvent:
        """The first event (past or future) matching ``match``, within ``timeout`` seconds."""
        for ev in self.seen:
            if match(ev):
                return ev

        async def _next() -> DiscoveryEvent:
            while True:
                ev = await self.events.get()
                self.seen.append(ev)
                if match(ev):
                    return ev

        return await asyncio.wait_for(_next(), timeout)

    def drain(self) -> list[DiscoveryEvent]:
        while not self.events.empty():
            self.seen.append(self.events.get_nowait())
        return self.seen


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_discovery() -> AsyncIterator[StartNode]:
    nodes: list[Node] = []

    async def _start(**kw: object) -> Node:
        events: asyncio.Queue[DiscoveryEvent] = asyncio.Queue()
        node_id = kw.pop("node_id", None) or secrets.token_hex(8)
        args: dict[str, object] = {
            "name": f"node-{node_id[:4]}",
            "port": 40000 + len(nodes),
            "fingerprint": "fp-test",
            "catalog_digest": "d0",
            "interfaces": LOOPBACK,
        }
        args.update(kw)
        d = Discovery(node_id=node_id, on_event=events.put_nowait, **args)  # type: ignore[arg-type]
        node = Node(d, events)
        nodes.append(node)
        await d.start()
        return node

    yield _start
    for node in reversed(nodes):
        await node.d.close()


def discovered(node_id: str) -> Callable[[DiscoveryEvent], bool]:
    return lambda ev: isinstance(ev, Discovered) and ev.info.node_id == node_id


# Pure helpers ---------------------------------------------------------------


def test_txt_record_fields_and_name_truncation() -> None:
    props = txt_properties(node_id="ab12", name="ö" * 100, port=32768, fingerprint="f1", proto=3, catalog_digest="c9")
    assert {k: v for k, v in props.items() if k != "name"} == {
        "id": "ab12",
        "fp": "f1",
        "v": "3",
        "port": "32768",
        "cat": "c9",
    }
    # Cut on a character boundary, never mid-UTF-8 sequence.
    assert props["name"] == "ö" * (NAME_MAX_BYTES // 2)
    assert len(props["name"].encode()) <= NAME_MAX_BYTES


def test_pick_address_prefers_our_lan_then_ipv4() -> None:
    own = ["192.168.1.20"]
    assert pick_address(["172.17.0.1", "192.168.1.7"], own) == "192.168.1.7"
    assert pick_address(["fe80::1", "2001:db8::5", "10.0.0.9"], own) == "10.0.0.9"
    assert pick_address(["169.254.3.3", "10.1.1.1"], own) == "10.1.1.1"
    assert pick_address(["2001:db8::5"], own) == "2001:db8::5"
    assert pick_address(["nonsense"], own) is None


# Loopback, in one process ------------------------------------------------------


async def test_peer_appears_within_3s_with_its_txt_fields(start_discovery: StartNode) -> None:
    a = await start_discovery()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    b = await start_discovery(name="bee", port=45678, fingerprint="fp-b", proto=2, catalog_digest="cat-1")
    ev = await a.wait_for(discovered(b.node_id), timeout=3.0 - (loop.time() - t0))
    assert ev.info.node_id == b.node_id
    assert ev.info.name == "bee"
    assert ev.info.address == "127.0.0.1:45678"
    assert ev.info.fingerprint == "fp-b"
    assert ev.info.proto == 2
    assert ev.info.catalog_digest == "cat-1"
    assert ev.info.route == "lan"
    # Discovery is symmetric: B, started second, finds A from A's answers.
    await b.wait_for(discovered(a.node_id), timeout=3.0)


async def test_three_nodes_see_each_other_and_never_themselves(start_discovery: StartNode) -> None:
    nodes = [await start_discovery() for _ in range(3)]
    for n in nodes:
        for other in nodes:
            if other is not n:
                await n.wait_for(discovered(other.node_id), timeout=3.0)
    # A's own catalog announcement reaches A too (same multicast group); once B has
    # seen it, A has had it as well, and must have ignored it.
    a, b, _ = nodes
    await a.d.update_catalog_digest("d1")
    await b.wait_for(lambda ev: isinstance(ev, Updated) and ev.info.node_id == a.node_id, timeout=3.0)
    for n in nodes:
        # Loopback is shared by every process on the machine, so another test run's
        # nodes may show up too: judge only this test's (random) node ids.
        ours = {o.node_id for o in nodes}
        ids = {ev.info.node_id if isinstance(ev, (Discovered, Updated)) else ev.node_id for ev in n.drain()}
        assert ids & ours == ours - {n.node_id}


async def test_clean_stop_makes_peer_gone_promptly(start_discovery: StartNode) -> None:
    a = await start_discovery()
    b = await start_discovery()
    await a.wait_for(discovered(b.node_id), timeout=3.0)
    await b.d.close()
    await a.wait_for(lambda ev: isinstance(ev, Gone) and ev.node_id == b.node_id, timeout=2.0)
    await b.d.close()  # idempotent


async def test_catalog_digest_change_reaches_peers(start_discovery: StartNode) -> None:
    a = await start_discovery()
    b = await start_discovery(catalog_digest="before")
    first = await a.wait_for(discovered(b.node_id), timeout=3.0)
    assert first.info.catalog_digest == "before"
    await b.d.update_catalog_digest("after")
    ev = await a.wait_for(lambda ev: isinstance(ev, Updated) and ev.info.node_id == b.node_id, timeout=2.0)
    assert ev.info.catalog_digest == "after"
    assert ev.info.address == first.info.address
    assert ev.info.fingerprint == first.info.fingerprint


async def test_restarted_peer_is_discovered_again(start_discovery: StartNode) -> None:
    a = await start_discovery()
    b = await start_discovery()
    await a.wait_for(discovered(b.node_id), timeout=3.0)
    await b.d.close()
    await a.wait_for(lambda ev: isinstance(ev, Gone) and ev.node_id == b.node_id, timeout=2.0)
    a.drain()
    a.seen.clear()
    again = await start_discovery(node_id=b.node_id, port=41111)
    ev = await a.wait_for(discovered(again.node_id), timeout=3.0)
    assert ev.info.address == "127.0.0.1:41111"


# Network namespaces: separate hosts on a bridge ----------------------------------

CHILD = r"""
import asyncio, json, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from quorum_node.cluster.mdns import Discovery, Discovered, Gone

def say(**kw):
    print("@@" + json.dumps(kw), flush=True)

async def main(node_id, ip, expect):
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    d = Discovery(node_id=node_id, name="ns-" + node_id, port=32769, fingerprint="",
                  interfaces=[ip], on_event=events.put_nowait)
    await d.start()
    stop = loop.run_in_executor(None, sys.stdin.readline)
    seen = {}
    try:
        while not stop.done():
            get = asyncio.ensure_future(events.get())
            await asyncio.wait([get, stop], return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                break
            ev = get.result()
            if isinstance(ev, Discovered):
                seen[ev.info.node_id] = ev.info.address
                if len(seen) == expect:
                    say(seen=seen)
            elif isinstance(ev, Gone):
                say(gone=ev.node_id)
    finally:
        await d.close()
    say(closed=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


class Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stopped = False

    async def message(self, key: str, timeout: float) -> object:
        """The next ``@@{...}`` line from the child holding ``key``."""

        async def _read() -> object:
            assert self.proc.stdout is not None
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"child exited (rc={await self.proc.wait()}) before saying {key!r}")
                if line.startswith(b"@@"):
                    msg = json.loads(line[2:])
                    if key in msg:
                        return msg[key]

        return await asyncio.wait_for(_read(), timeout)

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        if not self.stopped and self.proc.returncode is None:
            self.stopped = True
            self.proc.stdin.write(b"stop\n")
            await self.proc.stdin.drain()
            self.proc.stdin.close()


@pytest.mark.netns
async def test_nodes_in_namespaces_discover_each_other_over_a_bridge(request: pytest.FixtureRequest) -> None:
    require_netns("this LAN test")
    env = {**os.environ, "QLAN_PREFIX": f"qt{os.getpid()}n", "QLAN_NET": "10.77.0"}
    lan = [str(ROOT / "scripts" / "lan")]
    children: list[Child] = []

    def teardown() -> None:
        for c in children:
            if c.proc.returncode is None:
                c.proc.kill()
        subprocess.run([*lan, "down"], env=env, capture_output=True)

    request.addfinalizer(teardown)
    subprocess.run([*lan, "up", "3"], env=env, check=True, capture_output=True)

    ids = [secrets.token_hex(8) for _ in range(3)]
    for i, node_id in enumerate(ids, start=1):
        proc = await asyncio.create_subprocess_exec(
            *lan,
            "exec",
            str(i),
            sys.executable,
            "-c",
            CHILD,
            node_id,
            f"10.77.0.{i}",
            "2",
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        children.append(Child(proc))
    try:
        for i, child in enumerate(children, start=1):
            seen = await child.message("seen", timeout=10.0)
            assert seen == {ids[j - 1]: f"10.77.0.{j}:32769" for j in (1, 2, 3) if j != i}
        # A clean stop in one namespace is a goodbye on the wire: the others drop it at once.
        await children[2].stop()
        assert await children[2].message("closed", timeout=5.0) is True
        for child in children[:2]:
            assert await child.message("gone", timeout=3.0) == ids[2]
    finally:
        for child in children:
            await child.stop()
        for child in children:
            await asyncio.wait_for(child.proc.wait(), 10.0)
    assert [c.proc.returncode for c in children] == [0, 0, 0]


async def test_a_goodbye_sent_in_a_members_name_does_not_drop_it(start_node, fake) -> None:
    """mDNS is unauthenticated: anyone on the LAN can send a goodbye for a member, from its very address.
    The member then takes no new request for a moment and is checked over a link pinned to its key; it
    answers, so it is never dropped (nor its catalog, which would have to be fetched again)."""
    cluster = {"cluster": "m", "cluster_secret": "goodbye", "mdns": True, "mdns_interfaces": LOOPBACK}
    eng = await fake("openai", models=["only-b"])
    b = await start_node(backends=[{"kind": "openai", "url": eng.url}], **cluster)
    a = await start_node(**cluster)
    assert a.cluster is not None and b.cluster is not None
    b_id = b.cluster.node_id

    def a_serves_b() -> bool:
        peer = a.cluster.table.get(b_id)
        return peer is not None and peer.serving and "only-b" in a.cluster.model_names()

    await eventually(a_serves_b, "A serves B's model", timeout_s=10.0)
    states: list[str] = []

    async def watch() -> None:  # what A holds of B, sampled every few ms
        while True:
            peer = a.cluster.table.get(b_id)
            states.append("gone" if peer is None else "draining" if peer.draining else "serving")
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    # the forger withdraws B's service at B's own address and port: goodbye records in B's name, sent raw
    # (B's name is taken, so it could never register it)
    forger = AsyncZeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
    try:
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{b_id}.{SERVICE_TYPE}",
            port=b.peer_port,
            properties={"id": b_id, "v": "4"},
            server=f"quorum-{b_id}.local.",
            addresses=[socket.inet_aton("127.0.0.1")],
        )
        await (await forger.async_unregister_service(info))
    finally:
        await forger.async_close()
    try:
        await eventually(lambda: "draining" in states or "gone" in states, "the goodbye arrived", timeout_s=5.0)
        await eventually(a_serves_b, "A serves B again", timeout_s=5.0)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert "gone" not in states, "a goodbye nobody proved dropped the member"
