"""llama.cpp's ``rpc-server``: this machine's memory and cores, lent to another node's engine (issue 22).

``rpc-server`` has no authentication and runs whatever graph it is sent, so
it is only ever bound to loopback: the node carries its TCP stream through the
cluster's authenticated peer link (``cluster/lending.py``), and nothing else
can reach it. With ``-c`` it keeps the tensors it was sent in a local cache
(``LLAMA_CACHE``, under the node's cache dir), so a second load of the same
model sends (almost) nothing.

Usage::

    worker = RpcServerProcess(binary, cache_dir=cache / "rpc")
    await worker.start()  # listening on 127.0.0.1:worker.port, or EngineStartError
    ...
    await worker.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections import deque
from pathlib import Path

import structlog

from .supervisor import EngineStartError, die_with_parent_preexec

__all__ = ["RpcServerProcess"]

log = structlog.get_logger("quorum.rpc")

_READY_TIMEOUT_S = 15.0
_STOP_GRACE_S = 3.0
_TAIL_LINES = 20


def _free_port() -> int:
    """A loopback port free now (rpc-server takes a port, not 0; the race with another program is remote)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RpcServerProcess:
    """One ``rpc-server`` on loopback, started and stopped with its lender; it dies with the node too."""

    def __init__(self, binary: Path, *, cache_dir: Path | None = None, threads: int | None = None) -> None:
        self.binary = binary
        self.cache_dir = cache_dir
        self.threads = threads
        self.port: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def command(self, port: int) -> list[str]:
        cmd = [str(self.binary), "--host", "127.0.0.1", "--port", str(port)]
        if self.cache_dir is not None:
            cmd.append("--cache")
        if self.threads is not None:
            cmd += ["--threads", str(self.threads)]
        return cmd

    async def start(self) -> None:
        """Start it and wait until it accepts connections; ``EngineStartError`` (with its last words) if not."""
        port = _free_port()
        env = dict(os.environ)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            env["LLAMA_CACHE"] = str(self.cache_dir)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(port),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec(),
                env=env,
            )
        except OSError as e:
            raise EngineStartError(f"cannot run {self.binary}: {e}") from e
        self._reader = asyncio.create_task(self._read_output(), name=f"rpc-server-output-{self._proc.pid}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _READY_TIMEOUT_S
        while True:
            if self._proc.returncode is not None:
                await self._reader
                raise EngineStartError(f"rpc-server exited with {self._proc.returncode}: {self.last_words()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if loop.time() > deadline:
                    await self.stop()
                    raise EngineStartError(f"rpc-server did not listen within {_READY_TIMEOUT_S:.0f} s") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()  # a connection that says nothing: rpc-server drops it and goes on
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break
        self.port = port
        log.info("rpc_server_started", pid=self._proc.pid, port=port, cache=str(self.cache_dir or ""))

    def last_words(self) -> str:
        return " | ".join(self._tail)

    async def wait(self) -> int:
        """Until it exits; its exit status."""
        assert self._proc is not None
        return await self._proc.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            log.info("rpc_server_stopped", pid=proc.pid, returncode=proc.returncode)
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            async for raw in self._proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    self._tail.append(line[:500])
                    log.debug("rpc_server_output", line=line[:500])
