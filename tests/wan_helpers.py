"""Helpers for tests/test_wan.py: the two-LAN world of ``scripts/wan``, its processes, and what runs inside it.

Run inside a namespace (``ip netns exec NS python -m tests.wan_helpers MODE …``):

    host --name N --ip IP --data-dir D --secret S --relay URL --relay-token T [--models a,b] [--tokens JSON]
                                  tests/lan_host.py's fake engine plus node, with a relay: prints
                                  ``@@{"ready": {...}}``, takes engine knobs on stdin, reports
                                  ``@@{"request": ...}``, stops cleanly on SIGTERM
    peers [--until-relay STATE] [--timeout S]
                                  GET /quorum/v1/peers of the node on 127.0.0.1:32768 (polled until
                                  ``relay.state`` is STATE) → the body plus "elapsed_s"
    connect HOST PORT [--timeout S]
                                  one TCP connect → {"connected", "error", "elapsed_s"}
    poll-chat MODEL [--timeout S] [--go-on-stdin]
                                  a non-streamed chat through the openai SDK, again every 0.1 s until one
                                  succeeds: {"event": "polling"} first, then {"ok", "at" (time.monotonic()
                                  of the success: one clock for every namespace), "attempts", "status",
                                  "node", "route", "content", "last_error"}; with --go-on-stdin it says
                                  {"event": "waiting"} once loaded and starts on a line on stdin

Imported by the test: ``Proc`` (a process and what it says) and ``World``
(``scripts/wan`` up and down, processes and clients inside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai

from quorum_node.log import configure_logging
from quorum_node.node import Node
from quorum_node.settings import load_settings
from tests.fakes.engines import start_fake
from tests.lan_client import BASE, MESSAGES, emit
from tests.lan_host import PORT, _control, _report_requests, say

__all__ = ["PORT", "RELAY_PORT", "Proc", "World"]

ROOT = Path(__file__).resolve().parents[1]
WAN = str(ROOT / "scripts" / "wan")
RELAY_PORT = 8787


# -- inside a namespace --------------------------------------------------------


async def host(args: argparse.Namespace) -> int:
    """A fake engine and a node joined to the relay; lan_host.py's protocol on stdout and stdin."""
    configure_logging("json", args.log_level)
    models = [m for m in args.models.split(",") if m]
    knobs: dict[str, Any] = {}
    if args.tokens:
        knobs["tokens"] = json.loads(args.tokens)
    engine = await start_fake("openai", models=models, **knobs)
    settings = load_settings({
        "host": "0.0.0.0", "port": PORT, "name": args.name, "data_dir": args.data_dir,
        "backends": [{"kind": "openai", "url": engine.url, "name": "fake"}],
        "detect": False, "embedded_engine": False,
        "mdns": True, "mdns_interfaces": [args.ip],
        "cluster": "wan", "cluster_secret": args.secret,
        "relay": args.relay, "relay_token": args.relay_token,
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
                   "models": models})
        tasks.append(asyncio.create_task(_control(engine), name="wan-host-control"))
        tasks.append(asyncio.create_task(_report_requests(engine), name="wan-host-requests"))
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await node.stop()
        await engine.close()
    say(stopped=True)
    return 0


async def peers(until_relay: str, timeout_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            async with session.get(BASE + "/quorum/v1/peers") as resp:
                body = await resp.json()
            elapsed = time.monotonic() - t0
            state = (body.get("relay") or {}).get("state")
            if not until_relay or state == until_relay or elapsed > timeout_s:
                body["elapsed_s"] = round(elapsed, 3)
                return body
            await asyncio.sleep(0.05)


def connect(host_: str, port: int, timeout_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        with socket.create_connection((host_, port), timeout=timeout_s):
            return {"connected": True, "error": None, "elapsed_s": round(time.monotonic() - t0, 3)}
    except OSError as e:
        return {"connected": False, "error": f"{type(e).__name__}: {e}", "elapsed_s": round(time.monotonic() - t0, 3)}


async def _stdin_line() -> bytes:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        return await reader.readline()
    finally:
        transport.close()


async def poll_chat(model: str, timeout_s: float, go_on_stdin: bool) -> dict[str, Any]:
    attempts = 0
    last_error = None
    async with openai.AsyncOpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=3.0) as client:
        if go_on_stdin:  # loaded (the SDK import is the slow part), so polling starts the moment it is told
            emit(event="waiting")
            await _stdin_line()
        emit(event="polling")
        t0 = time.monotonic()
        while True:
            attempts += 1
            try:
                raw = await client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
                return {"ok": True, "at": time.monotonic(), "attempts": attempts, "status": raw.status_code,
                        "node": raw.headers.get("X-Quorum-Node"), "route": raw.headers.get("X-Quorum-Route"),
                        "content": raw.parse().choices[0].message.content, "last_error": last_error}
            except openai.APIError as e:
                last_error = f"{type(e).__name__}: {e.message}"
            if time.monotonic() - t0 > timeout_s:
                return {"ok": False, "at": time.monotonic(), "attempts": attempts, "last_error": last_error}
            await asyncio.sleep(0.1)


async def main(args: argparse.Namespace) -> int:
    if args.mode == "host":
        return await host(args)
    if args.mode == "peers":
        emit(**await peers(args.until_relay, args.timeout))
    elif args.mode == "connect":
        emit(**connect(args.host, args.port, args.timeout))
    else:
        emit(**await poll_chat(args.model, args.timeout, args.go_on_stdin))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("host")
    h.add_argument("--name", required=True)
    h.add_argument("--ip", required=True, help="this namespace's LAN address (zeroconf binds to it only)")
    h.add_argument("--data-dir", required=True)
    h.add_argument("--secret", required=True)
    h.add_argument("--relay", required=True)
    h.add_argument("--relay-token", required=True)
    h.add_argument("--models", default="")
    h.add_argument("--tokens", default="")
    h.add_argument("--log-level", default="info")
    pe = sub.add_parser("peers")
    pe.add_argument("--until-relay", default="")
    pe.add_argument("--timeout", type=float, default=0.0)
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--timeout", type=float, default=2.0)
    pc = sub.add_parser("poll-chat")
    pc.add_argument("model")
    pc.add_argument("--timeout", type=float, default=10.0)
    pc.add_argument("--go-on-stdin", action="store_true")
    return p.parse_args(argv)


# -- in the test ---------------------------------------------------------------


class Proc:
    """One process in a namespace: its ``@@{...}`` stdout messages and its JSON log lines (stderr, kept in a file)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.messages: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._readers = [asyncio.create_task(self._read_stdout(), name=f"stdout-{name}"),
                         asyncio.create_task(self._read_stderr(), name=f"stderr-{name}")]

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if line.startswith(b"@@"):
                self.messages.append(json.loads(line[2:]))
                self._changed.set()
        self._changed.set()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        with self.log.open("ab") as f:
            while line := await self.proc.stderr.readline():
                f.write(line)
                f.flush()
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "event" in rec:
                    self.events.append(rec)
                    self._changed.set()
        self._changed.set()

    @property
    def ended(self) -> bool:
        return all(r.done() for r in self._readers)

    async def _wait_for(self, pick: Callable[[], Any], what: str, timeout_s: float) -> Any:
        async def _find() -> Any:
            while True:
                found = pick()
                if found is not None:
                    return found
                if self.ended:
                    rc = await self.proc.wait()
                    raise AssertionError(f"{self.name} exited (rc={rc}) before {what}:\n{self.log_tail()}")
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(_find(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {what} within {timeout_s} s:\n{self.log_tail()}") from None

    async def message(self, key: str, timeout_s: float, *, after: int = 0) -> Any:
        """The value of the first ``@@`` message holding ``key`` past position ``after``."""
        return await self._wait_for(
            lambda: next((m[key] for m in self.messages[after:] if key in m), None), f"message {key!r}", timeout_s)

    async def event(self, name: str, timeout_s: float, *, after: int = 0,
                    where: Callable[[dict[str, Any]], bool] = lambda rec: True) -> dict[str, Any]:
        """The first log record of event ``name`` (satisfying ``where``) past position ``after``."""
        return await self._wait_for(
            lambda: next((e for e in self.events[after:] if e["event"] == name and where(e)), None),
            f"log event {name!r}", timeout_s)

    async def set_knobs(self, **knobs: Any) -> None:
        assert self.proc.stdin is not None
        mark = len(self.messages)
        self.proc.stdin.write(json.dumps(knobs).encode() + b"\n")
        await self.proc.stdin.drain()
        assert await self.message("set", 5.0, after=mark) == sorted(knobs)

    async def kill(self) -> None:
        """SIGKILL: no goodbye, no close frame; the kernel closes its sockets."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 5.0)

    async def reap(self) -> None:
        """Kill if still running; wait for the process and its readers."""
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 10.0)
        await asyncio.wait_for(asyncio.gather(*self._readers, return_exceptions=True), 10.0)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class World:
    """``scripts/wan``'s namespaces (own prefix and /16), the processes in them, and clients run there."""

    def __init__(self, prefix: str, net: str, tmp: Path) -> None:
        self.prefix = prefix
        self.net = net
        self.tmp = tmp
        # No proxies (every address is inside the namespaces) and no QUORUM_* settings from outside.
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("QUORUM_")}
        self.env.update(QWAN_PREFIX=prefix, QWAN_NET=net)
        self.procs: list[Proc] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def addr(self, name: str) -> str:
        return subprocess.run([WAN, "addr", name], env=self.env, check=True, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    @property
    def relay_url(self) -> str:
        return f"ws://{self.addr('vps')}:{RELAY_PORT}"

    def up(self, n1: int, n2: int) -> None:
        subprocess.run([WAN, "up", str(n1), str(n2)], env=self.env, check=True, capture_output=True, timeout=30)

    def down(self) -> None:
        subprocess.run([WAN, "down"], env=self.env, capture_output=True, timeout=30)

    def namespaces(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(self.prefix + "-")]

    async def spawn(self, where: str, label: str, *argv: str) -> Proc:
        log = self.tmp / f"{label}.log"
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.ns(where), *argv, cwd=ROOT, env=self.env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        p = Proc(label, proc, log)
        self.procs.append(p)
        return p

    async def relay(self, token: str, label: str = "relay") -> Proc:
        return await self.spawn("vps", label, sys.executable, "-m", "relay", "--host", "0.0.0.0",
                                "--port", str(RELAY_PORT), "--token", token, "--log-format", "json")

    async def host(self, where: str, name: str, *, secret: str, relay_token: str, models: list[str],
                   tokens: list[str]) -> Proc:
        return await self.spawn(
            where, name, sys.executable, "-m", "tests.wan_helpers", "host", "--name", name, "--ip", self.addr(where),
            "--data-dir", str(self.tmp / name), "--secret", secret, "--relay", self.relay_url,
            "--relay-token", relay_token, "--models", ",".join(models), "--tokens", json.dumps(tokens),
        )

    async def start_client(self, where: str, module: str, *args: str, stdin: int | None = None
                           ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.ns(where), sys.executable, "-m", module, *args,
            cwd=ROOT, env=self.env, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )

    async def client(self, where: str, module: str, *args: str, timeout_s: float = 15.0) -> dict[str, Any]:
        """Run ``python -m MODULE ARGS`` in namespace ``where``; its last JSON line."""
        proc = await self.start_client(where, module, *args)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, f"client {module} {args} failed (rc={proc.returncode}):\n{err.decode()}"
        return json.loads(out.decode().splitlines()[-1])

    async def reap(self) -> None:
        for p in self.procs:
            if p.proc.returncode is None:
                p.proc.kill()
        for p in self.procs:
            await p.reap()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (rc={p.proc.returncode})\n{p.log_tail()}" for p in self.procs)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
