"""One cluster across two LANs with no route between them, joined through quorum-relay on a "vps" (issue 8).

``scripts/wan`` builds the world: LAN 1 and LAN 2 are bridges inside their
routers' namespaces; each router knows one address beyond its LAN, the vps's,
and the vps forwards nothing. Inside it: the relay (``python -m quorum_relay``) in
the vps; node X on LAN 1 (host a1) with no engine; node Y on LAN 2 (b1) whose
fake engine holds ``far-model``; node Z on LAN 2 (b2), a member of the same
cluster but with a wrong relay token, holding ``hidden-model``. The three data
dirs are members of one keyed cluster before any node starts (as ``invite`` and
``join`` leave them: ``tests/members_support.py``). mDNS stays on inside each LAN.
Hosts and the relay are started with ``tests/cluster/lan_host.py``; every client is
``tests/cluster/lan_client.py`` run in a1's namespace against X over loopback, with
the real openai SDK where it parses answers. Relay and Y are killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.lan_host import PORT, RELAY_PORT, Wan
from tests.members_support import enrol
from tests.netns import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

NET = "10.82"  # scripts/wan's default is 10.81, so a world started by hand is left alone
SECRET = "wan-secret-" + secrets.token_hex(8)
TOKEN = "wan-token-" + secrets.token_hex(8)
WRONG_TOKEN = "not-the-" + TOKEN
MODEL = "far-model"
HIDDEN = "hidden-model"
ANSWER = "Hello from lan2"
BACK_WITHIN_S = 5.0
MARGIN_S = 0.5


async def test_two_lans_joined_through_the_relay(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    require_netns("this LAN test")
    world = Wan(f"qt{os.getpid() % 10000}w", NET, tmp_path)

    def teardown() -> None:  # even if the test body never reached its own clean-up
        world.kill_all()
        world.down()

    request.addfinalizer(teardown)
    for name in ("wan-x", "wan-y", "wan-z"):  # data dirs ``world.host`` gives them
        enrol(world.tmp, "lan", SECRET, world.tmp / name, name)
    world.up(1, 2)
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        relay = await world.relay(TOKEN)
        await relay.event("relay_started", 15.0)
        relay_url = world.relay_url
        x = await world.host("a1", "wan-x", secret=SECRET, relay=relay_url, relay_token=TOKEN, models=[], tokens=[])
        y = await world.host(
            "b1",
            "wan-y",
            secret=SECRET,
            relay=relay_url,
            relay_token=TOKEN,
            models=[MODEL],
            tokens=["Hello", " from", " lan2"],
        )
        z = await world.host(
            "b2", "wan-z", secret=SECRET, relay=relay_url, relay_token=WRONG_TOKEN, models=[HIDDEN], tokens=["psst"]
        )
        ready = {p.name: await p.message("ready", 20.0) for p in (x, y, z)}
        assert all(r["port"] == PORT for r in ready.values())
        timings["start"] = time.monotonic() - t0
        y_addr, z_addr, vps = world.ip("b1"), world.ip("b2"), world.ip("vps")

        # 1. No way from LAN 1 to LAN 2: Y listens (LAN 2 reaches it), LAN 1 cannot connect; LAN 1 reaches the vps.
        assert (await world.client("b2", "connect", y_addr, str(PORT)))["connected"] is True
        direct = await world.client("a1", "connect", y_addr, str(PORT))
        assert direct["connected"] is False, direct
        assert (await world.client("a1", "connect", vps, str(RELAY_PORT)))["connected"] is True

        # 2. X lists Y's model, and only it, learnt through the relay; chats are served by Y over the relay.
        t = time.monotonic()
        listed = await world.client("a1", "models", "--expect", json.dumps({MODEL: ["wan-y"]}), "--timeout", "10")
        assert listed["status"] == 200 and listed["models"] == {MODEL: ["wan-y"]}, listed
        timings["discovery"] = time.monotonic() - t
        view = await world.client("a1", "peers")
        assert view["relay"]["state"] == "up", view["relay"]
        assert view["relay"]["online"] == [ready["wan-y"]["node_id"]], view["relay"]
        assert [(p["name"], p["routes"], p["state"]) for p in view["peers"]] == [("wan-y", ["relay"], "up")], view
        served = {"status": 200, "node": "wan-y", "route": "relay", "content": ANSWER, "error": None, "done_seen": None}
        assert await world.client("a1", "chat", MODEL) == served
        assert await world.client("a1", "chat", MODEL, "--stream") == served

        # 5a. The wrong-token node: a member of the cluster on LAN 2 (Y and Z see each other by mDNS there), yet
        #     the relay refused it, so it is nowhere on LAN 1's side.
        zview = await world.client("b2", "peers", "--until-relay", "refused", "--timeout", "10")
        assert zview["relay"]["state"] == "refused", zview["relay"]
        await relay.event("handshake_refused", 5.0, where=lambda e: e.get("address") == z_addr)
        lan2 = await world.client(
            "b2", "models", "--expect", json.dumps({MODEL: ["wan-y"], HIDDEN: ["wan-z"]}), "--timeout", "10"
        )
        assert lan2["models"] == {MODEL: ["wan-y"], HIDDEN: ["wan-z"]}, lan2
        assert (await world.client("a1", "models"))["models"] == {MODEL: ["wan-y"]}
        # 5b. Its doctor names the refused token, with the fix (run on Z's machine as its user would)
        rc, out, err = await world.run(
            "b2", sys.executable, "-m", "quorum_node.cli", "doctor", "--json", "--url", f"http://127.0.0.1:{PORT}",
            "--data-dir", str(world.data_dir("wan-z")), timeout_s=40,
        )  # fmt: skip
        assert rc == 1, err
        [refused] = [f for f in json.loads(out)["findings"] if f["check"] == "relay"]
        assert refused["status"] == "fail" and "refused this node" in refused["message"], refused
        assert "--relay-token" in refused["fix"]

        # 3. kill -9 the relay and start it again: requests through X work again within 5 s of its return.
        #    The poller is loaded first and told to start once X has seen the relay go, so that the outage
        #    is the kill, X noticing it and the restart, not a Python start-up.
        poller = await world.start_client(
            "a1", "poll-chat", MODEL, "--timeout", "15", "--go-on-stdin", stdin=asyncio.subprocess.PIPE
        )
        try:
            assert poller.stdout is not None and poller.stdin is not None
            line = await asyncio.wait_for(poller.stdout.readline(), 10.0)
            assert json.loads(line) == {"event": "waiting"}, line
            relay_killed = time.monotonic()
            await relay.kill()
            down = await world.client("a1", "peers", "--until-relay", "down", "--timeout", "5")
            assert down["relay"]["state"] == "down", down["relay"]
            poller.stdin.write(b"go\n")
            await poller.stdin.drain()
            line = await asyncio.wait_for(poller.stdout.readline(), 5.0)
            assert json.loads(line) == {"event": "polling"}, line
            spawned = time.monotonic()
            relay2 = await world.relay(TOKEN, "relay2")
            await relay2.event("relay_started", 15.0)
            back = time.monotonic()
            out, err = await asyncio.wait_for(poller.communicate(), 20.0)
        finally:
            if poller.returncode is None:
                poller.kill()
                await poller.wait()
        assert poller.returncode == 0, err.decode()
        again = json.loads(out.decode().splitlines()[-1])
        assert again["ok"] is True, again
        assert (again["status"], again["node"], again["route"], again["content"]) == (200, "wan-y", "relay", ANSWER)
        timings["relay_down"] = back - relay_killed
        timings["relay_start"] = back - spawned
        timings["works_again"] = again["at"] - back
        assert timings["works_again"] <= BACK_WITHIN_S + MARGIN_S, (
            f"requests worked again {timings['works_again']:.2f} s after the relay returned "
            f"(goal {BACK_WITHIN_S} s); {again['attempts']} attempts, last error: {again['last_error']}"
        )
        view = await world.client("a1", "peers")
        assert view["relay"]["state"] == "up"
        assert [(p["name"], p["routes"]) for p in view["peers"]] == [("wan-y", ["relay"])], view

        # 4. kill -9 Y mid-stream: the stream ends with the SSE error event, no [DONE]; the SDK raises.
        await y.set_knobs(tokens=[f" t{i}" for i in range(40)], token_delay_s=0.1)
        cut = await world.start_client("a1", "cut", MODEL)
        try:
            assert cut.stdout is not None
            line = await asyncio.wait_for(cut.stdout.readline(), 15.0)
            assert json.loads(line) == {"event": "first_chunk"}, line
            killed = time.monotonic()
            await y.kill()
            out, err = await asyncio.wait_for(cut.communicate(), 15.0)
        finally:
            if cut.returncode is None:
                cut.kill()
                await cut.wait()
        timings["cut"] = time.monotonic() - killed
        assert cut.returncode == 0, err.decode()
        report = json.loads(out.decode().splitlines()[-1])
        raw, sdk = report["raw"], report["sdk"]
        assert (raw["status"], raw["node"], raw["route"]) == (200, "wan-y", "relay"), raw
        assert raw["content"].startswith(" t0") and len(raw["content"].split()) < 40, raw
        assert raw["ended_with_error"] is True and raw["done_seen"] is False, raw
        assert raw["error"]["type"] == "server_error", raw
        assert (sdk["status"], sdk["route"]) == (200, "relay"), sdk
        assert sdk["content"].startswith(" t0") and len(sdk["content"].split()) < 40, sdk
        assert sdk["error"] is not None and sdk["error"].startswith("APIError"), sdk
        assert timings["cut"] < 10.0, f"the broken stream took {timings['cut']:.1f} s to end"

        # 5b. To the end, the wrong-token node never appeared at X, through either relay process.
        final = await world.client("a1", "models")
        assert HIDDEN not in final["models"], final
        view = await world.client("a1", "peers")
        assert "wan-z" not in {p["name"] for p in view["peers"]}, view
        assert ready["wan-z"]["node_id"] not in view["relay"]["online"], view["relay"]

        # Clean stops of what is still alive.
        for p in (x, z, relay2):
            p.proc.send_signal(signal.SIGTERM)
        for p in (x, z):
            assert await p.message("stopped", 10.0) is True
        for p in (x, z, relay2):
            assert await asyncio.wait_for(p.proc.wait(), 10.0) == 0, p.log_tail()
        timings["total"] = time.monotonic() - t0
        print("wan: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    except BaseException:
        sys.stderr.write(world.logs() + "\n")
        raise
    finally:
        await world.reap()
        world.down()
    assert world.namespaces() == [], "scripts/wan down left namespaces behind"
