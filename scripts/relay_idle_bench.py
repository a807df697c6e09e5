"""Relay memory per idle node: one quorum-relay, N idle nodes connected, RSS per node.

Starts ``quorum-relay`` (``python -m quorum_relay``) as a subprocess on 127.0.0.1 with
a port it picks itself, connects ``--nodes`` idle nodes from this one asyncio
process (``--per-namespace`` of them per token, as clusters are small), waits
until the relay reports them all connected, then prints the relay's resident
memory per connected node: (RSS with N nodes − RSS before any) / N.
Goal: ≤ 50 KiB a node. Loopback only; bounded by ``--timeout-s``; stops the
relay with SIGTERM and checks it exits 0.

    .venv/bin/python scripts/relay_idle_bench.py --nodes 1000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import secrets
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

from quorum_relay.identity import node_id_for  # noqa: E402
from quorum_relay.wire import (  # noqa: E402
    CONNECT_PATH,
    NODE_ID_HEADER,
    NODE_KEY_HEADER,
    Challenge,
    Proof,
    Welcome,
    decode,
    encode,
    proof_message,
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(max(soft, need), hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < need:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} is below the {need} descriptors needed")


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


async def read_started(stderr: asyncio.StreamReader) -> int:
    while True:
        line = await stderr.readline()
        if not line:
            raise SystemExit("the relay exited before it started")
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "relay_started":
            return int(record["port"])


async def drain(stderr: asyncio.StreamReader) -> None:
    while await stderr.readline():
        pass


async def bench(args: argparse.Namespace) -> dict:
    n, per = args.nodes, args.per_namespace
    tokens = [secrets.token_urlsafe(24) for _ in range((n + per - 1) // per)]
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    tokens_file = tmp / "tokens"
    tokens_file.write_text("".join(f"{t} ns{i}\n" for i, t in enumerate(tokens)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "quorum_relay",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--tokens-file",
        str(tokens_file),
        "--log-format",
        "json",
        "--handshake-rate-per-s",
        "1000000",
        "--handshake-burst",
        "1000000",
        "--max-connections-per-address",
        str(n + 10),
        "--max-connections",
        str(n + 10),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    nodes: list[ClientConnection] = []
    drains: list[asyncio.Task[None]] = []
    try:
        port = await read_started(proc.stderr)
        log_drain = asyncio.create_task(drain(proc.stderr))
        health(port)  # warm the HTTP path before the baseline
        await asyncio.sleep(0.5)
        base = rss_kib(proc.pid)
        url = f"ws://127.0.0.1:{port}{CONNECT_PATH}"

        async def one(i: int) -> None:
            key = Ed25519PrivateKey.generate()  # each node proves its id with its own key, as a real one does
            public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            node_id = node_id_for(public)
            ws = await connect(
                url,
                additional_headers={
                    "Authorization": f"Bearer {tokens[i // per]}",
                    NODE_ID_HEADER: node_id,
                    NODE_KEY_HEADER: base64.b64encode(public).decode(),
                },
                compression=None,
                open_timeout=30,
                ping_interval=None,
                max_size=None,
            )
            nodes.append(ws)
            challenge = decode(await ws.recv())
            assert isinstance(challenge, Challenge)
            await ws.send(encode(Proof(signature=key.sign(proof_message(challenge.nonce, node_id, public)))))
            assert isinstance(decode(await ws.recv()), Welcome)

            async def keep_reading() -> None:  # Joined frames of later namespace mates
                async for _ in ws:
                    pass

            drains.append(asyncio.create_task(keep_reading()))

        t0 = time.monotonic()
        for start in range(0, n, 100):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 100))))
        connect_s = time.monotonic() - t0
        while health(port)["connections"] < n:  # noqa: ASYNC110  (another process's count: no event to wait on)
            await asyncio.sleep(0.1)
        await asyncio.sleep(args.settle_s)
        rss = rss_kib(proc.pid)
        h = health(port)
        result = {
            "nodes": n,
            "per_namespace": per,
            "connected": h["connections"],
            "namespaces": h["namespaces"],
            "rss_before_kib": base,
            "rss_with_nodes_kib": rss,
            "rss_per_node_kib": round((rss - base) / n, 1),
            "connect_s": round(connect_s, 2),
            "goal_kib": 50,
        }
        for ws in nodes:
            await ws.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            result["relay_exit"] = await proc.wait()
        log_drain.cancel()
        return result
    finally:
        for t in drains:
            t.cancel()
        for ws in nodes:
            ws.transport.abort()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--per-namespace", type=int, default=10, help="nodes per token (cluster size)")
    p.add_argument("--settle-s", type=float, default=1.0, help="wait before measuring")
    p.add_argument("--timeout-s", type=float, default=180.0, help="give up after this long")
    args = p.parse_args()
    raise_nofile(2 * args.nodes + 256)  # the child inherits it; each node is a socket on both ends
    try:
        result = asyncio.run(asyncio.wait_for(bench(args), args.timeout_s))
    except TimeoutError:
        print(f"relay_idle_bench: gave up after {args.timeout_s} s", file=sys.stderr)
        return 1
    print(
        f"{result['connected']} idle nodes ({result['namespaces']} namespaces): relay RSS "
        f"{result['rss_before_kib']} KiB → {result['rss_with_nodes_kib']} KiB, "
        f"{result['rss_per_node_kib']} KiB per node (goal ≤ {result['goal_kib']} KiB); "
        f"connected in {result['connect_s']} s; relay exit {result['relay_exit']}"
    )
    print(json.dumps(result))
    return 0 if result["rss_per_node_kib"] <= result["goal_kib"] and result["relay_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
