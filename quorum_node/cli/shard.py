"""``quorum-node shard``: serve a model bigger than this machine with other members' memory (issue 22).

``quorum-node shard MODEL --across N`` asks the node on this machine to lead
MODEL (a GGUF file on it, or the name of one in its model cache) across N
members that lend memory (``cluster/sharding.py``); it answers at once and
builds in the background: ``quorum-node shard --list`` shows how far it got
(and the workers this node lends others), ``--stop SHARD`` stops leading it.
To keep a shard across restarts, put it in the config instead::

    [[shards]]
    model = "/models/Llama-3.3-70B-Instruct-Q4_K_M.gguf"
    across = 2
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
from typing import Any

from ..errors import ApiError
from ..settings import Settings
from .common import NoNode, admin_request, node_options, node_url, table

__all__ = ["add_shard_command", "cmd_shard"]


def add_shard_command(sub: Any) -> None:
    p = sub.add_parser(
        "shard",
        help="serve a model with the memory of other members (llama.cpp RPC)",
        description="Lead a model across the memory of N other members of the cluster: their rpc-servers hold "
        "its layers, reached only through the cluster's authenticated links.",
    )
    p.add_argument("model", nargs="?", help="a GGUF file on this node, or the name of one in its model cache")
    p.add_argument("--across", type=int, default=2, metavar="N", help="how many members hold its layers (2)")
    p.add_argument("--alias", default=None, help="its name in the catalog (default: the file's stem)")
    p.add_argument("--list", action="store_true", help="the shards this node leads and the workers it lends")
    p.add_argument("--stop", default=None, metavar="SHARD", help="stop leading SHARD (its id, from --list)")
    p.add_argument("--json", action="store_true", help="print JSON")
    node_options(p)
    p.set_defaults(func=cmd_shard)


def _print_status(data: dict[str, Any]) -> None:
    rows = [
        [
            s["engine"],
            s["state"],
            ", ".join(f"{h['node']} {h['share'] * 100:.0f}%" for h in s["helpers"]) or "-",
            str(s["builds"]),
            s.get("error") or "",
        ]
        for s in data.get("leading", [])
    ]
    print(table(rows, ["SHARD", "STATE", "HELPERS (LAYERS)", "BUILDS", "LAST ERROR"]) if rows else "leading no shard")
    lent = data.get("lending") or []
    if lent:
        print()
        print(
            table([[w["leader"][:16], w["shard"], str(w["expires_in_s"])] for w in lent], ["FOR", "SHARD", "LEASE S"])
        )


def cmd_shard(args: argparse.Namespace, settings: Settings) -> int:
    url = node_url(args, settings)
    try:
        if args.stop:
            data = admin_request(settings, url, "DELETE", f"/quorum/admin/shards/{args.stop}")
        elif args.model and not args.list:
            body = {"model": args.model, "across": args.across, "alias": args.alias}
            data = admin_request(settings, url, "POST", "/quorum/admin/shards", body)
        else:
            data = admin_request(settings, url, "GET", "/quorum/admin/shards")
    except ApiError as e:
        print(f"quorum-node: {url}: {e.message}", file=sys.stderr)
        return 1
    except (NoNode, urllib.error.URLError, OSError) as e:
        print(f"quorum-node: cannot reach the node at {url}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.stop:
        print(f"stopped leading {data['stopped']}")
    elif args.model and not args.list:
        print(f"leading {data['engine']} across {data['across']} members; `quorum-node shard --list` shows it")
    else:
        _print_status(data)
    return 0
