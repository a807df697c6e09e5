"""Trust on a real LAN (issue 19's acceptance): only members are believed, and the wire tells a tap nothing.

Every test builds its own LAN with ``scripts/lan`` (namespaces on one bridge,
real multicast mDNS inside them only) and runs each node as its own process
(``tests/cluster/lan_host.py``: a fake engine and a node; peer port 32769). The
members' data dirs are enrolled in one test cluster before their hosts start,
as ``quorum-node invite`` and ``join`` leave them (``tests/members_support.py``).
Clients are ``tests/cluster/lan_client.py`` in a host's namespace; the outsider is
``tests/cluster/lan_outsider.py`` (its own keys, no member, announcing and answering
what it likes, recording everything it receives); the tap is
``tests/cluster/lan_tap.py``, a raw packet socket in the bridge's namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.lan_host import PEER_PORT, PORT, Lan, Proc, lan_of
from tests.cluster.lan_outsider import FORGED_ANSWER
from tests.cluster.lan_tap import read_capture
from tests.netns import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

NET = "10.79.0"  # test_mdns 10.77.0, test_lan 10.78.0
SECRET = "trust-" + secrets.token_hex(8)  # names the test cluster (tests/members_support.py)
STEP_S = 15.0  # the most any one step may take
CLI = (sys.executable, "-m", "quorum_node.cli")


def greeting(name: str) -> list[str]:
    return ["Hello", " from", f" {name}"]


def answer_of(name: str) -> str:
    return "".join(greeting(name))


@pytest.fixture
async def lan(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Lan]:
    require_netns("the trust tests")
    async with lan_of(
        request, f"qt{os.getpid() % 10000}t{secrets.token_hex(2)}", NET, tmp_path, 5
    ) as world:  # fresh names: no straggler's ports
        yield world


async def start_members(lan: Lan, hosts: dict[int, tuple[str, list[str]]]) -> dict[str, Proc]:
    """Enrol every member's data dir (in order: the first founds the cluster), then start them all."""
    for _, (name, _) in sorted(hosts.items()):
        lan.enrol(name, SECRET)
    procs = {
        name: await lan.host(place, name, secret=SECRET, models=models, tokens=greeting(name))
        for place, (name, models) in sorted(hosts.items())
    }
    for p in procs.values():
        assert (await p.message("ready", 20.0))["peer_port"] == PEER_PORT
    return procs


async def lists(
    lan: Lan, place: int, expect: dict[str, list[str]], *, absent: tuple[str, ...] = (), timeout_s: float = STEP_S
) -> dict[str, Any]:
    """The node at ``place`` lists ``expect`` (model: holders) and none of ``absent``, within ``timeout_s``."""
    got = await lan.client(
        place,
        "models",
        "--expect",
        json.dumps(expect),
        "--absent",
        ",".join(absent),
        "--timeout",
        str(timeout_s),
        timeout_s=timeout_s + 10,
    )
    assert got["status"] == 200
    missing = {k: got["models"].get(k) for k, v in expect.items() if got["models"].get(k) != v}
    assert not missing and not set(absent) & set(got["models"]), (
        f"host {place} lists {got['models']} after {got['elapsed_s']} s; wanted {expect}, without {absent}"
    )
    return got["models"]


async def chat(lan: Lan, place: int, model: str, *args: str) -> dict[str, Any]:
    return await lan.client(place, "chat", model, *args)


async def members_of(lan: Lan, place: int, name: str) -> list[str]:
    """The members the running node ``name`` at ``place`` lists (``quorum-node cluster members``)."""
    rc, said, err = await lan.run(place, *CLI, "cluster", "--data-dir", str(lan.data_dir(name)), "members", "--json")
    assert rc == 0, err
    return sorted(r["name"] for r in json.loads(said))


async def remove(lan: Lan, place: int, name: str, member: str) -> None:
    """``quorum-node cluster remove MEMBER`` by the admin of the running node ``name`` at ``place``."""
    rc, said, err = await lan.run(place, *CLI, "cluster", "--data-dir", str(lan.data_dir(name)), "remove", member)
    assert rc == 0 and said.startswith("removed ") and "no node runs here" not in err, (rc, said, err)


async def introduce(lan: Lan, place: int, url: str, name: str) -> dict[str, Any]:
    """``name``'s GET of ``url`` with its own keys, introducing its records first (``lan_client peer-get``).
    Introductions are taken a few a second node-wide: one that meets the node's own (or another's) in the
    same moment is answered 429 "retry in a moment", and is sent again, as a node would."""
    for _ in range(10):
        out = await lan.client(place, "peer-get", url, "--data-dir", str(lan.data_dir(name)), "--introduce")
        if out["introduced"]["status"] != 429:
            return out
        await asyncio.sleep(0.25)  # the rate: 5 introductions a second (members_sync.INTRODUCTIONS_PER_S)
    return out


async def outsider(lan: Lan, place: int, models: list[str]) -> Proc:
    data_dir = lan.tmp / "outsider"
    proc = await lan.spawn(
        place,
        "outsider",
        sys.executable,
        "-m",
        "tests.cluster.lan_outsider",
        "--ip",
        lan.ip(place),
        "--data-dir",
        str(data_dir),
        "--name",
        "outsider",
        "--models",
        ",".join(models),
    )
    await proc.message("ready", 20.0)
    return proc


async def test_an_outsider_is_never_trusted_and_cannot_take_a_members_place(lan: Lan) -> None:
    """(a) An outsider that announces itself and answers like a node gets nothing and gives nothing;
    (b) announcing under a member's id, from its own address, it takes none of that member's traffic,
    and its goodbye does not take the member away."""
    m = await start_members(
        lan, {1: ("lan-a", []), 2: ("lan-b", ["only-b", "shared-model"]), 3: ("lan-c", ["shared-model", "only-c"])}
    )
    a, b, c = m["lan-a"], m["lan-b"], m["lan-c"]
    ids = {name: (await p.message("ready", 1.0))["node_id"] for name, p in m.items()}
    cluster = {"only-b": ["lan-b"], "only-c": ["lan-c"], "shared-model": ["lan-b", "lan-c"]}
    await lists(lan, 1, cluster)
    await lists(lan, 2, {"only-c": ["lan-c"]})
    await lists(lan, 3, {"only-b": ["lan-b"]})
    o = await outsider(lan, 4, ["bait-model", "only-b", "only-c", "shared-model"])
    oid, oip = (await o.message("ready", 1.0))["node_id"], lan.ip(4)

    # (a) It announces itself as a node would: every member hears it, and ignores it.
    marks = {p.name: len(p.events) for p in m.values()}
    announced = await o.ask("announced", STEP_S, announce=None)
    assert announced["txt"]["id"] == oid
    for p in m.values():
        await p.event("mdns_peer_discovered", STEP_S, after=marks[p.name], where=lambda e: e["peer"] == oid)
    # It pushes membership records of its own making to a member's peer port: none is taken.
    pushed = await o.ask("pushed", STEP_S, push=f"{lan.ip(1)}:{PEER_PORT}")
    assert pushed["status"] == 200 and json.loads(pushed["body"]) == {"accepted": 0, "refused": 1}, pushed
    # Its key reads nothing from a member.
    got = await lan.client(
        4, "peer-get", f"https://{lan.ip(1)}:{PEER_PORT}/quorum/v1/catalog", "--data-dir", str(lan.tmp / "outsider")
    )
    assert got["status"] in (None, 401), got
    # No member lists its models, or routes a prompt to it, while it goes on announcing itself.
    for place in (1, 2, 3):
        assert "bait-model" not in await lists(lan, place, {}, absent=("bait-model",))
        bait = await chat(lan, place, "bait-model")
        assert bait["status"] == 404 and bait["content"] == "", bait
    served = [await chat(lan, 1, "shared-model", *(["--stream"] if i % 2 else [])) for i in range(6)]
    for r in served:
        assert r["status"] == 200 and r["node"] in ("lan-b", "lan-c") and r["route"] == "lan", r
        assert r["content"] == answer_of(r["node"]), r
    assert await chat(lan, 3, "only-b") == {
        "status": 200,
        "node": "lan-b",
        "route": "lan",
        "content": answer_of("lan-b"),
        "error": None,
        "done_seen": None,
    }
    await lists(lan, 1, cluster, absent=("bait-model",))
    # All that while, nobody so much as opened a connection to it.
    assert o.messages_of("connection") == [] and o.messages_of("request") == [], o.messages
    seen_a = o.mark()

    # (b) It copies lan-b's announcement off the wire and announces it as its own, at its own address, while
    #     a client of lan-a asks for lan-b's model ten times a second.
    watcher = await lan.start_client(1, "watch", "only-b", stdin=asyncio.subprocess.PIPE)
    try:
        assert watcher.stdout is not None and watcher.stdin is not None
        assert json.loads(await asyncio.wait_for(watcher.stdout.readline(), STEP_S)) == {"event": "watching"}
        marks = {p.name: len(p.events) for p in m.values()}
        b_requests = b.mark()
        impersonation = await o.ask("announced", STEP_S, announce=ids["lan-b"])
        assert impersonation["txt"]["id"] == ids["lan-b"] and impersonation["txt"]["name"] == "lan-b"
        for p in (a, c):  # they hear lan-b announced at the outsider's address …
            await p.event(
                "mdns_peer_discovered",
                STEP_S,
                after=marks[p.name],
                where=lambda e: e["peer"] == ids["lan-b"] and e["address"] == f"{oip}:{PEER_PORT}",
            )
        for member in (1, 3):  # … check it there, pinned to lan-b's key, and find someone else
            ip = lan.ip(member)
            await o.message("handshake_failed", STEP_S, after=seen_a, where=lambda h, ip=ip: h["remote"] == ip)
        assert await chat(lan, 3, "only-b") == {
            "status": 200,
            "node": "lan-b",
            "route": "lan",
            "content": answer_of("lan-b"),
            "error": None,
            "done_seen": None,
        }
        # It leaves: its goodbye names lan-b's id. Both members hear it; lan-b stays theirs.
        assert await o.ask("left", STEP_S, leave=True) is True
        for p in (a, c):
            await p.event("mdns_peer_gone", STEP_S, after=marks[p.name], where=lambda e: e["peer"] == ids["lan-b"])
        gone_at = time.monotonic()
        while time.monotonic() < gone_at + 3.0:  # three seconds on: lan-b is still listed everywhere
            for place in (1, 3):
                await lists(lan, place, {"only-b": ["lan-b"]}, timeout_s=0.0)
        watcher.stdin.write(b"stop\n")
        await watcher.stdin.drain()
        out, err = await asyncio.wait_for(watcher.communicate(), STEP_S)
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
    assert watcher.returncode == 0, err.decode()
    results = json.loads(out.decode().splitlines()[-1])["results"]
    assert results and results[-1][0] > gone_at + 2.5, "the watch did not outlast the goodbye"
    failures = [r for r in results if r[1] != 200]
    worst, start = 0.0, None
    for at, status, _, _ in results:  # the longest stretch with no successful answer
        if status != 200:
            start = at if start is None else start
            worst = max(worst, at - start)
        else:
            start = None
    assert worst <= 2.0, f"lan-b's model failed for {worst:.1f} s at lan-a: {failures[:5]}"
    served_b = [r for r in results if r[1] == 200]
    assert {(r[2], r[3]) for r in served_b} == {("lan-b", answer_of("lan-b"))}, results
    assert len(b.messages_of("request", after=b_requests)) >= len(served_b), "lan-b's engine served them"
    # It was asked for nothing, ever: the pinned checks never got past its certificate.
    assert o.messages_of("tls") == [] and o.messages_of("request") == [], o.messages
    assert {h["remote"] for h in o.messages_of("connection")} <= {lan.ip(1), lan.ip(3)}
    assert FORGED_ANSWER not in json.dumps(results)
    print(
        f"trust: {len(results)} requests for lan-b's model across the impersonation, {len(failures)} failed "
        f"(longest stretch {worst:.2f} s); the outsider saw {len(o.messages_of('connection'))} connections, "
        "no handshake completed"
    )


async def test_the_lan_carries_no_prompt_and_no_answer_in_the_clear(lan: Lan) -> None:
    """(c) A tap on the bridge sees the forwarded request cross the LAN, and neither its prompt nor its answer."""
    prompt_mark, answer_mark = f"prompt-{secrets.token_hex(8)}", f"answer-{secrets.token_hex(8)}"
    control_mark = f"control-{secrets.token_hex(8)}"
    for name in ("lan-a", "lan-b"):
        lan.enrol(name, SECRET)
    a = await lan.host(1, "lan-a", secret=SECRET, models=[], tokens=[])
    b = await lan.host(2, "lan-b", secret=SECRET, models=["only-b"], tokens=["Sure:", " ", answer_mark])
    for p in (a, b):
        await p.message("ready", 20.0)
    await lists(lan, 1, {"only-b": ["lan-b"]})
    out = lan.tmp / "tap.bin"
    tap = await lan.spawn(
        "-br", "tap", sys.executable, "-m", "tests.cluster.lan_tap", str(out)
    )  # the bridge's namespace
    assert await tap.message("ready", STEP_S) is True

    # What a tap sees in the clear is seen: a plain HTTP request across the bridge.
    assert (await lan.client(1, "plain-get", f"http://{lan.ip(2)}:{PORT}/v1/models?{control_mark}"))["status"] == 401
    # The prompt, through lan-a, for a model only lan-b holds: served by lan-b, over the LAN.
    for stream in ([], ["--stream"]):
        got = await chat(lan, 1, "only-b", "--prompt", f"Repeat after me: {prompt_mark}", *stream)
        assert got == {
            "status": 200,
            "node": "lan-b",
            "route": "lan",
            "content": f"Sure: {answer_mark}",
            "error": None,
            "done_seen": None,
        }, got
    assert [r["model"] for r in b.messages_of("request")] == ["only-b", "only-b"]
    assert await tap.ask("captured", STEP_S, stop=True)
    capture = read_capture(out)
    assert capture.find(control_mark.encode()), "the tap saw no plain HTTP: it proves nothing"
    across = capture.tcp_bytes(to_port=PEER_PORT, between=(lan.ip(1), lan.ip(2)))
    print(f"trust: the tap saw {capture.frames} frames, {across} bytes to and from lan-b's peer port")
    assert across > 2000, f"only {across} bytes crossed to lan-b's peer port: the requests did not travel the LAN"
    raw = out.read_bytes()
    for mark in (prompt_mark, answer_mark):
        assert capture.find(mark.encode()) == [] and mark.encode() not in raw, f"{mark} crossed the LAN in the clear"


async def test_a_removed_member_is_refused_everywhere(lan: Lan) -> None:
    """(d) ``quorum-node cluster remove`` evicts a member from every node within 10 s, and a member removed
    while it was offline is refused when it comes back with its old data dir."""
    m = await start_members(
        lan,
        {
            1: ("lan-a", []),
            2: ("lan-b", ["shared-model", "only-b"]),
            3: ("lan-c", ["shared-model", "only-c"]),
            4: ("lan-d", ["only-d"]),
        },
    )
    c, d = m["lan-c"], m["lan-d"]
    catalog_of_a = f"https://{lan.ip(1)}:{PEER_PORT}/quorum/v1/catalog"
    full = {"shared-model": ["lan-b", "lan-c"], "only-b": ["lan-b"], "only-c": ["lan-c"], "only-d": ["lan-d"]}
    await lists(lan, 1, full)
    await lists(lan, 2, {"only-c": ["lan-c"], "only-d": ["lan-d"]})
    await lists(lan, 3, {"only-b": ["lan-b"], "only-d": ["lan-d"]})

    # lan-d goes offline (a clean stop), and is removed while it is away, by lan-a's admin.
    d.proc.send_signal(signal.SIGTERM)
    assert await d.message("stopped", STEP_S) is True
    assert await asyncio.wait_for(d.proc.wait(), STEP_S) == 0
    await remove(lan, 1, "lan-a", "lan-d")

    # lan-c is removed while it runs, by lan-b's admin through the running node's admin API.
    c_requests = c.mark()
    await remove(lan, 2, "lan-b", "lan-c")
    removed_at = time.monotonic()
    rest = {"shared-model": ["lan-b"], "only-b": ["lan-b"]}
    for place in (1, 2):
        await lists(lan, place, rest, absent=("only-c", "only-d"), timeout_s=10.0)
    took = time.monotonic() - removed_at
    assert took <= 10.0, f"the removal took {took:.1f} s to reach every node"
    for place, name in ((1, "lan-a"), (2, "lan-b")):
        assert await members_of(lan, place, name) == ["lan-a", "lan-b"]
    # No request goes to lan-c any more: its models are nobody's, the shared one is lan-b's.
    for place in (1, 2):
        gone = await chat(lan, place, "only-c")
        assert gone["status"] == 404, gone
        for stream in ([], ["--stream"]):
            assert (await chat(lan, place, "shared-model", *stream))["node"] == "lan-b"
    # lan-c's key opens nothing at lan-a any more (the handshake may pass: the request is refused).
    c_refused = await introduce(lan, 3, catalog_of_a, "lan-c")
    assert c_refused["status"] in (None, 401), c_refused
    assert c_refused["introduced"]["status"] == 200, c_refused  # its records are read, and change nothing
    assert json.loads(c_refused["introduced"]["body"])["accepted"] == 0, c_refused
    # lan-c itself soon finds nobody to send to: its peers refuse it.
    await lists(lan, 3, {"only-c": ["lan-c"]}, absent=("only-b",))
    assert c.messages_of("request", after=c_requests) == [], "a request reached the removed lan-c"

    # lan-d comes back with its old data dir (where it is still a member). The others refuse it, and the
    # records it introduces bring it back nowhere.
    back = await lan.host(4, "lan-d", secret=None, models=["only-d"], tokens=greeting("lan-d"))
    await back.message("ready", 20.0)
    await back.event("members_introduced", STEP_S)  # it told lan-a or lan-b of itself, as a member would
    d_refused = await introduce(lan, 4, catalog_of_a, "lan-d")
    assert d_refused["status"] in (None, 401), d_refused
    assert d_refused["introduced"]["status"] == 200, d_refused
    assert json.loads(d_refused["introduced"]["body"])["accepted"] == 0, d_refused
    introduced_at = time.monotonic()
    while time.monotonic() < introduced_at + 3.0:  # three seconds on, neither lists it
        for place in (1, 2):
            await lists(lan, place, rest, absent=("only-c", "only-d"), timeout_s=0.0)
    for place, name in ((1, "lan-a"), (2, "lan-b")):
        assert await members_of(lan, place, name) == ["lan-a", "lan-b"]
    d_requests = back.mark()
    for place in (1, 2):
        assert (await chat(lan, place, "only-d"))["status"] == 404
    assert back.messages_of("request", after=d_requests) == []
    print(
        f"trust: removal everywhere in {took:.2f} s; the removed members' keys got "
        f"{c_refused['status'] or c_refused['error']} and {d_refused['status'] or d_refused['error']}"
    )
