"""A LAN cluster on loopback: several in-process nodes, each with its own fake engine.

Nodes find each other through static peers (no mDNS), prove who they are with
mutual TLS on their peer ports (each a member of one keyed cluster), and forward a
request for a model they lack to a peer that holds it. The client is the real
openai SDK; raw bytes are read with aiohttp where the SDK would hide what a test
needs to see.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from quorum_node.cluster.identity import NodeIdentity
from quorum_node.cluster.members import Candidate, MemberStore, encode_records
from tests.conftest import StartFake, StartNode
from tests.members_support import CLUSTER, Member, client_tls, member_client, model_holders, peer_rows
from tests.support import eventually

HELLO = "Hello, world!"  # the fakes' default tokens, joined
MESSAGES = [{"role": "user", "content": "hi"}]


async def make_preferred(client: openai.AsyncOpenAI, model: str, fast: Member, slow: Member) -> None:
    """Make ``fast`` the peer the router tries first for ``model``, by measurement.

    The slow engine answers after 0.6 s; once the fast one has served a request,
    its measured first-token time (a few ms) ranks it first, whatever the RTTs.
    """
    slow.engine.first_token_delay_s = 0.6
    for _ in range(3):
        if fast.engine.requests:
            break
        await client.chat.completions.create(model=model, messages=MESSAGES)
    assert fast.engine.requests, "the fast peer never got a request"


async def retry_affordable(member: Member) -> None:
    """Wait until the node's retry budget (20 % of requests, plus 1 per second) allows one more retry.

    The budget is there so a failing cluster is not hammered; a test that provokes
    several failovers in a row waits for it rather than measuring it.
    """
    cluster = member.node.cluster
    assert cluster is not None

    async def affordable() -> bool:
        return cluster.budget.can_retry(time.monotonic())

    await eventually(affordable, "the retry budget allows a retry", timeout_s=2.0)


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


# -- the catalog ---------------------------------------------------------------


async def test_models_lists_whole_cluster_deduplicated(start_cluster, client_for, http) -> None:
    a, b, c = await start_cluster(["alpha", "shared"], ["beta", "shared"], ["gamma"])
    for m in (a, b, c):
        listed = await client_for(m.node).models.list()
        ids = [x.id for x in listed.data]
        assert ids == sorted(set(ids)) == ["alpha", "beta", "gamma", "shared"]
        nodes = {x.id: x.model_extra["nodes"] for x in listed.data}
        assert nodes == {"alpha": [a.name], "beta": [b.name], "gamma": [c.name], "shared": sorted([a.name, b.name])}

    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "quorum-node"),
        "peers",
        "--url",
        a.node.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].split()[:5] == ["NAME", "ID", "ADDRESS", "ROUTES", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {b.name, c.name}
    assert rows[b.name][2] == b.address and rows[b.name][3] == "lan" and rows[b.name][4] == "up"
    assert rows[c.name][4] == "up"


async def test_model_added_to_peer_engine_reaches_other_node(start_cluster, client_for) -> None:
    a, b = await start_cluster(["alpha"], ["beta"])
    b.engine.models.append("delta")

    async def listed() -> bool:
        return "delta" in [m.id for m in (await client_for(a.node).models.list()).data]

    await eventually(listed, "the new model shows up on the other node")
    reply = await client_for(a.node).chat.completions.with_raw_response.create(model="delta", messages=MESSAGES)
    assert reply.headers["X-Quorum-Node"] == b.name
    assert reply.parse().choices[0].message.content == HELLO


# -- forwarding ----------------------------------------------------------------


async def test_request_for_peer_model_is_served_by_peer(start_cluster, client_for) -> None:
    a, b = await start_cluster(["alpha"], ["beta"])
    raw = await client_for(a.node).chat.completions.with_raw_response.create(model="beta", messages=MESSAGES)
    assert raw.headers["X-Quorum-Node"] == b.name
    assert raw.headers["X-Quorum-Route"] == "lan"
    reply = raw.parse()
    assert reply.choices[0].message.content == HELLO
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert len(b.engine.requests) == 1 and not a.engine.requests
    # what the engine received carries no cluster secrets
    assert not any(h.lower().startswith("x-quorum") for h in b.engine.requests[0].headers)

    completion = await client_for(a.node).completions.create(model="beta", prompt="hi")
    assert completion.choices[0].text == HELLO


async def test_streamed_request_passes_through_peer(start_cluster, client_for, http) -> None:
    a, b = await start_cluster(["alpha"], ["beta"])
    raw = await client_for(a.node).chat.completions.with_raw_response.create(
        model="beta", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["X-Quorum-Node"] == b.name
    assert raw.headers["X-Quorum-Route"] == "lan"
    chunks = [c async for c in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == HELLO
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4

    async with http.post(a.node.url + "/v1/chat/completions", json=chat_body("beta", stream=True)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        data = await resp.read()
    assert data.endswith(b"data: [DONE]\n\n")
    assert data.count(b"data: ") == 1 + 4 + 1 + 1  # role, four tokens, finish, [DONE]; no usage unasked
    assert b'"usage":{' not in data


async def test_local_engine_is_preferred_over_peer(start_cluster, client_for) -> None:
    """Without affinity; with it, a conversation goes to its holder wherever it is (test_affinity_cluster.py)."""
    a, b = await start_cluster(["shared"], ["shared"], affinity=False)
    for _ in range(3):
        raw = await client_for(a.node).chat.completions.with_raw_response.create(model="shared", messages=MESSAGES)
        assert raw.headers["X-Quorum-Route"] == "local"
        assert raw.headers["X-Quorum-Node"] == a.name
    assert len(a.engine.requests) == 3 and not b.engine.requests


# -- failover before the first byte -------------------------------------------


async def test_failing_peer_engine_fails_over_to_other_holder(start_cluster, client_for) -> None:
    a, b, c = await start_cluster(["alpha"], ["beta"], ["beta"], affinity=False)  # b is tried first
    client = client_for(a.node)
    await make_preferred(client, "beta", fast=b, slow=c)
    tried = len(b.engine.requests)

    await retry_affordable(a)
    b.engine.next_status = 503
    raw = await client.chat.completions.with_raw_response.create(model="beta", messages=MESSAGES)
    assert len(b.engine.requests) == tried + 1  # the preferred peer was tried first ...
    assert raw.headers["X-Quorum-Node"] == c.name  # ... and the other one answered
    assert raw.parse().choices[0].message.content == HELLO

    await retry_affordable(a)
    b.engine.next_status = 503
    stream = await client.chat.completions.create(model="beta", messages=MESSAGES, stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == HELLO
    assert len(b.engine.requests) == tried + 2


async def test_stopped_peer_engine_fails_over_to_other_holder(start_cluster, client_for) -> None:
    a, b, c = await start_cluster(["alpha"], ["beta"], ["beta"], affinity=False)  # b is tried first
    client = client_for(a.node)
    await make_preferred(client, "beta", fast=b, slow=c)
    c.engine.first_token_delay_s = 0.0
    await b.engine.stop_listening()
    for _ in range(3):
        await retry_affordable(a)
        raw = await client.chat.completions.with_raw_response.create(model="beta", messages=MESSAGES)
        assert raw.headers["X-Quorum-Node"] == c.name
        assert raw.parse().choices[0].message.content == HELLO


async def test_stopped_peer_node_is_routed_around_then_marked_down(start_cluster, client_for, http) -> None:
    # without affinity: b is made the first choice by measurement (make_preferred)
    a, b, c = await start_cluster(["alpha"], ["beta", "only-b"], ["beta"], peer_down_after_s=2.0, affinity=False)
    client = client_for(a.node)
    await make_preferred(client, "beta", fast=b, slow=c)
    c.engine.first_token_delay_s = 0.0
    await b.node.stop()
    stopped_at = time.monotonic()
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(model="beta", messages=MESSAGES)
        assert raw.headers["X-Quorum-Node"] == c.name
        assert raw.parse().choices[0].message.content == HELLO

    async def b_down() -> bool:
        rows = {p["name"]: p for p in await peer_rows(http, a.node)}
        return rows[b.name]["state"] == "down"

    await eventually(b_down, "the stopped peer is marked down", timeout_s=2.0 + 1.5)
    assert time.monotonic() - stopped_at < 2.0 + 1.5
    holders = await model_holders(http, a.node)
    assert "only-b" not in holders
    assert holders["beta"] == [c.name]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="only-b", messages=MESSAGES)


async def test_circuit_breaker_skips_a_peer_that_keeps_failing(start_cluster, client_for) -> None:
    a, b, c = await start_cluster(["alpha"], ["beta"], ["beta"], affinity=False)  # b is tried first
    client = client_for(a.node)
    await make_preferred(client, "beta", fast=b, slow=c)
    c.engine.first_token_delay_s = 0.2  # still clearly slower than b: b stays the first choice
    tried = len(b.engine.requests)
    threshold = 3  # PeerTable's default breaker_threshold
    for i in range(threshold):
        await retry_affordable(a)
        b.engine.next_status = 503
        raw = await client.chat.completions.with_raw_response.create(model="beta", messages=MESSAGES)
        assert raw.headers["X-Quorum-Node"] == c.name
        assert len(b.engine.requests) == tried + i + 1
    b.engine.next_status = 503
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(model="beta", messages=MESSAGES)
        assert raw.headers["X-Quorum-Node"] == c.name
    assert len(b.engine.requests) == tried + threshold  # not even tried: the breaker is open
    assert b.engine.next_status == 503


# -- after the first byte -------------------------------------------------------


async def test_mid_stream_failure_on_peer_reaches_client_as_error(start_cluster, client_for, http) -> None:
    a, b = await start_cluster(["alpha"], ["beta"])
    b.engine.fail_after_tokens = 2
    stream = await client_for(a.node).chat.completions.create(model="beta", messages=MESSAGES, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            if chunk.choices:
                got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "Hello,"

    async with http.post(a.node.url + "/v1/chat/completions", json=chat_body("beta", stream=True)) as resp:
        assert resp.status == 200
        assert resp.headers["X-Quorum-Node"] == b.name
        data = await resp.read()
    events = [e for e in data.split(b"\n\n") if e]
    assert events[-1].startswith(b'data: {"error"')
    assert b"[DONE]" not in data
    assert len(b.engine.requests) == 2  # never retried after the first byte


async def test_client_disconnect_cancels_generation_on_serving_peer(start_cluster, client_for) -> None:
    a, b = await start_cluster(["alpha"], ["beta"])
    b.engine.tokens = [f"t{i} " for i in range(200)]
    b.engine.token_delay_s = 0.05
    stream = await client_for(a.node).chat.completions.create(model="beta", messages=MESSAGES, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    assert b.engine.active_streams == 1
    await stream.close()
    await asyncio.wait_for(b.engine.wait_until(lambda e: e.cancelled == 1 and e.active_streams == 0), 2.0)
    cluster = a.node.cluster
    assert cluster is not None

    async def released() -> bool:  # the forwarding slot on the first node is given back too
        return all(p.in_flight == 0 for p in cluster.table.all())

    await eventually(released, "the forwarding slot is released", timeout_s=2.0)


# -- loops ---------------------------------------------------------------------


async def test_forwarded_request_is_never_forwarded_again(start_cluster, http, tmp_path: Path) -> None:
    a, b = await start_cluster(["alpha"], ["beta"])
    peer, base = await member_client(tmp_path, a.node, CLUSTER)
    path = "/v1/chat/completions"
    data = b'{"model":"beta","messages":[{"role":"user","content":"hi"}]}'
    headers = {"X-Quorum-Hop": "1", "X-Quorum-Origin": "some-peer", "Content-Type": "application/json"}
    async with peer:
        async with peer.post(base + path, data=data, headers=headers) as resp:
            assert resp.status == 404  # a member's request is served here or nowhere
            body = await resp.json()
        assert body["error"]["code"] == "model_not_found"
        assert not b.engine.requests and not a.engine.requests

        # a hop header on the public port is refused outright, even from loopback
        async with http.post(a.node.url + path, data=data, headers={"X-Quorum-Hop": "1"}) as resp:
            assert resp.status == 401
        assert not b.engine.requests

        # a member's request for a model the node holds is served there
        async with peer.post(base + path, data=data.replace(b"beta", b"alpha"), headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["message"]["content"] == HELLO


# -- trust ---------------------------------------------------------------------


async def test_peer_endpoints_answer_members_only(start_cluster, http, tmp_path: Path) -> None:
    (a,) = await start_cluster(["alpha"])
    assert a.node.cluster is not None
    path = "/quorum/v1/catalog"

    async with http.get(a.node.url + path) as resp:  # the public port: no peer endpoint for anyone
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"

    base = f"https://127.0.0.1:{a.node.peer_port}"
    # the peer port without a certificate: nothing but asking to join
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls(None, None))) as anon:
        for p in (path, "/quorum/v1/health", "/quorum/v1/keys", "/quorum/v1/members"):
            async with anon.get(base + p) as resp:
                assert resp.status == 401, p
    # a stranger's own key and certificate: the handshake fails, nothing is answered
    stranger = NodeIdentity.generate()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls(stranger, None))) as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(base + path) as resp:
                await resp.read()

    member, _ = await member_client(tmp_path, a.node, CLUSTER)
    async with member, member.get(base + path) as resp:
        assert resp.status == 200
        assert [m["id"] for m in (await resp.json())["models"]] == ["alpha"]


async def test_node_of_another_cluster_never_becomes_a_peer(start_cluster, start_node, fake, client_for, http) -> None:
    a, b = await start_cluster(["alpha"], ["beta"])
    w_eng = await fake("openai", models=["intruder"])
    w = await start_node(
        backends=[{"kind": "openai", "url": w_eng.url}],
        cluster="t",
        cluster_secret="another",
        peers=[f"127.0.0.1:{a.node.peer_port}"],
    )
    assert a.node.cluster is not None and w.cluster is not None
    a.node.cluster.table.add_static(f"127.0.0.1:{w.peer_port}")
    # a model added on a good peer afterwards arrives: enough probe rounds have run for W too
    b.engine.models.append("late")

    async def late_arrived() -> bool:
        return "late" in await model_holders(http, a.node)

    # the probe round that saw B's new digest started after W's address was added, so it probed W too
    await eventually(late_arrived, "a good peer's new model arrives")
    assert "intruder" not in await model_holders(http, a.node)
    assert [p["name"] for p in await peer_rows(http, a.node)] == [b.name]
    assert await peer_rows(http, w) == []
    assert "alpha" not in await model_holders(http, w)
    assert not a.node.cluster.members.is_member(w.cluster.node_id)
    assert not w.cluster.members.is_member(a.node.cluster.node_id)
    with pytest.raises(openai.NotFoundError):
        await client_for(a.node).chat.completions.create(model="intruder", messages=MESSAGES)


async def test_a_stopped_peer_comes_back_by_itself(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A peer that went away (crash, cable) is taken back as soon as it answers again."""
    eng_b = await fake("openai", models=["model-b"])
    b = await start_node(
        backends=[{"kind": "openai", "url": eng_b.url}],
        name="nodeB",
        data_dir=str(tmp_path / "b"),
        **CLUSTER,
        peer_down_after_s=1.0,
    )
    port_b, peer_port_b = b.port, b.peer_port
    a = await start_node(**CLUSTER, peers=[f"127.0.0.1:{peer_port_b}"], peer_down_after_s=1.0)

    async def holds(expected: dict[str, list[str]]) -> bool:
        return await model_holders(http, a) == expected

    await eventually(lambda: holds({"model-b": ["nodeB"]}), "A sees B")
    await b.stop()
    await eventually(lambda: holds({}), "A drops the stopped B", timeout_s=5.0)
    # B comes back: same data dir (same node id), same address
    await start_node(
        backends=[{"kind": "openai", "url": eng_b.url}],
        name="nodeB",
        data_dir=str(tmp_path / "b"),
        port=port_b,
        peer_port=peer_port_b,
        **CLUSTER,
    )
    await eventually(lambda: holds({"model-b": ["nodeB"]}), "A takes B back", timeout_s=5.0)


async def test_a_peer_with_200_models_is_listed_whole(start_cluster, http: aiohttp.ClientSession) -> None:
    """Catalogs travel over HTTP, not in the mDNS TXT record, so big ones work."""
    many = [f"org/model-{i:03d}:q4" for i in range(200)]
    a, b = await start_cluster([], many)
    holders = await model_holders(http, a.node)
    assert len(holders) == 200 and all(nodes == [b.name] for nodes in holders.values())


async def test_an_introduction_from_a_stranger_costs_the_node_little(start_cluster, tmp_path: Path) -> None:
    """The peer port takes records from anyone (they must verify), but a stranger's batch of many unknown
    records is refused unread, and introductions beyond a few a second get 429."""
    (a,) = await start_cluster(["alpha"])
    assert a.node.cluster is not None
    forger = NodeIdentity.generate()
    store = MemberStore(forger.node_id)
    store.found(forger, "forger", time.time())
    for i in range(70):  # a cluster of the forger's own: well-formed, signed, none of it ours
        store.admit(forger, Candidate.of(NodeIdentity.generate(), f"ghost{i}"), time.time())
    base = f"https://127.0.0.1:{a.node.peer_port}"
    connector = aiohttp.TCPConnector(ssl=client_tls(None, a.node.identity.cert_der))
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.post(base + "/quorum/v1/members", data=encode_records(store.records())) as resp:
            assert resp.status == 200
            assert await resp.json() == {"accepted": 0, "refused": 71}
        async with s.post(base + "/quorum/v1/members", data=b"[]") as resp:
            assert resp.status == 429 and "Retry-After" in resp.headers
    assert len(a.node.cluster.members) == 1
