"""API keys across a cluster: made on one node, accepted by all; revoked on one, refused by all —
including a node that was down at the time, within 10 s of its return. Forged records are refused;
a forwarded request carries the key's id, never the key. And the true off-loopback path.

Three in-process nodes on loopback, static peers, each with its own fake engine, all with
``require_key`` (so loopback callers are held to the rule that any other caller meets).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest

from quorum_node import cli
from quorum_node.cluster.identity import NodeIdentity, load_or_create_identity
from quorum_node.cluster.members_sync import RecordSigner
from quorum_node.control.keys import KeyRecord, sign_record
from quorum_node.node import Node
from quorum_node.records import Record
from tests.members_support import client_tls, member_client
from tests.netns import other_namespace
from tests.relay.test_relay_route import MODEL as RELAY_MODEL
from tests.relay.test_relay_route import (
    relay,  # noqa: F401  (a fixture: pytest finds it by name, a test's parameter)
    wan_pair,
)
from tests.support import eventually

CLUSTER = {"cluster": "t", "cluster_secret": "s3cret"}
AGREE_S = 10.0  # the promise: every node agrees within 10 s
MESSAGES = [{"role": "user", "content": "hi"}]


async def chat(node: Node, key: str, model: str) -> str:
    async with openai.AsyncOpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0) as client:
        out = await client.chat.completions.create(model=model, messages=MESSAGES)
    return out.choices[0].message.content or ""


async def accepted(node: Node, key: str, model: str) -> bool:
    try:
        return bool(await chat(node, key, model))
    except openai.AuthenticationError:
        return False


async def within(what: str, check, timeout_s: float = AGREE_S) -> float:
    """``eventually(check)``; the seconds it took."""
    t0 = time.monotonic()
    await eventually(check, what, timeout_s=timeout_s)
    return time.monotonic() - t0


class Trio:
    def __init__(self, start_node, fake, tmp_path: Path) -> None:
        self.start_node, self.fake, self.tmp = start_node, fake, tmp_path
        self.nodes: dict[str, Node] = {}
        self.engines: dict[str, Any] = {}

    async def start(self, name: str, *, port: int = 0, peers: list[str] = (), **settings: Any) -> Node:
        eng = self.engines.get(name) or await self.fake("openai", models=[f"model-{name}"])
        self.engines[name] = eng
        node = await self.start_node(
            backends=[{"kind": "openai", "url": eng.url}],
            name=f"node-{name}",
            data_dir=str(self.tmp / name),
            port=port,
            peers=list(peers),
            require_key=True,
            peer_down_after_s=1.5,
            **CLUSTER,
            **settings,
        )
        self.nodes[name] = node
        return node

    async def start_all(self) -> None:
        for n in "abc":
            await self.start(n)
        for n, node in self.nodes.items():
            for m, other in self.nodes.items():
                if m != n:
                    node.cluster.table.add_static(f"127.0.0.1:{other.peer_port}")


@pytest.fixture
async def trio(start_node, fake, tmp_path) -> Trio:
    t = Trio(start_node, fake, tmp_path)
    await t.start_all()
    return t


async def test_key_lifecycle_across_three_nodes_including_one_that_was_down(trio: Trio) -> None:
    a, b, c = (trio.nodes[n] for n in "abc")
    _, key = a.keys.create("phone")
    for node, name in ((a, "a"), (b, "b"), (c, "c")):
        took = await within(
            f"node {name} accepts the key made on a", lambda node=node, name=name: accepted(node, key, f"model-{name}")
        )
        assert took < AGREE_S
    # c goes down; the key is revoked on b meanwhile
    # it comes back on both its ports (else its peer port would be port + 1, which another listener may hold)
    port_c, peer_port_c = c.port, c.peer_port
    await c.stop()
    b.keys.revoke("phone")
    await within("a refuses the key revoked on b", lambda: _refused(a, key, "model-a"))
    assert not await accepted(b, key, "model-b")
    # c comes back (same data dir: it still holds the key as live) and must learn the revocation
    c2 = await trio.start(
        "c", port=port_c, peer_port=peer_port_c, peers=[f"127.0.0.1:{a.peer_port}", f"127.0.0.1:{b.peer_port}"]
    )
    took = await within("c refuses the key within 10 s of its return", lambda: _refused(c2, key, "model-c"))
    assert took < AGREE_S
    # and the revocation survives c's own restart (it was stored, not only held in memory)
    assert any(k.name == "phone" and k.revoked for k in c2.keys.list())


async def _refused(node: Node, key: str, model: str) -> bool:
    try:
        await chat(node, key, model)
    except openai.AuthenticationError as e:
        return e.code == "revoked_api_key"
    return False


async def test_a_key_made_while_a_node_was_down_reaches_it_when_it_returns(trio: Trio) -> None:
    a, b, c = (trio.nodes[n] for n in "abc")
    # it comes back on both its ports (else its peer port would be port + 1, which another listener may hold)
    port_c, peer_port_c = c.port, c.peer_port
    await c.stop()
    _, key = b.keys.create("made-meanwhile", models=["model-*"])
    c2 = await trio.start(
        "c", port=port_c, peer_port=peer_port_c, peers=[f"127.0.0.1:{a.peer_port}", f"127.0.0.1:{b.peer_port}"]
    )
    await within("the returning c accepts a key made while it was down", lambda: accepted(c2, key, "model-c"))


async def test_a_forwarded_request_carries_the_key_id_never_the_key(trio: Trio) -> None:
    a, b = trio.nodes["a"], trio.nodes["b"]
    info, key = a.keys.create("laptop", models=["model-b"])
    seen: list[Record] = []
    b.records.add(seen.append)
    await within("a knows model-b on b", lambda: _holds(a, key, "model-b"))
    assert await chat(a, key, "model-b") == "Hello, world!"
    served = [r for r in seen if r.surface is not None and r.peer is not None]
    assert served and served[-1].key_id == info.id
    await within("b names the key (its store has the record)", lambda: _named(b, info.id))
    assert await chat(a, key, "model-b")
    assert seen[-1].key_id == info.id and seen[-1].key_name == "laptop"
    engine_b = trio.engines["b"]
    for req in engine_b.requests:  # nothing of the key reaches the engine
        assert key not in json.dumps(req.headers) and key not in json.dumps(dict(req))
    with pytest.raises(openai.PermissionDeniedError):  # the scope holds for models on peers too
        await chat(a, key, "model-c")


async def _last_used(node: Node, admin_key: str, key_id: str) -> float | None:
    """A key's ``last used`` as ``keys list`` shows it on ``node`` (its admin API)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(node.url + "/quorum/admin/keys", headers={"Authorization": f"Bearer {admin_key}"}) as r,
    ):
        assert r.status == 200
        keys = (await r.json())["keys"]
    return next(k["last_used"] for k in keys if k["id"] == key_id)


async def test_keys_list_on_any_node_shows_the_last_use_anywhere(start_node, fake, tmp_path, capsys) -> None:
    duo = Trio(start_node, fake, tmp_path)
    a = await duo.start("a", keys_last_used_sync_s=0.2)
    b = await duo.start("b", peers=[f"127.0.0.1:{a.peer_port}"], keys_last_used_sync_s=0.2)
    a.cluster.table.add_static(f"127.0.0.1:{b.peer_port}")
    info, key = a.keys.create("phone")
    admin_info, admin = a.keys.create("ops", admin=True)
    await within("b has both keys", lambda: _named_all(b, info.id, admin_info.id))
    assert await _last_used(b, admin, info.id) is None
    t0 = time.time()
    assert await accepted(a, key, "model-a")  # used on a only
    used_at = a.keys.used()[info.id]
    assert used_at >= t0

    async def b_shows_it() -> bool:
        return await _last_used(b, admin, info.id) == used_at

    took = await within("b's keys list shows the use on a", b_shows_it)
    assert took < 2.0  # a few rounds of keys_last_used_sync_s (0.2 s here, 60 s by default)
    code = await asyncio.to_thread(cli.main, ["keys", "--url", b.url, "--api-key", admin, "list"])
    out = capsys.readouterr().out
    assert code == 0
    (row,) = [line for line in out.splitlines() if line.startswith("phone ")]
    assert datetime.datetime.fromtimestamp(used_at).strftime("%Y-%m-%d %H:%M") in row

    # b is down while the key is used on a again; it hears of that use within 10 s of its return.
    port_b, peer_port_b = b.port, b.peer_port
    await b.stop()
    assert await accepted(a, key, "model-a")
    used_again = a.keys.used()[info.id]
    assert used_again > used_at
    await asyncio.sleep(0.5)  # a's rounds pass while b is away: b must still hear of it when it is back
    b2 = await duo.start(
        "b", port=port_b, peer_port=peer_port_b, peers=[f"127.0.0.1:{a.peer_port}"], keys_last_used_sync_s=0.2
    )

    async def b2_shows_it() -> bool:
        return await _last_used(b2, admin, info.id) == used_again

    assert await within("the returning b shows the use made while it was down", b2_shows_it) < AGREE_S


async def _named_all(node: Node, *key_ids: str) -> bool:
    return all(node.keys.name_of(k) is not None for k in key_ids)


async def _holds(node: Node, key: str, model: str) -> bool:
    async with openai.AsyncOpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0) as client:
        return model in {m.id async for m in client.models.list()}


async def _named(node: Node, key_id: str) -> bool:
    return node.keys.name_of(key_id) is not None


async def test_forged_and_tampered_key_records_are_refused(trio: Trio) -> None:
    a, b = trio.nodes["a"], trio.nodes["b"]
    _, key = b.keys.create("genuine", models=["model-a"])
    await within("a accepts b's key", lambda: accepted(a, key, "model-a"))
    genuine = next(r for r in b.keys.records() if r.name == "genuine")
    # 1. a field changed after signing: all models, and admin
    widened = msgspec.structs.replace(genuine, models=(), admin=True, version=genuine.version + 5)
    # 2. a record signed by a node that is no member, for a key the forger holds
    forged_secret = "qk_" + "f" * 43
    stranger = NodeIdentity.generate()
    forged = sign_record(
        RecordSigner(stranger, None),
        KeyRecord(
            id="k_aaaaaaaaaaaa",
            name="forged",
            prefix="qk_ffffffff",
            hash=hashlib.sha256(forged_secret.encode()).hexdigest(),
            created=time.time(),
            origin=stranger.node_id,
        ),
    )
    # 3. a tombstone nobody signed (it would revoke the genuine key)
    fake_revoke = msgspec.structs.replace(genuine, revoked=time.time(), version=genuine.version + 1)
    # 4. the same record, passed off as the stranger's own but claiming b wrote it
    claimed = msgspec.structs.replace(forged, origin=b.cluster.node_id)
    body = msgspec.json.encode({"records": [widened, forged, fake_revoke, claimed]})
    headers = {"Content-Type": "application/json"}

    # Sent by a member over the peer port: taken apart record by record, each refused.
    member, base = await member_client(trio.tmp, a, CLUSTER)
    async with member:
        async with member.post(base + "/quorum/v1/keys", data=body, headers=headers) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["rejected"] == 4 and answer["changed"] == 0
        # garbage and oversized lists are 400s, never 500s
        for junk in (b"[1,2]", b'{"records": [{"id": 1}]}', b'{"records": ' + b"[" + b"{}," * 10_001 + b"{}]}"):
            async with member.post(base + "/quorum/v1/keys", data=junk, headers=headers) as resp:
                assert resp.status == 400, junk[:40]

        # Sent by a member since removed, even one it signed itself: refused, on its old connection or a new one.
        tester = load_or_create_identity(trio.tmp / "tester")
        own_secret = "qk_" + "e" * 43
        own = sign_record(
            RecordSigner(tester, None),
            KeyRecord(
                id="k_bbbbbbbbbbbb",
                name="removed-members",
                prefix="qk_eeeeeeee",
                hash=hashlib.sha256(own_secret.encode()).hexdigest(),
                created=time.time(),
                origin=tester.node_id,
            ),
        )
        own_body = msgspec.json.encode({"records": [own]})
        async with member.get(base + "/quorum/v1/keys") as resp:  # a live connection, a member's
            assert resp.status == 200
        a.cluster.members.remove(a.cluster.identity, tester.node_id, time.time())
        assert await _refused_on_peer_port(member, base + "/quorum/v1/keys", own_body)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls(tester, None))) as again:
        assert await _refused_on_peer_port(again, base + "/quorum/v1/keys", own_body)
    assert not await accepted(a, own_secret, "model-a")

    # Sent by a non-member: refused before any record is looked at.
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls(None, None))) as anon,
        anon.post(base + "/quorum/v1/keys", data=body, headers=headers) as resp,
    ):
        assert resp.status == 401  # the peer port without a certificate
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls(stranger, None))) as s:
        with pytest.raises(aiohttp.ClientError):  # the stranger's own certificate: no handshake
            async with s.post(base + "/quorum/v1/keys", data=body, headers=headers) as resp:
                await resp.read()
    claiming_b = {**headers, "X-Quorum-Node-Id": b.cluster.node_id}
    async with (
        aiohttp.ClientSession() as http,  # the public port, claiming to be b
        http.post(a.url + "/quorum/v1/keys", data=body, headers=claiming_b) as resp,
    ):
        assert resp.status == 401

    assert await accepted(a, key, "model-a")  # still live, still scoped
    with pytest.raises(openai.PermissionDeniedError):
        await chat(a, key, "model-b")
    assert not await accepted(a, forged_secret, "model-a")
    assert a.keys.name_of("k_aaaaaaaaaaaa") is None
    assert next(r for r in a.keys.records() if r.name == "genuine") == genuine


async def _refused_on_peer_port(session: aiohttp.ClientSession, url: str, body: bytes) -> bool:
    """Whether a POST is refused outright: 401, or no TLS session (the handshake or the connection fails)."""
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            return resp.status == 401
    except aiohttp.ClientError:
        return True


# -- off loopback, for real: a caller in another network namespace ------------------------

_CLIENT = """
import json, sys, urllib.request, urllib.error
url, key = sys.argv[1], sys.argv[2]
out = {}
for name, headers in (("none", {}), ("wrong", {"Authorization": "Bearer qk_" + "z" * 43}),
                      ("sk", {"Authorization": "Bearer sk-no-key-required"}),
                      ("good", {"Authorization": "Bearer " + key})):
    req = urllib.request.Request(url + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            out[name] = [r.status, json.loads(r.read())]
    except urllib.error.HTTPError as e:
        out[name] = [e.code, json.loads(e.read())]
print(json.dumps(out))
"""


async def _from_namespace(ns: str, script: str, *args: str) -> Any:
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        "-c",
        script,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


@pytest.mark.netns
async def test_a_caller_off_loopback_needs_a_key(start_node, fake) -> None:
    with other_namespace("key") as (ns, host):
        eng = await fake("openai", models=["m"])
        node = await start_node(backends=[{"kind": "openai", "url": eng.url}], host=host)  # no --require-key
        _, key = node.keys.create("remote")
        got = await _from_namespace(ns, _CLIENT, f"http://{host}:{node.port}", key)
        assert got["none"][0] == 401 and got["none"][1]["error"]["code"] == "missing_api_key"
        assert got["wrong"][0] == 401 and got["wrong"][1]["error"]["code"] == "invalid_api_key"
        assert got["sk"][0] == 401  # off loopback, "any api_key" is not a key
        assert got["good"][0] == 200 and [m["id"] for m in got["good"][1]["data"]] == ["m"]


_ADMIN_CLIENT = """
import json, sys, urllib.request, urllib.error
url, plain, admin = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
for path in ("/quorum/admin/usage", "/quorum/admin/usage/series", "/quorum/admin/recent", "/quorum/admin/keys",
             "/quorum/admin/fleet"):
    for name, headers in (("none", {}), ("plain", {"Authorization": "Bearer " + plain}),
                          ("admin", {"Authorization": "Bearer " + admin})):
        req = urllib.request.Request(url + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                out[path + " " + name] = [r.status, None]
        except urllib.error.HTTPError as e:
            out[path + " " + name] = [e.code, json.loads(e.read())["error"]["code"]]
print(json.dumps(out))
"""


@pytest.mark.netns
async def test_off_loopback_every_admin_endpoint_needs_an_admin_key(start_node, fake) -> None:
    with other_namespace("adm") as (ns, host):
        eng = await fake("openai", models=["m"])
        node = await start_node(backends=[{"kind": "openai", "url": eng.url}], host=host)  # no --require-key
        _, plain = node.keys.create("app")
        _, admin = node.keys.create("ops", admin=True)
        got = await _from_namespace(ns, _ADMIN_CLIENT, f"http://{host}:{node.port}", plain, admin)
        for path in (
            "/quorum/admin/usage",
            "/quorum/admin/usage/series",
            "/quorum/admin/recent",
            "/quorum/admin/keys",
            "/quorum/admin/fleet",
        ):
            assert got[path + " none"] == [401, "missing_api_key"], path
            assert got[path + " plain"] == [403, "not_admin"], path
            assert got[path + " admin"] == [200, None], path


_TOKEN_CLIENT = """
import json, sys, urllib.request, urllib.error
url, token = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url + "/quorum/admin/keys", headers={"X-Quorum-Admin": token})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(json.dumps([r.status, None]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, json.loads(e.read())["error"]["code"]]))
"""


@pytest.mark.netns
async def test_the_admin_token_is_refused_off_loopback(start_node, fake) -> None:
    """Issue 19, 16: the node's admin token is its own user's, on its own machine: from another address, even
    the right token gets 401."""
    with other_namespace("tok") as (ns, host):
        eng = await fake("openai", models=["m"])
        node = await start_node(backends=[{"kind": "openai", "url": eng.url}], host=host)  # no --require-key
        assert node.admin_token is not None
        got = await _from_namespace(ns, _TOKEN_CLIENT, f"http://{host}:{node.port}", node.admin_token.decode())
        assert got == [401, "missing_api_key"]


# -- through the relay: the same records, the same guarantees -----------------------------


async def test_keys_agree_between_nodes_that_only_meet_through_the_relay(start_node, fake, http, relay) -> None:
    a, b, _ = await wan_pair(start_node, fake, http, relay.url)
    assert a.cluster.table.get(b.cluster.node_id).info.address == ""  # no LAN route: the relay only
    info, key = b.keys.create("wan-app")
    await within("a learns b's key through the relay", lambda: _named(a, info.id))
    assert a.keys.authenticate(key) is not None
    seen: list[Record] = []
    b.records.add(seen.append)
    assert await chat(a, key, RELAY_MODEL) == "Hello, world!"  # a forwards it to b through the relay
    assert seen[-1].route is not None and seen[-1].key_id == info.id and seen[-1].key_name == "wan-app"
    a.keys.revoke("wan-app")
    await within("b refuses the key revoked on a", lambda: _revoked(b, key))


async def _revoked(node: Node, key: str) -> bool:
    return node.keys.lookup(key)[1] == "revoked"
