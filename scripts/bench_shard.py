"""A model split across two members' memory, against the whole model on one engine (issue 22).

Routes, each on the bundled SmolLM2-135M, greedy, ``--requests`` streamed
chats of ``--max-tokens`` tokens one after another (after two to warm up):

  whole        one llama-server holding the whole model (the baseline)
  rpc-direct   llama-server --rpc straight to two rpc-servers on loopback: what llama.cpp's split costs by itself
  sharded      a node leading the model across two member nodes (quorum-node shard): their rpc-servers are
               reached through the tunnels on the peer link, and the client asks the leader's API

Every engine and worker runs one thread (``--threads``); the nodes are
``quorum-node run`` subprocesses on 127.0.0.1, mDNS off, members of one
cluster that name each other as static peers, each helper with an rpc cache of
its own (``lend_cache_dir``, empty at first). Reported: time to first token
(p50), decode rate (tokens/s, p50 of each answer's tokens after the first over
the time they took), the link's cost per token (sharded's ms/token less
rpc-direct's: what the tunnels and the node add to llama.cpp's own split),
and the bytes the leader sent its helpers at the first load (cold caches) and
at a second (the leader stops leading and leads again: the helpers' rpc-server
caches hold the weights). No goal: a split on one machine is slower, and the
report says by how much and where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, _run
from bench_cluster import Nodes, free_ports

sys.path.insert(0, str(ROOT))
from quorum_node.embedded.rpc import RpcServerProcess
from quorum_node.embedded.supervisor import LlamaServerProcess

ROUTES = ("whole", "rpc-direct", "sharded")
READY_TIMEOUT_S = 300.0
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


@dataclass
class Result:
    route: str
    ttft_s: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)  # tokens/s after the first token, per answer
    up_s: float | None = None  # from asking to serving (the sharded route's first load)
    bytes_first: int | None = None
    bytes_second: int | None = None
    up_second_s: float | None = None

    def row(self) -> dict[str, Any]:
        rate = statistics.median(self.rate)
        out: dict[str, Any] = {
            "ttft_p50_ms": statistics.median(self.ttft_s) * 1000,
            "tokens_per_s": rate,
            "ms_per_token": 1000 / rate,
        }
        for k in ("up_s", "bytes_first", "bytes_second", "up_second_s"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


async def measure(http: aiohttp.ClientSession, base: str, model: str, args: argparse.Namespace, result: Result) -> None:
    body = {"model": model, "messages": PROMPT, "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    for i in range(args.requests + 2):
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        async with http.post(base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200, (r.status, await r.text())
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: {"):
                    continue
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0]["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += 1
        if i < 2 or first is None or last is None or tokens < 2:
            continue  # warm-up
        result.ttft_s.append(first - t0)
        result.rate.append((tokens - 1) / (last - first))


async def admin(http: aiohttp.ClientSession, url: str, method: str, path: str, body: Any = None) -> Any:
    async with http.request(method, url + path, json=body) as r:
        answer = await r.json(content_type=None)
        assert r.status in (200, 202), (r.status, answer)
        return answer


async def wait_up(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        (shard,) = (await admin(http, url, "GET", "/quorum/admin/shards"))["leading"]
        if shard["state"] == "up":
            return dict(shard)
        await asyncio.sleep(0.2)
    raise TimeoutError("the shard did not come up")


async def route(name: str, args: argparse.Namespace, binary: Path, rpc: Path, model: Path, tmp: Path) -> Result:
    result = Result(name)
    model_id = model.name.removesuffix(".gguf")
    timeout = aiohttp.ClientTimeout(total=600)
    # a connection each (llama-server closes one after a stream; a pooled one that is closing fails the next request)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        if name == "whole":
            engine = LlamaServerProcess(binary, model, threads=args.threads)
            await engine.start()
            try:
                await engine.wait_ready(READY_TIMEOUT_S)
                await measure(http, engine.url, model_id, args, result)
            finally:
                await engine.stop()
        elif name == "rpc-direct":
            workers = [RpcServerProcess(rpc, threads=args.threads) for _ in range(2)]
            engine = None
            try:
                for w in workers:
                    await w.start()
                extra = ["--rpc", ",".join(f"127.0.0.1:{w.port}" for w in workers), "-ngl", "999", "-ts", "1,1"]
                engine = LlamaServerProcess(binary, model, threads=args.threads, extra_args=extra)
                await engine.start()
                await engine.wait_ready(READY_TIMEOUT_S)
                await measure(http, engine.url, model_id, args, result)
            finally:
                if engine is not None:
                    await engine.stop()
                for w in workers:
                    await w.stop()
        else:
            nodes = Nodes(tmp / name)
            try:
                ports = free_ports(3)
                for i in range(3):
                    others = [p for p in ports if p != ports[i]]
                    extra = [f'lend_cache_dir = "{tmp / f"rpc-cache-{i}"}"']
                    await asyncio.to_thread(nodes.start, f"n{i}", [], peer_port=ports[i], peers=others, extra=extra)
                leader = nodes.urls[0]
                t0 = time.perf_counter()
                await admin(http, leader, "POST", "/quorum/admin/shards", {"model": str(model), "across": 2})
                shard = await wait_up(http, leader)
                result.up_s = time.perf_counter() - t0
                result.bytes_first = sum(h["bytes_sent"] for h in shard["helpers"])
                await measure(http, leader, model_id, args, result)
                # Again: the helpers' rpc-servers are new, their caches are not
                await admin(http, leader, "DELETE", f"/quorum/admin/shards/{model.stem}")
                t0 = time.perf_counter()
                await admin(http, leader, "POST", "/quorum/admin/shards", {"model": str(model), "across": 2})
                shard = await wait_up(http, leader)
                result.up_second_s = time.perf_counter() - t0
                result.bytes_second = sum(h["bytes_sent"] for h in shard["helpers"])
            finally:
                nodes.stop()
    return result


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from quorum_node.embedded.fetch import ensure_llama_server, ensure_model, rpc_server_path
    from quorum_node.settings import load_settings

    cache = Path(load_settings().cache_dir)
    binary, model = ensure_llama_server(cache), ensure_model(cache)
    tmp = Path(tempfile.mkdtemp(prefix="quorum-bench-shard-"))
    print(
        f"{model.name}: {args.requests} streamed chats of {args.max_tokens} tokens a route (after 2 to warm up), "
        f"{args.threads} thread(s) per engine and worker"
    )
    results: dict[str, Result] = {}
    try:
        for name in args.routes.split(","):
            print(f"  {name} ...", flush=True)
            results[name] = await route(name, args, binary, rpc_server_path(cache), model, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = {k: r.row() for k, r in results.items()}
    print()
    print(f"{'route':<12} {'TTFT p50 ms':>11} {'tokens/s':>9} {'ms/token':>9} {'x whole':>8}")
    base = rows.get("whole")
    for k, row in rows.items():
        vs = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        print(f"{k:<12} {row['ttft_p50_ms']:>11.1f} {row['tokens_per_s']:>9.1f} {row['ms_per_token']:>9.2f} {vs:>8}")
    if "sharded" in rows and "rpc-direct" in rows:
        link = rows["sharded"]["ms_per_token"] - rows["rpc-direct"]["ms_per_token"]
        rows["link_ms_per_token"] = link
        print(f"\nthe tunnels' and the node's cost per token: {link:+.2f} ms (sharded less rpc-direct)")
    if "sharded" in rows:
        s = rows["sharded"]
        print(
            f"sharded: up in {s['up_s']:.1f} s, {s['bytes_first'] / 1e6:.1f} MB sent to the helpers at the first load; "
            f"{s['bytes_second'] / 1e6:.1f} MB at a second (their rpc caches warm), up in {s['up_second_s']:.1f} s"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/bench-shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--routes", default=",".join(ROUTES), help=f"comma list of {', '.join(ROUTES)}")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="threads of each llama-server and rpc-server")
    ap.add_argument("--json", action="store_true", help="also print the report as JSON")
    args = ap.parse_args(argv)
    unknown = [r for r in args.routes.split(",") if r not in ROUTES]
    if unknown:
        ap.error(f"unknown routes: {', '.join(unknown)}")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rows = _run(bench(args))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
