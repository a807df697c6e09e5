"""A real LAN of four quorum nodes, each a separate process in its own network namespace.

``scripts/lan`` builds the LAN: namespaces joined by a bridge, no route out.
Every host runs ``tests/cluster/lan_host.py`` (a fake engine plus a node on :32768,
zeroconf bound to the host's LAN address only); every client call is
``tests/cluster/lan_client.py`` run inside a host's namespace (host 1's, mostly), talking
to its node over loopback with the real openai SDK or raw aiohttp. Hosts find each other by real
multicast mDNS, fetch catalogs and forward requests over mutual TLS on their
peer ports, and are killed with SIGKILL to prove the failure contract across
real sockets.

The LAN: host 1 holds nothing; hosts 2 and 3 both hold ``shared-model`` and one
model each of their own (``only2``, ``only3``); hosts 1-3 are members of one
cluster (each data dir enrolled as ``invite`` and ``join`` leave it, just before
its host starts: ``tests/members_support.py``). Host 4 holds ``secret-model``
and is a member of another cluster: its own keys, its own founder.
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

from tests.cluster.lan_host import PEER_PORT, PORT, Lan, Proc
from tests.netns import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

NET = "10.78.0"  # test_mdns.py's namespace test uses 10.77.0
SECRET = "lan-secret-" + secrets.token_hex(8)  # names the test cluster (tests/members_support.py)
WRONG_SECRET = "not-the-" + SECRET  # another cluster
DISCOVERY_DEADLINE_S = 10.0
STEP_DEADLINE_S = 20.0


def tokens(host: int) -> list[str]:
    return ["Hello", " from", f" host{host}"]


async def first_to_get(model: str, hosts: list[Proc], marks: dict[str, int], timeout_s: float) -> Proc:
    """The host whose engine next receives a request for ``model``."""

    async def got(h: Proc) -> Proc:
        await h.message("request", timeout_s, after=marks[h.name], where=lambda req: req["model"] == model)
        return h

    waits = [asyncio.create_task(got(h)) for h in hosts]
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        assert done, f"no holder received a request for {model} within {timeout_s} s"
        return done.pop().result()
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def test_lan_of_namespaces_discovers_forwards_and_fails_over(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    require_netns("this LAN test")
    lan = Lan(f"qt{os.getpid() % 10000}l", NET, tmp_path)

    async def spawn(index: int, *, models: list[str], secret: str = SECRET) -> Proc:
        return await lan.host(index, f"lan-h{index}", secret=secret, models=models, tokens=tokens(index))

    def teardown() -> None:
        lan.kill_all()
        lan.down()

    request.addfinalizer(teardown)
    lan.up(4)

    try:
        h1 = await spawn(1, models=[])
        h2 = await spawn(2, models=["shared-model", "only2"])
        h3 = await spawn(3, models=["shared-model", "only3"])
        h4 = await spawn(4, models=["secret-model"], secret=WRONG_SECRET)
        for h in (h1, h2, h3, h4):
            assert (await h.message("ready", 20.0))["port"] == PORT
        started = time.monotonic()

        # 2. Discovery: host 1 lists every model of its cluster with the hosts holding it.
        expect = {"shared-model": sorted([h2.name, h3.name]), "only2": [h2.name], "only3": [h3.name]}
        listed = await lan.client(1, "models", "--expect", json.dumps(expect), "--timeout", str(DISCOVERY_DEADLINE_S))
        assert listed["status"] == 200
        assert listed["models"] == expect, f"not discovered within {DISCOVERY_DEADLINE_S} s"
        discovered_s = time.monotonic() - started

        # 6a. The other cluster's host is on the same wire and serving (its model is missing from the
        #     exact listing above), but it sees none of this cluster either.
        own = await lan.client(4, "models")
        assert own["models"] == {"secret-model": [h4.name]}

        # 3. A model only host 2 holds is served by host 2, forwarded over the LAN.
        only2 = await lan.client(1, "chat", "only2")
        assert only2 == {
            "status": 200,
            "node": h2.name,
            "route": "lan",
            "content": "Hello from host2",
            "error": None,
            "done_seen": None,
        }

        # 4. Kill the holder of `shared-model` while a request waits on it for its first token: the
        #    request fails over, before any byte reached the client, and the other holder serves it.
        for h in (h2, h3):
            await h.set_knobs(first_token_delay_s=30.0)
        marks = {h.name: h.mark() for h in (h2, h3)}
        inflight = await lan.start_client(1, "chat", "shared-model", "--stream")
        try:
            victim = await first_to_get("shared-model", [h2, h3], marks, STEP_DEADLINE_S)
            (survivor,) = {h2, h3} - {victim}
            await survivor.set_knobs(first_token_delay_s=0.0)
            await victim.kill()
            out, err = await asyncio.wait_for(inflight.communicate(), STEP_DEADLINE_S)
        finally:
            if inflight.returncode is None:
                inflight.kill()
                await inflight.wait()
        assert inflight.returncode == 0, err.decode()
        lines = [json.loads(x) for x in out.decode().splitlines()]
        assert lines == [
            {"event": "first_chunk"},
            {
                "status": 200,
                "node": survivor.name,
                "route": "lan",
                "content": f"Hello from host{survivor.place}",
                "error": None,
                "done_seen": None,
            },
        ]
        await survivor.message(
            "request", 1.0, after=marks[survivor.name], where=lambda req: req["model"] == "shared-model"
        )
        # The requests after it go to the survivor too, whether or not host 1 has noticed the death yet.
        for stream in (False, True):
            after = await lan.client(1, "chat", "shared-model", *(["--stream"] if stream else []))
            assert after == {
                "status": 200,
                "node": survivor.name,
                "route": "lan",
                "content": f"Hello from host{survivor.place}",
                "error": None,
                "done_seen": None,
            }
        # Without goodbye packets the dead host drops out by failed health checks.
        gone = await lan.client(
            1, "models", "--expect", json.dumps({"shared-model": [survivor.name]}), "--timeout", "8"
        )
        assert gone["models"].get("shared-model") == [survivor.name]
        assert f"only{victim.place}" not in gone["models"]

        # 5. A stream cut mid-way by its node dying ends with an SSE error event and no [DONE].
        await survivor.set_knobs(tokens=[f" t{i}" for i in range(40)], token_delay_s=0.1)
        cut = await lan.start_client(1, "cut", f"only{survivor.place}")
        try:
            assert cut.stdout is not None
            line = await asyncio.wait_for(cut.stdout.readline(), STEP_DEADLINE_S)
            assert json.loads(line) == {"event": "first_chunk"}, line
            killed_at = time.monotonic()
            await survivor.kill()
            out, err = await asyncio.wait_for(cut.communicate(), STEP_DEADLINE_S)
        finally:
            if cut.returncode is None:
                cut.kill()
                await cut.wait()
        assert cut.returncode == 0, err.decode()
        report = json.loads(out.decode().splitlines()[-1])
        cut_s = time.monotonic() - killed_at
        raw, sdk = report["raw"], report["sdk"]
        assert raw["status"] == 200 and raw["node"] == survivor.name and raw["route"] == "lan"
        assert raw["content"].startswith(" t0") and len(raw["content"].split()) < 40
        assert raw["ended_with_error"] is True and raw["done_seen"] is False, raw
        assert raw["error"]["type"] == "server_error", raw
        assert sdk["status"] == 200 and sdk["content"].startswith(" t0") and len(sdk["content"].split()) < 40
        assert sdk["error"] is not None and sdk["error"].startswith("APIError"), sdk
        assert cut_s < 10.0, f"the broken stream took {cut_s:.1f} s to end"

        # 6b. Long after discovery, the other cluster's model is still absent on host 1 …
        final = await lan.client(1, "models")
        assert "secret-model" not in final["models"]
        assert "secret-model" not in listed["models"]
        # The two clusters leave each other alone: neither ever sent the other a request it refused.
        assert h4.log_events("unauthenticated_request") == []
        assert h1.log_events("unauthenticated_request") == []
        # … and host 1 refuses its catalog to host 4's key, asked from host 4's namespace over its peer
        # port, while the same request with a member's key (host 2's) passes.
        catalog = f"https://{lan.ip(1)}:{PEER_PORT}/quorum/v1/catalog"
        stranger = await lan.client(4, "peer-get", catalog, "--data-dir", str(lan.data_dir(h4.name)))
        assert stranger["status"] in (None, 401), stranger
        member = await lan.client(4, "peer-get", catalog, "--data-dir", str(lan.data_dir(h2.name)))
        assert member["status"] == 200 and json.loads(member["body"])["models"] == [], member

        # Clean stops of the hosts still alive.
        for h in (h1, h4):
            h.proc.send_signal(signal.SIGTERM)
        for h in (h1, h4):
            assert await h.message("stopped", 10.0) is True
            assert await asyncio.wait_for(h.proc.wait(), 10.0) == 0
        print(f"lan: discovered in {discovered_s:.2f} s; broken stream ended {cut_s:.2f} s after the kill")
    except BaseException:
        sys.stderr.write(lan.logs() + "\n")
        raise
    finally:
        await lan.reap()
