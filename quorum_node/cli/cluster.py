"""``quorum-node cluster …``, ``invite`` and ``join``: who belongs to this machine's cluster.

The commands that change membership while a node runs go through it
(``/quorum/admin/members``, on loopback, with the node's admin token), so the
change is signed by the node and pushed to every peer at once. With no node
running they sign and edit the data dir directly (this user's files: the
node's key is there); the node takes it up when it starts and its peers get it
from there.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import socket
import sys
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import segno

from ..cluster.codes import GUESSES, parse_code, relay_of
from ..cluster.identity import load_or_create_identity
from ..cluster.join import JoinError, join, join_by_relay, token_for_code
from ..cluster.mdns import browse_once
from ..cluster.members import MemberStore, decode_records, encode_records
from ..cluster.membership import (
    Cluster,
    create_invite,
    leave_cluster,
    legacy_cluster,
    load_cluster,
    load_member_records,
    parse_invite,
    save_member_records,
    store_cluster,
)
from ..control.keys import parse_duration
from ..errors import ApiError
from ..settings import Settings
from .common import NoNode, admin_request, node_url, tool_options

__all__ = ["add_cluster_commands", "cmd_cluster", "cmd_invite", "cmd_join"]


def add_cluster_commands(sub: Any) -> None:
    c = sub.add_parser("cluster", help="create, show, list or change this machine's cluster")
    c.add_argument("--data-dir", default=None, metavar="DIR")
    c.add_argument("--url", default=None, help="the running node (default http://127.0.0.1:32768)")
    c.add_argument("--api-key", default=None, metavar="KEY", help="an admin key (prefer env QUORUM_API_KEY)")
    csub = c.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    ci = csub.add_parser("init", help="found a cluster with this machine as its first member")
    ci.add_argument("--name", default=None, help="the cluster's name (default: this machine's)")
    ci.add_argument("--force", action="store_true", help="leave the cluster this machine is in first")
    csub.add_parser("show", help="the cluster's name, its root and this node's id")
    cm = csub.add_parser("members", help="list the members")
    cm.add_argument("--json", action="store_true")
    cr = csub.add_parser("remove", help="remove a member for good (a lost or sold machine): every node refuses it")
    cr.add_argument("member", metavar="NAME|ID")
    csub.add_parser("leave", help="forget this machine's membership (the others still list it until removed)")
    cg = csub.add_parser(
        "migrate",
        help="turn a cluster of the shared-secret days into a keyed one, this machine "
        "its first member, and print an invite for each other machine",
    )
    cg.add_argument(
        "--invites",
        type=int,
        default=None,
        metavar="N",
        help="how many invites to print, one per other machine (default 1)",
    )
    cg.add_argument("--expires", default="1d", metavar="DURATION", help="how long the invites last (default 1d)")
    cj = csub.add_parser("join", help="the same as `quorum-node join`")
    _join_args(cj)
    c.set_defaults(func=cmd_cluster)
    tool_options(c, csub)  # `cluster init --data-dir X` as well as `cluster --data-dir X init`

    i = sub.add_parser(
        "invite",
        help="let one more machine join this cluster: a short code to type (7-harbor-lantern) and a QR code, or "
        "a one-time token where no node runs here (--token: always the token, for scripts)",
    )
    i.add_argument("--expires", default="10m", metavar="DURATION", help="e.g. 10m, 1h, 2d (default 10m)")
    i.add_argument(
        "--address",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="where the new machine reaches this node's peer port (default: this machine's LAN "
        "addresses, port 32769 or the running node's); repeatable",
    )
    how = i.add_mutually_exclusive_group()
    how.add_argument(
        "--code",
        action="store_true",
        help="a short code, or fail: the node must be running (the default gives a token where none runs)",
    )
    how.add_argument("--token", action="store_true", help="the long one-time token only (no node needed; for scripts)")
    i.add_argument(
        "--admit",
        action="store_true",
        help="confirm the new machine yourself: wait here, show who uses the invite, and admit it only if you "
        "answer y (the node must be running)",
    )
    i.add_argument("--data-dir", default=None, metavar="DIR")
    i.add_argument("--url", default=None, help="the running node (default http://127.0.0.1:32768)")
    i.set_defaults(func=cmd_invite)

    j = sub.add_parser("join", help="join a cluster with an invite token from one of its members")
    _join_args(j)
    j.add_argument("--data-dir", default=None, metavar="DIR")
    j.set_defaults(func=cmd_join)


def _join_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("token", help="the short code `quorum-node invite` printed (7-harbor-lantern[@RELAY]), or a token")
    p.add_argument("--name", default=None, help="this machine's name in the cluster (default: its host name)")
    p.add_argument("--via", default=None, metavar="HOST:PORT", help="the inviter's peer port, if not in the token")
    p.add_argument("--force", action="store_true", help="leave the cluster this machine is in first")


def _node(settings: Settings, args: argparse.Namespace, method: str, path: str) -> Any:
    """Ask the running node; None if none runs here."""
    try:
        return admin_request(settings, node_url(args, settings), method, path)
    except NoNode:
        return None


def _offline_store(data_dir: Path) -> tuple[Cluster, MemberStore]:
    cluster = load_cluster(data_dir)
    if cluster is None:
        raise ValueError(
            f"this machine is in no cluster ({data_dir}): `quorum-node cluster init`, or "
            "`quorum-node join TOKEN` with an invite from a member"
        )
    return cluster, MemberStore(cluster.root, decode_records(load_member_records(data_dir)))


def _print_members(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    width = max([len(r["name"]) for r in rows] + [4])
    print(f"{'NAME':<{width}}  {'ID':<24}  {'ADMITTED BY':<24}  SINCE")
    for r in rows:
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["at"]))
        me = "  (this node)" if r.get("self") else ""
        print(f"{r['name']:<{width}}  {r['node_id']:<24}  {r['by']:<24}  {since}{me}")


def cmd_cluster(args: argparse.Namespace, settings: Settings) -> int:
    data_dir = Path(settings.data_dir)
    try:
        match args.cluster_command:
            case "init":
                return _init(data_dir, args.name or socket.gethostname(), force=args.force)
            case "show":
                cluster, store = _offline_store(data_dir)
                me = load_or_create_identity(data_dir)
                print(
                    f"name:    {cluster.name}\nroot:    {cluster.root}\nnode id: {me.node_id}\n"
                    f"members: {len(store)}"
                    + ("" if store.is_member(me.node_id) else "\nthis node is not a member (it was removed)")
                )
            case "members":
                rows = _node(settings, args, "GET", "/quorum/admin/members")
                if rows is None:
                    _, store = _offline_store(data_dir)
                    rows = store.rows(load_or_create_identity(data_dir).node_id)
                _print_members(rows, args.json)
            case "remove":
                answer = _node(settings, args, "DELETE", "/quorum/admin/members/" + quote(args.member, safe=""))
                if answer is None:
                    cluster, store = _offline_store(data_dir)
                    nid = store.find(args.member)
                    store.remove(load_or_create_identity(data_dir), nid, time.time())
                    save_member_records(data_dir, encode_records(store.records()))
                    answer = {"removed": nid}
                    print(
                        "no node runs here: the removal is stored and reaches the others when it starts",
                        file=sys.stderr,
                    )
                print(f"removed {answer['removed']}: every node refuses it from now on")
            case "leave":
                if leave_cluster(data_dir):
                    print(
                        "this machine left its cluster (ask a member to `quorum-node cluster remove` it, so "
                        "the others forget it too); restart the node"
                    )
                else:
                    print("this machine is in no cluster")
            case "migrate":
                return _migrate(args, settings)
            case "join":
                return cmd_join(args, settings)
    except ApiError as e:
        print(f"quorum-node: {e.message}", file=sys.stderr)
        return 1
    except FileExistsError as e:
        print(f"quorum-node: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"quorum-node: {e}", file=sys.stderr)
        return 2
    return 0


def _init(data_dir: Path, name: str, *, force: bool) -> int:
    existing = load_cluster(data_dir)
    if existing is not None:
        if not force:  # founding again would drop the members this node holds (its own root is the same)
            raise FileExistsError(
                f"this node already belongs to cluster {existing.name!r} (root {existing.root}); "
                "leave it first (`quorum-node cluster leave`) or pass --force"
            )
        leave_cluster(data_dir)
    identity = load_or_create_identity(data_dir)
    store = MemberStore(identity.node_id)
    store.found(identity, socket.gethostname()[:64] or "node", time.time())  # the member is named as `join` names it
    cluster = Cluster(name=name, root=identity.node_id)
    store_cluster(data_dir, cluster, encode_records(store.records()), force=force)
    print(f"cluster {name} founded; this machine ({identity.node_id}) is its first member")
    print("add a machine: `quorum-node invite` here, then `quorum-node join CODE` there")
    return 0


def _addresses(args: argparse.Namespace, settings: Settings) -> tuple[str, ...]:
    """Where a new machine reaches this node's peer port: ``--address``, else this machine's LAN addresses at
    the running node's peer port (or the one the settings give it)."""
    if getattr(args, "address", None):
        return tuple(args.address)
    port = settings.peer_port if settings.peer_port is not None else settings.port + 1
    info = _node(settings, args, "GET", "/quorum/v1/peers")
    if info is not None and info.get("node", {}).get("port"):
        port = int(info["node"]["port"])
    import ifaddr

    ips = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                addr = ipaddress.ip_address(ip.ip)
                if not (addr.is_loopback or addr.is_link_local):
                    ips.append(str(addr))
    return tuple(f"{ip}:{port}" for ip in ips[:8]) or (f"127.0.0.1:{port}",)


def cmd_invite(args: argparse.Namespace, settings: Settings) -> int:
    data_dir = Path(settings.data_dir)
    try:
        _, store = _offline_store(data_dir)
        identity = load_or_create_identity(data_dir)
        if not store.is_member(identity.node_id):
            raise ValueError("this node is not a member of its cluster (it was removed): it cannot invite")
        ttl_s = parse_duration(args.expires)
        token = create_invite(
            data_dir,
            inviter=identity.node_id,
            addresses=_addresses(args, settings),
            ttl_s=ttl_s,
            now=time.time(),
            confirm=args.admit,
        )
    except (ValueError, OSError) as e:
        print(f"quorum-node: {e}", file=sys.stderr)
        return 2
    rc = None if args.token else _give_code(args, settings, token.encode(), ttl_s, token.addresses, args.code)
    if rc is None:
        print(token.encode())
        print(
            f"on the new machine: quorum-node join TOKEN (works once, for {args.expires}; it reaches this node at "
            f"{', '.join(token.addresses)})",
            file=sys.stderr,
        )
        rc = 0
    sys.stdout.flush()
    return _confirm(args, settings, token.secret_hash[:12], ttl_s) if rc == 0 and args.admit else rc


def _confirm(args: argparse.Namespace, settings: Settings, invite: str, ttl_s: float) -> int:
    """``invite --admit``: wait for the machine that uses this invite, show who it is, and admit it only if
    the user says so (``JoinHandler``: it waits for the answer, ``CONFIRM_S`` at most)."""
    url = node_url(args, settings)
    deadline = time.monotonic() + ttl_s
    print("waiting for the new machine (Ctrl-C to stop; the invite then admits nobody) ...", file=sys.stderr)
    while time.monotonic() < deadline:
        try:
            asking = admin_request(settings, url, "GET", "/quorum/admin/joins")["asking"]
        except (ApiError, NoNode, urllib.error.URLError, OSError) as e:
            print(f"quorum-node: {url}: {e}", file=sys.stderr)
            return 1
        mine = [a for a in asking if a["invite"] == invite]
        if not mine:
            time.sleep(0.3)
            continue
        who = mine[0]
        print(
            f"{who['name']} (node id {who['node_id']}, from {_from(who['remote'])}) asks to join. "
            "It shows the same node id on its screen. Admit it? [y/N] ",
            end="",
            flush=True,
        )
        admit = sys.stdin.readline().strip().lower() in ("y", "yes")
        try:
            admin_request(settings, url, "POST", f"/quorum/admin/joins/{who['id']}", {"admit": admit})
        except ApiError as e:
            print(f"quorum-node: {e.message}", file=sys.stderr)
            return 1
        print(f"admitted {who['name']}" if admit else f"declined {who['name']}: the invite is spent")
        return 0 if admit else 1
    print("quorum-node: nobody used the invite before it expired", file=sys.stderr)
    return 1


def _give_code(
    args: argparse.Namespace, settings: Settings, token: str, ttl_s: float, at: tuple[str, ...], required: bool
) -> int | None:
    """The running node keeps the token under a short code (``cluster/codes.py``). None where no node runs
    here and the code is not ``required``: the caller prints the token instead."""
    url = node_url(args, settings)
    try:
        code = admin_request(settings, url, "POST", "/quorum/admin/invites/code", {"token": token, "expires_s": ttl_s})[
            "code"
        ]
    except ApiError as e:
        print(f"quorum-node: {url}: {e.message}", file=sys.stderr)
        return 1
    except (NoNode, urllib.error.URLError, OSError) as e:
        if not required:
            print(f"(no node runs at {url}, and a short code needs it: a token instead)", file=sys.stderr)
            return None
        print(
            f"quorum-node: a code needs the node running here ({url}: {e}); without it: invite --token",
            file=sys.stderr,
        )
        return 1
    print(code)
    _, relay = relay_of(code)
    qr = io.StringIO()
    segno.make(f"quorum-node join {code} --via {at[0]}" if at and not relay else f"quorum-node join {code}").terminal(
        out=qr, compact=True
    )
    print(qr.getvalue(), file=sys.stderr, end="")
    where = (
        f"through the relay {relay}, from any network"
        if relay
        else f"it finds this node on the LAN, or add --via {at[0] if at else 'HOST:PORT'}"
    )
    print(
        f"on the new machine: quorum-node join {code} (works once, for {args.expires}; {where}; "
        f"{GUESSES} wrong codes burn it)",
        file=sys.stderr,
    )
    return 0


def cmd_join(args: argparse.Namespace, settings: Settings) -> int:
    data_dir = Path(settings.data_dir)
    try:
        via = args.via
        text, relay = relay_of(args.token)
        try:
            _, code = parse_code(text)
        except ValueError:
            if relay is not None:
                raise
            code = None  # a token
        name = args.name or socket.gethostname()
        if code is not None and relay is not None and not via:  # through the relay the code names
            identity = load_or_create_identity(data_dir)
            waiting = _waiting_note(name, identity.node_id)
            cluster, store, relay = join_by_relay(
                data_dir, identity, code, relay, name, force=args.force, on_wait=waiting
            )
            print(
                f"joined cluster {cluster.name} through the relay {relay}: {len(store)} members; this machine is "
                f"{identity.node_id}"
            )
            print("restart quorum-node here to take its place in the cluster (it connects to that relay)")
            return 0
        if code is not None:  # a short code: its token comes from the inviter, over SPAKE2 (cluster/codes.py)
            addresses = [via] if via else browse_once(3.0)
            encoded, via = token_for_code(code, addresses)
            token = parse_invite(encoded)
        else:
            token = parse_invite(args.token)
        identity = load_or_create_identity(data_dir)
        waiting = _waiting_note(name, identity.node_id)
        cluster, store = join(data_dir, identity, token, name, via=via, force=args.force, on_wait=waiting)
    except (JoinError, ValueError, FileExistsError, OSError) as e:
        print(f"quorum-node: {e}", file=sys.stderr)
        return 1
    print(f"joined cluster {cluster.name}: {len(store)} members; this machine is {identity.node_id}")
    print("restart quorum-node here to take its place in the cluster")
    return 0


def _from(remote: str | None) -> str:
    return "the relay" if remote in (None, "relay") else str(remote)


def _waiting_note(name: str, node_id: str) -> Callable[[], None]:
    """What the new machine says when the inviter takes its time: it may be asked to confirm this machine
    (``invite --admit``), by the node id both screens show."""
    return lambda: print(
        f"waiting for the inviter to confirm this machine: {name}, node id {node_id}", file=sys.stderr, flush=True
    )


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Shared secret → keys, in one step on one machine: found the keyed cluster here (same name), and print
    the invites the other machines join with."""
    data_dir = Path(settings.data_dir)
    legacy = legacy_cluster(data_dir)
    name = legacy.name if legacy is not None else settings.cluster
    if name is None:
        raise ValueError(f"no cluster of the shared-secret days in {data_dir} (and no QUORUM_CLUSTER)")
    if load_cluster(data_dir) is None:
        _init(data_dir, name, force=True)
    cluster, _ = _offline_store(data_dir)
    identity = load_or_create_identity(data_dir)
    count = args.invites or 1
    ttl_s = parse_duration(args.expires)
    addresses = _addresses(args, settings)
    print(
        f"cluster {cluster.name} now has keys; this machine ({identity.node_id}) is its first member. On each "
        f"other machine, after upgrading: quorum-node join TOKEN (one token each, valid {args.expires}):",
        file=sys.stderr,
    )
    for _ in range(count):
        print(
            create_invite(
                data_dir, inviter=identity.node_id, addresses=addresses, ttl_s=ttl_s, now=time.time()
            ).encode()
        )
    return 0
