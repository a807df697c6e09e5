"""Test clusters: data dirs provisioned as members of one keyed cluster, as `invite` + `join` would leave them.

The first data dir enrolled under a ``(cluster, secret)`` pair founds the
cluster (its node is the root); each later one is admitted by the founder,
signed with the founder's key read from its data dir — what the founder's
``quorum-node invite`` and the newcomer's ``join`` do over the network. The
secret only names the test cluster here (two secrets, two clusters); it grants
nothing to the nodes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from quorum_node.cluster.identity import NodeIdentity, load_or_create_identity
from quorum_node.cluster.members import Candidate, MemberStore, decode_records, encode_records
from quorum_node.cluster.membership import Cluster, load_cluster, load_member_records, store_cluster
from quorum_node.node import Node
from tests.fakes.base import FakeEngine
from tests.support import eventually

__all__ = [
    "CLUSTER",
    "Member",
    "client_tls",
    "enrol",
    "founder_of",
    "member_client",
    "model_holders",
    "peer_rows",
    "records_of",
    "wait_converged",
]

#: The keyword arguments of ``start_node`` that make a node a member of the test cluster ``start_cluster`` builds.
CLUSTER = {"cluster": "t", "cluster_secret": "s3cret"}


@dataclass
class Member:
    node: Node
    engine: FakeEngine

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.node.peer_port}"


async def model_holders(session: aiohttp.ClientSession, node: Node) -> dict[str, list[str]]:
    async with session.get(node.url + "/v1/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    return {m["id"]: m["nodes"] for m in body["data"]}


async def peer_rows(session: aiohttp.ClientSession, node: Node) -> list[dict[str, Any]]:
    async with session.get(node.url + "/quorum/v1/peers") as resp:
        assert resp.status == 200
        return (await resp.json())["peers"]


async def wait_converged(http: aiohttp.ClientSession, members: list[Member]) -> None:
    expected: dict[str, list[str]] = {}
    for m in members:
        for model in m.engine.models:
            expected.setdefault(model, []).append(m.name)
    expected = {k: sorted(v) for k, v in expected.items()}
    for m in members:

        async def converged(node: Node = m.node) -> bool:
            return await model_holders(http, node) == expected

        await eventually(converged, f"{m.name} sees the whole cluster {expected}")


def _registry(tmp: Path, cluster: str, secret: str) -> Path:
    d = tmp / ".test-clusters"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{cluster}-{hashlib.sha256(secret.encode()).hexdigest()[:12]}"


def founder_of(tmp: Path, cluster: str, secret: str) -> Path | None:
    """The data dir of the test cluster's founder, once one was enrolled."""
    reg = _registry(tmp, cluster, secret)
    return Path(reg.read_text()) if reg.exists() else None


def enrol(tmp: Path, cluster: str, secret: str, data_dir: Path, name: str) -> NodeIdentity:
    """Make ``data_dir`` a member of the test cluster ``(cluster, secret)``; returns its identity."""
    reg = _registry(tmp, cluster, secret)
    lock = os.open(str(reg) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        identity = load_or_create_identity(data_dir)
        existing = load_cluster(data_dir)
        if not reg.exists():
            store = MemberStore(identity.node_id)
            store.found(identity, name, time.time())
            store_cluster(data_dir, Cluster(name=cluster, root=identity.node_id), encode_records(store.records()))
            reg.write_text(str(data_dir))
            return identity
        founder_dir = Path(reg.read_text())
        founder = load_or_create_identity(founder_dir)
        root = load_cluster(founder_dir)
        assert root is not None
        store = MemberStore(root.root, decode_records(load_member_records(founder_dir)))
        if existing is None or not store.is_member(identity.node_id):
            store.admit(founder, Candidate.of(identity, name), time.time())
            records = encode_records(store.records())
            store_cluster(founder_dir, root, records)
            store_cluster(data_dir, root, records, force=True)
        return identity
    finally:
        os.close(lock)


def client_tls(identity: NodeIdentity | None, server_cert: bytes | None) -> ssl.SSLContext:
    """A TLS client context as a peer would use: ``identity``'s certificate (None: none), trusting exactly
    ``server_cert`` (None: trusting anything, to see what a stranger gets)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if server_cert is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=server_cert)
    if identity is not None:
        with tempfile.NamedTemporaryFile(suffix=".pem") as f:
            f.write(identity.key_pem() + identity.cert_pem())
            f.flush()
            ctx.load_cert_chain(f.name)
    return ctx


def records_of(data_dir: Path) -> bytes:
    """The membership records a data dir holds (JSON), e.g. to introduce a member a node has not heard of."""
    return load_member_records(data_dir)


async def member_client(
    tmp: Path,
    node: Any,
    cluster: dict[str, str],
    name: str = "tester",
) -> tuple[aiohttp.ClientSession, str]:
    """An HTTPS client holding the key of a member ``node`` has just heard of — admitted by the founder of the
    test cluster ``cluster`` (``{"cluster": ..., "cluster_secret": ...}``), as an invite would, and introduced
    to ``node`` over its peer port — and the base URL of that port: what a peer sends with. Close the session."""
    assert node.cluster is not None
    identity = enrol(tmp, cluster["cluster"], cluster["cluster_secret"], tmp / name, name)
    base = f"https://127.0.0.1:{node.peer_port}"
    intro = aiohttp.TCPConnector(ssl=client_tls(None, node.identity.cert_der))
    async with (
        aiohttp.ClientSession(connector=intro) as s,
        s.post(base + "/quorum/v1/members", data=records_of(tmp / name)) as resp,
    ):
        assert resp.status == 200, await resp.text()
    assert node.cluster.members.is_member(identity.node_id)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls(identity, node.identity.cert_der)))
    return session, base
