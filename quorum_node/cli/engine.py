"""``quorum-node engine fetch`` and ``engine start``: the bundled llama.cpp engine.

The node's parser mounts these with ``add_engine_commands(subparsers)``. The cache is
the settings' ``cache_dir`` (``--cache-dir``, ``QUORUM_CACHE_DIR``, the config
file, else ``~/.cache/quorum``).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ..embedded.fetch import EngineFetchError, ensure_llama_server, ensure_model
from ..embedded.supervisor import die_with_parent_preexec
from ..settings import Settings

__all__ = ["add_engine_commands"]


def add_engine_commands(subparsers: Any) -> None:
    """Add ``engine {fetch,start}`` to a parser's subparsers."""
    engine = subparsers.add_parser(
        "engine",
        help="build and run the local llama.cpp engine",
        description="Build and run the local llama.cpp engine (llama-server, and rpc-server for sharded models).",
    )
    _add_engine_subcommands(engine)


def _add_engine_subcommands(parser: argparse.ArgumentParser) -> None:
    """Add the ``fetch`` and ``start`` subcommands directly under ``parser``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache directory (default: $QUORUM_CACHE_DIR, else ~/.cache/quorum)",
    )
    common.add_argument("--quiet", action="store_true", help="do not show download/build progress")
    sub = parser.add_subparsers(dest="engine_command", metavar="COMMAND", required=True)

    fetch = sub.add_parser(
        "fetch",
        parents=[common],
        help="build llama-server and rpc-server, and fetch the model into the cache",
        description="Build llama-server (once; needs cmake and a C++ compiler) and fetch the "
        "SmolLM2-135M model into the cache, then print both paths.",
    )
    fetch.set_defaults(func=cmd_fetch)

    start = sub.add_parser(
        "start",
        parents=[common],
        help="run llama-server in the foreground (fetching it first if needed)",
        description="Run llama-server in the foreground; Ctrl-C or SIGTERM stops it. "
        "Arguments after -- go to llama-server unchanged.",
    )
    start.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    start.add_argument("--port", type=int, default=8080, help="TCP port, 0 for any (default: %(default)s)")
    start.add_argument("--ctx-size", type=int, default=0, help="context size in tokens (default: 0, the model's own)")
    start.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama-server's choice)")
    start.add_argument("--model", type=Path, default=None, help="GGUF model (default: the cached SmolLM2-135M)")
    start.add_argument("llama_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    start.set_defaults(func=cmd_start)


def cmd_fetch(args: argparse.Namespace, settings: Settings) -> int:
    """``engine fetch``: print the binary's and the model's paths, one per line."""
    cache = Path(settings.cache_dir)
    try:
        binary = ensure_llama_server(cache, progress=not args.quiet)
        model = ensure_model(cache, progress=not args.quiet)
    except EngineFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(binary)
    print(model)
    return 0


def cmd_start(args: argparse.Namespace, settings: Settings) -> int:
    """``engine start``: run llama-server in the foreground; return its exit status."""
    cache = Path(settings.cache_dir)
    try:
        binary = ensure_llama_server(cache, progress=not args.quiet)
        model = args.model if args.model is not None else ensure_model(cache, progress=not args.quiet)
    except EngineFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    extra = list(args.llama_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd = [
        str(binary),
        "--model", str(model),
        "--host", args.host,
        "--port", str(args.port),
        "--ctx-size", str(args.ctx_size),
    ]  # fmt: skip
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    cmd += extra
    return _run_foreground(cmd)


def _run_foreground(cmd: Sequence[str]) -> int:
    """Run ``cmd`` with our stdio, forwarding SIGINT/SIGTERM/SIGHUP; return its exit status.

    The child gets its own session so a terminal Ctrl-C reaches it exactly once
    (through us), and dies with us even if we are killed (Linux).
    A child killed by signal N yields 128 + N, as a shell would report it.
    """
    try:
        proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent_preexec())
    except OSError as exc:
        print(f"error: cannot run {cmd[0]}: {exc}", file=sys.stderr)
        return 1

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # we are leaving on an exception
            proc.kill()
            proc.wait()
    return 128 - returncode if returncode < 0 else returncode
