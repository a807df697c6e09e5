"""``quorum-node run``: the node daemon, its flags one to one with the settings."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import msgspec

from quorum_common.log import configure_logging

from ..errors import ConfigError
from ..settings import Settings, parse_backend_arg

__all__ = ["add_run_command", "cmd_run"]

# Flags spelled by hand; every other Settings field gets --dashed-name automatically.
_EXPLICIT = {
    "host",
    "port",
    "ollama_port",
    "peer_port",
    "name",
    "data_dir",
    "backends",
    "detect",
    "embedded_engine",
    "log_format",
    "log_level",
    "cluster",
    "cluster_secret",
    "mdns",
    "mdns_interfaces",
    "peers",
    "relay",
    "relay_token",
    "ledger",
    "metrics",
    "cors_origins",
    "require_key",
}


def add_run_command(sub: Any) -> None:
    p = sub.add_parser("run", help="run the node daemon", description="Serve the OpenAI API on this machine.")
    S = argparse.SUPPRESS
    p.add_argument("--config", default=S, metavar="FILE", help="TOML config file (env QUORUM_CONFIG)")
    p.add_argument("--host", default=S, help="address to bind (default 0.0.0.0; non-loopback callers need a key)")
    p.add_argument("--port", type=int, default=S, help="port (default 32768)")
    p.add_argument(
        "--ollama-port",
        dest="ollama_port",
        type=int,
        default=S,
        metavar="PORT",
        help="also serve the API on this port, for tools that hard-code Ollama's (e.g. 11435; default off)",
    )
    p.add_argument(
        "--peer-port",
        dest="peer_port",
        type=int,
        default=S,
        metavar="PORT",
        help="the port peers reach this node on (mutual TLS; default the API port + 1, 32769)",
    )
    p.add_argument("--name", default=S, help="this node's name (default: hostname)")
    p.add_argument("--data-dir", default=S, metavar="DIR", help="state directory (default ~/.local/share/quorum)")
    p.add_argument(
        "--backend",
        dest="backends",
        action="append",
        type=_backend,
        default=S,
        metavar="KIND=URL",
        help="an engine to serve, e.g. ollama=http://127.0.0.1:11434 (repeatable)",
    )
    p.add_argument(
        "--no-detect", dest="detect", action="store_false", default=S, help="do not probe this machine for engines"
    )
    p.add_argument(
        "--no-embedded-engine",
        dest="embedded_engine",
        action="store_false",
        default=S,
        help="do not start the bundled llama-server when no engine is found",
    )
    p.add_argument("--log-format", choices=("auto", "console", "json"), default=S)
    p.add_argument("--log-level", default=S, choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--cluster",
        default=S,
        metavar="NAME",
        help="a cluster of the shared-secret days (with --secret): only `cluster migrate` reads it",
    )
    p.add_argument(
        "--secret",
        dest="cluster_secret",
        default=S,
        help="that cluster's secret (env QUORUM_CLUSTER_SECRET); it grants nothing by itself",
    )
    p.add_argument("--no-mdns", dest="mdns", action="store_false", default=S, help="no LAN discovery")
    p.add_argument(
        "--mdns-interface",
        dest="mdns_interfaces",
        action="append",
        default=S,
        metavar="IP",
        help="announce and browse on this interface address only (repeatable)",
    )
    p.add_argument(
        "--peer",
        dest="peers",
        action="append",
        default=S,
        metavar="HOST:PORT",
        help="a static peer, where multicast does not pass (repeatable)",
    )
    p.add_argument(
        "--relay",
        default=S,
        metavar="URL",
        help="a quorum-relay to join peers on other networks through (ws:// or wss://)",
    )
    p.add_argument(
        "--relay-token",
        dest="relay_token",
        default=S,
        metavar="TOKEN",
        help="the relay's admission token (prefer env QUORUM_RELAY_TOKEN: it stays out of ps)",
    )
    p.add_argument(
        "--no-ledger",
        dest="ledger",
        action="store_false",
        default=S,
        help="keep no usage ledger (SQLite in the data dir)",
    )
    p.add_argument("--no-metrics", dest="metrics", action="store_false", default=S, help="no GET /metrics")
    p.add_argument(
        "--require-key",
        dest="require_key",
        action="store_true",
        default=S,
        help="callers on this machine need an API key too (see `quorum-node keys`)",
    )
    p.add_argument(
        "--cors-origins",
        dest="cors_origins",
        default=S,
        metavar="ORIGIN,...",
        type=lambda v: [o.strip() for o in v.split(",") if o.strip()],
        help="web origins whose pages may call the node (default none; * is any page: unsafe)",
    )
    for f in msgspec.structs.fields(Settings):
        if f.name in _EXPLICIT:
            continue
        kind = f.type if f.type in (int, float, str) else None
        if f.type is bool:
            p.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                default=S,
                type=lambda v: v.lower() in ("1", "true", "yes", "on"),
                metavar="BOOL",
            )
        elif kind is not None:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=S)
        elif f.name == "detect_ports":
            p.add_argument(
                "--detect-ports",
                dest="detect_ports",
                default=S,
                metavar="P1,P2",
                type=lambda v: [int(x) for x in v.split(",") if x],
            )
    p.set_defaults(func=cmd_run)


def _backend(text: str) -> Any:
    try:
        return parse_backend_arg(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from ..node import serve_forever

    configure_logging(settings.log_format, settings.log_level)
    try:
        import uvloop  # a faster event loop where it exists (not on Windows)
    except ImportError:
        return asyncio.run(serve_forever(settings))
    return uvloop.run(serve_forever(settings))
