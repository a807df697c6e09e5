"""A model sharded across members on a real LAN (issue 22's acceptance), and nobody else reaching its workers.

Every test builds its own LAN with ``scripts/lan`` (namespaces on one bridge)
and runs each member as its own process (``tests/cluster/lan_host.py``; peer
port 32769): ``shard-a`` (host 1) leads SmolLM2 across ``shard-b`` and
``shard-c`` (hosts 2 and 3), which each lend an ``rpc-server`` bound to their
own loopback; ``quorum-node shard`` is run in host 1's namespace as a person
would. Host 4 is an outsider: no node, no keys, only ``tests/cluster/lan_client.py``.
The tap (``tests/cluster/lan_tap.py``) is a raw packet socket in the bridge's
namespace. The llama-server and rpc-servers come from the node's cache
(``quorum-node engine fetch``), shared by every namespace (one filesystem, one
pid namespace: the test sees their processes).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from quorum_node.embedded.supervisor import LlamaServerProcess
from tests.cluster.lan_host import PEER_PORT, PORT, Lan, Proc, lan_of
from tests.cluster.lan_tap import read_capture
from tests.netns import require_netns
from tests.support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.netns, pytest.mark.timeout(300, func_only=True)]

NET = "10.79.9"  # test_mdns 10.77.0, test_lan 10.78.0, test_trust_lan 10.79.0, tests/netns.py 10.79.1
SECRET = "shard-" + secrets.token_hex(8)  # names the test cluster (tests/members_support.py)
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"  # a file stem in the node's model cache
ENGINE = f"shard:{MODEL_ID}"
PROMPTS = ["Name three colors.", "Write one sentence about the sea."]
SAMPLING = {"temperature": 0, "max_tokens": 24, "seed": 1}
LEASE_S = 6.0  # the leader's shard_lease_s: a killed leader's workers end within it
HOSTS = {1: "shard-a", 2: "shard-b", 3: "shard-c"}  # 1 leads; 2 and 3 lend
OUTSIDER = 4
UP_S = 150.0  # from `quorum-node shard` to the model listed by a helper (every layer through the tunnels)
STEP_S = 30.0  # the most any other step may take
CLI = (sys.executable, "-m", "quorum_node.cli")
REPLAY_BYTES = 256 * 1024  # of a recorded connection played again: its handshake and first requests


@pytest.fixture
async def lan(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Lan]:
    require_netns("the sharded LAN tests")
    async with lan_of(
        request, f"qs{os.getpid() % 10000}s{secrets.token_hex(2)}", NET, tmp_path, 4
    ) as world:  # fresh names: no straggler's ports
        yield world


async def unsharded(llama_server: Path, model: Path) -> list[str]:
    """The greedy answers of the whole model on one llama-server (on this machine, outside the LAN)."""
    whole = LlamaServerProcess(llama_server, model)
    await whole.start()
    try:
        await whole.wait_ready(60)
        async with openai.AsyncOpenAI(base_url=whole.url + "/v1", api_key="unused", max_retries=0) as direct:
            out = []
            for prompt in PROMPTS:
                answer = await direct.chat.completions.create(
                    model=MODEL_ID,
                    messages=[{"role": "user", "content": prompt}],
                    **SAMPLING,  # type: ignore[arg-type]
                )
                out.append(answer.choices[0].message.content or "")
            return out
    finally:
        await whole.stop()


def admin(lan: Lan, place: int) -> tuple[str, ...]:
    """The admin flags of ``quorum-node`` for the node at ``place`` (run in its namespace)."""
    return ("--url", f"http://127.0.0.1:{PORT}", "--data-dir", str(lan.data_dir(HOSTS[place])))


async def start_members(lan: Lan) -> dict[int, Proc]:
    """Enrol hosts 1-3 in one cluster, start them (no model of their own; the leader's lease short), and
    wait until the leader sees both others up with memory to lend."""
    for _, name in sorted(HOSTS.items()):
        lan.enrol(name, SECRET)
    procs = {
        place: await lan.host(
            place, name, secret=SECRET, models=[], tokens=[], shard_lease_s=LEASE_S if place == 1 else None
        )
        for place, name in sorted(HOSTS.items())
    }
    for p in procs.values():
        assert (await p.message("ready", 20.0))["peer_port"] == PEER_PORT

    async def lenders_up() -> bool:  # what `lenders()` needs: up, on the LAN, a health answer (with memory)
        peers = (await lan.client(1, "peers"))["peers"]
        ready = {p["name"] for p in peers if p["state"] == "up" and p["address"] and p["load"] is not None}
        return {HOSTS[2], HOSTS[3]} <= ready

    await eventually(lenders_up, "the leader sees both helpers up", timeout_s=STEP_S, interval_s=0.2)
    return procs


async def lead(lan: Lan) -> tuple[dict[str, Any], float]:
    """``quorum-node shard MODEL --across 2`` on host 1; wait until host 2 lists the model, held by host 1's
    sharded engine across hosts 2 and 3. Its listing, and how long it took."""
    t0 = time.monotonic()
    rc, out, err = await lan.run(1, *CLI, "shard", MODEL_ID, "--across", "2", *admin(lan, 1))
    assert rc == 0 and f"leading {ENGINE} across 2 members" in out, (rc, out, err)
    got = await lan.client(
        2,
        "models",
        "--expect",
        json.dumps({MODEL_ID: [HOSTS[1]]}),
        "--holders",
        "--timeout",
        str(UP_S),
        timeout_s=UP_S + 15,
    )
    took = time.monotonic() - t0
    assert got["models"].get(MODEL_ID) == [HOSTS[1]], f"host 2 lists {got['models']} after {got['elapsed_s']} s"
    (holder,) = got["holders"][MODEL_ID]
    assert holder["node"] == HOSTS[1] and holder["engine"] == ENGINE, holder
    assert sorted(holder["helpers"]) == [HOSTS[2], HOSTS[3]], holder
    return got, took


async def shards_of(lan: Lan, place: int) -> dict[str, Any]:
    """``quorum-node shard --list --json`` of the node at ``place``: what it leads and what it lends."""
    rc, out, err = await lan.run(place, *CLI, "shard", "--list", "--json", *admin(lan, place))
    assert rc == 0, (rc, out, err)
    data: dict[str, Any] = json.loads(out)
    return data


async def loan_of(lan: Lan, place: int, leader_id: str) -> dict[str, Any]:
    """The one worker the helper at ``place`` lends: to the leader, for the model's shard, running."""
    lending = (await shards_of(lan, place))["lending"]
    assert len(lending) == 1, f"host {place} lends {lending}"
    (loan,) = lending
    assert loan["leader"] == leader_id and loan["shard"] == MODEL_ID, loan
    assert psutil.Process(loan["pid"]).cmdline()[0].endswith("/rpc-server"), loan
    return loan


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_model_sharded_across_lan_members_answers_as_the_whole_engine_and_only_its_leader_reaches_the_workers(
    lan: Lan, llama_server: Path, model: Path
) -> None:
    """(1) Host 1 leads SmolLM2 across hosts 2 and 3; host 2 lists it with host 1's sharded holder.
    (2) Greedy answers through host 2 (the openai SDK, streamed or not) are the unsharded engine's, word for
    word. (3) The outsider at host 4 reaches no worker: (a) not on its port at a helper's LAN address, (b) not
    through the tunnel without a member's certificate, (c) not by replaying a leader's recorded connection
    to a helper's peer port; and the tap on the bridge never sees a prompt (or an answer) in the clear."""
    expected = await unsharded(llama_server, model)
    assert all(expected), expected
    procs = await start_members(lan)
    leader_id = (await procs[1].message("ready", 1.0))["node_id"]
    capture_file = lan.tmp / "tap.bin"
    tap = await lan.spawn("-br", "tap", sys.executable, "-m", "tests.cluster.lan_tap", str(capture_file))
    assert await tap.message("ready", STEP_S) is True
    control_mark = f"control-{secrets.token_hex(8)}"  # what the tap sees in the clear is seen
    plain = await lan.client(OUTSIDER, "plain-get", f"http://{lan.ip(2)}:{PORT}/v1/models?{control_mark}")
    assert plain["status"] == 401, plain

    # (1) The shard comes up across both helpers, and another member lists it.
    _, up_s = await lead(lan)
    leading = (await shards_of(lan, 1))["leading"]
    assert [(s["engine"], s["state"]) for s in leading] == [(ENGINE, "up")], leading
    assert sorted(h["node"] for h in leading[0]["helpers"]) == [HOSTS[2], HOSTS[3]], leading
    loans = {place: await loan_of(lan, place, leader_id) for place in (2, 3)}

    # (2) The same greedy answers as the whole model on one engine, through a helper, streamed or not.
    t0 = time.monotonic()
    for prompt, want in zip(PROMPTS, expected, strict=True):
        for stream in ([], ["--stream"]):
            got = await lan.client(
                2,
                "chat",
                MODEL_ID,
                "--prompt",
                prompt,
                "--temperature",
                str(SAMPLING["temperature"]),
                "--max-tokens",
                str(SAMPLING["max_tokens"]),
                "--seed",
                str(SAMPLING["seed"]),
                *stream,
                timeout_s=60,
            )
            assert got["status"] == 200 and got["error"] is None, got
            assert got["node"] == HOSTS[1] and got["route"] == "lan", got
            assert got["content"] == want, (prompt, stream, got["content"], want)
    chats_s = time.monotonic() - t0

    # (3a) A helper's rpc-server is on its loopback only: not the outsider, not even the leader, gets to it.
    for place, loan in loans.items():
        for who in (OUTSIDER, 1):
            reached = await lan.client(who, "connect", lan.ip(place), str(loan["port"]))
            assert reached["connected"] is False and "refused" in reached["error"].lower(), (place, who, reached)
    # (3b) Its tunnel is for the member that leased the worker: without a certificate, 401.
    for place in (2, 3):
        url = f"https://{lan.ip(place)}:{PEER_PORT}/quorum/v1/shards/tunnel?shard={MODEL_ID}"
        refused = await lan.client(OUTSIDER, "tunnel", url)
        assert refused["status"] == 401, (place, refused)

    assert await tap.ask("captured", STEP_S, stop=True)
    capture = read_capture(capture_file)
    assert capture.find(control_mark.encode()), "the tap saw no plain HTTP: it proves nothing"
    raw = capture_file.read_bytes()
    for text in [*PROMPTS, *(a for a in expected if len(a) >= 16)]:
        assert capture.find(text.encode()) == [] and text.encode() not in raw, f"{text!r} crossed the LAN in the clear"
    across = {place: capture.tcp_bytes(to_port=PEER_PORT, between=(lan.ip(1), lan.ip(place))) for place in (2, 3)}
    assert all(n > 1_000_000 for n in across.values()), f"the layers did not cross the LAN: {across}"

    # (3c) The leader's connections to a helper's peer port, played again by the outsider: the helper answers
    #      the recorded hello with a handshake of its own (fresh keys), and takes nothing after it: no
    #      upgrade, no HTTP answer, no new worker.
    assert capture.find(b"/quorum/v1/shards/") == [], "a shard request crossed the LAN in the clear"
    replays: list[dict[str, Any]] = []
    for place in (2, 3):
        leader_ip, helper_ip = lan.ip(1), lan.ip(place)
        flows = sorted(  # the connections the tap saw from their first byte (a TLS ClientHello), largest first
            (
                (sport, data)
                for (src, sport, dst, dport), data in capture.tcp.items()
                if (src, dst, dport) == (leader_ip, helper_ip, PEER_PORT)
                and data[:1] == b"\x16"
                and data[5:6] == b"\x01"
            ),
            key=lambda f: -len(f[1]),
        )
        assert len(flows) >= 2, f"the tap saw no whole connection of the leader to host {place}'s peer port"
        for sport, data in (flows[0], flows[-1]):  # the tunnel that carried the layers, and a short call
            hello = 5 + int.from_bytes(data[3:5], "big")  # the ClientHello record
            recorded = lan.tmp / f"flow-{place}-{sport}.bin"
            recorded.write_bytes(data[:REPLAY_BYTES])
            answer = await lan.client(
                OUTSIDER, "replay", helper_ip, str(PEER_PORT), str(recorded), "--first", str(hello)
            )
            first, back = base64.b64decode(answer["first_answer"]), base64.b64decode(answer["received"])
            assert b"HTTP/" not in back and b"101 Switching" not in back, (place, back[:300])
            assert answer["closed"], f"host {place} held a replayed connection open: {answer}"
            # Its answer to the hello is a ServerHello with a random of its own: the recorded keys are no use.
            assert first[:1] == b"\x16" and first[5] == 2, (place, first[:64])
            then = capture.tcp[(helper_ip, PEER_PORT, leader_ip, sport)]
            assert then[5] == 2 and first[11:43] != then[11:43], "the helper answered with the recorded random"
            replays.append(
                {
                    "host": place,
                    "recorded": len(data),
                    "sent": answer["sent"],
                    "back": len(back),
                    "error": answer["error"],
                }
            )
    for place in (2, 3):  # still the one worker, to the leader, the same process: nothing new was lent
        loan = await loan_of(lan, place, leader_id)
        assert (loan["pid"], loan["port"]) == (loans[place]["pid"], loans[place]["port"]), (loan, loans[place])
        assert len(procs[place].log_events("shard_worker_lent")) == 1, procs[place].log_events("shard_worker_lent")
    leading = (await shards_of(lan, 1))["leading"]  # and the shard was built once, and is still up
    assert [(s["state"], s["builds"]) for s in leading] == [("up", 1)], leading

    print(
        f"shard lan: up and listed by a helper {up_s:.1f} s after `quorum-node shard`; 4 greedy chats through "
        f"host 2 in {chats_s:.1f} s, equal to the unsharded engine's; the tap saw {capture.frames} frames, "
        f"{len(raw)} bytes, {across[2]} and {across[3]} bytes between the leader and each helper's peer port, "
        f"no prompt in the clear; replays by the outsider: {replays}"
    )


async def test_a_killed_leader_leaves_no_worker_running_on_the_lan(lan: Lan) -> None:
    """(4) The leader killed outright (SIGKILL: no release, no goodbye): both helpers' rpc-servers are gone
    within its lease and a few seconds, and the model leaves the catalog."""
    procs = await start_members(lan)
    leader = procs[1]
    leader_id = (await leader.message("ready", 1.0))["node_id"]
    _, up_s = await lead(lan)
    pids = {place: int((await loan_of(lan, place, leader_id))["pid"]) for place in (2, 3)}
    assert all(running(p) for p in pids.values())
    leader_pid = (await leader.message("ready", 1.0))["pid"]
    engines = [
        c.pid for c in psutil.Process(leader_pid).children() if (c.cmdline() or [""])[0].endswith("/llama-server")
    ]
    assert len(engines) == 1, "the leader runs one llama-server for the shard"
    marks = {place: len(procs[place].events) for place in (2, 3)}

    killed_at = time.monotonic()
    await leader.kill()
    await eventually(
        lambda: not any(running(p) for p in pids.values()),
        "both helpers' rpc-servers are gone",
        timeout_s=LEASE_S + 5,
        interval_s=0.1,
    )
    gone_s = time.monotonic() - killed_at
    assert gone_s <= LEASE_S + 5
    assert not running(engines[0]), "the killed leader's llama-server outlived it"
    for place in (2, 3):
        ended = await procs[place].event("shard_worker_ended", 5.0, after=marks[place])
        assert ended["reason"] == "lease_expired" and ended["shard"] == MODEL_ID, ended
        assert (await shards_of(lan, place))["lending"] == []
    await lan.client(2, "models", "--absent", MODEL_ID, "--timeout", str(STEP_S), timeout_s=STEP_S + 10)
    assert MODEL_ID not in (await lan.client(2, "models"))["models"]
    print(
        f"shard lan: up in {up_s:.1f} s; leader killed, both helpers' rpc-servers gone after {gone_s:.1f} s "
        f"(lease {LEASE_S:.0f} s)"
    )
