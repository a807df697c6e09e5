"""`quorum-node cluster …`, `invite` and `join` as a person runs them: the real CLI in its own process, against
a real node on loopback.

The nodes run in this test's event loop, so the CLI runs as an asyncio subprocess (a blocking one would
stop the node it talks to).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from quorum_node.cluster.identity import IDENTITY_FILE, NodeIdentity, load_or_create_identity
from quorum_node.cluster.members import MemberStore, decode_records
from quorum_node.cluster.membership import (
    CLUSTER_FILE,
    INVITES_FILE,
    Cluster,
    InviteToken,
    create_invite,
    legacy_cluster,
    load_cluster,
    load_member_records,
    parse_invite,
)
from quorum_node.node import Node
from tests.conftest import StartNode
from tests.support import eventually

QN = [sys.executable, "-m", "quorum_node.cli"]
INVITE_REFUSED = "This invite is not valid (unknown, used or expired)"


@dataclass
class Ran:
    rc: int
    out: str
    err: str

    def tokens(self) -> list[str]:
        return [w for w in self.out.split() if w.startswith("qrm2.")]


async def qn(*args: str) -> Ran:
    """Run ``quorum-node ARGS`` as a person would, and wait for it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")}
    proc = await asyncio.create_subprocess_exec(
        *QN, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def one_line_error(ran: Ran, rc: int, says: str) -> None:
    """Failed as a person should see it: the exit status, one line on stderr, no traceback."""
    assert ran.rc == rc, ran
    assert "Traceback" not in ran.err
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quorum-node: "), ran.err
    assert says in lines[0], lines[0]


@pytest.fixture
def nobody() -> Iterator[str]:
    """A URL where no node listens (bound, never listening: connections are refused), for the CLI's offline
    paths — never the default port, where a real node may run on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def members_in(data_dir: Path) -> dict[str, str]:
    """The members a data dir lists, name by node id."""
    cluster = load_cluster(data_dir)
    assert cluster is not None
    store = MemberStore(cluster.root, decode_records(load_member_records(data_dir)))
    return {nid: a.name for nid, a in store.members().items()}


def members_of(node: Node) -> dict[str, str]:
    assert node.cluster is not None
    return {nid: a.name for nid, a in node.cluster.members.members().items()}


@dataclass
class Founded:
    node: Node
    data_dir: Path
    node_id: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.node.peer_port}"

    async def invite(self, *extra: str) -> str:
        ran = await qn("invite", "--token", "--data-dir", str(self.data_dir), "--address", self.address, *extra)
        assert ran.rc == 0, ran.err
        (token,) = ran.tokens()
        assert "quorum-node join TOKEN" in ran.err and self.address in ran.err
        return token


@pytest.fixture
async def founder(tmp_path: Path, start_node: StartNode) -> Founded:
    """`quorum-node cluster init --name home` in data dir A, then its node running on loopback."""
    a = tmp_path / "A"
    init = await qn("cluster", "--data-dir", str(a), "init", "--name", "home")
    assert init.rc == 0, init.err
    me = load_or_create_identity(a)
    assert f"cluster home founded; this machine ({me.node_id})" in init.out
    node = await start_node(data_dir=str(a))
    assert node.cluster is not None and node.peer_port
    return Founded(node, a, me.node_id)


async def peer_ids(http: aiohttp.ClientSession, node: Node) -> dict[str, str]:
    async with http.get(node.url + "/quorum/v1/peers") as resp:
        assert resp.status == 200
        return {p["node_id"]: p["state"] for p in (await resp.json())["peers"]}


async def test_a_machine_joins_with_an_invite_and_the_two_nodes_find_each_other(
    tmp_path: Path, founder: Founded, start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    b = tmp_path / "B"
    token = await founder.invite()
    assert parse_invite(token).inviter == founder.node_id
    joined = await qn("join", token, "--data-dir", str(b), "--name", "bee")
    assert joined.rc == 0, joined.err
    bee = load_or_create_identity(b).node_id
    assert f"joined cluster home: 2 members; this machine is {bee}" in joined.out
    assert load_cluster(b) == Cluster(name="home", root=founder.node_id)
    assert members_in(b) == {founder.node_id: socket.gethostname(), bee: "bee"}
    assert members_of(founder.node) == members_in(b)  # the inviter admitted it at once

    node_b = await start_node(data_dir=str(b))
    assert node_b.cluster is not None
    founder.node.cluster.table.add_static(f"127.0.0.1:{node_b.peer_port}")
    node_b.cluster.table.add_static(founder.address)

    async def both_up() -> bool:
        return (await peer_ids(http, founder.node)).get(bee) == "up" and (await peer_ids(http, node_b)).get(
            founder.node_id
        ) == "up"

    await eventually(both_up, timeout_s=10, what="each node lists the other as up in /quorum/v1/peers")


async def test_an_invite_admits_one_machine_only(tmp_path: Path, founder: Founded) -> None:
    token = await founder.invite()
    assert (await qn("join", token, "--data-dir", str(tmp_path / "B"), "--name", "bee")).rc == 0
    again = await qn("join", token, "--data-dir", str(tmp_path / "C"), "--name", "sea")
    one_line_error(again, 1, INVITE_REFUSED)
    assert load_cluster(tmp_path / "C") is None
    assert sorted(members_of(founder.node).values()) == sorted([socket.gethostname(), "bee"])


async def test_an_expired_invite_is_refused(tmp_path: Path, founder: Founded) -> None:
    # made ten minutes ago, valid for one: what a person holding it for too long has
    token = create_invite(
        founder.data_dir, inviter=founder.node_id, addresses=(founder.address,), ttl_s=60, now=time.time() - 600
    ).encode()
    late = await qn("join", token, "--data-dir", str(tmp_path / "C"), "--name", "sea")
    one_line_error(late, 1, INVITE_REFUSED)
    assert load_cluster(tmp_path / "C") is None and len(members_of(founder.node)) == 1


async def test_an_invite_naming_another_node_never_gives_its_secret_to_the_one_at_the_address(
    tmp_path: Path, founder: Founded
) -> None:
    elsewhere = NodeIdentity.generate().node_id  # the invite says: the node at this address is `elsewhere`
    meant = create_invite(founder.data_dir, inviter=elsewhere, addresses=(founder.address,), ttl_s=600, now=time.time())
    wrong = await qn("join", meant.encode(), "--data-dir", str(tmp_path / "C"), "--name", "sea")
    one_line_error(wrong, 1, "not the inviter")
    assert load_cluster(tmp_path / "C") is None
    # the node there never saw the secret: the invite is still unused
    right = InviteToken(inviter=founder.node_id, secret=meant.secret, addresses=meant.addresses)
    joined = await qn("join", right.encode(), "--data-dir", str(tmp_path / "C"), "--name", "sea")
    assert joined.rc == 0, joined.err
    assert "sea" in members_of(founder.node).values()


async def test_members_are_listed_through_the_node_and_offline(tmp_path: Path, founder: Founded, nobody: str) -> None:
    assert (await qn("join", await founder.invite(), "--data-dir", str(tmp_path / "B"), "--name", "bee")).rc == 0
    bee = load_or_create_identity(tmp_path / "B").node_id
    host = socket.gethostname()

    # through the node: asked from a directory that holds no cluster, only the node can answer
    listed = await qn(
        "cluster", "--data-dir", str(tmp_path / "elsewhere"), "--url", founder.node.url, "members", "--json"
    )
    assert listed.rc == 0, listed.err
    rows = {r["node_id"]: r for r in json.loads(listed.out)}
    assert {nid: r["name"] for nid, r in rows.items()} == {founder.node_id: host, bee: "bee"}
    assert rows[founder.node_id]["self"] and rows[bee]["by"] == founder.node_id

    table = await qn("cluster", "--data-dir", str(founder.data_dir), "--url", founder.node.url, "members")
    assert table.rc == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "ADMITTED", "BY", "SINCE"]
    assert any(line.startswith("bee ") and bee in line for line in lines)
    assert any(founder.node_id in line and line.endswith("(this node)") for line in lines)

    offline = await qn("cluster", "--data-dir", str(tmp_path / "B"), "--url", nobody, "members", "--json")
    assert offline.rc == 0, offline.err
    assert {r["node_id"]: r["name"] for r in json.loads(offline.out)} == {founder.node_id: host, bee: "bee"}
    assert [r["node_id"] for r in json.loads(offline.out) if r["self"]] == [bee]


async def test_remove_through_the_running_node(tmp_path: Path, founder: Founded) -> None:
    assert (await qn("join", await founder.invite(), "--data-dir", str(tmp_path / "B"), "--name", "bee")).rc == 0
    bee = load_or_create_identity(tmp_path / "B").node_id
    assert founder.node.cluster.members.is_member(bee)

    removed = await qn("cluster", "--data-dir", str(founder.data_dir), "--url", founder.node.url, "remove", "bee")
    assert removed.rc == 0, removed.err
    assert f"removed {bee}: every node refuses it from now on" in removed.out
    store = founder.node.cluster.members
    assert not store.is_member(bee) and store.was_removed(bee)

    async def saved() -> bool:
        return bee not in members_in(founder.data_dir)

    await eventually(saved, what="the removal is in A's data dir, for its next start")
    listed = await qn("cluster", "--data-dir", str(founder.data_dir), "--url", founder.node.url, "members")
    assert "bee" not in listed.out and bee not in listed.out

    one_line_error(
        await qn("cluster", "--data-dir", str(founder.data_dir), "--url", founder.node.url, "remove", "bee"),
        1,
        "no member is named 'bee'",
    )
    one_line_error(
        await qn("cluster", "--data-dir", str(founder.data_dir), "--url", founder.node.url, "remove", founder.node_id),
        1,
        "does not remove itself",
    )


async def test_show_tells_the_cluster_and_never_a_secret(tmp_path: Path, founder: Founded, nobody: str) -> None:
    token = await founder.invite()
    shown = await qn("cluster", "--data-dir", str(founder.data_dir), "--url", nobody, "show")
    assert shown.rc == 0 and shown.err == ""
    assert shown.out.splitlines() == [
        "name:    home",
        f"root:    {founder.node_id}",
        f"node id: {founder.node_id}",
        "members: 1",
    ]
    listed = await qn("cluster", "--data-dir", str(founder.data_dir), "--url", founder.node.url, "members", "--json")
    assert listed.rc == 0, listed.err
    stored = json.loads((founder.data_dir / IDENTITY_FILE).read_text())
    admin_token = (founder.data_dir / "admin.token").read_text().strip()
    for secret in (stored["sign"], stored["dh"], token.split(".")[2], admin_token):
        assert secret
        for text in (shown.out, listed.out, listed.err):
            assert secret not in text


@pytest.mark.parametrize(
    "args, rc, says",
    [
        (["join", "not-a-token"], 1, "has the form qrm2"),
        (["join", "qrm1.aG9tZQ.c2VjcmV0c2VjcmV0"], 1, "shared-secret days"),
        (["cluster", "show"], 2, "this machine is in no cluster"),
        (["cluster", "--url", "{nobody}", "members"], 2, "this machine is in no cluster"),
        (["cluster", "--url", "{nobody}", "remove", "bee"], 2, "this machine is in no cluster"),
        (["invite", "--address", "127.0.0.1:1"], 2, "this machine is in no cluster"),
        (["cluster", "--url", "{nobody}", "migrate"], 2, "no cluster of the shared-secret days"),
    ],
)
async def test_errors_are_one_line(tmp_path: Path, nobody: str, args: list[str], rc: int, says: str) -> None:
    args = [a.replace("{nobody}", nobody) for a in args]
    where = ["--data-dir", str(tmp_path / "empty")]
    ran = await qn(*args[:1], *where, *args[1:])
    one_line_error(ran, rc, says)
    assert "qrm1.aG9tZQ.c2VjcmV0c2VjcmV0" not in ran.err  # a token is never repeated


async def test_init_twice_needs_force_and_a_bad_duration_is_refused(tmp_path: Path) -> None:
    d = str(tmp_path / "A")
    assert (await qn("cluster", "--data-dir", d, "init", "--name", "one")).rc == 0
    one_line_error(await qn("cluster", "--data-dir", d, "init", "--name", "two"), 1, "--force")
    assert load_cluster(tmp_path / "A").name == "one"
    one_line_error(
        await qn("invite", "--data-dir", d, "--address", "127.0.0.1:1", "--expires", "soon"), 2, "bad duration"
    )
    assert (await qn("cluster", "--data-dir", d, "init", "--name", "two", "--force")).rc == 0
    assert load_cluster(tmp_path / "A").name == "two"


async def test_leave_forgets_the_membership_but_not_the_identity(tmp_path: Path) -> None:
    d = tmp_path / "A"
    assert (await qn("cluster", "--data-dir", str(d), "init", "--name", "home")).rc == 0
    me = load_or_create_identity(d)
    assert (await qn("invite", "--data-dir", str(d), "--address", "127.0.0.1:1")).rc == 0
    assert (d / INVITES_FILE).exists()
    left = await qn("cluster", "--data-dir", str(d), "leave")
    assert left.rc == 0 and "this machine left its cluster" in left.out, left
    assert load_cluster(d) is None and load_member_records(d) == b"[]"
    assert not (d / INVITES_FILE).exists()  # nobody joins through this machine's old invites
    assert load_or_create_identity(d).node_id == me.node_id  # the same machine, free to join another cluster
    one_line_error(await qn("cluster", "--data-dir", str(d), "show"), 2, "in no cluster")
    again = await qn("cluster", "--data-dir", str(d), "leave")
    assert again.rc == 0 and "this machine is in no cluster" in again.out, again


async def test_migrate_turns_a_shared_secret_cluster_into_a_keyed_one_that_others_join(
    tmp_path: Path, start_node: StartNode, nobody: str
) -> None:
    old = tmp_path / "old-node"
    old.mkdir(mode=0o700)
    secret = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    (old / CLUSTER_FILE).write_text(json.dumps({"version": 1, "name": "old", "secret": secret}))
    migrated = await qn("cluster", "--data-dir", str(old), "--url", nobody, "migrate", "--invites", "2")
    assert migrated.rc == 0, migrated.err
    tokens = migrated.tokens()
    assert len(tokens) == 2 and len({parse_invite(t).secret for t in tokens}) == 2
    assert "cluster old now has keys" in migrated.err and secret not in migrated.out + migrated.err
    me = load_or_create_identity(old).node_id
    assert load_cluster(old) == Cluster(name="old", root=me) and legacy_cluster(old) is None
    assert all(parse_invite(t).inviter == me for t in tokens)

    node = await start_node(data_dir=str(old))
    assert node.cluster is not None
    # the tokens name this machine's LAN addresses; the test reaches the node on loopback
    joined = await qn(
        "join",
        tokens[1],
        "--data-dir",
        str(tmp_path / "other"),
        "--name",
        "other",
        "--via",
        f"127.0.0.1:{node.peer_port}",
    )
    assert joined.rc == 0, joined.err
    other = load_or_create_identity(tmp_path / "other").node_id
    assert load_cluster(tmp_path / "other") == Cluster(name="old", root=me)
    assert members_in(tmp_path / "other") == members_of(node) == {me: socket.gethostname(), other: "other"}


async def test_joining_from_another_cluster_needs_force_and_keeps_the_invite(tmp_path: Path, founder: Founded) -> None:
    b = tmp_path / "B"
    assert (await qn("cluster", "--data-dir", str(b), "init", "--name", "work")).rc == 0
    token = await founder.invite()
    refused = await qn("join", token, "--data-dir", str(b), "--name", "bee")
    one_line_error(refused, 1, "already belongs to cluster 'work'")
    assert load_cluster(b).name == "work" and len(members_of(founder.node)) == 1  # nobody was admitted
    moved = await qn("join", token, "--data-dir", str(b), "--name", "bee", "--force")  # the same invite still works
    assert moved.rc == 0, moved.err
    assert load_cluster(b) == Cluster(name="home", root=founder.node_id)
    assert "bee" in members_of(founder.node).values()


async def test_every_subcommand_takes_the_common_options_after_it_as_well(tmp_path: Path) -> None:
    """Issue 23: `cluster init --name home --data-dir X` (as `run` takes them) is not refused."""
    data = tmp_path / "after"
    init = await qn("cluster", "init", "--name", "home", "--data-dir", str(data))
    assert init.rc == 0, init.err
    assert (await qn("cluster", "show", "--data-dir", str(data))).out.startswith("name:    home")
    # Before the subcommand still works, and a value after it wins over one before it
    shown = await qn("cluster", "--data-dir", str(tmp_path / "nowhere"), "show", "--data-dir", str(data))
    assert shown.rc == 0 and shown.out.startswith("name:    home"), shown.err
    keys = await qn("keys", "create", "--name", "laptop", "--data-dir", str(data))
    assert keys.rc == 0 and "qk_" in keys.out, keys.err
    listed = await qn("keys", "list", "--data-dir", str(data))
    assert listed.rc == 0 and "laptop" in listed.out
