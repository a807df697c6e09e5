"""Direct vs through quorum-node, measured in one run against the same engine.

Routes compared (each against ``direct``, the engine itself):
  local   client → node → engine
  lan     client → node A → node B → engine (one LAN hop over mutual TLS to B's peer port, loopback)

Engines:
  fake    (default) a lean OpenAI-compatible SSE server in its own process that
          streams ``--tokens`` tokens ``--token-interval-ms`` apart, like a real
          engine paced by its decode loop; it is cheap, so what is measured is us.
  llama   the real llama-server with SmolLM2-135M (built and cached by
          ``quorum-node engine fetch``); overhead is reported as a share of the
          engine's own time to first token and tokens/s.

Every process (engine, nodes, this client) runs on this machine, so the
numbers include the node competing with the client and the engine for CPU.
The nodes' data dirs are made members of one cluster before they start, as
``quorum-node invite`` and ``join`` would leave them (``tests/members_support.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))
from tests.members_support import enrol  # noqa: E402  (the repo's own test tools)


def _run(coro: Any) -> Any:
    """The engine and the client use the node's fast event loop too, so they stay cheap."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---------------------------------------------------------------------------
# The lean fake engine (runs as ``python scripts/bench.py --serve-engine``)


def serve_engine(tokens: int, interval_s: float) -> None:
    from aiohttp import web

    model = "bench-model"
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    role = chunk({"role": "assistant", "content": ""})
    tok = chunk({"content": " tok"})
    fin = chunk({}, "length")
    usage = (
        b"data: "
        + json.dumps(
            {
                **head,
                "choices": [],
                "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
            }
        ).encode()
        + b"\n\n"
    )
    whole = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
        }
    ).encode()

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": model, "object": "model", "created": 1, "owned_by": "vllm", "max_model_len": 4096}],
            }
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=whole, content_type="application/json")
        n = int(body.get("max_tokens") or tokens)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(role)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(n):
            # paced against a schedule, so a late wake-up does not slow the whole stream
            delay = t0 + (i + 1) * interval_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await resp.write(tok)
        await resp.write(fin)
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(usage)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0-bench"})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(json.dumps({"port": port}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    _run(main())


# ---------------------------------------------------------------------------
# Processes


def _follow(path: Path, proc: subprocess.Popen[str], deadline: float) -> Any:
    """The lines of a log file as they are written, until the process exits or the deadline passes."""
    with path.open() as f:
        while time.monotonic() < deadline:
            line = f.readline()
            if line:
                yield line
            elif proc.poll() is not None:
                return
            else:
                time.sleep(0.02)


KEEP_LOGS = False  # --keep-logs
# base URL -> the headers its requests carry: the local route sends a real API key (issue 9's "with keys" leg:
# it is checked, charged and recorded like any caller's), the other routes none.
KEYS: dict[str, dict[str, str]] = {}


class Proc:
    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, *, quiet: bool = False) -> None:
        # stderr (the logs) goes to a file, not a pipe: draining a pipe would cost the measuring client CPU,
        # and a pipe drained too slowly blocks the process it measures. quiet: no output kept at all.
        self.log_path: Path | None = None
        if quiet:
            out: Any = subprocess.DEVNULL
            err: Any = subprocess.DEVNULL
        else:
            fd, name = tempfile.mkstemp(prefix="quorum-bench-", suffix=".log")
            self.log_path = Path(name)
            out, err = subprocess.PIPE, fd
        self.p = subprocess.Popen(args, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
        if not quiet:
            os.close(fd)

    def read_json_line(self, stream: str, key: str, timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        if stream == "stdout":
            assert self.p.stdout is not None
            lines: Any = iter(self.p.stdout.readline, "")
        else:
            assert self.log_path is not None
            lines = _follow(self.log_path, self.p, deadline)
        for line in lines:
            if time.monotonic() > deadline:
                break
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if key in obj or obj.get("event") == key:
                return obj
        if self.p.poll() is not None:
            raise RuntimeError(f"process exited: {self.p.poll()}")
        raise TimeoutError(key)

    def drain_stderr(self) -> None:
        """Nothing to do: the logs go to a file (kept for callers)."""

    def cpu_s(self) -> float:
        """User + system CPU seconds this process has used so far."""
        try:
            fields = Path(f"/proc/{self.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def peak_rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self.log_path is not None:
            if KEEP_LOGS:
                print(f"  log of {' '.join(self.p.args[1:4])}: {self.log_path}", file=sys.stderr)
            else:
                self.log_path.unlink(missing_ok=True)


def start_node_and_port(name: str, data_dir: str, extra: Sequence[str]) -> tuple[Proc, str, int]:
    """A node (its data dir a member already); its API's URL and its peer port."""
    proc = Proc(
        [
            PY,
            "-m",
            "quorum_node.cli",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--name",
            name,
            "--data-dir",
            data_dir,
            "--no-detect",
            "--no-embedded-engine",
            "--log-format",
            "json",
            "--log-level",
            "info",
            *extra,
        ]
    )
    started = proc.read_json_line("stderr", "node_started", 60)
    peer_port = proc.read_json_line("stderr", "peer_port", 5)["peer_port"]  # cluster_started, logged before
    proc.drain_stderr()
    return proc, f"http://127.0.0.1:{started['port']}", peer_port


# ---------------------------------------------------------------------------
# Measurements

# Greedy, and (llama.cpp) no early end of sequence: every route gets the same amount of work.
CHAT = {"model": "", "messages": [{"role": "user", "content": "Say something."}], "temperature": 0, "ignore_eos": True}


async def wait_model(session: aiohttp.ClientSession, base: str, model: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with session.get(base + "/v1/models") as r:
                if r.status == 200:
                    # llama-server itself names its model by the -m path; the node by the file stem
                    ids = {m["id"] for m in (await r.json())["data"] or []}
                    if model in ids | {Path(i).name.removesuffix(".gguf") for i in ids}:
                        return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{model} never showed up at {base}")


async def one_request(session: aiohttp.ClientSession, base: str, model: str, max_tokens: int | None = None) -> float:
    body: dict[str, Any] = {**CHAT, "model": model}
    if max_tokens:  # a real engine otherwise talks until its context is full
        body["max_tokens"] = max_tokens
    t0 = time.perf_counter()
    async with session.post(base + "/v1/chat/completions", json=body, headers=KEYS.get(base)) as r:
        await r.read()
        assert r.status == 200, r.status
    return time.perf_counter() - t0


async def one_stream(
    session: aiohttp.ClientSession,
    base: str,
    model: str,
    max_tokens: int | None,
    on_token: Any = None,
) -> tuple[float, int, float]:
    """(time to first token, content tokens, total time) of one streamed chat; ``on_token(now)`` per token."""
    body: dict[str, Any] = {**CHAT, "model": model, "stream": True}
    if max_tokens:
        body["max_tokens"] = max_tokens
    t0 = time.perf_counter()
    ttft = -1.0
    n = 0
    buf = b""
    async with session.post(base + "/v1/chat/completions", json=body, headers=KEYS.get(base)) as r:
        assert r.status == 200, (base, r.status, await r.text())
        async for chunk in r.content.iter_any():
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if b'"content":"' in ev and b'"content":""' not in ev:
                    if ttft < 0:
                        ttft = time.perf_counter() - t0
                    n += 1
                    if on_token is not None:
                        on_token(time.perf_counter())
    return ttft, n, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def latency(
    session: aiohttp.ClientSession, routes: dict[str, str], model: str, n: int, max_tokens: int | None = None
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in routes}
    for base in routes.values():  # warm connections
        for _ in range(10):
            await one_request(session, base, model, max_tokens)
    for _ in range(n):  # interleaved, so drift hits every route alike
        for name, base in routes.items():
            out[name].append(await one_request(session, base, model, max_tokens))
    return out


async def ttft(
    session: aiohttp.ClientSession, routes: dict[str, str], model: str, n: int, max_tokens: int
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in routes}
    for _ in range(n):
        for name, base in routes.items():
            out[name].append((await one_stream(session, base, model, max_tokens))[0])
    return out


# The bench's processes each route runs through (keys of node_procs), and how they are named in the report.
ROUTE_PROCS = {
    "local": ("local",),
    "bare": ("bare",),
    "lan": ("lan", "local"),
    "relay": ("relay", "relay (the relay itself)", "local"),
}
PROC_LABELS = {
    "local": "serving node",
    "bare": "serving node",
    "lan": "entry node",
    "relay": "entry node",
    "relay (the relay itself)": "relay",
}


async def throughput(
    session: aiohttp.ClientSession, base: str, model: str, streams: int, max_tokens: int | None
) -> tuple[float, int, float, float]:
    """(delivered tokens/s, tokens, last first token s, longest stream after its first token s) with
    ``streams`` concurrent streams, all sent at once (each runs once)."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_stream(session, base, model, max_tokens) for _ in range(streams)))
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n, _ in results)
    started = [(t, total) for t, _, total in results if t >= 0] or [(wall, wall)]  # t < 0: no token came
    return tokens / wall, tokens, max(t for t, _ in started), max(total - t for t, total in started)


async def steady(
    session: aiohttp.ClientSession,
    base: str,
    model: str,
    streams: int,
    max_tokens: int | None,
    seconds: float,
    warmup_s: float,
) -> float:
    """Delivered tokens/s with ``streams`` streams kept open: each client starts its next stream as its last
    one ends (a closed loop, as ``streams`` busy users would), counted over ``seconds`` after ``warmup_s``.

    The clients start at random times within the first half of the warm-up, so streams begin and end at
    different moments, as those of independent users do (all at once, they would stay in step)."""
    t0 = time.perf_counter()
    start, end = t0 + warmup_s, t0 + warmup_s + seconds
    counted = 0

    def on_token(now: float) -> None:
        nonlocal counted
        if start <= now < end:
            counted += 1

    async def user() -> None:
        await asyncio.sleep(random.uniform(0, warmup_s / 2))
        while time.perf_counter() < end:
            await one_stream(session, base, model, max_tokens, on_token)

    await asyncio.gather(*(user() for _ in range(streams)))
    return counted / seconds


def _rates_line(c: int, rates: dict[str, float], report: dict[str, Any], key: str) -> str:
    """One level's tokens/s per route and each route's share of direct (stored in ``report``)."""
    line = f"  {c:4d} streams: direct {rates['direct']:9.1f} tok/s"
    for name, rate in rates.items():
        if name != "direct":
            ratio = rate / rates["direct"]
            line += f" | {name} {rate:9.1f} tok/s = {ratio * 100:5.1f} %"
            report[f"{name}_{key}_{c}"] = ratio
    return line


def fmt_ms(x: float) -> str:
    return f"{x * 1000:8.3f} ms"


async def run_bench(args: argparse.Namespace, routes: dict[str, str], model: str, node_procs: dict[str, Proc]) -> dict:
    report: dict[str, Any] = {}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        for base in routes.values():
            await wait_model(session, base, model)
        if "local" in routes:  # a key made on the serving node, through its admin API (loopback)
            async with session.post(routes["local"] + "/quorum/admin/keys", json={"name": "bench"}) as r:
                assert r.status == 201, (r.status, await r.text())
                KEYS[routes["local"]] = {"Authorization": f"Bearer {(await r.json())['key']}"}
        print(f"\n== non-streamed request, concurrency 1 ({args.requests} each, interleaved)")
        lat = await latency(session, routes, model, args.requests, args.max_tokens)
        d50, d99 = pct(lat["direct"], 0.5), pct(lat["direct"], 0.99)
        print(f"  {'direct':7s} p50 {fmt_ms(d50)}  p99 {fmt_ms(d99)}")
        for name in routes:
            if name == "direct":
                continue
            p50, p99 = pct(lat[name], 0.5), pct(lat[name], 0.99)
            print(
                f"  {name:7s} p50 {fmt_ms(p50)}  p99 {fmt_ms(p99)}   added p50 {fmt_ms(p50 - d50)}  "
                f"added p99 {fmt_ms(p99 - d99)}"
            )
            report[f"{name}_added_p50_ms"] = (p50 - d50) * 1000
            report[f"{name}_added_p99_ms"] = (p99 - d99) * 1000

        print(f"\n== time to first token, streamed, concurrency 1 ({args.ttft_requests} each)")
        tt = await ttft(session, routes, model, args.ttft_requests, max_tokens=4)
        d = statistics.median(tt["direct"])
        print(f"  {'direct':7s} p50 {fmt_ms(d)}")
        for name in routes:
            if name != "direct":
                m = statistics.median(tt[name])
                extra = f"  ({(m - d) / d * 100:.1f} % of the engine's own TTFT)" if args.engine == "llama" else ""
                print(f"  {name:7s} p50 {fmt_ms(m)}   added {fmt_ms(m - d)}{extra}")
                report[f"{name}_added_ttft_ms"] = (m - d) * 1000

        args.rounds = args.rounds or 3
        print(f"\n== delivered stream tokens/s (median of {args.rounds} interleaved round(s))")
        cpu_lines: list[str] = []
        for c in args.streams:
            samples: dict[str, list[float]] = {name: [] for name in routes}
            cpu: dict[str, dict[str, float]] = {name: {} for name in routes}  # route -> process -> CPU s
            delivered: dict[str, int] = dict.fromkeys(routes, 0)
            first: dict[str, list[float]] = {name: [] for name in routes}  # the last stream's first token
            body: dict[str, list[float]] = {name: [] for name in routes}  # the longest stream after it
            for _ in range(args.rounds):  # interleaved rounds, so drift hits every route alike
                for name, base in routes.items():
                    procs = {label: p for label, p in node_procs.items() if label in ROUTE_PROCS.get(name, ())}
                    before = {label: p.cpu_s() for label, p in procs.items()}
                    rate, tokens, last_first, longest = await throughput(session, base, model, c, args.max_tokens)
                    samples[name].append(rate)
                    first[name].append(last_first)
                    body[name].append(longest)
                    delivered[name] += tokens
                    for label, p in procs.items():
                        cpu[name][label] = cpu[name].get(label, 0.0) + p.cpu_s() - before[label]
            rates = {name: statistics.median(xs) for name, xs in samples.items()}
            line = _rates_line(c, rates, report, "ratio")
            for name in routes:
                if name != "direct" and cpu[name] and delivered[name]:
                    per = {label: s * 1e6 / delivered[name] for label, s in cpu[name].items()}
                    total = sum(per.values())
                    report[f"{name}_cpu_us_per_token_{c}"] = total
                    # the cores this route needs to deliver the direct rate: what a machine must have spare
                    cores = total * rates["direct"] / 1e6
                    cpu_lines.append(
                        f"  {c:4d} streams, {name}: "
                        + ", ".join(f"{PROC_LABELS.get(label, label)} {us:.1f}" for label, us in per.items())
                        + f" us/token; {total:.1f} in all = {cores:.2f} cores at the direct rate"
                    )
            print(line)
            if c >= 64:  # where the time goes: all streams are sent at once, so the last to start sets the wall
                print(
                    "        last first token / longest stream after it (median ms): "
                    + "; ".join(
                        f"{name} {statistics.median(first[name]) * 1000:.0f} / "
                        f"{statistics.median(body[name]) * 1000:.0f}"
                        for name in routes
                    )
                )
            for name in routes:
                report[f"{name}_last_first_token_ms_{c}"] = statistics.median(first[name]) * 1000
        if args.steady_s and args.streams:
            c = max(args.streams)
            print(
                f"\n== delivered stream tokens/s, {c} streams kept open ({args.steady_s:g} s counted after "
                f"{args.steady_warmup_s:g} s; each client starts its next stream as its last ends)"
            )
            rates = {
                name: await steady(session, base, model, c, args.max_tokens, args.steady_s, args.steady_warmup_s)
                for name, base in routes.items()
            }
            print(_rates_line(c, rates, report, "steady_ratio"))
        if cpu_lines:
            print("\n== CPU per delivered token (the route's own processes, user + system; needs no quiet machine)")
            print("\n".join(cpu_lines))
        for name, proc in node_procs.items():
            report[f"{name}_peak_rss_mb"] = proc.peak_rss_mb()
            print(f"\n  peak RSS of node {name}: {report[f'{name}_peak_rss_mb']:.1f} MiB")
    return report


# ---------------------------------------------------------------------------
# The Ollama surface against the OpenAI surface (issue 10): the same node, the same engine, one run


async def one_ollama_stream(
    session: aiohttp.ClientSession, base: str, model: str, max_tokens: int | None
) -> tuple[float, int, float]:
    """(time to first token, content tokens, total time) of one streamed ``/api/chat`` (NDJSON)."""
    options: dict[str, Any] = {"temperature": 0}
    if max_tokens:
        options["num_predict"] = max_tokens
    body = {"model": model, "messages": CHAT["messages"], "stream": True, "options": options}
    t0 = time.perf_counter()
    ttft = -1.0
    n = 0
    buf = b""
    async with session.post(base + "/api/chat", json=body) as r:
        assert r.status == 200, (base, r.status, await r.text())
        async for chunk in r.content.iter_any():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if b'"done":false' in line and b'"content":""' not in line:
                    if ttft < 0:
                        ttft = time.perf_counter() - t0
                    n += 1
    return ttft, n, time.perf_counter() - t0


async def surface_bench(args: argparse.Namespace, base: str, model: str) -> dict[str, float]:
    """Time to first token and delivered tokens/s of the Ollama surface relative to the OpenAI surface."""
    report: dict[str, float] = {}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await wait_model(session, base, model)
        kinds = {"openai": one_stream, "ollama": one_ollama_stream}
        for fn in kinds.values():  # warm connections and code paths
            for _ in range(10):
                await fn(session, base, model, 4)
        print("\n== the Ollama surface against the OpenAI surface, same node and engine (local route)")
        tt: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.ttft_requests):  # interleaved, so drift hits both alike
            for name, fn in kinds.items():
                tt[name].append((await fn(session, base, model, 4))[0])
        o, m = statistics.median(tt["openai"]), statistics.median(tt["ollama"])
        print(
            f"  time to first token p50: openai {fmt_ms(o)}  ollama {fmt_ms(m)}  added {fmt_ms(m - o)}"
            "  (goal <= 0.5 ms)"
        )
        report["ollama_added_ttft_ms"] = (m - o) * 1000
        for c in args.streams:
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(args.rounds or 3):
                for name, fn in kinds.items():
                    t0 = time.perf_counter()
                    results = await asyncio.gather(*(fn(session, base, model, args.max_tokens) for _ in range(c)))
                    samples[name].append(sum(n for _, n, _ in results) / (time.perf_counter() - t0))
            rates = {k: statistics.median(v) for k, v in samples.items()}
            ratio = rates["ollama"] / rates["openai"]
            print(
                f"  {c:4d} streams: openai {rates['openai']:9.1f} tok/s | ollama {rates['ollama']:9.1f} tok/s"
                f" = {ratio * 100:5.1f} %" + ("  (goal >= 98 %)" if c == 64 else "")
            )
            report[f"ollama_ratio_{c}"] = ratio
    return report


# ---------------------------------------------------------------------------
# The Responses and Messages surfaces against Chat Completions (issue 11): same node, same engine, one run


async def _one_named_sse(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], first: bytes
) -> tuple[float, int, float]:
    """(time to first token, tokens, total time) of a stream of named SSE events; ``first`` marks a token."""
    t0 = time.perf_counter()
    ttft = -1.0
    n = 0
    buf = b""
    async with session.post(url, json=body) as r:
        assert r.status == 200, (url, r.status, await r.text())
        async for chunk in r.content.iter_any():
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if ev.startswith(first):
                    if ttft < 0:
                        ttft = time.perf_counter() - t0
                    n += 1
    return ttft, n, time.perf_counter() - t0


async def one_responses_stream(
    session: aiohttp.ClientSession, base: str, model: str, max_tokens: int | None
) -> tuple[float, int, float]:
    body: dict[str, Any] = {"model": model, "input": CHAT["messages"], "stream": True, "store": False}
    if max_tokens:
        body["max_output_tokens"] = max_tokens
    return await _one_named_sse(session, base + "/v1/responses", body, b"event: response.output_text.delta")


async def one_messages_stream(
    session: aiohttp.ClientSession, base: str, model: str, max_tokens: int | None
) -> tuple[float, int, float]:
    body = {"model": model, "messages": CHAT["messages"], "stream": True, "max_tokens": max_tokens or 4096}
    return await _one_named_sse(session, base + "/v1/messages", body, b"event: content_block_delta")


async def translated_surfaces_bench(args: argparse.Namespace, base: str, model: str) -> dict[str, float]:
    """Time to first token through /v1/responses and /v1/messages relative to /v1/chat/completions."""
    report: dict[str, float] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await wait_model(session, base, model)
        kinds = {"chat": one_stream, "responses": one_responses_stream, "messages": one_messages_stream}
        for fn in kinds.values():  # warm connections and code paths
            for _ in range(10):
                await fn(session, base, model, 4)
        print("\n== the Responses and Messages surfaces against Chat Completions, same node and engine (local)")
        tt: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.ttft_requests):  # interleaved, so drift hits all alike
            for name, fn in kinds.items():
                tt[name].append((await fn(session, base, model, 4))[0])
        chat = statistics.median(tt["chat"])
        line = f"  time to first token p50: chat {fmt_ms(chat)}"
        for name in ("responses", "messages"):
            m = statistics.median(tt[name])
            line += f"  {name} {fmt_ms(m)} (added {fmt_ms(m - chat)})"
            report[f"{name}_added_ttft_ms"] = (m - chat) * 1000
        print(line + "  (goal <= 0.5 ms)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--engine", choices=("fake", "llama"), default="fake")
    ap.add_argument(
        "--routes",
        default="local,lan,relay",
        help="comma list of local, lan, relay; ollama: the Ollama surface against the OpenAI one; "
        "surfaces: Responses and Messages against Chat Completions",
    )
    ap.add_argument("--requests", type=int, default=300, help="non-streamed requests per route")
    ap.add_argument("--ttft-requests", type=int, default=100)
    ap.add_argument("--streams", default="1,16,64,256", help="concurrency levels")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per fake stream")
    ap.add_argument("--token-interval-ms", type=float, default=20.0, help="fake engine's time between tokens")
    ap.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (llama: 32)")
    ap.add_argument("--rounds", type=int, default=None, help="throughput rounds per level (median; default 3, llama 5)")
    ap.add_argument(
        "--steady-s",
        type=float,
        default=6.0,
        help="also measure the highest level with its streams kept open, over this many seconds (0: not)",
    )
    ap.add_argument("--steady-warmup-s", type=float, default=3.0)
    ap.add_argument("--json", action="store_true", help="also print the report as JSON")
    ap.add_argument("--keep-logs", action="store_true", help="keep the processes' log files (their paths are printed)")
    ap.add_argument("--serve-engine", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global KEEP_LOGS
    KEEP_LOGS = args.keep_logs
    if args.serve_engine:
        serve_engine(args.tokens, args.token_interval_ms / 1000)
        return 0
    args.streams = [int(x) for x in args.streams.split(",") if x]
    wanted = [r for r in args.routes.split(",") if r]
    procs: list[Proc] = []
    node_procs: dict[str, Proc] = {}
    engine_proc = None
    try:
        if args.engine == "fake":
            engine_proc = Proc(
                [
                    PY,
                    str(Path(__file__)),
                    "--serve-engine",
                    "--tokens",
                    str(args.tokens),
                    "--token-interval-ms",
                    str(args.token_interval_ms),
                ]
            )
            procs.append(engine_proc)
            engine_url = f"http://127.0.0.1:{engine_proc.read_json_line('stdout', 'port')['port']}"
            kind, model = "vllm", "bench-model"
        else:
            from quorum_node.embedded.fetch import ensure_llama_server, ensure_model
            from quorum_node.settings import load_settings

            cache = Path(load_settings().cache_dir)
            binary, gguf = ensure_llama_server(cache), ensure_model(cache)
            import socket

            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            engine_proc = Proc(
                [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", "4096", "-np", "4"],
                quiet=True,
            )
            procs.append(engine_proc)
            engine_url = f"http://127.0.0.1:{port}"
            kind, model = "llamacpp", gguf.name.removesuffix(".gguf")
            if args.max_tokens is None:
                args.max_tokens = 32
            if args.rounds is None:
                args.rounds = 5
            args.streams = [s for s in args.streams if s <= 4] or [1, 4]
        routes = {"direct": engine_url}
        tmp = tempfile.mkdtemp(prefix="quorum-bench-")
        for name in ("B", "A", "B0", "C"):  # B founds the cluster, the others are admitted
            enrol(Path(tmp), "bench", "bench", Path(tmp) / name, name)
        cluster = ["--no-mdns"]
        relay_args: list[str] = []
        if "relay" in wanted:
            token = "bench-relay-token-0123456789"
            relay_proc = Proc(
                [
                    PY,
                    "-m",
                    "quorum_relay",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--token",
                    token,
                    "--log-format",
                    "json",
                ]
            )
            procs.append(relay_proc)
            relay_port = relay_proc.read_json_line("stderr", "relay_started", 60)["port"]
            relay_proc.drain_stderr()
            relay_args = ["--relay", f"ws://127.0.0.1:{relay_port}", "--relay-token", token]
            node_procs["relay (the relay itself)"] = relay_proc
        if wanted:
            b, b_url, b_peer_port = start_node_and_port(
                "B", f"{tmp}/B", ["--backend", f"{kind}={engine_url}", *cluster, *relay_args]
            )
            procs.append(b)
            node_procs["local"] = b
            if "local" in wanted:
                routes["local"] = b_url
            if "lan" in wanted:
                a, a_url, _ = start_node_and_port("A", f"{tmp}/A", [*cluster, "--peer", f"127.0.0.1:{b_peer_port}"])
                procs.append(a)
                node_procs["lan"] = a
                routes["lan"] = a_url
            if "ledger" in wanted:  # B again with no ledger and no metrics: what they cost is local - bare
                b0, b0_url, _ = start_node_and_port(
                    "B0", f"{tmp}/B0", ["--backend", f"{kind}={engine_url}", *cluster, "--no-ledger", "--no-metrics"]
                )
                procs.append(b0)
                node_procs["bare"] = b0
                routes["bare"] = b0_url
            if "relay" in wanted:  # node C reaches B only through the relay
                c, c_url, _ = start_node_and_port("C", f"{tmp}/C", [*cluster, *relay_args])
                procs.append(c)
                node_procs["relay"] = c
                routes["relay"] = c_url
        print(f"engine: {args.engine} at {engine_url}; routes: {', '.join(routes)}")
        if args.engine == "fake":
            print(f"fake engine: {args.tokens} tokens per stream, {args.token_interval_ms:g} ms apart")
        report = _run(run_bench(args, routes, model, node_procs)) if len(routes) > 1 else {}
        if "ollama" in wanted:
            report.update(_run(surface_bench(args, b_url, model)))
        if "surfaces" in wanted:
            report.update(_run(translated_surfaces_bench(args, b_url, model)))
        if "ledger" in wanted and "local_added_p50_ms" in report and "bare_added_p50_ms" in report:
            print(
                "\n== keys, ledger and metrics: local (on: each request carries an API key, its record is stored "
                "and counted) against bare (--no-ledger --no-metrics, no key)"
            )
            for what, key in (("added p50, non-streamed", "added_p50_ms"), ("added TTFT p50", "added_ttft_ms")):
                on, off = report[f"local_{key}"], report[f"bare_{key}"]
                print(f"  {what}: on {on:.3f} ms, off {off:.3f} ms, cost {on - off:+.3f} ms  (goal <= 0.1 ms)")
                report[f"ledger_cost_{key}"] = on - off
            for c in args.streams:
                if f"local_ratio_{c}" in report and f"bare_ratio_{c}" in report:
                    d = (report[f"local_ratio_{c}"] - report[f"bare_ratio_{c}"]) * 100
                    print(
                        f"  {c:4d} streams: on {report[f'local_ratio_{c}'] * 100:.1f} %, off "
                        f"{report[f'bare_ratio_{c}'] * 100:.1f} % of direct, cost {-d:+.1f} points"
                        + ("  (goal <= 1 %)" if c == 64 else "")
                    )
                    report[f"ledger_cost_ratio_{c}"] = -d / 100
        if args.json:
            print(json.dumps(report, indent=2))
    finally:
        for p in reversed(procs):
            p.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
