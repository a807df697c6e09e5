"""The ``quorum-node`` command line: every command, on the one settings object.

The top layer: it may import anything, and nothing outside this package
imports it. ``main`` parses the command line, builds the settings once
(``run``: every flag; the tools: their few setting flags, over ``QUORUM_*``
and the config file) and hands both to the command.

    common    what the tools share: their settings, the admin request, tables
    run       ``run``: the node daemon
    show      ``models``, ``peers``: the tables of a running node
    cluster   ``cluster …``, ``invite``, ``join``: membership
    keys      ``keys create|list|revoke``: API keys
    usage     ``usage``: totals from the ledger
    shard     ``shard``: a model across other members' memory
    doctor    ``doctor``: this node's setup checked, with fixes
    engine    ``engine fetch|start``: the bundled llama-server
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from quorum_common.log import configure_logging

from ..errors import ConfigError
from .cluster import add_cluster_commands
from .common import run_settings, tool_settings
from .doctor import add_doctor_command
from .engine import add_engine_commands
from .keys import add_keys_command
from .run import add_run_command
from .shard import add_shard_command
from .show import add_show_commands
from .usage import add_usage_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quorum-node", description="Run local LLM engines as one cluster.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_run_command(sub)
    add_show_commands(sub)  # models, peers
    add_cluster_commands(sub)  # cluster init|show|members|remove|leave|migrate, invite, join
    add_engine_commands(sub)
    add_usage_command(sub)
    add_keys_command(sub)
    add_shard_command(sub)
    add_doctor_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command != "run":
        # The command line's tools (usage, keys, ...): stdout is their answer (--json), so what the node's
        # code they call logs goes to stderr, warnings and errors only. (A caller in its own process, such
        # as a test, passes argv and keeps its own logging.)
        configure_logging("console", "warning")
    try:
        settings = run_settings(args) if args.command == "run" else tool_settings(args)
        return int(args.func(args, settings) or 0)
    except ConfigError as e:
        print(f"quorum-node: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
