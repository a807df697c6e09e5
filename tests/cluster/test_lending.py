"""The helper's side of sharding, attacked (issue 22): who may lend, what a lend message may be, and the tunnel.

The endpoints are the peer API's (``api/peer.py``, ``cluster/lending.py``): members only, on the mutual-TLS
peer port. Here a member client (``member_client``: a key the founder admitted) and strangers send what they
like; a worker is never started for anything but a well-formed lend from a member, and a tunnel opens only
to a worker leased by the member asking. These tests need no ``rpc-server``: the node under attack has none
(its cache is empty), so a well-formed lend is answered 503 and says how to get one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from quorum_node.cluster.lending import LEND_PATH, RELEASE_PATH, RENEW_PATH, TUNNEL_PATH
from quorum_node.resources import Memory, parse_nvidia_smi, parse_rocm_smi
from tests.members_support import CLUSTER, client_tls, member_client


@pytest.fixture
async def helper(start_node: Any, tmp_path: Path) -> Any:
    """A member that lends, with no rpc-server built (its cache dir is empty)."""
    return await start_node(cache_dir=str(tmp_path / "empty-cache"), **CLUSTER)


async def test_a_members_malformed_lend_is_400_and_starts_nothing(helper: Any, tmp_path: Path) -> None:
    session, base = await member_client(tmp_path, helper, CLUSTER)
    async with session:
        for body in (
            b"not json",
            b"[]",
            b'{"shard": ""}',
            b'{"shard": "../../etc"}',
            b'{"shard": "x", "lease_s": 0}',
            b'{"shard": "x", "lease_s": 1e9}',
            b'{"shard": "x", "lease_s": "15"}',
            b'{"shard": "' + b"a" * 65 + b'"}',
        ):
            async with session.post(base + LEND_PATH, data=body) as resp:
                assert resp.status == 400, body
                assert (await resp.json())["error"]["code"] == "bad_shard_message"
        async with session.post(base + LEND_PATH, data=b'{"shard": "x", "pad": "' + b"a" * 8192 + b'"}') as resp:
            assert resp.status == 413
        # Well-formed, but this node has no rpc-server: 503, saying what to run
        async with session.post(base + LEND_PATH, json={"shard": "m", "lease_s": 10}) as resp:
            assert resp.status == 503
            assert "quorum-node engine fetch" in (await resp.json())["error"]["message"]
        async with session.post(base + RENEW_PATH, json={"shard": "m"}) as resp:
            assert resp.status == 404  # no worker: the leader builds again
        async with session.post(base + RELEASE_PATH, json={"shard": "m"}) as resp:
            assert resp.status == 200  # nothing to release is no error
        async with session.get(base + TUNNEL_PATH, params={"shard": "m"}) as resp:
            assert resp.status == 404  # no worker to reach
    assert helper.lending is not None and len(helper.lending) == 0


async def test_strangers_get_401_on_every_shard_endpoint(helper: Any, tmp_path: Path) -> None:
    peer_port = f"https://127.0.0.1:{helper.peer_port}"
    no_cert = aiohttp.TCPConnector(ssl=client_tls(None, helper.identity.cert_der))
    async with aiohttp.ClientSession(connector=no_cert) as stranger:
        for method, path in (("POST", LEND_PATH), ("POST", RENEW_PATH), ("POST", RELEASE_PATH), ("GET", TUNNEL_PATH)):
            async with stranger.request(method, peer_port + path, json={"shard": "m"}) as resp:
                assert resp.status == 401, (method, path)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # the upgrade itself
            await stranger.ws_connect(peer_port + TUNNEL_PATH + "?shard=m")
        assert refused.value.status == 401
    async with (  # the public port, even from this machine: not a peer
        aiohttp.ClientSession() as local,
        local.post(helper.url + LEND_PATH, json={"shard": "m"}) as resp,
    ):
        assert resp.status == 401


async def test_a_node_that_lends_nothing_says_so(start_node: Any, tmp_path: Path) -> None:
    node = await start_node(lend=False, **CLUSTER)
    session, base = await member_client(tmp_path, node, CLUSTER)
    async with session, session.post(base + LEND_PATH, json={"shard": "m"}) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "no_lending"
    async with aiohttp.ClientSession() as http, http.get(node.url + "/quorum/v1/health") as resp:
        assert resp.status == 401  # (health is for members: its memory is not told to strangers either)


async def test_health_says_what_memory_a_lending_node_has(helper: Any, tmp_path: Path) -> None:
    session, base = await member_client(tmp_path, helper, CLUSTER)
    async with session, session.get(base + "/quorum/v1/health") as resp:
        memory = (await resp.json())["load"]["memory"]
    assert 0 < memory["ram_free"] <= memory["ram_total"]


@pytest.mark.parametrize(
    ("out", "want"),
    [
        ("81920, 80000\n", (81920 << 20, 80000 << 20)),
        ("24576, 1000\n24576, 24000\n", (49152 << 20, 25000 << 20)),
        ("", None),
        ("[N/A], [N/A]\n", None),
        ("100, 200\n", None),  # more free than there is
        ("1, 2, 3\n", None),
        ("-1, 0\n", None),
        ("1" * 40 + ", 1\n", None),
        ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", None),
    ],
)
def test_nvidia_smi_is_read_strictly(out: str, want: tuple[int, int] | None) -> None:
    assert parse_nvidia_smi(out) == want


def test_rocm_smi_is_read_strictly() -> None:
    out = "device,VRAM Total Memory (B),VRAM Total Used Memory (B)\ncard0,17163091968,1073741824\n"
    assert parse_rocm_smi(out) == (17163091968, 17163091968 - 1073741824)
    assert parse_rocm_smi("device,other\ncard0,1\n") is None
    assert parse_rocm_smi("device,VRAM Total Memory (B),VRAM Total Used Memory (B)\ncard0,1,2\n") is None
    assert parse_rocm_smi("no header") is None


def test_memory_to_lend_is_the_gpus_where_there_are_any() -> None:
    assert Memory(ram_total=64, ram_free=32).free == 32
    assert Memory(ram_total=64, ram_free=32, vram_total=24, vram_free=20).free == 20
