"""The ``quorum-relay`` command line: flags over ``QUORUM_RELAY_*`` env over defaults.

Signals: SIGTERM/SIGINT stop (every node closed with 1001 within
``close_timeout_s``), SIGHUP reloads the tokens file. Exit status: 0 after a
stop, 2 for bad settings (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from quorum_common.log import configure_logging

from .errors import ConfigError
from .server import Relay, preflight
from .settings import ENV_PREFIX, Settings, load_settings, parse_bytes

__all__ = ["build_parser", "main"]

log = structlog.get_logger(__name__)


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS
    p = argparse.ArgumentParser(
        prog="quorum-relay",
        description="Relay frames between Quorum nodes that cannot reach each other directly. "
        f"Every flag has an environment variable: {ENV_PREFIX}<FLAG_NAME>, e.g. {ENV_PREFIX}PORT.",
    )
    a = p.add_argument
    a("--host", default=S, help="address to bind (default 0.0.0.0)")
    a("--port", type=int, default=S, help="port (default 8787; 0 picks a free one, logged in relay_started)")
    a(
        "--token",
        dest="tokens",
        action="append",
        default=S,
        metavar="TOKEN",
        help="a token admitting nodes into its own namespace (repeatable; env: comma-separated)",
    )
    a(
        "--tokens-file",
        default=S,
        metavar="FILE",
        help="one token per line, optional label after whitespace (tokens with one label share a namespace); "
        "'#' comments; reloaded on SIGHUP",
    )
    a("--tls-cert", default=S, metavar="FILE", help="serve wss:// directly with this certificate chain (PEM)")
    a("--tls-key", default=S, metavar="FILE", help="... and this private key (PEM)")
    a("--max-frame-bytes", type=_size, default=S, metavar="SIZE", help="largest frame a node may send (256KiB)")
    a("--max-streams-per-node", type=int, default=S, metavar="N", help="open streams per node (1024)")
    a(
        "--send-queue-bytes",
        type=_size,
        default=S,
        metavar="SIZE",
        help="bytes queued for one node before it is closed as too slow (8MiB)",
    )
    a("--ping-interval-s", type=float, default=S, metavar="S", help="ping a node quiet this long (20)")
    a("--idle-timeout-s", type=float, default=S, metavar="S", help="close a node quiet this long, pongs included (60)")
    a("--handshake-rate-per-s", type=float, default=S, metavar="R", help="handshakes per second per address (5)")
    a("--handshake-burst", type=int, default=S, metavar="N", help="handshake burst per address (20)")
    a("--max-connections-per-address", type=int, default=S, metavar="N", help="per address, IPv6 per /64 (64)")
    a("--max-connections", type=int, default=S, metavar="N", help="in all (10000)")
    a(
        "--trusted-proxy",
        dest="trusted_proxies",
        action="append",
        default=S,
        metavar="CIDR",
        help="a reverse proxy whose X-Forwarded-For is believed (repeatable)",
    )
    a("--open-timeout-s", type=float, default=S, metavar="S", help="time allowed for a handshake (10)")
    a(
        "--close-timeout-s",
        type=float,
        default=S,
        metavar="S",
        help="time allowed for a closing handshake before the TCP connection is aborted (1)",
    )
    a("--metrics-token", default=S, metavar="TOKEN", help="require Authorization: Bearer TOKEN on /metrics")
    a("--log-format", choices=("auto", "console", "json"), default=S)
    a("--log-level", choices=("debug", "info", "warning", "error"), default=S)
    return p


def _raise_nofile_limit() -> None:
    """Every node is a socket: lift the soft descriptor limit to the hard one."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


async def _run(settings: Settings) -> int:
    relay = Relay(settings)
    await relay.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def _reload() -> None:
        try:
            relay.reload_tokens()
        except ConfigError as e:
            log.error("tokens_reload_failed", error=str(e), kept="the tokens in force before")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await relay.stop()
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli: dict[str, Any] = vars(args)
    try:
        settings, unknown = load_settings(cli, os.environ if env is None else env)
        preflight(settings)
    except ConfigError as e:
        print(f"quorum-relay: {e}", file=sys.stderr)
        return 2
    # websockets logs through the stdlib; keep its handshake noise (bad requests, EOFs) out of ours.
    configure_logging(settings.log_format, settings.log_level, quiet=("websockets",))
    for var in unknown:
        log.warning("unknown_env_variable", name=var)
    _raise_nofile_limit()
    loop_factory: Any = None
    with contextlib.suppress(ImportError):
        import uvloop  # optional: a faster event loop for the hot path

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_run(settings))
    except ConfigError as e:
        print(f"quorum-relay: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken, the address is not ours
        print(f"quorum-relay: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
