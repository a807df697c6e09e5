"""``quorum-node keys create|list|revoke``: API keys.

Talks to the node running on this machine (``/quorum/admin/keys``), which
replicates the change to its peers at once. With no node running it edits the
store in the data dir directly; the node takes it up when it starts and its
peers get it from there. Under ``--require-key`` the admin API needs an admin
key (``--api-key`` or ``QUORUM_API_KEY``), or the node's admin token, which
the CLI sends by itself to a node on this machine when it can read
``<data_dir>/admin.token`` (the node's own user can).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any

import msgspec

from ..control.admin_token import read_token
from ..control.keys import open_keystore, parse_duration
from ..errors import ApiError, ConfigError
from ..settings import Settings
from .common import NoNode, admin_request, node_url, table, tool_options

__all__ = ["add_keys_command", "cmd_keys"]


def add_keys_command(sub: Any) -> None:
    p = sub.add_parser(
        "keys",
        help="create, list or revoke the cluster's API keys",
        description="API keys for callers that are not on this machine (phones, servers, apps).",
    )
    p.add_argument("--url", default=None, help="node URL (default http://127.0.0.1:32768)")
    p.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="the node's data dir: its admin token, and the store to edit when no node runs "
        "(default ~/.local/share/quorum)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="an admin key, for a node run with --require-key (prefer env QUORUM_API_KEY)",
    )
    ks = p.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    c = ks.add_parser("create", help="make a key and print it (once: only its hash is kept)")
    c.add_argument("--name", required=True)
    c.add_argument(
        "--models",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="models it may use: names or globs (llama3*, qwen2.5:*); default all",
    )
    c.add_argument("--expires", default=None, metavar="DURATION", help="e.g. 12h, 30d, 2w; default never")
    c.add_argument(
        "--rate",
        type=int,
        default=None,
        metavar="REQ/MIN",
        help="requests a minute it may make, on each node; default unlimited",
    )
    c.add_argument("--admin", action="store_true", help="it may manage keys through the admin API")
    ks.add_parser("list", help="list the keys (never the keys themselves)")
    r = ks.add_parser("revoke", help="revoke a key, on every node of the cluster")
    r.add_argument("key", metavar="NAME|ID")
    tool_options(p, ks)  # `keys create --data-dir X` as well as `keys --data-dir X create`
    p.set_defaults(func=cmd_keys)


def _store(data_dir: Path) -> Any:
    """The key store in the data dir, for when no node runs (records signed with this node's key)."""
    from ..cluster.identity import load_or_create_identity
    from ..cluster.members import MemberStore, decode_records
    from ..cluster.members_sync import RecordSigner
    from ..cluster.membership import load_cluster, load_member_records

    try:
        identity = load_or_create_identity(data_dir)
        cluster = load_cluster(data_dir)
        members = (
            MemberStore(cluster.root, decode_records(load_member_records(data_dir))) if cluster is not None else None
        )
    except (ValueError, OSError) as e:
        raise ConfigError(f"cluster membership in {data_dir}: {e}") from None
    return open_keystore(data_dir, RecordSigner(identity, members))


def _when(t: Any) -> str:
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "-"
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def _state(k: dict[str, Any]) -> str:
    if k.get("revoked"):
        return "revoked"
    if k.get("expires") is not None and k["expires"] <= time.time():
        return "expired"
    return "active"


def _print_list(keys: list[dict[str, Any]]) -> None:
    rows = [
        [
            k["name"],
            k["id"],
            k["prefix"] + "…",
            ",".join(k["models"]) or "*",
            str(k["rate_per_min"]) + "/min" if k.get("rate_per_min") else "-",
            "yes" if k.get("admin") else "-",
            _when(k["created"]),
            _when(k.get("expires")),
            _when(k.get("last_used")),
            _state(k),
        ]
        for k in keys
    ]
    print(table(rows, ["NAME", "ID", "PREFIX", "MODELS", "RATE", "ADMIN", "CREATED", "EXPIRES", "LAST USED", "STATE"]))


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    to_builtins = msgspec.to_builtins
    url, data_dir = node_url(args, settings), Path(settings.data_dir)

    def request(method: str, path: str, body: Any = None) -> Any:
        return admin_request(settings, url, method, path, body)

    try:
        if args.keys_command == "create":
            if args.expires is not None:
                try:
                    parse_duration(args.expires)
                except ValueError as e:
                    print(f"quorum-node: {e}", file=sys.stderr)
                    return 2
            body = {
                "name": args.name,
                "models": args.models,
                "expires": args.expires,
                "rate": args.rate,
                "admin": args.admin,
            }
            try:
                answer = request("POST", "/quorum/admin/keys", body)
            except NoNode:
                store = _store(data_dir)
                info, secret = store.create(
                    args.name,
                    models=args.models,
                    rate_per_min=args.rate,
                    admin=args.admin,
                    expires_s=parse_duration(args.expires) if args.expires else None,
                )
                answer = {"key": secret, "info": to_builtins(info)}
            info = answer["info"]
            print(answer["key"])
            print(
                f"key {info['name']} ({info['id']}) created; it is shown only now: keep it somewhere safe",
                file=sys.stderr,
            )
        elif args.keys_command == "list":
            try:
                keys = request("GET", "/quorum/admin/keys")["keys"]
            except NoNode:
                keys = [to_builtins(k) for k in _store(data_dir).list()]
            _print_list(keys)
        else:
            try:
                info = request("DELETE", "/quorum/admin/keys/" + urllib.parse.quote(args.key, safe=""))["info"]
            except NoNode:
                info = to_builtins(_store(data_dir).revoke(args.key))
            print(f"key {info['name']} ({info['id']}) revoked")
    except ApiError as e:
        print(f"quorum-node: {e.message}", file=sys.stderr)
        if e.status == 401 and read_token(data_dir) is None:
            print(
                f"quorum-node: no admin token readable in {data_dir}: run this as the node's user with "
                f"its --data-dir, or pass an admin key (--api-key)",
                file=sys.stderr,
            )
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"quorum-node: cannot reach the node: {e}", file=sys.stderr)
        return 1
    return 0
