"""The ``quorum-node`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from .errors import ConfigError
from .settings import Settings, load_settings, parse_backend_arg

__all__ = ["main"]

# Flags spelled by hand; every other Settings field gets --dashed-name automatically.
_EXPLICIT = {
    "host", "port", "ollama_port", "peer_port", "name",
    "data_dir", "backends", "detect", "embedded_engine", "log_format", "log_level",
    "cluster", "cluster_secret", "mdns", "mdns_interfaces", "peers", "relay", "relay_token", "ledger", "metrics",
    "cors_origins", "require_key",
}


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run the node daemon", description="Serve the OpenAI API on this machine.")
    S = argparse.SUPPRESS
    p.add_argument("--config", default=S, metavar="FILE", help="TOML config file (env QUORUM_CONFIG)")
    p.add_argument("--host", default=S, help="address to bind (default 0.0.0.0; non-loopback callers need a key)")
    p.add_argument("--port", type=int, default=S, help="port (default 32768)")
    p.add_argument("--ollama-port", dest="ollama_port", type=int, default=S, metavar="PORT",
                   help="also serve the API on this port, for tools that hard-code Ollama's (e.g. 11435; default off)")
    p.add_argument("--peer-port", dest="peer_port", type=int, default=S, metavar="PORT",
                   help="the port peers reach this node on (mutual TLS; default the API port + 1, 32769)")
    p.add_argument("--name", default=S, help="this node's name (default: hostname)")
    p.add_argument("--data-dir", default=S, metavar="DIR", help="state directory (default ~/.local/share/quorum)")
    p.add_argument("--backend", dest="backends", action="append", type=_backend, default=S, metavar="KIND=URL",
                   help="an engine to serve, e.g. ollama=http://127.0.0.1:11434 (repeatable)")
    p.add_argument("--no-detect", dest="detect", action="store_false", default=S,
                   help="do not probe this machine for engines")
    p.add_argument("--no-embedded-engine", dest="embedded_engine", action="store_false", default=S,
                   help="do not start the bundled llama-server when no engine is found")
    p.add_argument("--log-format", choices=("auto", "console", "json"), default=S)
    p.add_argument("--log-level", default=S, choices=("debug", "info", "warning", "error"))
    p.add_argument("--cluster", default=S, metavar="NAME",
                   help="a cluster of the shared-secret days (with --secret): only `cluster migrate` reads it")
    p.add_argument("--secret", dest="cluster_secret", default=S,
                   help="that cluster's secret (env QUORUM_CLUSTER_SECRET); it grants nothing by itself")
    p.add_argument("--no-mdns", dest="mdns", action="store_false", default=S, help="no LAN discovery")
    p.add_argument("--mdns-interface", dest="mdns_interfaces", action="append", default=S, metavar="IP",
                   help="announce and browse on this interface address only (repeatable)")
    p.add_argument("--peer", dest="peers", action="append", default=S, metavar="HOST:PORT",
                   help="a static peer, where multicast does not pass (repeatable)")
    p.add_argument("--relay", default=S, metavar="URL",
                   help="a quorum-relay to join peers on other networks through (ws:// or wss://)")
    p.add_argument("--relay-token", dest="relay_token", default=S, metavar="TOKEN",
                   help="the relay's admission token (prefer env QUORUM_RELAY_TOKEN: it stays out of ps)")
    p.add_argument("--no-ledger", dest="ledger", action="store_false", default=S,
                   help="keep no usage ledger (SQLite in the data dir)")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", default=S, help="no GET /metrics")
    p.add_argument("--require-key", dest="require_key", action="store_true", default=S,
                   help="callers on this machine need an API key too (see `quorum-node keys`)")
    p.add_argument("--cors-origins", dest="cors_origins", default=S, metavar="ORIGIN,...",
                   type=lambda v: [o.strip() for o in v.split(",") if o.strip()],
                   help="web origins whose pages may call the node (default none; * is any page: unsafe)")
    for f in msgspec.structs.fields(Settings):
        if f.name in _EXPLICIT:
            continue
        kind = f.type if f.type in (int, float, str) else None
        if f.type is bool:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=S,
                           type=lambda v: v.lower() in ("1", "true", "yes", "on"), metavar="BOOL")
        elif kind is not None:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=S)
        elif f.name == "detect_ports":
            p.add_argument("--detect-ports", dest="detect_ports", default=S, metavar="P1,P2",
                           type=lambda v: [int(x) for x in v.split(",") if x])
    p.set_defaults(func=cmd_run)


def _backend(text: str) -> Any:
    try:
        return parse_backend_arg(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _settings_from(args: argparse.Namespace) -> Settings:
    skip = {"func", "command", "cluster_command", "engine_command"}
    return load_settings({k: v for k, v in vars(args).items() if k not in skip})


def cmd_run(args: argparse.Namespace) -> int:
    from .log import configure_logging
    from .node import serve_forever

    settings = _settings_from(args)
    configure_logging(settings.log_format, settings.log_level)
    try:
        import uvloop  # a faster event loop where it exists (not on Windows)
    except ImportError:
        return asyncio.run(serve_forever(settings))
    return uvloop.run(serve_forever(settings))


def _get(url: str) -> Any:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _node_url(args: argparse.Namespace) -> str:
    return args.url or f"http://127.0.0.1:{os.environ.get('QUORUM_PORT', '32768')}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    try:
        data = _get(_node_url(args) + "/v1/models")["data"]
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"quorum-node: cannot reach the node at {_node_url(args)}: {e}", file=sys.stderr)
        return 1
    rows = []
    for m in data:
        loaded = m.get("loaded")
        rows.append([
            m["id"],
            ",".join(m.get("engines") or []),
            ",".join(m.get("nodes") or []),
            str(m.get("context_length") or "-"),
            "-" if loaded is None else ("yes" if loaded else "no"),
        ])
    print(_table(rows, ["MODEL", "ENGINE", "NODE", "CONTEXT", "LOADED"]))
    return 0


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


def cmd_peers(args: argparse.Namespace) -> int:
    try:
        data = _get(_node_url(args) + "/quorum/v1/peers")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            print("quorum-node: this node is in no cluster (see `quorum-node cluster init`)", file=sys.stderr)
            return 1
        print(f"quorum-node: {e}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"quorum-node: cannot reach the node at {_node_url(args)}: {e}", file=sys.stderr)
        return 1
    rows = [
        [p["name"], p["node_id"], p["address"] or "-", ",".join(p.get("routes") or [p["route"]]),
         "draining" if p.get("draining") else p["state"], _since(p.get("since")), str(len(p["models"])), str(p["in_flight"]),
         "-" if p.get("load") is None else str(p["load"]),
         f"{p['last_seen_s']:.1f}s ago" if p.get("last_seen_s") is not None else "-",
         f"{p['rtt_ms']:.1f}ms" if p.get("rtt_ms") is not None else "-"]
        for p in data["peers"]
    ]
    print(_table(rows, ["NAME", "ID", "ADDRESS", "ROUTES", "STATE", "SINCE", "MODELS", "IN-FLIGHT", "LOAD",
                        "LAST SEEN", "RTT"]))
    relay = data.get("relay")
    if relay:
        online = ", ".join(relay.get("online") or []) or "nobody else"
        print(f"relay {relay['url']}: {relay['state']}" + (f" ({relay['error']})" if relay.get("error") else "")
              + f"; online there: {online}")
    return 0



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quorum-node", description="Run local LLM engines as one cluster.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run(sub)
    for name, func, help_ in (("models", cmd_models, "print the model table of a running node"),
                              ("peers", cmd_peers, "print the peers of a running node")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--url", default=None, help="node URL (default http://127.0.0.1:32768)")
        p.set_defaults(func=func)
    from .cluster.members_cli import add_cluster_commands

    add_cluster_commands(sub)  # cluster init|show|members|remove|leave|migrate, invite, join
    from .embedded.cli import add_engine_commands

    add_engine_commands(sub)
    from .control.usage_cli import add_usage_command

    add_usage_command(sub)
    from .control.keys_cli import add_keys_command

    add_keys_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command != "run":
        # The command line's tools (usage, keys, ...): stdout is their answer (--json), so what the node's
        # code they call logs goes to stderr, warnings and errors only. (A caller in its own process, such
        # as a test, passes argv and keeps its own logging.)
        from .log import configure_logging

        configure_logging("console", "warning")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"quorum-node: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
