"""Join with a short code on a real LAN (issue 23): the new machine finds the inviter by mDNS, no address typed.

Namespaces on one bridge (``scripts/lan``): three members, each its own process (``lan_host``), and a
fourth machine with nothing but a data dir. ``quorum-node invite --code`` on a member; ``quorum-node join
CODE`` on the fourth, with no ``--via``: it asks the quorum nodes it hears on the LAN (mDNS in its own
namespace) for the code's invitation, runs SPAKE2 with the one that has it, and joins. Its node then serves
and is served within 10 s.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.cluster.lan_host import PORT, Lan, Wan, lan_of
from tests.netns import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

NET = "10.79.5"  # test_mdns 10.77.0, test_lan 10.78.0, test_trust_lan 10.79.0, test_shard_lan 10.79.9
SECRET = "codes-" + secrets.token_hex(8)
CLI = (sys.executable, "-m", "quorum_node.cli")


@pytest.fixture
async def lan(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Lan]:
    require_netns("the join code LAN test")
    async with lan_of(request, f"qc{os.getpid() % 10000}c{secrets.token_hex(2)}", NET, tmp_path, 4) as world:
        yield world


async def test_a_fourth_machine_joins_three_with_a_code_found_by_mdns(lan: Lan) -> None:
    members = {1: ("lan-a", ["alpha"]), 2: ("lan-b", ["beta"]), 3: ("lan-c", [])}
    for _, (name, _) in sorted(members.items()):
        lan.enrol(name, SECRET)
    procs = {
        name: await lan.host(place, name, secret=None, models=models, tokens=["hi ", name])
        for place, (name, models) in sorted(members.items())
    }
    for p in procs.values():
        await p.message("ready", 20.0)
    rc, out, err = await lan.run(1, *CLI, "invite", "--data-dir", str(lan.data_dir("lan-a")))  # a code: its node runs
    assert rc == 0, err
    code = out.strip()
    assert re.fullmatch(r"\d{1,3}-[a-z]+-[a-z]+", code), out
    newcomer = lan.data_dir("lan-d")
    started = time.monotonic()
    rc, out, err = await lan.run(4, *CLI, "join", code, "--name", "lan-d", "--data-dir", str(newcomer), timeout_s=30)
    assert rc == 0 and "joined cluster" in out, err
    d = await lan.host(4, "lan-d", secret=None, models=["delta"], tokens=["hi ", "lan-d"])
    await d.message("ready", 20.0)
    ready = time.monotonic()
    # It is served (a member's model, through its node) and serves (its model, through another's)
    got = await lan.client(4, "poll-chat", "alpha", "--timeout", "10")
    assert got["ok"] and got["node"] == "lan-a", got
    got = await lan.client(2, "poll-chat", "delta", "--timeout", "10")
    assert got["ok"] and got["node"] == "lan-d", got
    serving = time.monotonic() - ready
    print(f"join code: joined {ready - started:.1f} s after `quorum-node join` (its node started), both ways "
          f"served {serving:.1f} s after its node was up")  # fmt: skip
    assert serving < 10


async def test_a_machine_on_another_lan_joins_with_a_code_through_the_relay(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``scripts/wan``: three members on LAN 1 and the relay on the vps; the fourth machine is on LAN 2, with
    no route to LAN 1. The code names the relay; the joined node is started with no relay flag (it stored
    the relay and its token when it joined) and serves and is served through it within 10 s."""
    require_netns("the join code WAN test")
    world = Wan(f"qj{os.getpid() % 10000}w", "10.84", tmp_path)

    def teardown() -> None:
        world.kill_all()
        world.down()

    request.addfinalizer(teardown)
    token = "wan-token-" + secrets.token_hex(8)
    for name in ("wan-a", "wan-b", "wan-c"):
        world.enrol(name, SECRET)
    world.up(3, 1)
    try:
        relay = await world.relay(token)
        await relay.event("relay_started", 15.0)
        members = {"a1": ("wan-a", ["alpha"]), "a2": ("wan-b", ["beta"]), "a3": ("wan-c", [])}
        procs = [
            await world.host(place, name, secret=None, models=models, tokens=["hi ", name],
                             relay=world.relay_url, relay_token=token)
            for place, (name, models) in members.items()
        ]  # fmt: skip
        for p in procs:
            await p.message("ready", 20.0)
        assert (await world.client("b1", "connect", world.ip("a1"), str(PORT)))["connected"] is False
        rc, out, err = await world.run("a1", *CLI, "invite", "--code", "--data-dir", str(world.data_dir("wan-a")))
        assert rc == 0, err
        code = out.strip()
        assert re.fullmatch(rf"\d{{1,3}}-[a-z]+-[a-z]+@{re.escape(world.relay_url)}", code), out
        started = time.monotonic()
        rc, out, err = await world.run(
            "b1", *CLI, "join", code, "--name", "wan-d", "--data-dir", str(world.data_dir("wan-d")), timeout_s=30
        )
        assert rc == 0 and "through the relay" in out, err
        d = await world.host("b1", "wan-d", secret=None, models=["delta"], tokens=["hi ", "wan-d"])
        await d.message("ready", 20.0)
        ready = time.monotonic()
        got = await world.client("b1", "poll-chat", "alpha", "--timeout", "10")
        assert got["ok"] and got["node"] == "wan-a", got
        got = await world.client("a2", "poll-chat", "delta", "--timeout", "10")
        assert got["ok"] and got["node"] == "wan-d", got
        serving = time.monotonic() - ready
        print(f"join code through the relay: joined {ready - started:.1f} s after `quorum-node join` (its node "
              f"started), both ways served {serving:.1f} s after its node was up")  # fmt: skip
        assert serving < 10
    finally:
        await world.reap()
        sys.stderr.write(world.logs() + "\n")
        world.down()
