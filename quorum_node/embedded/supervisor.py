"""Run and supervise one ``llama-server`` child process.

:class:`LlamaServerProcess` owns the child and one supervising task. If the child
dies without being asked to, the task restarts it after a backoff delay and
counts the restart; :meth:`LlamaServerProcess.stop` cancels the task and ends the
child (SIGTERM, then SIGKILL after a grace period).

Port choice. ``port=0`` (the default) passes ``--port 0`` to llama-server, which
binds an ephemeral port itself and prints ``srv main: listening on
http://127.0.0.1:PORT`` once the model has loaded; the supervisor reads the port
from that line, so there is no "find a free port, then hope it is still free"
race. A restart re-uses the port the previous child had, so :attr:`url` stays
stable; if that port has been taken meanwhile, the next attempt asks for a fresh
one.

Lifetime. The child runs in its own session (a Ctrl-C on the node's terminal does
not reach it; the node decides when it stops) and, on Linux, with
``PR_SET_PDEATHSIG=SIGKILL``, so it dies with the node even if the node is killed
with SIGKILL. (The death signal follows the *thread* that forked the child: here
that is the thread running the event loop.)

The child's stdout and stderr are read continuously (a full pipe would block the
engine) and logged at debug level as ``llama_server_output`` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import structlog

from ..backoff import Backoff

__all__ = ["EngineStartError", "LlamaServerProcess", "RestartBackoff", "die_with_parent_preexec"]

log = structlog.get_logger(__name__)

_LISTENING_RE = re.compile(r"listening on (https?)://(\S+):(\d+)\s*$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_STOP_GRACE_S = 5.0
_OUTPUT_DRAIN_S = 2.0
_HEALTH_POLL_S = 0.1
_TAIL_LINES = 30
_PR_SET_PDEATHSIG = 1


class EngineStartError(Exception):
    """The engine process could not be started, or did not become ready in time."""


class RestartBackoff:
    """Exponential restart delays; a child that stayed up long enough resets them.

    Pure logic: it is told how long the child ran and answers how long to wait.
    """

    def __init__(
        self,
        *,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        factor: float = 2.0,
        healthy_after_s: float = 60.0,
    ) -> None:
        self.healthy_after_s = healthy_after_s
        self._backoff = Backoff(initial_s, factor=factor, max_s=max_s, jitter=0.0)

    def next_delay(self, uptime_s: float) -> float:
        """Delay before restarting a child that ran for ``uptime_s`` seconds."""
        if uptime_s >= self.healthy_after_s:
            self._backoff.reset()
        return self._backoff.next_delay()


@dataclass(eq=False)
class _Child:
    """One spawned llama-server process and what we learned from its output."""

    proc: asyncio.subprocess.Process
    cmd_port: int  # the --port we passed; 0 means "ask the output"
    started_at: float
    # Resolved with the port from the "listening on" line, or None at EOF (exited).
    listening: asyncio.Future[int | None]
    # Set once the exit status is recorded in LlamaServerProcess._exits.
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once a successor exists or the supervisor stopped; waiters move on.
    superseded: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class LlamaServerProcess:
    """An async supervisor for one ``llama-server`` serving one GGUF model.

    Usage::

        engine = LlamaServerProcess(binary, model, port=0)
        await engine.start()
        try:
            await engine.wait_ready(timeout_s=60)
            ...  # talk to engine.url
        finally:
            await engine.stop()

    ``host`` is the bind address (loopback by default: the node, not the engine,
    faces the network). ``extra_args`` are appended to the command line.
    ``restart=False``: a child that dies is not restarted; ``ended`` is set (a
    sharded model's engine dies with a helper, and its leader rebuilds it elsewhere).
    """

    def __init__(
        self,
        binary: str | os.PathLike[str],
        model: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ctx_size: int = 2048,
        threads: int | None = None,
        extra_args: Sequence[str] = (),
        backoff: RestartBackoff | None = None,
        restart: bool = True,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        self.binary = Path(binary)
        self.model = Path(model)
        self.host = host
        self.ctx_size = ctx_size
        self.threads = threads
        self.extra_args = tuple(extra_args)
        self.restarts = 0
        """How many times the child was restarted after dying unexpectedly."""
        self.restart = restart
        self.ended = asyncio.Event()
        """Set when a child that is not restarted (``restart=False``) died on its own."""
        self._requested_port = port
        self._port: int | None = port or None
        self._backoff = backoff or RestartBackoff()
        self._child: _Child | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_lock = asyncio.Lock()
        self._exits: dict[int, int] = {}  # pid -> exit status, for wait_exited()
        self._output_tail: deque[str] = deque(maxlen=_TAIL_LINES)

    # --- public face ---------------------------------------------------------

    @property
    def port(self) -> int | None:
        """The engine's TCP port, or None while a ``port=0`` child has not reported it yet."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the engine, e.g. ``http://127.0.0.1:41234`` (no trailing slash).

        For a wildcard bind address the URL uses loopback, since that is how the
        node on the same host reaches it. Raises ``RuntimeError`` before the port
        is known (with ``port=0``: until :meth:`wait_ready` returned).
        """
        if self._port is None:
            raise RuntimeError("the engine's port is not known yet; await wait_ready() first")
        return f"http://{_format_host(_connect_host(self.host))}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The running child's process id, or None when no child is running."""
        child = self._child
        if child is None or child.proc.returncode is not None:
            return None
        return child.pid

    def command(self, port: int) -> list[str]:
        """The llama-server command line for a child listening on ``port`` (0: any)."""
        cmd = [
            str(self.binary),
            "--model", str(self.model),
            "--host", self.host,
            "--port", str(port),
            "--ctx-size", str(self.ctx_size),
        ]  # fmt: skip
        if self.threads is not None:
            cmd += ["--threads", str(self.threads)]
        cmd += self.extra_args
        return cmd

    async def start(self) -> None:
        """Spawn the child and begin supervising it. Does not wait for readiness."""
        if self._stopping:
            raise RuntimeError("this LlamaServerProcess was stopped; create a new one")
        if self._supervisor is not None:
            raise RuntimeError("already started")
        self._child = await self._spawn(self._requested_port)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"llama-server-supervisor-{self._child.pid}")

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the engine answers ``GET /health`` with 200, across restarts.

        Raises :class:`EngineStartError` after ``timeout_s`` (with the engine's
        last output lines, which usually say why) or if the process is stopped.
        """
        if self._child is None and not self._stopping:
            raise RuntimeError("not started")
        timeout = aiohttp.ClientTimeout(total=2.0, sock_connect=1.0)
        try:
            async with asyncio.timeout(timeout_s), aiohttp.ClientSession(timeout=timeout) as session:
                while True:
                    child = self._child
                    if self._stopping or child is None:
                        raise EngineStartError("llama-server was stopped before it became ready")
                    if await self._wait_child_healthy(session, child):
                        return
                    await child.superseded.wait()  # it died; the supervisor spawns the next
        except TimeoutError:
            raise EngineStartError(
                f"llama-server did not become ready within {timeout_s:g} s; last output:\n{self._format_tail()}"
            ) from None

    async def wait_exited(self, pid: int) -> int:
        """Wait until the child with ``pid`` has exited; return its exit status.

        A negative status is the signal that ended it. Returns at once if that
        child already exited.
        """
        if pid not in self._exits:
            child = self._child
            if child is None or child.pid != pid:
                raise LookupError(f"pid {pid} is not a child of this supervisor")
            await child.exited.wait()
        return self._exits[pid]

    async def stop(self) -> None:
        """Stop supervising and end the child: SIGTERM, then SIGKILL after 5 s. Idempotent."""
        async with self._stop_lock:
            self._stopping = True
            supervisor, self._supervisor = self._supervisor, None
            if supervisor is not None:
                supervisor.cancel()
                # asyncio.wait never raises the task's outcome, and a cancellation
                # of stop() itself still propagates.
                await asyncio.wait({supervisor})
                if not supervisor.cancelled():
                    supervisor.exception()  # mark retrieved; the task root logged it
            child = self._child
            if child is not None:
                await self._terminate(child)
                self._child = None

    # --- internals -----------------------------------------------------------

    async def _spawn(self, port: int, *, restart: bool = False) -> _Child:
        cmd = self.command(port)
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec(),
                limit=1 << 20,
            )
        except OSError as exc:
            raise EngineStartError(f"cannot run {self.binary}: {exc}") from exc
        loop = asyncio.get_running_loop()
        child = _Child(proc=proc, cmd_port=port, started_at=loop.time(), listening=loop.create_future())
        child.reader = asyncio.create_task(self._read_output(child), name=f"llama-server-output-{proc.pid}")
        log.info(
            "llama_server_spawned",
            pid=proc.pid,
            port=port or "auto",
            model=str(self.model),
            restart=self.restarts + 1 if restart else 0,
        )
        return child

    async def _read_output(self, child: _Child) -> None:
        """Task root: log the child's output lines and watch for the listening address."""
        stream = child.proc.stdout
        assert stream is not None
        try:
            while True:
                try:
                    raw = await stream.readline()
                except ValueError:  # a line over the limit; the reader dropped it
                    continue
                if not raw:
                    break
                line = _ANSI_RE.sub("", raw.decode(errors="replace")).rstrip()
                if not line:
                    continue
                self._output_tail.append(line)
                log.debug("llama_server_output", pid=child.pid, line=line)
                if not child.listening.done() and (match := _LISTENING_RE.search(line)):
                    port = int(match.group(3))
                    self._port = port
                    child.listening.set_result(port)
                    log.info("llama_server_listening", pid=child.pid, url=self.url)
        except Exception:
            log.exception("llama_server_output_reader_failed", pid=child.pid)
        finally:
            if not child.listening.done():
                child.listening.set_result(None)

    async def _wait_child_healthy(self, session: aiohttp.ClientSession, child: _Child) -> bool:
        """Poll ``/health`` of ``child`` until 200 (True) or until it exits (False)."""
        port = child.cmd_port or await child.listening
        if port is None:
            return False
        url = f"http://{_format_host(_connect_host(self.host))}:{port}/health"
        while True:
            if child.proc.returncode is not None or child.superseded.is_set():
                return False
            if child.listening.done() and child.listening.result() is None:
                return False  # output ended: the child is exiting
            try:
                async with session.get(url, allow_redirects=False) as resp:
                    await resp.read()
                    if resp.status == 200:
                        # Another server could own a fixed port we failed to bind.
                        return child.proc.returncode is None
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet, or restarting
            await asyncio.sleep(_HEALTH_POLL_S)

    async def _supervise(self) -> None:
        """Task root: restart the child whenever it exits on its own."""
        try:
            while True:
                child = self._child
                assert child is not None
                returncode = await child.proc.wait()
                await self._drain_output(child)
                self._exits[child.pid] = returncode
                child.exited.set()
                uptime_s = asyncio.get_running_loop().time() - child.started_at
                log.warning(
                    "llama_server_exited",
                    pid=child.pid,
                    returncode=returncode,
                    uptime_s=round(uptime_s, 1),
                    last_output=list(self._output_tail)[-5:],
                )
                if not self.restart:
                    self.ended.set()
                    return
                reported = child.listening.result() if child.listening.done() else None
                # Re-use the port it had so the URL stays stable; if it never got
                # one (perhaps that very port was taken), ask for a fresh one.
                port = reported if reported is not None else self._requested_port
                while True:
                    delay_s = self._backoff.next_delay(uptime_s)
                    log.info("llama_server_restart_scheduled", delay_s=delay_s, port=port or "auto")
                    await asyncio.sleep(delay_s)
                    try:
                        successor = await self._spawn(port, restart=True)
                    except EngineStartError as exc:
                        log.error("llama_server_restart_failed", error=str(exc))
                        uptime_s = 0.0
                        continue
                    break
                self.restarts += 1
                self._child = successor
                child.superseded.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("llama_server_supervisor_failed")
            raise

    async def _terminate(self, child: _Child) -> None:
        proc = child.proc
        try:
            if proc.returncode is None:
                _send_signal(proc, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
                except TimeoutError:
                    log.warning("llama_server_kill", pid=child.pid, grace_s=_STOP_GRACE_S)
                    _send_signal(proc, signal.SIGKILL)
                    await proc.wait()
            await self._drain_output(child)
        except BaseException:
            # Cancelled mid-stop: never leave the engine running behind us.
            _send_signal(proc, signal.SIGKILL)
            child.superseded.set()
            raise
        assert proc.returncode is not None
        self._exits[child.pid] = proc.returncode
        child.exited.set()
        child.superseded.set()
        log.info("llama_server_stopped", pid=child.pid, returncode=proc.returncode)

    async def _drain_output(self, child: _Child) -> None:
        """Let the reader see EOF; a grandchild holding the pipe open must not block us."""
        reader = child.reader
        if reader is None:
            return
        done, _ = await asyncio.wait({reader}, timeout=_OUTPUT_DRAIN_S)
        if not done:
            reader.cancel()
            await asyncio.wait({reader})

    def _format_tail(self) -> str:
        return "\n".join(self._output_tail) or "(no output)"


def _send_signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


def _connect_host(host: str) -> str:
    """The address to reach a server bound to ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when we die (Linux only).

    The libc lookup happens here, in the parent; the hook itself only makes the
    ``prctl`` call, which is async-signal-safe, in the forked child.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook
