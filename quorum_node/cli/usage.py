"""``quorum-node usage``: totals from the usage ledger.

Reads the running node's admin endpoint (``/quorum/admin/usage``); with no
node running, opens the ledger file in the data dir read-only. ``--cluster``
needs a running node: it asks every peer for its share. The admin endpoint
needs an admin key off loopback or under ``--require-key``: ``--api-key`` or
``QUORUM_API_KEY``, or the node's admin token (``<data_dir>/admin.token``),
sent by itself to a node on this machine. Token totals that include estimates (the engine gave no
usage) are marked ``~``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any

import msgspec

from ..control.ledger import BY, LEDGER_FILE, open_readonly, query_rows, recover
from ..control.usage import parse_since
from ..errors import ApiError
from ..settings import Settings
from .common import NoNode, admin_request, node_url, table

__all__ = ["add_usage_command", "cmd_usage"]


def add_usage_command(sub: Any) -> None:
    p = sub.add_parser(
        "usage",
        help="print usage totals from the ledger (requests, tokens, errors)",
        description="Usage totals from the ledger: of this node, or of the whole cluster.",
    )
    p.add_argument(
        "--since",
        default=None,
        metavar="WHEN",
        help="a duration back from now (1h, 7d) or an ISO date (2025-05-01); default: everything",
    )
    p.add_argument("--by", default="model", choices=tuple(BY), help="group by (default: model)")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="sum over every reachable node of the cluster (each request counted once)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--url", default=None, help="node URL (default http://127.0.0.1:32768)")
    p.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="the node's data dir: its admin token, and the ledger when no node runs (default ~/.local/share/quorum)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="an admin key, for a node run with --require-key (prefer env QUORUM_API_KEY)",
    )
    p.set_defaults(func=cmd_usage)


def _from_node(settings: Settings, url: str, since: float | None, by: str, cluster: bool) -> Any:
    q = {"by": by}
    if since is not None:
        q["since"] = f"{since:.3f}"
    if cluster:
        q["cluster"] = "1"
    return admin_request(
        settings, url, "GET", f"/quorum/admin/usage?{urllib.parse.urlencode(q)}", timeout_s=15 if cluster else 10
    )


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    try:
        since = parse_since(args.since)
    except ValueError as e:
        print(f"quorum-node: {e}", file=sys.stderr)
        return 2
    url = node_url(args, settings)
    try:
        data = _from_node(settings, url, since, args.by, args.cluster)
        source = f"node at {url}"
    except ApiError as e:
        print(f"quorum-node: {url}: {e.message}", file=sys.stderr)
        return 1
    except (NoNode, urllib.error.URLError, OSError) as e:
        if not isinstance(e, NoNode) or args.cluster:
            why = "--cluster needs a running node; " if args.cluster else ""
            print(f"quorum-node: {why}cannot reach the node at {url}: {e}", file=sys.stderr)
            return 1
        path = Path(settings.data_dir) / LEDGER_FILE
        if not path.exists():
            print(f"quorum-node: no node at {url} and no ledger at {path}", file=sys.stderr)
            return 1
        try:
            recover(path)  # a node that was killed left records in the journal: they go in first
        except (OSError, sqlite3.Error) as e:  # a node holds it (one we could not reach), or it is read-only
            print(f"quorum-node: ledger {path}: records still in its journal are not counted ({e})", file=sys.stderr)
        try:
            conn = open_readonly(path)
            try:
                rows = query_rows(conn, since, args.by, entry_only=True)
            finally:
                conn.close()
        except sqlite3.Error as e2:
            print(f"quorum-node: ledger {path}: {e2}", file=sys.stderr)
            return 1
        data = {
            "by": args.by,
            "since": since,
            "rows": [msgspec.structs.asdict(r) for r in rows],
            "nodes": [],
            "unreachable": [],
        }
        source = f"ledger {path} (no node running)"
    data["source"] = source
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = data["rows"]
    requests, prompt, completion, errors = (
        sum(r[k] for r in rows) for k in ("requests", "prompt_tokens", "completion_tokens", "errors")
    )
    estimated = sum(r.get("estimated", 0) for r in rows)

    def line(group: str, n: int, p: int, c: int, e: int, est: int) -> list[str]:
        mark = "~" if est else ""  # these totals include estimated tokens
        return [group, str(n), mark + str(p), mark + str(c), str(e)]

    groups = [
        line(r["group"], r["requests"], r["prompt_tokens"], r["completion_tokens"], r["errors"], r.get("estimated", 0))
        for r in rows
    ]
    groups.append(line("TOTAL", requests, prompt, completion, errors, estimated))
    print(table(groups, [args.by.upper(), "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "ERRORS"]))
    if estimated:
        print(
            f"~: includes the estimated tokens of {estimated} request{'s' if estimated != 1 else ''} "
            f"(the engine gave no usage; about 4 characters a token)"
        )
    print(f"from the {source}" + (f"; nodes: {', '.join(data.get('nodes') or [])}" if args.cluster else ""))
    for u in data.get("unreachable") or []:
        print(f"unreachable: {u['node']} ({u['error']})")
    return 0
