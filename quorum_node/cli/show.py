"""``quorum-node models`` and ``peers``: the tables of a running node."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from ..settings import Settings
from .common import node_url, table

__all__ = ["add_show_commands", "cmd_models", "cmd_peers"]


def add_show_commands(sub: Any) -> None:
    for name, func, help_ in (
        ("models", cmd_models, "print the model table of a running node"),
        ("peers", cmd_peers, "print the peers of a running node"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--url", default=None, help="node URL (default http://127.0.0.1:32768)")
        p.set_defaults(func=func)


def _get(url: str) -> Any:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    url = node_url(args, settings)
    try:
        data = _get(url + "/v1/models")["data"]
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"quorum-node: cannot reach the node at {url}: {e}", file=sys.stderr)
        return 1
    rows = []
    for m in data:
        loaded = m.get("loaded")
        rows.append(
            [
                m["id"],
                ",".join(m.get("engines") or []),
                ",".join(m.get("nodes") or []),
                str(m.get("context_length") or "-"),
                "-" if loaded is None else ("yes" if loaded else "no"),
                _sharded(m),
                _grouped(m),
            ]
        )
    print(table(rows, ["MODEL", "ENGINE", "NODE", "CONTEXT", "LOADED", "SHARDED", "GROUPED"]))
    return 0


def _sharded(m: dict[str, Any]) -> str:
    """Its sharded holders (``quorum-node shard``): the leader, and the members whose memory holds the layers."""
    out = [
        f"{h.get('node')} across {'+'.join(str(x) for x in h['helpers'])}"
        for h in m.get("holders") or []
        if isinstance(h, dict) and isinstance(h.get("helpers"), list) and h["helpers"]
    ]
    return "; ".join(out) or "-"


def _grouped(m: dict[str, Any]) -> str:
    """For an entry whose holders call it differently: each holder's name for it, and what they agree on."""
    lineage = m.get("lineage")
    if not isinstance(lineage, dict):
        return "-"
    said = " ".join(str(lineage.get(k)) for k in ("family", "size", "variant") if lineage.get(k))
    names = ",".join(f"{h.get('node')}:{h.get('id')}" for h in m.get("holders") or [] if isinstance(h, dict))
    return f"{said} ({','.join(lineage.get('quantizations') or [])}): {names}"


def _since(epoch: Any) -> str:
    """How long a peer has been online, for people: ``42s``, ``5m``, ``3h12m``, ``2d4h`` (``-``: it is not)."""
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
        return "-"
    s = max(0, int(time.time() - epoch))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def cmd_peers(args: argparse.Namespace, settings: Settings) -> int:
    url = node_url(args, settings)
    try:
        data = _get(url + "/quorum/v1/peers")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            print("quorum-node: this node is in no cluster (see `quorum-node cluster init`)", file=sys.stderr)
            return 1
        print(f"quorum-node: {e}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"quorum-node: cannot reach the node at {url}: {e}", file=sys.stderr)
        return 1
    rows = [
        [
            p["name"],
            p["node_id"],
            p["address"] or "-",
            ",".join(p.get("routes") or [p["route"]]),
            "draining" if p.get("draining") else p["state"],
            _since(p.get("since")),
            str(len(p["models"])),
            str(p["in_flight"]),
            "-" if p.get("load") is None else str(p["load"]),
            f"{p['last_seen_s']:.1f}s ago" if p.get("last_seen_s") is not None else "-",
            f"{p['rtt_ms']:.1f}ms" if p.get("rtt_ms") is not None else "-",
        ]
        for p in data["peers"]
    ]
    print(
        table(
            rows,
            ["NAME", "ID", "ADDRESS", "ROUTES", "STATE", "SINCE", "MODELS", "IN-FLIGHT", "LOAD", "LAST SEEN", "RTT"],
        )
    )
    relay = data.get("relay")
    if relay:
        online = ", ".join(relay.get("online") or []) or "nobody else"
        print(
            f"relay {relay['url']}: {relay['state']}"
            + (f" ({relay['error']})" if relay.get("error") else "")
            + f"; online there: {online}"
        )
    return 0
