"""Nodes in network namespaces, for tests/cluster/test_lan.py and tests/cluster/test_wan.py: the host process
and the test's handles.

Inside a namespace, ``python -m tests.cluster.lan_host`` is one host: a fake engine plus a quorum node::

    python -m tests.cluster.lan_host --name h1 --ip 10.78.0.1 --data-dir DIR \
        [--relay URL --relay-token T] [--models a,b] [--tokens '["x"," y"]'] [--token-delay-s 0.0] \
        [--shard-lease-s S]

The data dir must already hold the node's keys and membership (the test
enrols it, ``tests/members_support.py``, before spawning the host: as
``invite`` and ``join`` would leave it). The fake engine listens on
127.0.0.1:0 inside the namespace; the node listens on 0.0.0.0:32768 (its
peers' mutual-TLS port on 32769), binds zeroconf to ``--ip`` only and, with
``--relay``, joins that relay too; ``--shard-lease-s`` is its ``shard_lease_s``
(the lease of the workers it leads a sharded model with; default: the node's).
When both are up it prints one line ``@@{"ready": {...}}`` on stdout. It runs
until SIGTERM/SIGINT (a clean stop: mDNS goodbye, draining,
then ``@@{"stopped": true}`` and exit 0). A JSON object on a stdin line sets
engine knobs (``{"token_delay_s": 0.1, "tokens": [...]}``) and is answered with
``@@{"set": [...names]}``, so a test can slow one engine down on demand; each
generation request reaching the engine is reported as
``@@{"request": {"model": ..., "stream": ...}}``. Logs (JSON) go to stderr.

In the test: ``Proc`` (one process in a namespace: what it says and logs) and
the namespaces that the scripts build, with hosts and clients
(``tests/cluster/lan_client.py``) started in them: ``Lan`` (``scripts/lan``, one
bridge, hosts by number) and ``Wan`` (``scripts/wan``, two LANs and a vps,
hosts by name, the relay in the vps).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from quorum_common.log import configure_logging
from quorum_node.node import Node
from quorum_node.settings import load_settings
from tests.fakes.engines import start_fake
from tests.members_support import enrol

__all__ = ["PEER_PORT", "PORT", "RELAY_PORT", "Lan", "Namespaces", "Proc", "Wan", "lan_of"]

ROOT = Path(__file__).resolve().parents[2]
PORT = 32768
PEER_PORT = PORT + 1  # the node's default: its API port + 1
RELAY_PORT = 8787


# -- inside a namespace --------------------------------------------------------


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
    settings = load_settings(
        {
            "host": "0.0.0.0",
            "port": PORT,
            "name": args.name,
            "data_dir": args.data_dir,
            "backends": [{"kind": "openai", "url": engine.url, "name": "fake"}],
            "detect": False,
            "embedded_engine": False,
            "mdns": True,
            "mdns_interfaces": [args.ip],
            **({"relay": args.relay, "relay_token": args.relay_token} if args.relay else {}),
            **({"shard_lease_s": args.shard_lease_s} if args.shard_lease_s is not None else {}),
            "health_interval_s": 0.5,
            "peer_down_after_s": 3.0,
            "log_format": "json",
            "log_level": args.log_level,
        },
        env={},
    )
    node = Node(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = []
    try:
        await node.start()
        if node.cluster is None:
            raise SystemExit(f"lan_host: {args.data_dir} is no member of a cluster (enrol it before spawning)")
        say(
            ready={
                "name": args.name,
                "pid": os.getpid(),
                "port": node.port,
                "peer_port": node.peer_port,
                "node_id": node.cluster.node_id,
                "engine": engine.url,
                "models": models,
            }
        )
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
    p.add_argument("--data-dir", required=True, help="a member's data dir (keys and membership records)")
    p.add_argument("--relay", default="", help="ws://HOST:PORT of a quorum-relay to join as well")
    p.add_argument("--relay-token", default="")
    p.add_argument("--models", default="", help="comma-separated model ids the fake engine holds")
    p.add_argument("--tokens", default="", help="JSON list of tokens the fake engine generates")
    p.add_argument("--token-delay-s", type=float, default=0.0)
    p.add_argument("--shard-lease-s", type=float, default=None, help="its shard_lease_s (default: the node's)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


# -- in the test ---------------------------------------------------------------


class Proc:
    """One process in a namespace (``place``: the key its namespaces know it by): its ``@@{...}`` stdout
    messages and its JSON log lines (stderr, kept in a file)."""

    def __init__(self, name: str, place: Any, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.place = place
        self.proc = proc
        self.log = log
        self.messages: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._readers = [
            asyncio.create_task(self._read_stdout(), name=f"stdout-{name}"),
            asyncio.create_task(self._read_stderr(), name=f"stderr-{name}"),
        ]

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

    def mark(self) -> int:
        """A position in the messages: ``message(..., after=mark)`` ignores everything before it."""
        return len(self.messages)

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

    async def message(
        self, key: str, timeout_s: float, *, after: int = 0, where: Callable[[Any], bool] = lambda value: True
    ) -> Any:
        """The value of the first ``@@`` message holding ``key`` (and satisfying ``where``) past ``after``."""
        return await self._wait_for(
            lambda: next((m[key] for m in self.messages[after:] if key in m and where(m[key])), None),
            f"message {key!r}",
            timeout_s,
        )

    async def event(
        self, name: str, timeout_s: float, *, after: int = 0, where: Callable[[dict[str, Any]], bool] = lambda rec: True
    ) -> dict[str, Any]:
        """The first log record of event ``name`` (satisfying ``where``) past position ``after``."""
        return await self._wait_for(
            lambda: next((e for e in self.events[after:] if e["event"] == name and where(e)), None),
            f"log event {name!r}",
            timeout_s,
        )

    def log_events(self, name: str) -> list[dict[str, Any]]:
        """The log records of event ``name`` read so far."""
        return [e for e in self.events if e["event"] == name]

    async def set_knobs(self, **knobs: Any) -> None:
        assert self.proc.stdin is not None
        mark = self.mark()
        self.proc.stdin.write(json.dumps(knobs).encode() + b"\n")
        await self.proc.stdin.drain()
        assert await self.message("set", 5.0, after=mark) == sorted(knobs)

    async def ask(self, key: str, timeout_s: float, **command: Any) -> Any:
        """Send ``command`` as a JSON line on stdin; the value of the answer ``@@`` message holding ``key``."""
        assert self.proc.stdin is not None
        mark = self.mark()
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.message(key, timeout_s, after=mark)

    def messages_of(self, key: str, *, after: int = 0, until: int | None = None) -> list[Any]:
        """The values of the ``@@`` messages holding ``key`` read so far (between positions ``after`` and
        ``until``)."""
        return [m[key] for m in self.messages[after:until] if key in m]

    async def kill(self) -> None:
        """SIGKILL: no goodbye, no drain, no close frame; the kernel closes its sockets."""
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


class Namespaces:
    """The namespaces one of the scripts builds (``SCRIPT up …`` / ``down``), the processes in them,
    and clients (``tests/cluster/lan_client.py``) run there. ``place`` names a namespace the script's way."""

    SCRIPT = ""

    def __init__(self, prefix: str, tmp: Path, **script_env: str) -> None:
        self.prefix = prefix
        self.tmp = tmp
        # No proxies (every address is inside the namespaces) and no QUORUM_* settings from outside.
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("QUORUM_")}
        self.env.update(script_env)
        self.procs: list[Proc] = []

    def ns(self, place: Any) -> str:
        raise NotImplementedError

    def ip(self, place: Any) -> str:
        """The LAN address of the host at ``place``."""
        raise NotImplementedError

    def _script(self, *args: str, check: bool = True) -> str:
        return subprocess.run(
            [self.SCRIPT, *args], env=self.env, check=check, capture_output=True, text=True, timeout=30
        ).stdout.strip()

    def up(self, *sizes: int) -> None:
        self._script("up", *map(str, sizes))

    def down(self) -> None:
        self._script("down", check=False)

    def namespaces(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(self.prefix)]

    async def spawn(self, place: Any, label: str, *argv: str) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            self.ns(place),
            *argv,
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        p = Proc(label, place, proc, self.tmp / f"{label}.log")
        self.procs.append(p)
        return p

    def data_dir(self, name: str) -> Path:
        """The data dir of the host ``name`` (its keys and membership)."""
        return self.tmp / name

    def enrol(self, name: str, secret: str, cluster: str = "lan") -> None:
        """Make the data dir of host ``name`` a member of the test cluster ``(cluster, secret)`` (the first
        one enrolled founds it): what ``invite`` and ``join`` leave. Call it before the host starts."""
        enrol(self.tmp, cluster, secret, self.data_dir(name), name)

    async def host(
        self,
        place: Any,
        name: str,
        *,
        secret: str | None,
        models: list[str],
        tokens: list[str],
        relay: str = "",
        relay_token: str = "",
        shard_lease_s: float | None = None,
        wrap: tuple[str, ...] = (),
    ) -> Proc:
        """This module's host (fake engine and node) at ``place``; ``relay``: join it too; ``shard_lease_s``:
        its setting of that name (None: the node's default); ``wrap``: a command it runs under (``faketime``).

        ``secret`` names the test cluster its data dir is enrolled in first (``enrol``; nothing if it is a
        member already); None: the data dir is used as it is (a node that comes back with its old one)."""
        if secret is not None:
            self.enrol(name, secret)
        extra = ["--relay", relay, "--relay-token", relay_token] if relay else []
        if shard_lease_s is not None:
            extra += ["--shard-lease-s", str(shard_lease_s)]
        return await self.spawn(
            place,
            name,
            *wrap,
            sys.executable,
            "-m",
            "tests.cluster.lan_host",
            "--name",
            name,
            "--ip",
            self.ip(place),
            "--data-dir",
            str(self.data_dir(name)),
            "--models",
            ",".join(models),
            "--tokens",
            json.dumps(tokens),
            *extra,
        )

    async def run(self, place: Any, *argv: str, timeout_s: float = 20.0) -> tuple[int, str, str]:
        """Run ``argv`` to its end in the namespace at ``place`` (a CLI, say): its exit status, stdout, stderr."""
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            self.ns(place),
            *argv,
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def start_client(self, place: Any, *args: str, stdin: int | None = None) -> asyncio.subprocess.Process:
        """``python -m tests.cluster.lan_client ARGS`` in the namespace at ``place``, running."""
        return await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            self.ns(place),
            sys.executable,
            "-m",
            "tests.cluster.lan_client",
            *args,
            cwd=ROOT,
            env=self.env,
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def client(self, place: Any, *args: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """Run ``python -m tests.cluster.lan_client ARGS`` in the namespace at ``place``; its last JSON line."""
        rc, out, err = await self.run(
            place, sys.executable, "-m", "tests.cluster.lan_client", *args, timeout_s=timeout_s
        )
        assert rc == 0, f"client {args} failed (rc={rc}):\n{err}"
        return json.loads(out.splitlines()[-1])

    def kill_all(self) -> None:
        """SIGKILL what still runs (a finalizer's last resort; ``reap`` also waits)."""
        for p in self.procs:
            if p.proc.returncode is None:
                p.proc.kill()

    async def reap(self) -> None:
        self.kill_all()
        for p in self.procs:
            await p.reap()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (rc={p.proc.returncode})\n{p.log_tail()}" for p in self.procs)


class Lan(Namespaces):
    """``scripts/lan``: hosts 1..N on one bridge, ``NET.I``."""

    SCRIPT = str(ROOT / "scripts" / "lan")

    def __init__(self, prefix: str, net: str, tmp: Path) -> None:
        super().__init__(prefix, tmp, QLAN_PREFIX=prefix, QLAN_NET=net)
        self.net = net

    def ns(self, place: int) -> str:
        return f"{self.prefix}{place}"

    def ip(self, place: int) -> str:
        return f"{self.net}.{place}"


class Wan(Namespaces):
    """``scripts/wan``: LAN 1 (a1…), LAN 2 (b1…) with no route between them, and the vps both reach."""

    SCRIPT = str(ROOT / "scripts" / "wan")

    def __init__(self, prefix: str, net: str, tmp: Path) -> None:
        super().__init__(prefix, tmp, QWAN_PREFIX=prefix, QWAN_NET=net)

    def ns(self, place: str) -> str:
        return f"{self.prefix}-{place}"

    def ip(self, place: str) -> str:
        return self._script("addr", place)

    @property
    def relay_url(self) -> str:
        return f"ws://{self.ip('vps')}:{RELAY_PORT}"

    async def relay(self, token: str, label: str = "relay") -> Proc:
        return await self.spawn(
            "vps",
            label,
            sys.executable,
            "-m",
            "quorum_relay",
            "--host",
            "0.0.0.0",
            "--port",
            str(RELAY_PORT),
            "--token",
            token,
            "--log-format",
            "json",
        )


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))


@contextlib.asynccontextmanager
async def lan_of(request: Any, prefix: str, net: str, tmp: Path, hosts: int) -> AsyncIterator[Lan]:
    """A ``Lan`` of ``hosts`` namespaces for one test (a fixture's body): torn down even if the test never
    reaches its own clean-up (a finalizer), its hosts' logs shown when it failed, no namespace left behind."""
    world = Lan(prefix, net, tmp)

    def teardown() -> None:
        world.kill_all()
        world.down()

    request.addfinalizer(teardown)
    world.up(hosts)
    try:
        yield world
    finally:
        await world.reap()
        sys.stderr.write(world.logs() + "\n")  # shown when the test failed
        world.down()
    assert world.namespaces() == [], "scripts/lan down left namespaces behind"
