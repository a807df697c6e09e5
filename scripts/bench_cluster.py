"""Conversations against real engines: does each keep to the engine that has its prompt cached? (issue 21)

The workload: ``--conversations`` conversations (12), each opening with its own
document of about ``--doc-tokens`` tokens (1,000; the issue's runs used 1,900,
which takes about 20 minutes here; deterministic text, sized with the engine's
own ``/tokenize``) and going on for ``--turns`` turns (5), every answer
(``--max-tokens``, 16, greedy) and a new question appended to its history.
Turns are sent in order; the conversations of a turn are sent together, and
each conversation is sequential in itself.

Routes, each measured on three fresh llama-servers (SmolLM2-135M, started for
the route and stopped after it, so no route is helped by another's cache):

  sticky                client → engine c % 3 itself: the ideal, and the baseline
  one-node              client → one node in front of the three engines
  three-nodes           three nodes with one engine each; turn t enters at node t % 3
  one-node-no-affinity  one-node with ``affinity = false``: the routing before issue 21, for the record
  overload              a light key's requests in turn, alone, with a heavy key keeping every slot of the
                        three engines busy, and keeping twice that many going, through one node (its queue)
  overload-direct       the same straight to the engines, each queueing in arrival order (for the record)

What each engine evaluated is read from the engine itself
(``llamacpp:prompt_tokens_total`` of its ``/metrics``, the prompt tokens it did
not take from its cache); what was sent, from the answers'
``usage.prompt_tokens``. Goals, for the node routes with affinity: evaluated
≤ 1.05 × sticky's, every engine ≥ 20 % of the evaluated work, p90 latency
≤ 1.2 × sticky's, of all requests and of the turns after the first (the first
turns, every document evaluated on every route, weigh heavily in the p90 of
all). Overload's goals: no 5xx, the queue's waits reported (the node's
records), the light key's p90 with twice the engines' slots going ≤ 1.5 ×
its p90 alone. Exit status 0 when they all hold.

Nodes run as subprocesses (``quorum-node run``, started as ``scripts/bench``
starts them: ``bench.start_node_and_port``), on 127.0.0.1 with mDNS off and the
node's own defaults otherwise; their engines and ``affinity`` come from a TOML
file written per node; the three of ``three-nodes`` are members of one cluster
and name each other as static peers. The engines run under this process
(``LlamaServerProcess``), one thread each (``--engine-threads``), with
``--metrics`` and four slots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import socket
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import aiohttp
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, Proc, _run, pct, start_node_and_port, wait_model

sys.path.insert(0, str(ROOT))
from quorum_node.embedded.supervisor import LlamaServerProcess
from tests.conversations import opening, sentences
from tests.members_support import enrol

ENGINES = 3
SLOTS = 4
CONVERSATION_ROUTES = ("sticky", "one-node", "three-nodes", "one-node-no-affinity")
OVERLOAD_ROUTES = ("overload", "overload-direct")
OVERLOAD_FACTOR = 2  # the heavy key keeps this many requests going per slot of the engines
GOAL_LIGHT_P90 = 1.5  # the light key's p90 under the flood, x its p90 alone
FLOOD_CAP_S = 600.0  # the flood stops by itself after this long, whatever happens
ROUTES = CONVERSATION_ROUTES + OVERLOAD_ROUTES
GOAL_EVALUATED = 1.05  # × sticky's
GOAL_SHARE = 0.20  # of the route's evaluated tokens, each engine
GOAL_P90 = 1.2  # × sticky's
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 600.0  # one turn of a long document on a busy two-core machine takes a while
RECORD_ONLY = {"sticky", "one-node-no-affinity"}  # measured, but the goals are not theirs

# ---------------------------------------------------------------------------
# The workload


async def count_tokens(http: aiohttp.ClientSession, engine: str, text: str) -> int:
    async with http.post(engine + "/tokenize", json={"content": text}) as r:
        r.raise_for_status()
        return len((await r.json())["tokens"])


async def document(http: aiohttp.ClientSession, engine: str, seed: int, tokens: int) -> str:
    """Conversation ``seed``'s own text, just over ``tokens`` tokens by the engine's tokenizer (deterministic)."""
    out: list[str] = []
    for sentence in sentences(seed):
        out.append(sentence)
        if len(out) % 16 == 0:
            text = " ".join(out)
            if await count_tokens(http, engine, text) >= tokens:
                return text
    raise AssertionError("unreachable: sentences never ends")


@dataclass
class Result:
    """One route's run."""

    route: str
    sent: int = 0  # prompt tokens, as the answers' usage counts them
    evaluated: list[int] = field(default_factory=list)  # per engine, from its /metrics
    latencies: list[tuple[int, float]] = field(default_factory=list)  # (turn, seconds), every request
    cached: int | None = 0  # usage.prompt_tokens_details.cached_tokens summed, where every answer had it
    served: dict[int, set[str]] = field(default_factory=dict)  # conversation -> X-Quorum-Node of its turns
    wall_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.evaluated)

    def p90(self, *, later: bool = False) -> float:
        """p90 latency of every request, or (``later``) of the turns after the first: those a cache can serve."""
        return pct([s for t, s in self.latencies if t > 0 or not later], 0.9)

    def row(self, sticky: Result | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sent": self.sent,
            "evaluated": self.total,
            "reuse": 1 - self.total / self.sent if self.sent else None,
            "engine_shares": [e / self.total if self.total else 0.0 for e in self.evaluated],
            "p50_s": pct([s for _, s in self.latencies], 0.5),
            "p90_s": self.p90(),
            "p90_later_turns_s": self.p90(later=True),
            "wall_s": self.wall_s,
        }
        if self.cached is not None:
            out["cached_tokens"] = self.cached
        if self.route == "three-nodes":  # the other routes have one way in
            out["conversations_on_one_node"] = sum(1 for s in self.served.values() if len(s) == 1)
        if sticky is not None and sticky.total and sticky.latencies:
            out["evaluated_vs_sticky"] = self.total / sticky.total
            out["p90_vs_sticky"] = self.p90() / sticky.p90()
            out["p90_later_turns_vs_sticky"] = self.p90(later=True) / sticky.p90(later=True)
        return out


async def converse(
    http: aiohttp.ClientSession,
    model_id: str,
    docs: Sequence[str],
    entry: Callable[[int, int], str],
    turns: int,
    max_tokens: int,
    result: Result,
) -> None:
    """Every conversation's turns; turn t of conversation c is sent to ``entry(c, t)`` (a base URL)."""
    history = {c: opening(doc) for c, doc in enumerate(docs)}

    async def turn(c: int, t: int) -> None:
        body = {"model": model_id, "messages": history[c], "max_tokens": max_tokens, "temperature": 0}
        t0 = time.perf_counter()
        async with http.post(entry(c, t) + "/v1/chat/completions", json=body) as r:
            answer = await r.json(content_type=None)
            assert r.status == 200, (r.status, answer)
            node = r.headers.get("X-Quorum-Node")
        result.latencies.append((t, time.perf_counter() - t0))
        usage = answer["usage"]
        result.sent += usage["prompt_tokens"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        result.cached = None if cached is None or result.cached is None else result.cached + cached
        if node is not None:
            result.served.setdefault(c, set()).add(node)
        history[c] = [
            *history[c],
            {"role": "assistant", "content": answer["choices"][0]["message"]["content"] or ""},
            {"role": "user", "content": f"And what does it say about point {t + 2}?"},
        ]

    for t in range(turns):
        await asyncio.gather(*(turn(c, t) for c in range(len(docs))))


# ---------------------------------------------------------------------------
# Engines and nodes


async def evaluated(http: aiohttp.ClientSession, engine: str) -> int:
    """The prompt tokens ``engine`` has evaluated since it started (not those it took from its cache)."""
    async with http.get(engine + "/metrics") as r:
        r.raise_for_status()
        for line in (await r.text()).splitlines():
            if line.startswith("llamacpp:prompt_tokens_total "):
                return int(float(line.split()[1]))
    raise RuntimeError(f"{engine}/metrics has no llamacpp:prompt_tokens_total")


class Engines:
    """Three fresh llama-servers for one route."""

    def __init__(self, binary: Path, model: Path, args: argparse.Namespace) -> None:
        per_slot = args.doc_tokens + args.turns * (args.max_tokens + 48) + 256  # the longest conversation, with room
        self.procs = [
            LlamaServerProcess(
                binary,
                model,
                ctx_size=SLOTS * per_slot,  # one unified KV cache (llama-server's default with several slots)
                threads=args.engine_threads,
                extra_args=["--metrics", "-np", str(SLOTS)],
            )
            for _ in range(ENGINES)
        ]

    async def __aenter__(self) -> list[str]:
        try:
            for p in self.procs:
                await p.start()
            for p in self.procs:
                await p.wait_ready(READY_TIMEOUT_S)
        except BaseException:
            await self.__aexit__()
            raise
        return [p.url for p in self.procs]

    async def __aexit__(self, *_: object) -> None:
        for p in self.procs:
            await p.stop()


@dataclass
class Nodes:
    """The node subprocesses of one route (stopped by ``stop``)."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def start(
        self,
        name: str,
        backends: Sequence[tuple[str, str]],
        *,
        affinity: bool = True,
        peer_port: int = 0,
        peers: Sequence[int] = (),
        extra: Sequence[str] = (),
    ) -> str:
        """A node (``quorum-node run``) with ``backends`` (name, url); ``extra``: more TOML lines, top level."""
        data_dir = self.tmp / name
        enrol(self.tmp, "bench-cluster", "bench-cluster", data_dir, name)
        config = self.tmp / f"{name}.toml"
        lines = [f"affinity = {str(affinity).lower()}", *extra]
        for engine_name, url in backends:
            lines += ["[[backends]]", 'kind = "llamacpp"', f'url = "{url}"', f'name = "{engine_name}"']
        config.write_text("\n".join(lines) + "\n")
        extra = ["--config", str(config), "--no-mdns", "--peer-port", str(peer_port)]
        extra += [a for p in peers for a in ("--peer", f"127.0.0.1:{p}")]
        proc, url, _ = start_node_and_port(name, str(data_dir), extra)
        self.procs.append(proc)
        self.urls.append(url)
        return url

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free now. Static peers are named before they start, so their peer ports are
    chosen first (on a quiet loopback the race with another program taking one meanwhile is remote)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


async def wait_holders(http: aiohttp.ClientSession, urls: Sequence[str], model_id: str, count: int) -> None:
    """Until every node lists the model with ``count`` nodes holding it (their catalogs name their engines)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for url in urls:
        while True:
            try:
                async with http.get(url + "/v1/models") as r:
                    listed = (
                        {m["id"]: m.get("nodes") or [] for m in (await r.json())["data"]} if r.status == 200 else {}
                    )
            except aiohttp.ClientError:
                listed = {}
            if len(listed.get(model_id, [])) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} never saw {count} holders of {model_id}: {listed}")
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------
# Routes


async def run_route(
    route: str, args: argparse.Namespace, binary: Path, model: Path, docs: Sequence[str], tmp: Path
) -> Result:
    result = Result(route)
    model_id = model.name.removesuffix(".gguf")  # the node names a GGUF model by its file stem
    nodes = Nodes(tmp / route)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with Engines(binary, model, args) as engines, aiohttp.ClientSession(timeout=timeout) as http:
        try:
            entry: Callable[[int, int], str]
            if route == "sticky":
                entry = lambda c, t: engines[c % ENGINES]  # noqa: E731
            elif route in ("one-node", "one-node-no-affinity"):
                backends = [(f"e{i}", e) for i, e in enumerate(engines)]
                url = await asyncio.to_thread(nodes.start, "n0", backends, affinity=route == "one-node")
                await wait_model(http, url, model_id, READY_TIMEOUT_S)
                entry = lambda c, t: url  # noqa: E731
            elif route == "three-nodes":
                ports = free_ports(ENGINES)  # each node names the other two as its static peers
                for i, e in enumerate(engines):
                    others = [p for p in ports if p != ports[i]]
                    await asyncio.to_thread(nodes.start, f"n{i}", [(f"e{i}", e)], peer_port=ports[i], peers=others)
                await wait_holders(http, nodes.urls, model_id, ENGINES)
                entry = lambda c, t: nodes.urls[t % ENGINES]  # noqa: E731
            else:
                raise ValueError(f"unknown route {route!r}")
            before = [await evaluated(http, e) for e in engines]
            t0 = time.perf_counter()
            await converse(http, model_id, docs, entry, args.turns, args.max_tokens, result)
            result.wall_s = time.perf_counter() - t0
            result.evaluated = [await evaluated(http, e) - b for e, b in zip(engines, before, strict=True)]
        finally:
            nodes.stop()
    return result


# ---------------------------------------------------------------------------
# Overload: a heavy key floods the engines, a light key goes on (the admission queue)


@dataclass
class Overload:
    """One overload route's run: the light key's latencies in three phases, and what the flood got."""

    route: str
    alone: list[float] = field(default_factory=list)  # nothing else running
    full: list[float] = field(default_factory=list)  # the heavy key keeps every slot busy, no more
    flooded: list[float] = field(default_factory=list)  # the heavy key keeps OVERLOAD_FACTOR x the slots going
    statuses: Counter[int] = field(default_factory=Counter)  # every answer while the heavy key ran, both keys
    heavy_served: int = 0  # during the flood
    waits: dict[str, list[float]] | None = None  # the node's records: each key's queue waits in the flood, seconds

    def row(self) -> dict[str, Any]:
        alone, full, flooded = (pct(x, 0.9) for x in (self.alone, self.full, self.flooded))
        out: dict[str, Any] = {
            "light_p90_alone_s": alone,
            "light_p90_full_s": full,
            "light_p90_flooded_s": flooded,
            "light_p90_vs_alone": flooded / alone,
            "light_p90_vs_full": flooded / full,
            "statuses": dict(sorted(self.statuses.items())),
            "server_errors": sum(n for s, n in self.statuses.items() if s >= 500),
            "heavy_served": self.heavy_served,
        }
        if self.waits is not None:
            for who, waits in self.waits.items():
                out[f"{who}_queued"] = sum(1 for w in waits if w > 0)
                out[f"{who}_queue_wait_p90_s"] = pct(waits, 0.9) if waits else 0.0
        return out


def short_prompt(who: str, i: int) -> list[dict[str, str]]:
    """A request of its own (no prompt shared with another beyond its first words), about 80 tokens."""
    text = " ".join(islice(sentences(zlib.crc32(f"{who}/{i}".encode())), 6))
    return [{"role": "user", "content": f"{text} Say what this is about."}]


async def ask(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], model_id: str, who: str, i: int, max_tokens: int
) -> tuple[int, float]:
    """One request; its status and latency (an error is counted, never raised)."""
    body = {"model": model_id, "messages": short_prompt(who, i), "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    try:
        async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            await r.read()
            status = r.status
    except aiohttp.ClientError:
        status = 599  # the connection broke: as bad as a 5xx
    return status, time.perf_counter() - t0


async def queue_waits(http: aiohttp.ClientSession, url: str, since: float) -> dict[str, list[float]]:
    """Each key's queue waits (seconds; 0: it did not wait) from the node's last 1,000 records since ``since``."""
    async with http.get(url + "/quorum/admin/recent", params={"limit": "1000"}) as r:
        r.raise_for_status()
        records = (await r.json())["records"]
    out: dict[str, list[float]] = {}
    for rec in records:
        if rec["time"] >= since and rec.get("operation") == "chat":
            out.setdefault(rec.get("key_name") or "", []).append((rec.get("queue_ms") or 0.0) / 1000)
    return out


async def run_overload(route: str, args: argparse.Namespace, binary: Path, model: Path, tmp: Path) -> Overload:
    """The light key's requests, one after another: alone, while the heavy key keeps every slot of the engines
    busy, and while it keeps ``OVERLOAD_FACTOR`` x that many going. ``overload`` goes through one node (its
    queue takes turns across keys); ``overload-direct`` straight to the engines, each of which queues in
    arrival order (for the record)."""
    result = Overload(route)
    model_id = model.name.removesuffix(".gguf")
    nodes = Nodes(tmp / route)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        Engines(binary, model, args) as engines,
        aiohttp.ClientSession(timeout=timeout, connector=connector) as http,
    ):
        try:
            keys: dict[str, dict[str, str]] = {"light": {}, "heavy": {}}
            url = ""
            if route == "overload":
                backends = [(f"e{i}", e) for i, e in enumerate(engines)]
                url = await asyncio.to_thread(nodes.start, "n0", backends)
                await wait_model(http, url, model_id, READY_TIMEOUT_S)
                for who in keys:
                    async with http.post(url + "/quorum/admin/keys", json={"name": who}) as r:
                        r.raise_for_status()
                        keys[who] = {"Authorization": f"Bearer {(await r.json())['key']}"}
            entry: Callable[[int], str] = (lambda i: url) if url else (lambda i: engines[i % ENGINES])
            sent = 0  # every request its own prompt

            async def light(into: list[float]) -> None:
                nonlocal sent
                for _ in range(args.light_requests):
                    sent += 1
                    status, seconds = await ask(
                        http, entry(sent), keys["light"], model_id, "light", sent, args.max_tokens
                    )
                    if into is not result.alone:
                        result.statuses[status] += 1
                    elif status != 200:
                        raise RuntimeError(f"{route}: the light key alone got {status}")
                    into.append(seconds)

            async def under(workers: int, into: list[float]) -> int:
                """The light key's requests while ``workers`` heavy requests go on at all times; heavy served."""
                stop = asyncio.Event()
                deadline = time.monotonic() + FLOOD_CAP_S
                served = 0

                async def heavy(w: int) -> None:
                    nonlocal served
                    i = 0
                    while not stop.is_set() and time.monotonic() < deadline:
                        status, _ = await ask(
                            http, entry(w + i), keys["heavy"], model_id, f"heavy{workers}/{w}", i, args.max_tokens
                        )
                        result.statuses[status] += 1
                        served += status == 200
                        i += 1

                tasks = [asyncio.create_task(heavy(w)) for w in range(workers)]
                try:
                    await asyncio.sleep(args.flood_warmup)  # every slot taken (and the queue, or the engines', full)
                    await light(into)
                finally:
                    stop.set()
                    await asyncio.gather(*tasks)  # the last heavy requests finish: bounded by their own timeout
                return served

            await light(result.alone)
            await under(ENGINES * SLOTS, result.full)
            since = time.time()
            result.heavy_served = await under(OVERLOAD_FACTOR * ENGINES * SLOTS, result.flooded)
            if url:
                result.waits = await queue_waits(http, url, since)
        finally:
            nodes.stop()
    return result


def report_overload(results: dict[str, Overload]) -> tuple[dict[str, Any], bool]:
    rows = {name: r.row() for name, r in results.items()}
    print()
    print(
        f"{'overload route':<16} {'light p90: alone s':>18} {'full s':>6} {'flooded s':>9} {'vs alone':>8} "
        f"{'vs full':>7} {'heavy served':>12} {'5xx':>4}  queue waits in the flood (node's records)"
    )
    for name, row in rows.items():
        waits = (
            ", ".join(
                f"{who} {row[f'{who}_queued']} waited, p90 {row[f'{who}_queue_wait_p90_s']:.2f} s"
                for who in ("light", "heavy")
                if f"{who}_queued" in row
            )
            or "-"
        )
        print(
            f"{name:<16} {row['light_p90_alone_s']:>18.2f} {row['light_p90_full_s']:>6.2f} "
            f"{row['light_p90_flooded_s']:>9.2f} {row['light_p90_vs_alone']:>8.2f} {row['light_p90_vs_full']:>7.2f} "
            f"{row['heavy_served']:>12} {row['server_errors']:>4}  {waits}"
        )
    print(
        f"(full: the heavy key keeps the engines' {ENGINES * SLOTS} slots busy; flooded: "
        f"{OVERLOAD_FACTOR} x that many going; statuses: "
        + "; ".join(f"{n}: " + " ".join(f"{s} x{c}" for s, c in r["statuses"].items()) for n, r in rows.items())
        + ")"
    )
    print()
    all_ok = True
    for name, row in rows.items():
        record = name != "overload"
        goals = [
            ("5xx under load", str(row["server_errors"]), row["server_errors"] == 0, "0"),
            (
                "light key's p90 flooded",
                f"{row['light_p90_vs_alone']:.2f} x alone",
                row["light_p90_vs_alone"] <= GOAL_LIGHT_P90,
                f"<= {GOAL_LIGHT_P90}",
            ),
        ]
        if not record:
            queued = row.get("heavy_queued", 0) + row.get("light_queued", 0)
            goals.append(("queue wait reported", f"{queued} requests waited", queued > 0, "> 0"))
        all_ok = judge(name, row, goals, record=record, widths=(16, 40)) and all_ok
    return rows, all_ok


# ---------------------------------------------------------------------------
# Report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def judge(
    name: str, row: dict[str, Any], goals: list[tuple[str, str, bool, str]], *, record: bool, widths: tuple[int, int]
) -> bool:
    """Print each (goal, what was measured, whether it held, the goal) of route ``name``, note them in ``row``;
    whether they all held (a route measured for the record holds whatever it measured)."""
    for goal, measured, ok, wanted in goals:
        what = f"{goal} {measured}"
        mark = "  (for the record)" if record else ""
        print(f"  {name:<{widths[0]}} {what:<{widths[1]}} (goal {wanted}): {verdict(ok)}{mark}")
        row.setdefault("goals", {})[goal] = ok
    return record or all(ok for _, _, ok, _ in goals)


def report(results: dict[str, Result]) -> tuple[dict[str, Any], bool]:
    sticky = results.get("sticky")
    rows = {name: r.row(sticky if name != "sticky" else None) for name, r in results.items()}
    print()
    print(
        f"{'route':<21} {'sent':>7} {'evaluated':>9} {'reuse':>5} {'vs sticky':>9} {'engine shares':>14} "
        f"{'p50 s':>6} {'p90 s':>6} {'(vs)':>5} {'p90 t>0':>7} {'(vs)':>5} {'wall s':>6}"
    )
    for name, row in rows.items():
        shares = " ".join(f"{s * 100:.0f}" for s in row["engine_shares"])
        print(
            f"{name:<21} {row['sent']:>7} {row['evaluated']:>9} {row['reuse']:>5.2f} "
            f"{row.get('evaluated_vs_sticky', 1):>9.2f} {shares:>14} {row['p50_s']:>6.1f} {row['p90_s']:>6.1f} "
            f"{row.get('p90_vs_sticky', 1):>5.2f} {row['p90_later_turns_s']:>7.1f} "
            f"{row.get('p90_later_turns_vs_sticky', 1):>5.2f} {row['wall_s']:>6.0f}"
        )
    print("(engine shares: % of the route's evaluated tokens; p90 t>0: the turns after the first; (vs): x sticky's)")
    print()
    all_ok = True
    for name, row in rows.items():
        if name == "sticky" or "evaluated_vs_sticky" not in row:
            continue
        low_share = min(row["engine_shares"])
        goals = [  # (name, what was measured, whether it met the goal, the goal)
            (
                "evaluated",
                f"{row['evaluated_vs_sticky']:.2f} x sticky's",
                row["evaluated_vs_sticky"] <= GOAL_EVALUATED,
                f"<= {GOAL_EVALUATED}",
            ),
            ("least engine share", f"{low_share * 100:.0f} %", low_share >= GOAL_SHARE, f">= {GOAL_SHARE * 100:.0f} %"),
            ("p90", f"{row['p90_vs_sticky']:.2f} x sticky's", row["p90_vs_sticky"] <= GOAL_P90, f"<= {GOAL_P90}"),
            (
                "p90 of turns > 0",
                f"{row['p90_later_turns_vs_sticky']:.2f} x sticky's",
                row["p90_later_turns_vs_sticky"] <= GOAL_P90,
                f"<= {GOAL_P90}",
            ),
        ]
        record = name in RECORD_ONLY
        all_ok = judge(name, row, goals, record=record, widths=(21, 36)) and all_ok
        if "conversations_on_one_node" in row:
            print(
                f"  {name:<21} conversations whose turns all had one serving node: "
                f"{row['conversations_on_one_node']} of {len(results[name].served)}"
            )
    return rows, all_ok


# ---------------------------------------------------------------------------


async def bench(args: argparse.Namespace, routes: list[str]) -> tuple[dict[str, Any], bool]:
    from quorum_node.embedded.fetch import ensure_llama_server, ensure_model
    from quorum_node.settings import load_settings

    cache = Path(load_settings().cache_dir)
    binary, model = ensure_llama_server(cache), ensure_model(cache)
    tmp = Path(tempfile.mkdtemp(prefix="quorum-bench-cluster-"))
    docs: list[str] = []
    if any(r in CONVERSATION_ROUTES for r in routes):
        one = LlamaServerProcess(binary, model, threads=args.engine_threads)  # only to size the documents
        await one.start()
        try:
            await one.wait_ready(READY_TIMEOUT_S)
            async with aiohttp.ClientSession() as http:
                docs = [await document(http, one.url, c, args.doc_tokens) for c in range(args.conversations)]
        finally:
            await one.stop()
        print(
            f"{args.conversations} conversations x {args.turns} turns, documents of ~{args.doc_tokens} tokens, "
            f"max_tokens {args.max_tokens}; {ENGINES} llama-servers ({model.name}, {SLOTS} slots, "
            f"{args.engine_threads} thread(s) each) per route"
        )
    if any(r in OVERLOAD_ROUTES for r in routes):
        print(
            f"overload: a light key's {args.light_requests} requests in turn, alone and while a heavy key keeps "
            f"{OVERLOAD_FACTOR * ENGINES * SLOTS} going on {ENGINES} llama-servers' {ENGINES * SLOTS} slots "
            f"(~80-token prompts, max_tokens {args.max_tokens})"
        )
    results: dict[str, Result] = {}
    overloads: dict[str, Overload] = {}
    try:
        for route in routes:
            print(f"  {route} ...", end="", flush=True)
            if route in OVERLOAD_ROUTES:
                overloads[route] = await run_overload(route, args, binary, model, tmp)
            else:
                results[route] = await run_route(route, args, binary, model, docs, tmp)
                print(f" {results[route].wall_s:.0f} s", end="", flush=True)
            print(flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the nodes' data dirs
    rows: dict[str, Any] = {}
    ok = True
    if results:
        rows, ok = report(results)
    if overloads:
        more, more_ok = report_overload(overloads)
        rows.update(more)
        ok = ok and more_ok
    return rows, ok


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/bench-cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--routes", default=",".join(ROUTES), help=f"comma list of {', '.join(ROUTES)}")
    ap.add_argument("--light-requests", type=int, default=20, help="the light key's requests, alone and flooded")
    ap.add_argument("--flood-warmup", type=float, default=3.0, help="seconds of flood before the light key goes on")
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument(
        "--doc-tokens", type=int, default=1000, help="each conversation's opening document (the issue: 1900)"
    )
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each answer")
    ap.add_argument("--engine-threads", type=int, default=1, help="threads of each llama-server")
    ap.add_argument("--json", action="store_true", help="also print the report as JSON")
    args = ap.parse_args(argv)
    routes = [r for r in args.routes.split(",") if r]
    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        ap.error(f"unknown routes: {', '.join(unknown)}")
    if routes and routes[0] != "sticky" and "sticky" in routes:
        routes = ["sticky", *(r for r in routes if r != "sticky")]  # the baseline first
    # the engines' supervisors log every line of their output at debug level: keep warnings only
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rows, ok = _run(bench(args, routes))
    if args.json:
        print(json.dumps(rows, indent=2, default=sorted))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
