"""What the command's tools share: the settings they run under, the node they ask, a table.

The tools (``keys``, ``usage``, ``cluster``, ``models`` ...) read the same
settings as the node on this machine (its config file, ``QUORUM_*``), so they
find its port and data dir as it does; their own few flags go on top.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..control.admin_token import admin_headers
from ..errors import ApiError
from ..settings import Settings, load_settings

__all__ = ["NoNode", "admin_request", "node_url", "run_settings", "table", "tool_settings"]

# The flags of a tool that are settings; its other flags (``usage --cluster``, ``cluster init --name``,
# ``engine start --port``) mean something else there, and stay out.
_TOOL_SETTINGS = ("data_dir", "api_key", "cache_dir")
# What argparse puts in the namespace that is no flag.
_NOT_FLAGS = {"func", "command"}


def run_settings(args: argparse.Namespace) -> Settings:
    """``run``'s settings: every flag given (the others are absent: argparse.SUPPRESS) over env over file."""
    return load_settings({k: v for k, v in vars(args).items() if k not in _NOT_FLAGS})


def tool_settings(args: argparse.Namespace) -> Settings:
    """A tool's settings: its few setting flags (``--data-dir``, ``--api-key``, ``--cache-dir``) over env
    over the config file (``QUORUM_CONFIG``)."""
    flags = {name: getattr(args, name, None) for name in _TOOL_SETTINGS}
    return load_settings({k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None})


def node_url(args: argparse.Namespace, settings: Settings) -> str:
    """The node a tool asks: ``--url``, or the one on this machine at the settings' port."""
    return (getattr(args, "url", None) or f"http://127.0.0.1:{settings.port}").rstrip("/")


class NoNode(Exception):
    """No node listens at the URL (the connection was refused): a tool may work on the data dir instead."""


def _refused(e: urllib.error.URLError) -> bool:
    return isinstance(e.reason, ConnectionRefusedError) or (
        isinstance(e.reason, OSError) and e.reason.errno in (111, 61, 10061)
    )


def admin_request(
    settings: Settings, url: str, method: str, path: str, body: Any = None, *, timeout_s: float = 10.0
) -> Any:
    """Ask the node at ``url`` (``/quorum/admin/...``) and return its JSON answer.

    Sends the admin key (``--api-key``, ``QUORUM_API_KEY``) if one is set, and the node's admin token when
    the node is on this machine and the token is readable. An HTTP error is ``ApiError`` with the node's
    message; no node there is ``NoNode``; other network errors (``URLError``, ``OSError``) pass.
    """
    headers = {"Accept": "application/json", **admin_headers(url, Path(settings.data_dir))}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        raise ApiError(message, status=e.code) from None
    except urllib.error.URLError as e:
        if _refused(e):
            raise NoNode(str(e.reason)) from None
        raise


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to their widest cell, the header first."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


#: The options every tool with subcommands takes, before its subcommand or after it (``tool_options``).
_TOOL_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--data-dir", {"metavar": "DIR", "help": "the node's data dir (default ~/.local/share/quorum)"}),
    ("--url", {"help": "the running node (default http://127.0.0.1:32768)"}),
    ("--api-key", {"metavar": "KEY", "help": "an admin key (prefer env QUORUM_API_KEY)"}),
)


def node_options(parser: argparse.ArgumentParser) -> None:
    """The options of a tool that asks the running node: ``--data-dir``, ``--url``, ``--api-key``."""
    for flag, kw in _TOOL_OPTIONS:
        parser.add_argument(flag, default=None, **kw)


def tool_options(group: argparse.ArgumentParser, subcommands: Any) -> None:
    """Give every subcommand of ``group`` the options ``group`` takes, so that they are taken where ``run``
    takes them, after the subcommand (``cluster init --data-dir X``) as well as before it. A value given
    after the subcommand wins; one given nowhere stays the group's default."""
    for parser in subcommands.choices.values():
        for flag, kw in _TOOL_OPTIONS:
            if any(flag in a.option_strings for a in parser._actions):
                continue
            parser.add_argument(flag, default=argparse.SUPPRESS, **kw)
    for flag, kw in _TOOL_OPTIONS:
        if not any(flag in a.option_strings for a in group._actions):
            group.add_argument(flag, default=None, **kw)
