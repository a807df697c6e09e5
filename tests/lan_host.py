"""One LAN host for tests/test_lan.py: a fake engine plus a quorum node, run inside a namespace.

    python -m tests.lan_host --name h1 --ip 10.78.0.1 --data-dir DIR --secret S \
        [--models a,b] [--tokens '["x"," y"]'] [--token-delay-s 0.0]

The fake engine listens on 127.0.0.1:0 inside the namespace; the node listens
on 0.0.0.0:32768 and binds zeroconf to ``--ip`` only. When both are up it
prints one line ``@@{"ready": {...}}`` on stdout. It runs until SIGTERM/SIGINT
(a clean stop: mDNS goodbye, then exit 0). A JSON object on a stdin line sets
engine knobs (``{"token_delay_s": 0.1, "tokens": [...]}``) and is answered
with ``@@{"set": [...names]}``, so a test can slow one engine down on demand;
each generation request reaching the engine is reported as
``@@{"request": {"model": ..., "stream": ...}}``. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

from quorum_node.log import configure_logging
from quorum_node.node import Node
from quorum_node.settings import load_settings
from tests.fakes.engines import start_fake

PORT = 32768


def say(**kw: Any) -> None:
    print("@@" + json.dumps(kw), flush=True)


async def _control(engine: Any) -> None:
    """Apply knob updates read from stdin until EOF."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            knobs = json.loads(line)
            for name, value in knobs.items():
                if name.startswith("_") or not hasattr(engine, name):
                    raise SystemExit(f"lan_host: unknown engine knob {name!r}")
                setattr(engine, name, value)
            say(set=sorted(knobs))
    finally:
        transport.close()


async def _report_requests(engine: Any) -> None:
    """Say ``@@{"request": {...}}`` as each generation request reaches the engine."""
    seen = 0
    while True:
        await engine.wait_until(lambda e, n=seen: len(e.requests) > n)
        for rec in engine.requests[seen:]:
            say(request={"model": rec.get("model"), "stream": bool(rec.get("stream"))})
        seen = len(engine.requests)


async def main(args: argparse.Namespace) -> int:
    configure_logging("json", args.log_level)
    models = [m for m in args.models.split(",") if m]
    knobs: dict[str, Any] = {"token_delay_s": args.token_delay_s}
    if args.tokens:
        knobs["tokens"] = json.loads(args.tokens)
    engine = await start_fake("openai", models=models, **knobs)
    settings = load_settings({
        "host": "0.0.0.0", "port": PORT, "name": args.name, "data_dir": args.data_dir,
        "backends": [{"kind": "openai", "url": engine.url, "name": "fake"}],
        "detect": False, "embedded_engine": False,
        "mdns": True, "mdns_interfaces": [args.ip],
        "cluster": "lan", "cluster_secret": args.secret,
        "health_interval_s": 0.5, "peer_down_after_s": 3.0,
        "log_format": "json", "log_level": args.log_level,
    }, env={})
    node = Node(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = []
    try:
        await node.start()
        assert node.cluster is not None
        say(ready={"name": args.name, "pid": os.getpid(), "port": node.port, "node_id": node.cluster.node_id,
                   "engine": engine.url, "models": models})
        tasks.append(asyncio.create_task(_control(engine), name="lan-host-control"))
        tasks.append(asyncio.create_task(_report_requests(engine), name="lan-host-requests"))
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await node.stop()
        await engine.close()
    say(stopped=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--ip", required=True, help="this namespace's LAN address (zeroconf binds to it only)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--models", default="", help="comma-separated model ids the fake engine holds")
    p.add_argument("--tokens", default="", help="JSON list of tokens the fake engine generates")
    p.add_argument("--token-delay-s", type=float, default=0.0)
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
