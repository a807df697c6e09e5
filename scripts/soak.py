"""Soak: paced streams through quorum-node for minutes, with faults injected at random.

Topology (every process on 127.0.0.1, nothing else)::

    local  client ─────────────────────────────► node B ──► fake engine (vLLM wire format)
    lan    client ──► node A ──► FaultProxy ──► node B       (A has no engine; its --peer is
                                                             the proxy in front of B's peer
                                                             port: mutual TLS passes through)

A and B are members of one cluster: their data dirs are enrolled before they start,
as ``quorum-node invite`` and ``join`` would leave them (``tests/members_support.py``).

Load: ``--streams`` client loops, half on each route; half of each use the real
``openai`` SDK (max_retries=0), the other half parse the SSE themselves with aiohttp,
because the SDK does not tell a stream that ended without ``[DONE]`` from one that did.
Each loop: a streamed chat of 16..96 tokens, a short random pause (longer after an error,
as a client backs off), again.

Faults, at random:
  engine cuts   ``--cut-fraction`` of the engine's streams end after a random number of
                tokens: an RST, a FIN mid-body, a clean end of body without [DONE], or
                vLLM's in-band error event (then [DONE])
  slow readers  ``--slow-readers`` raw-socket clients (4 KiB receive buffer) that ask for a
                long stream, read it in a trickle or stop reading, then close with a FIN
                or an RST
  LAN resets    every ~``--lan-reset-every-s`` the proxy RSTs every open A↔B connection
  peer restart  every ~``--restart-every-s`` node B gets SIGTERM and is started again on
                the same ports (API and peer) and data dir (none in the last part of the run, so that its
                last incarnation is measured over a long enough stretch)

Every request ends as one of:
  success       200, every token asked for, a finish_reason, and (aiohttp clients) [DONE]
  documented    an HTTP error status with the OpenAI error body
                ``{"error":{"message","type","param","code"}}``; a stream that ends with an
                SSE ``data: {"error":…}`` event and no [DONE]; a connection refused (or
                closed before any answer) while B restarts, for a client talking to B
  violation     anything else: a stream that ends without [DONE] and without an error
                event, a 500 or an ``internal_error`` event (a bug, whatever its shape), an
                error body not in the OpenAI shape, an event that is not JSON, a hang past
                ``--client-timeout-s``, a connection error to A (never restarted)

Measurements are taken at quiet checkpoints: the load pauses, the clients close their
connections, the nodes' ``in_flight`` and the engine's open streams reach 0, then
``--settle-s`` idle. Then RSS and open fds (psutil) and, from ``/health``, asyncio tasks and
connections, for A and B; fds, tasks and connections are the minimum of a few samples, so
a periodic peer probe in flight does not read as a leak (a leak does not go away). A is
measured from the warm-up checkpoint (``--warmup-s``) to the end. B is restarted, so its
*last incarnation* is measured: from a checkpoint ``--b-warmup-s`` after its last restart
to the end.

A's idle keep-alive connections to B are dropped (an RST through the proxy) at each
checkpoint, and the engine closes idle ones after 5 s as uvicorn does, so every checkpoint
sees the same idle state whatever the load just before it was.

Goals: RSS growth under ``--rss-goal-pct`` per node, fds and tasks not above their warm-up
value plus a small slack, no engine stream left open, B stops by itself on every SIGTERM,
and 0 violations. Exit status: 0 all goals pass, 1 one failed, 2 a process did not start or
come back (the end of its log is printed), 130 interrupted. Children are in their own
process groups and get SIGTERM when this script dies; logs stay in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.faults import FaultProxy, hard_reset  # noqa: E402  (the repo's own test tools)
from tests.members_support import enrol  # noqa: E402

try:
    import openai
except ImportError:  # a test extra; without it every client parses SSE with aiohttp
    openai = None  # type: ignore[assignment]

PY = sys.executable
MODEL = "soak-model"
MESSAGES = [{"role": "user", "content": "Say something."}]
CUT_MODES = ("rst", "fin", "eof", "error")
ERROR_KEYS = frozenset({"message", "type", "param", "code"})
SLOW_READER_TOKENS = 4000  # long enough that no slow reader ever reaches the end
MIB = 1024 * 1024


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---------------------------------------------------------------------------
# The fake engine (runs as ``python scripts/soak.py --serve-engine``)


def serve_engine(interval_s: float, cut_fraction: float, seed: int) -> None:
    """A lean vLLM-shaped SSE server that cuts ``cut_fraction`` of its streams at random."""
    from aiohttp import web

    rng = random.Random(seed)
    head = {"id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    stats: dict[str, Any] = {"requests": 0, "active": 0, "completed": 0, "client_gone": 0, "cuts": Counter()}

    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    role, tok, fin = chunk({"role": "assistant", "content": ""}), chunk({"content": " tok"}), chunk({}, "length")
    cut_error = event(
        {
            "error": {
                "message": "generation failed (soak cut)",
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        }
    )

    async def cut(request: web.Request, resp: web.StreamResponse, mode: str) -> web.StreamResponse:
        if mode == "error":  # vLLM: the error event, then [DONE], then a proper end of body
            await resp.write(cut_error + b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        if mode == "eof":  # the body ends properly, but early: no finish chunk, no [DONE]
            await resp.write_eof()
            return resp
        transport = request.transport
        if mode == "rst":
            await asyncio.sleep(0.01)  # Linux drops unread data when an RST arrives: let it be read
            if transport is not None:
                hard_reset(transport)
        elif transport is not None:
            transport.close()  # FIN, mid-body
        # the connection is gone; ending the handler as cancelled is what aiohttp expects then
        raise asyncio.CancelledError

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        stats["requests"] += 1
        n = max(1, int(body.get("max_tokens") or 16))
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-soak",
                    "object": "chat.completion",
                    "created": 1,
                    "model": MODEL,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
                }
            )
        mode, cut_at = None, -1
        if rng.random() < cut_fraction:
            mode, cut_at = rng.choice(CUT_MODES), rng.randint(0, n)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        stats["active"] += 1
        try:
            await resp.prepare(request)
            await resp.write(role)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i in range(n + 1):
                if i == cut_at:
                    stats["cuts"][mode] += 1
                    return await cut(request, resp, mode)  # type: ignore[arg-type]
                if i == n:
                    break
                # paced against a schedule, so a late wake-up does not slow the whole stream
                if (delay := t0 + (i + 1) * interval_s - loop.time()) > 0:
                    await asyncio.sleep(delay)
                await resp.write(tok)
            await resp.write(fin)
            if (body.get("stream_options") or {}).get("include_usage"):
                await resp.write(
                    event(
                        {
                            **head,
                            "choices": [],
                            "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n},
                        }
                    )
                )
            await resp.write(b"data: [DONE]\n\n")
            stats["completed"] += 1
            return resp
        except ConnectionError:  # the node closed the stream (its client went away, or a cut)
            stats["client_gone"] += 1
            return resp
        finally:
            stats["active"] -= 1

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": MODEL,
                        "object": "model",
                        "created": 1,
                        "owned_by": "vllm",
                        "root": MODEL,
                        "max_model_len": 4096,
                    }
                ],
            }
        )

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0-soak"})

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response({**stats, "cuts": dict(stats["cuts"])})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/soak/stats", get_stats)

    async def main() -> None:
        # idle keep-alive connections closed after 5 s, as uvicorn (vLLM's server) does: at a
        # quiet checkpoint node B then holds no pooled engine connections, whatever the load was
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=5.0)
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
# The LAN hop's fault proxy (runs as ``python scripts/soak.py --serve-proxy PORT``, PORT: B's peer port)


def serve_proxy(target_port: int, latency_s: float) -> None:
    """`tests.faults.FaultProxy` in front of B, told what to do by JSON lines on stdin.

    Its own process, on plain asyncio: the network's work stays off the clients' event
    loop, and FaultProxy is written for asyncio's transports (under uvloop a write to a
    transport that ``reset_all`` just aborted raises RuntimeError instead of OSError).
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        proxy = await FaultProxy("127.0.0.1", target_port).start()
        proxy.latency_s = proxy.jitter_s = latency_s
        print(json.dumps({"port": proxy.port}), flush=True)
        commands = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
        try:
            while line := await commands.readline():  # EOF: the soak is over (or gone)
                cmd = json.loads(line)
                connections = proxy.connections
                match cmd["op"]:
                    case "stop_listening":
                        await proxy.stop_listening()
                    case "resume_listening":
                        await proxy.resume_listening()
                    case "reset_all":
                        proxy.reset_all()
                print(
                    json.dumps({"reply": cmd["id"], "connections": connections, "accepted": proxy.accepted}), flush=True
                )
        finally:
            await proxy.close()

    loop = asyncio.new_event_loop()  # never uvloop: see above
    try:
        loop.add_signal_handler(signal.SIGTERM, lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main())
    finally:
        loop.close()


# ---------------------------------------------------------------------------
# Child processes


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if this script dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    # no QUORUM_* setting of the caller's may change the topology
    return {**{k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")}, **extra}


def _matches(obj: dict[str, Any], key: str) -> bool:
    return key in obj or obj.get("event") == key or obj.get("reply") == key


class ChildFailed(RuntimeError):
    """A child process exited or never got ready; the message ends with its log's tail."""


class Child:
    """A subprocess in its own process group; its output goes to a log file, line by line."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.port = 0
        self.errors: list[str] = []  # log lines at level error or above
        self.warnings: Counter[str] = Counter()  # warning events by name
        self._marks: list[dict[str, Any]] = []  # lines with a port, and command replies
        self._waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self._commands = 0
        self._reader = asyncio.get_running_loop().create_task(self._read())  # awaited in stop()

    @classmethod
    async def start(
        cls,
        name: str,
        args: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        *,
        commands: bool = False,
    ) -> Child:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if commands else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
            env=_child_env(env or {}),
            start_new_session=True,
            preexec_fn=_die_with_parent,
            limit=1 << 20,
        )
        return cls(name, proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            while line := await self.proc.stdout.readline():
                text = line.decode(errors="replace")
                log.write(text)
                try:
                    obj = json.loads(text)
                except ValueError:
                    continue
                if not isinstance(obj, dict):
                    continue
                level = obj.get("level")
                if level in ("error", "critical") or obj.get("exception"):
                    self.errors.append(text.strip()[:600])
                elif level == "warning":
                    self.warnings[str(obj.get("event"))] += 1
                if "port" in obj or "peer_port" in obj or "reply" in obj:
                    self._marks.append(obj)
                    for key, fut in self._waiters:
                        if not fut.done() and _matches(obj, key):
                            fut.set_result(obj)
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(self.failed("exited"))

    def failed(self, what: str) -> ChildFailed:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-12:]
        except OSError:
            tail = []
        return ChildFailed(f"{self.name} {what}; the end of {self.log_path}:\n" + "\n".join("  " + ln for ln in tail))

    async def command(self, op: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Send ``{"op", "id"}`` on the child's stdin; its reply is a line ``{"reply": id, …}``."""
        assert self.proc.stdin is not None
        self._commands += 1
        cid = f"c{self._commands}"
        self.proc.stdin.write(json.dumps({"op": op, "id": cid}).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.wait_for(cid, timeout_s)

    async def wait_for(self, key: str, timeout_s: float) -> dict[str, Any]:
        """The first line with a port (or a peer port) and ``key`` (or event ``key``), or the reply ``key``."""
        for obj in self._marks:
            if _matches(obj, key):
                return obj
        if self._reader.done():
            raise self.failed("exited")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((key, fut))
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise self.failed(f"did not log {key} within {timeout_s:g} s") from None
        finally:
            self._waiters.remove((key, fut))

    async def stop(self, timeout_s: float = 15.0) -> tuple[int | None, float, bool]:
        """SIGTERM, then SIGKILL to the group past ``timeout_s``: (exit code, seconds, killed)."""
        t0 = time.monotonic()
        killed = False
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                killed = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # not reaped yet: the group is still its
                await self.proc.wait()
        took = time.monotonic() - t0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, 5)
        return self.proc.returncode, took, killed


# ---------------------------------------------------------------------------
# Outcomes


def openai_error(obj: Any) -> dict[str, Any] | None:
    """The error dict if ``obj`` is the OpenAI error envelope, else None."""
    err = obj.get("error") if isinstance(obj, dict) else None
    if (
        isinstance(err, dict)
        and err.keys() >= ERROR_KEYS
        and isinstance(err["message"], str)
        and isinstance(err["type"], str)
    ):
        return err
    return None


Result = tuple[str, str, str]  # (kind: ok | doc | bad | conn, reason, detail); conn is decided by the caller


def classify_http_error(status: int, body: bytes) -> Result:
    try:
        err = openai_error(json.loads(body))
    except ValueError:
        return "bad", f"HTTP {status}, body not JSON", body[:200].decode(errors="replace")
    if err is None:
        return "bad", f"HTTP {status}, body not in the OpenAI error shape", body[:200].decode(errors="replace")
    reason = f"HTTP {status} {err['code']}"
    if status == 500 or err["code"] == "internal_error":
        return "bad", reason, err["message"]
    return "doc", reason, err["message"]


def classify_error_event(err: dict[str, Any], *, done_after: bool) -> Result:
    reason = f"error event {err['code']}"
    if err["code"] == "internal_error":
        return "bad", reason, err["message"]
    if done_after:
        return "bad", f"{reason}, then [DONE]", err["message"]
    return "doc", reason, err["message"]


async def sdk_request(client: Any, n: int, timeout_s: float) -> Result:
    """One streamed chat through the openai SDK; what its user would see."""
    content, finish, got_head = 0, None, False
    try:
        async with asyncio.timeout(timeout_s):
            stream = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=n, stream=True, stream_options={"include_usage": True}
            )
            got_head = True
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        content += 1
                    if choice.finish_reason:
                        finish = choice.finish_reason
    except (TimeoutError, openai.APITimeoutError):
        return "bad", "hang: no end within the client timeout", f"{content}/{n} tokens"
    except openai.APIConnectionError as e:
        cause = e.__cause__ or e
        if got_head:  # a 200 and then the connection broke: no error event, no [DONE]
            return "bad", f"stream cut, no error event ({type(cause).__name__})", f"{content}/{n} tokens: {cause}"[:200]
        return "conn", f"connection error ({type(cause).__name__})", str(cause)[:200]
    except openai.APIStatusError as e:
        try:
            raw = e.response.content
        except Exception:  # noqa: BLE001  (the body was not read: judge what the SDK parsed)
            raw = json.dumps({"error": e.body}).encode()
        return classify_http_error(e.status_code, raw)
    except openai.APIError as e:  # the SDK raises this for an in-band error event
        err = openai_error({"error": e.body})
        if err is None:
            return "bad", "error event not in the OpenAI shape", repr(e.body)[:200]
        return classify_error_event(err, done_after=False)
    except ValueError as e:  # json.JSONDecodeError inside the SDK's SSE parsing
        return "bad", f"SDK: {type(e).__name__}", str(e)[:200]
    if finish and content == n:
        return "ok", "success", ""
    return "bad", "stream ended without an error", f"finish_reason={finish}, {content}/{n} tokens"


def _sse_data(event: bytes) -> bytes | None:
    lines = [ln[5:].removeprefix(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


async def raw_request(session: aiohttp.ClientSession, base: str, n: int, timeout_s: float) -> Result:
    """One streamed chat, the SSE parsed strictly: [DONE], error events and every event's JSON."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": n, "stream": True}
    content, finish, done, err, done_after_error = 0, None, False, None, False
    got_head = False
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(base + "/v1/chat/completions", json=body) as r:
                got_head = True
                if r.status != 200:
                    return classify_http_error(r.status, await r.read())
                if r.content_type != "text/event-stream":
                    return "bad", f"200 with Content-Type {r.content_type}", ""
                buf = b""
                async for piece in r.content.iter_any():
                    buf += piece.replace(b"\r\n", b"\n")
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        data = _sse_data(ev)
                        if data is None:
                            continue  # a comment or an empty event
                        if done:
                            return "bad", "data after [DONE]", data[:200].decode(errors="replace")
                        if data == b"[DONE]":
                            done = True
                            done_after_error = err is not None
                            continue
                        if err is not None:
                            return "bad", "data after an error event", data[:200].decode(errors="replace")
                        try:
                            obj = json.loads(data)
                        except ValueError:
                            return "bad", "event not JSON", data[:200].decode(errors="replace")
                        if isinstance(obj, dict) and "error" in obj:
                            if (err := openai_error(obj)) is None:
                                return "bad", "error event not in the OpenAI shape", data[:200].decode(errors="replace")
                            continue
                        for choice in obj.get("choices") or ():
                            if (choice.get("delta") or {}).get("content"):
                                content += 1
                            if choice.get("finish_reason"):
                                finish = choice["finish_reason"]
                if buf.strip():
                    return "bad", "body ends inside an event", buf[:200].decode(errors="replace")
    except TimeoutError:
        return "bad", "hang: no end within the client timeout", f"{content}/{n} tokens, done={done}"
    except (aiohttp.ClientError, OSError) as e:
        if not got_head:
            return "conn", f"connection error ({type(e).__name__})", str(e)[:200]
        what = "error event, then the stream cut" if err is not None else "stream cut, no [DONE], no error event"
        return "bad", f"{what} ({type(e).__name__})", f"{content}/{n} tokens: {str(e)[:160]}"
    if err is not None:
        return classify_error_event(err, done_after=done_after_error)
    if done and finish and content == n:
        return "ok", "success", ""
    if done:
        return "bad", "[DONE] without every token", f"finish_reason={finish}, {content}/{n} tokens"
    return "bad", "stream ended without [DONE] and without an error event", f"{content}/{n} tokens"


# ---------------------------------------------------------------------------
# The soak


@dataclass
class Snapshot:
    rss_mib: float
    fds: int
    tasks: int
    connections: int


@dataclass
class Checkpoint:
    label: str
    t_s: float
    b_incarnation: int
    nodes: dict[str, Snapshot]
    engine_active: int


@dataclass
class Tally:
    counts: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)  # route, client, kind, reason
    examples: dict[str, list[str]] = field(default_factory=dict)  # violations, by reason

    def add(self, route: str, client: str, kind: str, reason: str, detail: str, t_s: float) -> None:
        self.counts[route, client, kind, reason] += 1
        if kind == "bad":
            ex = self.examples.setdefault(reason, [])
            if len(ex) < 3:
                ex.append(f"t={t_s:.1f}s {route}/{client}: {detail}")

    def total(self, kind: str | None = None, route: str | None = None, client: str | None = None) -> int:
        return sum(
            n
            for (r, c, k, _), n in self.counts.items()
            if (kind is None or k == kind) and (route is None or r == route) and (client is None or c == client)
        )


class Gate:
    """Lets the load through, or holds it back and waits for what is in flight (checkpoints)."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.closing = asyncio.Event()
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_open(self, deadline: float) -> bool:
        """Wait until the gate is open; False once ``deadline`` (loop time) has passed."""
        loop = asyncio.get_running_loop()
        while not self.open.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.open.wait(), max(0.0, deadline - loop.time()))
            if loop.time() >= deadline:
                return False
        return loop.time() < deadline

    @contextlib.contextmanager
    def slot(self) -> Any:
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def hold(self, timeout_s: float) -> bool:
        self.open.clear()
        self.closing.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def release(self) -> None:
        self.closing.clear()
        self.open.set()


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.deadline = self.t0 + args.duration_s
        self.dir = Path(tempfile.mkdtemp(prefix="quorum-soak-"))
        for name in ("B", "A"):  # B founds the cluster; A is admitted
            enrol(self.dir, "soak", "soak", self.dir / name, name)
        self.gate = Gate()
        self.tally = Tally()
        self.checkpoints: list[Checkpoint] = []
        self.findings: list[str] = []
        self.restarts: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []  # B restarts: start, end (None while down), recovered_s
        self.ms_per_token: dict[str, list[float]] = {"local": [], "lan": []}  # successful streams
        self.lan_resets = 0
        self.slow_runs = Counter[str]()
        self.engine: Child | None = None
        self.a: Child | None = None
        self.b: Child | None = None
        self.old_b: list[Child] = []
        self.b_incarnation = 0
        self.b_port = 0
        self.b_peer_port = 0  # B's mutual-TLS listener for A (through the proxy)
        self.proxy: Child | None = None
        self.probe: aiohttp.ClientSession | None = None
        self.http: aiohttp.ClientSession | None = None
        self.sdk: dict[str, Any] = {}
        self.engine_url = ""
        self.use_sdk = openai is not None
        self.engine_stats: dict[str, Any] = {}

    # ------------------------------------------------------------ helpers

    def now_s(self) -> float:
        return self.loop.time() - self.t0

    def base(self, route: str) -> str:
        port = self.b_port if route == "local" else self.a.port if self.a is not None else 0
        return f"http://127.0.0.1:{port}"

    async def get_json(self, url: str) -> Any:
        assert self.probe is not None
        async with self.probe.get(url) as r:
            return await r.json(content_type=None)

    async def sleep_until(self, t_s: float) -> None:
        await asyncio.sleep(max(0.0, min(self.t0 + t_s, self.deadline) - self.loop.time()))

    def b_down_during(self, t_start: float, t_end: float) -> bool:
        grace = self.args.restart_grace_s
        return any(
            t_start <= (w["end"] if w["end"] is not None else float("inf")) + grace and t_end >= w["start"]
            for w in self.windows
        )

    def record(self, route: str, client: str, result: Result, t_start: float, t_end: float, n_tokens: int = 0) -> None:
        kind, reason, detail = result
        if kind == "conn":
            if route == "local" and self.b_down_during(t_start, t_end):
                kind, reason = "doc", f"B restarting: {reason}"
            else:
                kind = "bad"
        elif kind == "ok" and client != "slow":
            self.ms_per_token[route].append((t_end - t_start) * 1000 / n_tokens)
            if route == "lan":  # the first LAN success begun after B was back: A routes to it again
                for w in self.windows:
                    if w["end"] is not None and w["recovered_s"] is None and t_start >= w["end"]:
                        w["recovered_s"] = round(t_end - w["end"], 2)
        self.tally.add(route, client, kind, reason, detail, t_end - self.t0)

    # ----------------------------------------------------------- processes

    async def start_node(self, name: str, port: int, extra: Sequence[str], incarnation: int) -> Child:
        args = [
            PY,
            "-m",
            "quorum_node.cli",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--name",
            name,
            "--data-dir",
            str(self.dir / name),
            "--no-detect",
            "--no-embedded-engine",
            "--no-mdns",
            "--log-format",
            "json",
            "--log-level",
            self.args.node_log_level,
            *extra,
        ]
        child = await Child.start(f"node {name}#{incarnation}", args, self.dir / f"node-{name}-{incarnation}.log")
        child.port = int((await child.wait_for("node_started", 60))["port"])
        return child

    async def start_b(self) -> Child:
        b = await self.start_node(
            "B",
            self.b_port,
            ["--backend", f"vllm={self.engine_url}", "--peer-port", str(self.b_peer_port)],
            self.b_incarnation,
        )
        self.b_peer_port = int((await b.wait_for("cluster_started", 5))["peer_port"])
        return b

    async def wait_model(self, base: str, timeout_s: float = 60) -> None:
        end = self.loop.time() + timeout_s
        while self.loop.time() < end:
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError, KeyError, TypeError):
                if MODEL in {m["id"] for m in (await self.get_json(base + "/v1/models"))["data"]}:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{MODEL} never showed up at {base}")

    async def setup(self) -> None:
        a = self.args
        self.probe = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit_per_host=1), timeout=aiohttp.ClientTimeout(total=10)
        )
        self.engine = await Child.start(
            "engine",
            [
                PY,
                str(Path(__file__).resolve()),
                "--serve-engine",
                "--token-interval-ms",
                str(a.token_interval_ms),
                "--cut-fraction",
                str(a.cut_fraction),
                "--seed",
                str(a.seed),
            ],
            self.dir / "engine.log",
        )
        self.engine_url = f"http://127.0.0.1:{(await self.engine.wait_for('port', 30))['port']}"
        self.b = await self.start_b()
        self.b_port = self.b.port
        self.proxy = await Child.start(
            "proxy",
            [
                PY,
                str(Path(__file__).resolve()),
                "--serve-proxy",
                str(self.b_peer_port),
                "--lan-latency-ms",
                str(a.lan_latency_ms),
            ],
            self.dir / "proxy.log",
            commands=True,
        )
        self.proxy.port = int((await self.proxy.wait_for("port", 30))["port"])
        self.a = await self.start_node("A", 0, ["--peer", f"127.0.0.1:{self.proxy.port}"], 0)
        await self.wait_model(self.base("local"))
        await self.wait_model(self.base("lan"))
        self.open_clients()
        self.t0 = self.loop.time()  # the clock starts with the load
        self.deadline = self.t0 + a.duration_s

    def open_clients(self) -> None:
        t = self.args.client_timeout_s
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=t),
        )
        if self.use_sdk:
            # the SDK's own timeout a little later than ours, so a hang is always ours to name
            self.sdk = {
                route: openai.AsyncOpenAI(
                    base_url=self.base(route) + "/v1", api_key="soak", max_retries=0, timeout=t + 5
                )
                for route in ("local", "lan")
            }

    async def close_clients(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        for client in self.sdk.values():
            await client.close()
        self.sdk = {}

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.close_clients()
        for child in (self.a, self.b, self.proxy, self.engine):
            if child is not None:
                with contextlib.suppress(Exception):
                    await child.stop(10)
        if self.probe is not None:
            await self.probe.close()

    # ---------------------------------------------------------------- load

    async def client_loop(self, idx: int, route: str, client: str) -> None:
        rng = random.Random(self.args.seed * 1000 + idx)
        while await self.gate.wait_open(self.deadline):
            n = rng.randint(self.args.min_tokens, self.args.max_tokens)
            start = self.loop.time()
            with self.gate.slot():
                if client == "sdk":
                    result = await sdk_request(self.sdk[route], n, self.args.client_timeout_s)
                else:
                    assert self.http is not None
                    result = await raw_request(self.http, self.base(route), n, self.args.client_timeout_s)
            self.record(route, client, result, start, self.loop.time(), n)
            # after an error a client backs off (the node's 503s say Retry-After) rather than spin
            await asyncio.sleep(
                rng.uniform(0, 2 * self.args.pause_s)
                if result[0] == "ok"
                else rng.uniform(0.5, 1.5) * self.args.error_pause_s
            )

    async def slow_reader_loop(self, idx: int) -> None:
        rng = random.Random(self.args.seed * 1000 + 500 + idx)
        while await self.gate.wait_open(self.deadline):
            route = rng.choice(("local", "lan"))
            mode, close = rng.choice(("trickle", "stall")), rng.choice(("fin", "rst"))
            hold_s = min(rng.uniform(2, 10), max(0.0, self.deadline - self.loop.time()))
            start = self.loop.time()
            with self.gate.slot():
                result = await self.slow_read(int(self.base(route).rsplit(":", 1)[1]), hold_s, mode, close)
            self.slow_runs[f"{mode}+{close}"] += 1
            self.record(route, "slow", result, start, self.loop.time())
            await asyncio.sleep(rng.uniform(0.5, 2))

    async def slow_read(self, port: int, hold_s: float, mode: str, close: str) -> Result:
        """Ask for a long stream; trickle-read it or stop reading; then close. Judged on the answer's head."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # backpressure reaches the node soon
        sock.setblocking(False)
        try:
            await asyncio.wait_for(self.loop.sock_connect(sock, ("127.0.0.1", port)), 10)
        except (OSError, TimeoutError) as e:
            sock.close()
            return "conn", f"connection error ({type(e).__name__})", str(e)[:200]
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        try:
            body = json.dumps(
                {"model": MODEL, "messages": MESSAGES, "max_tokens": SLOW_READER_TOKENS, "stream": True}
            ).encode()
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (port, len(body), body)
            )
            try:
                async with asyncio.timeout(self.args.client_timeout_s):
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head.split(b" ", 2)[1])
                    if status != 200:
                        length = next(
                            (
                                int(ln.split(b":", 1)[1])
                                for ln in head.lower().split(b"\r\n")
                                if ln.startswith(b"content-length:")
                            ),
                            None,
                        )
                        rest = await (reader.readexactly(length) if length is not None else reader.read(65536))
                        return classify_http_error(status, rest)
            except TimeoutError:
                return "bad", "hang: no answer head within the client timeout", ""
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                return "conn", f"connection error ({type(e).__name__})", str(e)[:200]
            except (ValueError, IndexError, asyncio.LimitOverrunError) as e:
                return "bad", "unparsable answer head", repr(e)[:200]
            end = self.loop.time() + hold_s
            while self.loop.time() < end and not self.gate.closing.is_set():
                if mode == "trickle":
                    with contextlib.suppress(TimeoutError):
                        if not await asyncio.wait_for(reader.read(256), max(0.0, end - self.loop.time())):
                            break  # the stream ended (a cut reached it): nothing more to hold
                    await asyncio.sleep(0.2)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.gate.closing.wait(), max(0.0, end - self.loop.time()))
            return "ok", "success", ""
        finally:
            if close == "rst":
                hard_reset(writer.transport)
            else:
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def lan_reset_loop(self) -> None:
        every = self.args.lan_reset_every_s
        while True:
            await asyncio.sleep(min(self.rng.expovariate(1 / every), max(0.0, self.deadline - self.loop.time())))
            if self.loop.time() >= self.deadline:
                return
            open_ = self.gate.open.is_set() and self.proxy is not None
            if open_ and (await self.proxy.command("reset_all"))["connections"]:
                self.lan_resets += 1

    # ------------------------------------------------------- restarts, checks

    async def restart_b(self) -> None:
        assert self.b is not None and self.proxy is not None
        window: dict[str, Any] = {"start": self.loop.time(), "end": None, "recovered_s": None}
        self.windows.append(window)
        t = self.now_s()
        await self.proxy.command("stop_listening")  # A sees B's port refuse, as on a real LAN
        rc, took, killed = await self.b.stop(self.args.stop_timeout_s)
        self.old_b.append(self.b)
        self.b_incarnation += 1
        self.b = await self.start_b()
        await self.wait_model(self.base("local"))
        await self.proxy.command("resume_listening")
        window["end"] = self.loop.time()
        self.restarts.append(
            {
                "t_s": round(t, 1),
                "exit_code": rc,
                "stop_s": round(took, 2),
                "killed": killed,
                "down_s": round(window["end"] - window["start"], 2),
                "window": window,
            }
        )
        if killed or rc != 0:
            self.findings.append(f"B at t={t:.0f}s: {'killed after SIGTERM timeout' if killed else f'exit {rc}'}")

    async def settled(self, timeout_s: float) -> str | None:
        """None once nothing is in flight at A, B or the engine; else what still was at the timeout."""
        end = self.loop.time() + timeout_s
        state = ""
        while True:
            try:
                ha = await self.get_json(self.base("lan") + "/health")
                hb = await self.get_json(self.base("local") + "/health")
                es = await self.get_json(self.engine_url + "/soak/stats")
                state = f"in_flight A={ha['in_flight']} B={hb['in_flight']}, engine streams={es['active']}"
                if ha["in_flight"] == 0 and hb["in_flight"] == 0 and es["active"] == 0:
                    return None
            except (aiohttp.ClientError, OSError, ValueError, KeyError) as e:
                state = f"probe failed: {e!r}"
            if self.loop.time() >= end:
                return state
            await asyncio.sleep(0.2)

    async def snapshot(self, child: Child, base: str) -> Snapshot:
        samples = []
        for i in range(5):
            if i:
                await asyncio.sleep(0.4)
            proc = psutil.Process(child.pid)
            health = await self.get_json(base + "/health")
            samples.append(
                (proc.memory_info().rss / MIB, proc.num_fds(), int(health["tasks"]), int(health["connections"]))
            )
        return Snapshot(
            rss_mib=samples[-1][0],
            fds=min(s[1] for s in samples),
            tasks=min(s[2] for s in samples),
            connections=min(s[3] for s in samples),
        )

    async def checkpoint(self, label: str, *, final: bool = False) -> None:
        t = self.now_s()
        if not await self.gate.hold(self.args.client_timeout_s + 15):
            self.findings.append(f"{label}: {self.gate.active} client request(s) still open after the timeout")
        await self.close_clients()
        # A keeps idle pooled connections to B, as many as the load last needed: drop them (an RST
        # through the proxy), so that every checkpoint sees B with the same idle connections
        assert self.proxy is not None
        await self.proxy.command("reset_all")
        if (state := await self.settled(15)) is not None:
            self.findings.append(f"{label} (t={t:.0f}s): not settled after 15 s idle: {state}")
        await asyncio.sleep(self.args.settle_s)
        assert self.a is not None and self.b is not None
        nodes = {
            "A": await self.snapshot(self.a, self.base("lan")),
            "B": await self.snapshot(self.b, self.base("local")),
        }
        engine = await self.get_json(self.engine_url + "/soak/stats")
        self.checkpoints.append(Checkpoint(label, round(t, 1), self.b_incarnation, nodes, int(engine["active"])))
        print(
            f"  t={t:6.1f}s checkpoint {label}: "
            + "; ".join(
                f"{n} RSS {s.rss_mib:.1f} MiB fds {s.fds} tasks {s.tasks} conns {s.connections}"
                for n, s in nodes.items()
            )
            + f"; engine streams open {engine['active']}",
            flush=True,
        )
        if not final:
            self.open_clients()
            self.gate.release()

    async def timeline(self) -> None:
        a = self.args
        await self.sleep_until(a.warmup_s)
        await self.checkpoint("warm-up")
        if a.restart_every_s <= 0:
            return
        # no restart in the tail, so B's last incarnation gets a warm-up and a measured stretch
        last_allowed = a.duration_s - max(0.25 * a.duration_s, a.b_warmup_s + 0.15 * a.duration_s)
        next_t = a.restart_every_s * self.rng.uniform(0.75, 1.25)
        while True:
            next_t = max(next_t, self.now_s() + 1)
            if next_t > last_allowed:
                break
            await self.sleep_until(next_t)
            await self.restart_b()
            r = self.restarts[-1]
            print(
                f"  t={self.now_s():6.1f}s B restarted: exit {r['exit_code']} after {r['stop_s']} s, "
                f"down {r['down_s']} s{' (KILLED)' if r['killed'] else ''}",
                flush=True,
            )
            next_t += a.restart_every_s * self.rng.uniform(0.75, 1.25)
        if self.restarts:
            await self.sleep_until(self.now_s() + a.b_warmup_s)
            if self.loop.time() < self.deadline - 2:
                await self.checkpoint(f"B#{self.b_incarnation} warm-up")

    async def run(self) -> None:
        a = self.args
        routes = ("local", "lan")
        clients = ("sdk", "raw") if self.use_sdk else ("raw",)
        print(
            f"soak: {a.duration_s:g} s, {a.streams} streams, seed {a.seed}; engine {self.engine_url}, "
            f"B :{self.b_port}, A :{self.base('lan').rsplit(':', 1)[1]} (peer via proxy :{self.proxy.port}); "
            f"logs in {self.dir}",
            flush=True,
        )
        if not self.use_sdk:
            print(
                "  (the openai SDK is not installed: every client parses SSE with aiohttp; "
                "QUORUM_EXTRAS=test scripts/soak gets it)",
                flush=True,
            )
        async with asyncio.TaskGroup() as tg:
            for i in range(a.streams):
                tg.create_task(self.client_loop(i, routes[i % 2], clients[(i // 2) % len(clients)]))
            for i in range(a.slow_readers):
                tg.create_task(self.slow_reader_loop(i))
            if a.lan_reset_every_s > 0:
                tg.create_task(self.lan_reset_loop())
            tg.create_task(self.timeline())
        await self.checkpoint("end", final=True)


# ---------------------------------------------------------------------------
# Report


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[str, str]:
    """The same table as aligned plain text and as Markdown."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    plain = "\n".join(
        "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
        for r in cells
    )
    md = "\n".join(
        [
            "| " + " | ".join(cells[0]) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
        ]
        + ["| " + " | ".join(r) + " |" for r in cells[1:]]
    )
    return plain, md


def report(soak: Soak) -> tuple[str, bool, dict[str, Any]]:
    a, tally = soak.args, soak.tally
    by_label = {c.label: c for c in soak.checkpoints}
    end = by_label.get("end")
    first = by_label.get("warm-up")
    # B: the first checkpoint of the incarnation that is measured at the end
    b_first = next((c for c in soak.checkpoints if c.b_incarnation == soak.b_incarnation and c.label != "end"), None)
    out: list[str] = []
    goals: list[tuple[str, str, bool]] = []
    mem_rows = []
    for name, before in (("A", first), ("B", b_first)):
        if end is None or before is None:
            goals.append((f"measurements taken ({name})", "missing", False))
            continue
        what = (
            f"t={before.t_s:g}s → end" if name == "A" else f"incarnation #{soak.b_incarnation}, t={before.t_s:g}s → end"
        )
        s0, s1 = before.nodes[name], end.nodes[name]
        growth = (s1.rss_mib - s0.rss_mib) / s0.rss_mib * 100
        mem_rows.append(
            [
                name,
                what,
                f"{s0.rss_mib:.1f}",
                f"{s1.rss_mib:.1f}",
                f"{growth:+.1f} %",
                s0.fds,
                s1.fds,
                s0.tasks,
                s1.tasks,
                s0.connections,
                s1.connections,
            ]
        )
        goals.append((f"RSS growth < {a.rss_goal_pct:g} % ({name})", f"{growth:+.1f} %", growth < a.rss_goal_pct))
        goals.append(
            (f"no fd leak ({name}, slack {a.fd_slack})", f"{s1.fds - s0.fds:+d}", s1.fds - s0.fds <= a.fd_slack)
        )
        goals.append(
            (
                f"no task leak ({name}, slack {a.task_slack})",
                f"{s1.tasks - s0.tasks:+d}",
                s1.tasks - s0.tasks <= a.task_slack,
            )
        )
    if end is not None:
        goals.append(("no engine stream left open", str(end.engine_active), end.engine_active == 0))
    clean = sum(1 for r in soak.restarts if not r["killed"] and r["exit_code"] == 0)
    goals.append(("B stops by itself on SIGTERM", f"{clean}/{len(soak.restarts)}", clean == len(soak.restarts)))
    bad = tally.total("bad")
    goals.append(("0 violations", str(bad), bad == 0))
    ok = all(g[2] for g in goals)

    req_rows = []
    for route in ("local", "lan"):
        for client in ("sdk", "raw", "slow"):
            if tally.total(route=route, client=client):
                req_rows.append(
                    [
                        f"{route}/{client}",
                        tally.total(route=route, client=client),
                        tally.total("ok", route, client),
                        tally.total("doc", route, client),
                        tally.total("bad", route, client),
                    ]
                )
    req_rows.append(["all", tally.total(), tally.total("ok"), tally.total("doc"), bad])

    mem = table(
        [
            "node",
            "measured",
            "RSS before MiB",
            "RSS after MiB",
            "growth",
            "fds before",
            "fds after",
            "tasks before",
            "tasks after",
            "conns before",
            "conns after",
        ],
        mem_rows,
    )
    req = table(["route/client", "requests", "success", "documented", "violations"], req_rows)
    gl = table(["goal", "value", "result"], [[g, v, "PASS" if p else "FAIL"] for g, v, p in goals])

    engine_stats = soak.engine_stats
    cuts = engine_stats.get("cuts", {})
    out.append(
        f"\n== soak report: {a.duration_s:g} s, {a.streams} streams (half local, half LAN"
        f"{', half of each via the openai SDK' if soak.use_sdk else ''}), seed {a.seed}"
    )
    out.append(
        f"faults: engine cut {sum(cuts.values())} of {engine_stats.get('requests', 0)} streams "
        f"({', '.join(f'{k} {v}' for k, v in sorted(cuts.items())) or 'none'}); "
        f"slow readers {sum(soak.slow_runs.values())} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(soak.slow_runs.items()))}); "
        f"LAN resets {soak.lan_resets}; B restarts {len(soak.restarts)}"
    )
    for r in soak.restarts:
        rec = r["window"]["recovered_s"]
        out.append(
            f"  B restart at t={r['t_s']}s: exit {r['exit_code']} after {r['stop_s']} s"
            f"{' (KILLED)' if r['killed'] else ''}, down {r['down_s']} s; A served it again "
            + (f"{rec} s after it was back" if rec is not None else "never (no LAN success after)")
        )
    for route, xs in soak.ms_per_token.items():
        if xs:
            out.append(
                f"  {route}: successful streams took {statistics.median(xs):.1f} ms/token p50, "
                f"{sorted(xs)[int(0.99 * (len(xs) - 1))]:.1f} p99 (the engine paces {a.token_interval_ms:g})"
            )
    out.append("\nrequests:\n" + req[0])
    docs = Counter[str]()
    bads = Counter[str]()
    for (route, _, kind, reason), n in tally.counts.items():
        if kind == "doc":
            docs[f"{route}: {reason}"] += n
        elif kind == "bad":
            bads[f"{route}: {reason}"] += n
    if docs:
        out.append("documented errors:\n" + "\n".join(f"  {n:6d}  {r}" for r, n in docs.most_common()))
    if bads:
        out.append("VIOLATIONS:\n" + "\n".join(f"  {n:6d}  {r}" for r, n in bads.most_common()))
        out.append("violation examples (what the client saw):")
        for reason, exs in tally.examples.items():
            out.append(f"  {reason}:")
            out.extend(f"    {e}" for e in exs)
    out.append("\ncheckpoints (load paused, idle; fds/tasks/conns: min of 5 samples):")
    out.append(
        table(
            [
                "checkpoint",
                "t s",
                "B#",
                "A RSS MiB",
                "A fds",
                "A tasks",
                "B RSS MiB",
                "B fds",
                "B tasks",
                "engine open",
            ],
            [
                [
                    c.label,
                    c.t_s,
                    c.b_incarnation,
                    f"{c.nodes['A'].rss_mib:.1f}",
                    c.nodes["A"].fds,
                    c.nodes["A"].tasks,
                    f"{c.nodes['B'].rss_mib:.1f}",
                    c.nodes["B"].fds,
                    c.nodes["B"].tasks,
                    c.engine_active,
                ]
                for c in soak.checkpoints
            ],
        )[0]
    )
    out.append("\nmemory, fds, tasks (A: from warm-up; B: its last incarnation, from its warm-up):\n" + mem[0])
    out.append("\ngoals:\n" + gl[0])
    logs = []
    for child in [soak.a, *soak.old_b, soak.b]:
        if child is not None and (child.errors or child.warnings):
            logs.append(
                f"  {child.name}: {len(child.errors)} error line(s); warnings "
                + (", ".join(f"{k} {v}" for k, v in child.warnings.most_common(8)) or "none")
            )
            logs.extend(f"    {e}" for e in child.errors[:3])
    if logs:
        out.append("\nnode logs:\n" + "\n".join(logs))
    if soak.findings:
        out.append("\nfindings:\n" + "\n".join(f"  {f}" for f in soak.findings))
    out.append(f"\nMarkdown:\n\n{mem[1]}\n\n{req[1]}\n\n{gl[1]}\n")
    out.append(f"result: {'PASS' if ok else 'FAIL'} (logs in {soak.dir})")
    summary = {
        "ok": ok,
        "duration_s": a.duration_s,
        "seed": a.seed,
        "goals": goals,
        "requests": req_rows,
        "documented": dict(docs),
        "violations": dict(bads),
        "examples": tally.examples,
        "checkpoints": [asdict(c) for c in soak.checkpoints],
        "restarts": [
            {k: v for k, v in r.items() if k != "window"} | {"recovered_s": r["window"]["recovered_s"]}
            for r in soak.restarts
        ],
        "lan_resets": soak.lan_resets,
        "engine": engine_stats,
        "findings": soak.findings,
    }
    return "\n".join(out), ok, summary


async def run_soak(args: argparse.Namespace) -> int:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    soak = Soak(args)
    failure: BaseException | None = None
    try:
        await soak.setup()  # a failure here has nothing to report yet: it propagates
        try:
            await soak.run()
        except* (ChildFailed, TimeoutError) as eg:  # e.g. B did not come back after a restart
            failure = eg.exceptions[0]
        with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
            soak.engine_stats = await soak.get_json(soak.engine_url + "/soak/stats")
    finally:
        await soak.teardown()
    text, ok, summary = report(soak)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2, default=str))
    if failure is not None:
        print(f"soak: stopped early: {failure}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration-s", type=float, default=600.0, help="how long the load runs (default 600)")
    ap.add_argument("--streams", type=int, default=64, help="concurrent paced client streams (default 64)")
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--pause-s", type=float, default=0.25, help="mean pause between a loop's requests")
    ap.add_argument("--error-pause-s", type=float, default=1.0, help="mean pause after a request that failed")
    ap.add_argument("--token-interval-ms", type=float, default=20.0, help="the engine's time between tokens")
    ap.add_argument("--cut-fraction", type=float, default=0.05, help="share of engine streams cut at random")
    ap.add_argument("--slow-readers", type=int, default=4, help="concurrent slow-reader clients")
    ap.add_argument("--restart-every-s", type=float, default=120.0, help="B restarted about this often (0: never)")
    ap.add_argument(
        "--lan-reset-every-s",
        type=float,
        default=60.0,
        help="mean time between RSTs of every A↔B connection (0: never)",
    )
    ap.add_argument("--lan-latency-ms", type=float, default=1.0, help="added to the A↔B hop, plus as much jitter")
    ap.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="load before the first measurement (default 10 %% of the duration, at least 10 s)",
    )
    ap.add_argument(
        "--b-warmup-s",
        type=float,
        default=None,
        help="load on B's last incarnation before its first measurement (default 30 s or --warmup-s)",
    )
    ap.add_argument(
        "--settle-s",
        type=float,
        default=6.0,
        help="idle time before each measurement (longer than the engine's 5 s keep-alive)",
    )
    ap.add_argument("--client-timeout-s", type=float, default=30.0, help="a request not over by then is a hang")
    ap.add_argument(
        "--restart-grace-s",
        type=float,
        default=2.0,
        help="after B is back, connection errors to it still count as the restart's",
    )
    ap.add_argument("--stop-timeout-s", type=float, default=15.0, help="SIGTERM to exit before B is killed")
    ap.add_argument("--rss-goal-pct", type=float, default=10.0)
    ap.add_argument("--fd-slack", type=int, default=4, help="fds above the warm-up value that are not a leak")
    ap.add_argument("--task-slack", type=int, default=2, help="tasks above the warm-up value that are not a leak")
    ap.add_argument("--node-log-level", default="info", choices=("debug", "info", "warning", "error"))
    ap.add_argument("--seed", type=int, default=None, help="for the faults and the load (default: random)")
    ap.add_argument("--json-out", default=None, help="also write the report as JSON to this file")
    ap.add_argument("--serve-engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-proxy", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if args.serve_engine:
        serve_engine(args.token_interval_ms / 1000, args.cut_fraction, args.seed)
        return 0
    if args.serve_proxy is not None:
        serve_proxy(args.serve_proxy, args.lan_latency_ms / 1000)
        return 0
    if args.warmup_s is None:
        args.warmup_s = max(10.0, 0.1 * args.duration_s)
    if args.b_warmup_s is None:
        args.b_warmup_s = min(30.0, args.warmup_s)
    if args.duration_s < 3 * args.warmup_s:
        ap.error("--duration-s must be at least three times --warmup-s")
    try:
        return _run(run_soak(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("soak: interrupted", file=sys.stderr)
        return 130
    except (ChildFailed, TimeoutError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
