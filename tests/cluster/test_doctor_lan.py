"""``quorum-node doctor`` on a real LAN (issue 23): each fault made for real in namespaces, named, with its fix.

``scripts/lan``: members, each its own process in its own namespace (``lan_host``), mDNS on the bridge.
A clean LAN first: the doctor reports no problem. Then, one machine at a time:

- multicast dropped by the machine's firewall (``nft``: 5353/udp in and out): the doctor there says its
  own mDNS does not come back, names 5353/udp, and the members it never saw;
- the node's ports dropped by its firewall for the LAN (``nft``: TCP from eth0): its own dial still opens
  them (from the machine itself), yet the member it reaches cannot, and says so through the doctor;
- a clock two minutes ahead (the node runs under ``faketime``): named by the doctor of another member.

The commands are run as a user would, inside the machine's namespace: ``quorum-node doctor --json``.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.lan_host import PEER_PORT, PORT, Lan, lan_of
from tests.netns import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

NET = "10.79.7"  # test_mdns 10.77.0, test_lan 10.78.0, test_trust_lan 10.79.0, test_join_code_lan 10.79.5
SECRET = "doctor-" + secrets.token_hex(8)
CLI = (sys.executable, "-m", "quorum_node.cli")
MULTICAST_DROPPED = """
table inet doctorfault {
  chain in { type filter hook input priority 0; udp dport 5353 drop; }
  chain out { type filter hook output priority 0; udp dport 5353 drop; }
}
"""
PORTS_DROPPED = f"""
table inet doctorfault {{
  chain in {{ type filter hook input priority 0; iifname "eth0" tcp dport {{ {PORT}, {PEER_PORT} }} drop; }}
}}
"""


@pytest.fixture
async def lan(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Lan]:
    require_netns("the doctor's LAN test")
    async with lan_of(request, f"qd{os.getpid() % 10000}d{secrets.token_hex(2)}", NET, tmp_path, 4) as world:
        yield world


def libfaketime() -> str:
    """libfaketime (Debian's ``faketime``; ``scripts/test`` installs it): preloaded, it moves the clock that
    the process reads (``env`` execs the node with it, so the test's kill reaches the node itself)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is not installed (apt-get install faketime; scripts/test does)")
    return found[0]


def firewall(lan: Lan, place: int, rules: str) -> None:
    subprocess.run(["ip", "netns", "exec", lan.ns(place), "nft", "-f", "-"], input=rules, text=True, check=True)


async def doctor(lan: Lan, place: int, name: str) -> tuple[int, list[dict[str, Any]]]:
    rc, out, err = await lan.run(
        place, *CLI, "doctor", "--json", "--url", f"http://127.0.0.1:{PORT}", "--data-dir", str(lan.data_dir(name)),
        timeout_s=40,
    )  # fmt: skip
    assert rc in (0, 1), err
    return rc, json.loads(out)["findings"]


def of(findings: list[dict[str, Any]], check: str, status: str | None = None) -> list[dict[str, Any]]:
    return [f for f in findings if f["check"] == check and (status is None or f["status"] == status)]


async def test_each_fault_is_named_with_its_fix_and_a_clean_lan_has_none(lan: Lan) -> None:
    names = {1: "doc-a", 2: "doc-b", 3: "doc-c", 4: "doc-d"}
    for name in names.values():
        lan.enrol(name, SECRET)
    a = await lan.host(1, "doc-a", secret=None, models=["alpha"], tokens=["hi"])
    b = await lan.host(2, "doc-b", secret=None, models=["beta"], tokens=["hi"])
    for p in (a, b):
        await p.message("ready", 20.0)
    assert (await lan.client(1, "poll-chat", "beta", "--timeout", "10"))["ok"]
    assert (await lan.client(2, "poll-chat", "alpha", "--timeout", "10"))["ok"]

    # 1. A clean LAN (two members up; the two others not started yet: named, as members not seen)
    rc, found = await doctor(lan, 1, "doc-a")
    assert of(found, "mdns") == [
        {"check": "mdns", "status": "ok", "message": f"mDNS on {lan.ip(1)}: this node hears itself", "fix": ""}
    ]
    assert [f["message"] for f in of(found, "reachable", "ok") if "doc-b reaches" in f["message"]] == [
        f"doc-b reaches this node's peer port {PEER_PORT}",
        f"doc-b reaches this node's API port {PORT}",
    ]
    assert [f["status"] for f in of(found, "clock")] == ["ok"]
    # all else is well (where the tests run in a container, the doctor names that too, as members are missing)
    rest = [f for f in found if "doc-c" not in f["message"] and "doc-d" not in f["message"] and f["check"] != "network"]
    assert {f["status"] for f in rest} == {"ok"}
    assert rc == 0  # members not started yet are warnings, not failures

    # 2. Multicast dropped by doc-c's firewall: it hears neither itself nor anybody
    firewall(lan, 3, MULTICAST_DROPPED)
    c = await lan.host(3, "doc-c", secret=None, models=[], tokens=["hi"])
    await c.message("ready", 20.0)
    rc, found = await doctor(lan, 3, "doc-c")
    assert rc == 1, found
    [mdns] = of(found, "mdns")
    assert mdns["status"] == "fail" and "does not come back" in mdns["message"] and "5353/udp" in mdns["fix"]
    unseen = {f["message"].split(" ")[0] for f in of(found, "peers", "warn") if "never seen" in f["message"]}
    assert {"doc-a", "doc-b"} <= unseen
    assert all("--peer HOST:PORT" in f["fix"] for f in of(found, "peers", "warn"))

    # 3. doc-b's ports dropped for the LAN: its own dial opens them, doc-a (which it reaches) cannot
    firewall(lan, 2, PORTS_DROPPED)
    rc, found = await doctor(lan, 2, "doc-b")
    assert rc == 1, found
    own = [f for f in of(found, "reachable") if lan.ip(2) in f["message"] and "answers" in f["message"]]
    assert own and {f["status"] for f in own} == {"ok"}  # from the machine itself: open
    blocked = [f for f in of(found, "reachable", "fail") if f["message"].startswith("doc-a cannot open")]
    assert {f"port {PORT}", f"port {PEER_PORT}"} == {
        p for f in blocked for p in (f"port {PORT}", f"port {PEER_PORT}") if p in f["message"]
    }
    assert all(lan.ip(2) in f["message"] and "ufw allow" in f["fix"] for f in blocked)

    # 4. doc-d's clock two minutes ahead: doc-a's doctor names it
    d = await lan.host(
        4, "doc-d", secret=None, models=["delta"], tokens=["hi"],
        wrap=("env", f"LD_PRELOAD={libfaketime()}", "FAKETIME=+120s", "FAKETIME_DONT_FAKE_MONOTONIC=1"),
    )  # fmt: skip
    await d.message("ready", 20.0)
    assert (await lan.client(1, "poll-chat", "delta", "--timeout", "10"))["ok"]
    for _ in range(3):  # a loaded machine may answer the doctor's call late once (named, as a warning)
        rc, found = await doctor(lan, 1, "doc-a")
        if [f for f in of(found, "clock") if "doc-d" in f["message"]]:
            break
    assert rc == 1, found
    [skewed] = of(found, "clock", "fail")
    assert skewed["message"].startswith("doc-d's clock is +12") and "NTP" in skewed["fix"]
    print("doctor findings of doc-a, doc-d's clock ahead:\n" + "\n".join(f"  {f}" for f in found))
