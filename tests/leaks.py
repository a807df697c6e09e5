"""The leak guard: what a test started, it must stop.

Around each test (``_leak_guard`` in ``tests/conftest.py``) it notes the asyncio tasks
and the open file descriptors, and after the test's fixtures are torn down it
looks again, with a settle moment for what is already closing (a cancelled task's
last step, a peer's FIN, an executor thread closing a file). What is still there
is a leak, named: the task's coroutine, the descriptor's target, and for a
socket its addresses.

``QUORUM_LEAK_GUARD`` picks the mode: ``fail`` (the default) fails the test at
teardown; ``report`` lists the leaks at the end of the run and fails nothing;
``off`` skips the guard. ``@pytest.mark.leaks_ok("reason")`` excuses one test,
and must say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from dataclasses import dataclass, field

import psutil
import pytest

__all__ = ["LATE", "LEAKS", "LeakGuard", "MODE"]

MODE = os.environ.get("QUORUM_LEAK_GUARD", "fail")
#: How long what is closing may take to close before it counts as left behind.
SETTLE_S = 1.0
#: Every leak seen in this run, ``(test id, description)``; listed at the end in ``report`` mode.
LEAKS: list[tuple[str, str]] = []
#: What was still open at teardown and closed only during the settle moment (more than 0.2 s): not failures.
LATE: list[tuple[str, str]] = []


def _fds() -> dict[int, str]:
    """Open descriptors of this process and what each points at (``socket:[inode]``, a path, ``pipe:[…]``)."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, or one closed meanwhile
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def _describe_sockets(fds: set[int]) -> dict[int, str]:
    """``fd -> "tcp 127.0.0.1:5 -> 127.0.0.1:6 ESTABLISHED"`` for the sockets among ``fds``."""
    out: dict[int, str] = {}
    try:
        conns = psutil.Process().net_connections(kind="all")
    except psutil.Error:
        return out
    for c in conns:
        if c.fd in fds:
            kind = {1: "tcp", 2: "udp"}.get(int(c.type), "sock")
            laddr = f"{c.laddr.ip}:{c.laddr.port}" if c.laddr and hasattr(c.laddr, "ip") else str(c.laddr or "")
            raddr = f"{c.raddr.ip}:{c.raddr.port}" if c.raddr and hasattr(c.raddr, "ip") else str(c.raddr or "")
            status = f" {c.status}" if c.status != "NONE" else ""
            out[c.fd] = f"{kind} {laddr}" + (f" -> {raddr}" if raddr else "") + status
    return out


def _task_name(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    where = getattr(coro, "__qualname__", None) or repr(coro)
    frame = getattr(coro, "cr_frame", None)
    if frame is not None:
        where += f" at {os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno}"
    return f"task {task.get_name()} ({where})"


@dataclass
class LeakGuard:
    """One test's before-and-after of tasks and descriptors."""

    nodeid: str
    fail: bool
    tasks: set[asyncio.Task[object]] = field(default_factory=set)
    fds: dict[int, str] = field(default_factory=dict)

    @classmethod
    def for_item(cls, item: pytest.Item) -> LeakGuard | None:
        """The guard for ``item``, or ``None`` where it is off (the mode, or ``leaks_ok``)."""
        if MODE == "off":
            return None
        marker = item.get_closest_marker("leaks_ok")
        if marker is not None:
            if not marker.args or not str(marker.args[0]).strip():
                raise pytest.UsageError(f"{item.nodeid}: leaks_ok needs a reason")
            return None
        return cls(item.nodeid, fail=MODE == "fail")

    async def before(self) -> None:
        self.tasks = asyncio.all_tasks()
        self.fds = _fds()

    async def after(self) -> None:
        leaks = await self._settled_leaks()
        if not leaks:
            return
        LEAKS.extend((self.nodeid, leak) for leak in leaks)
        if self.fail:
            pytest.fail("the test left behind:\n  " + "\n  ".join(leaks), pytrace=False)

    async def _settled_leaks(self) -> list[str]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline = t0 + SETTLE_S
        first: list[str] | None = None
        gc.collect(1)  # the young garbage: cheap, and where what the test dropped unclosed mostly is
        while True:
            tasks, fds = self._new_tasks(), self._new_fds(collect=first is not None)
            if (not tasks and not fds) or loop.time() >= deadline:
                break
            if first is None:
                first = [_task_name(t) for t in tasks] + [f"fd {fd} {target}" for fd, target in fds.items()]
            await asyncio.sleep(0.02)
        if first and not tasks and not fds and loop.time() - t0 > 0.2:  # closed, but only well after teardown
            LATE.extend((self.nodeid, f"{loop.time() - t0:.2f} s: {what}") for what in first)
        sockets = _describe_sockets(set(fds))
        return [_task_name(t) for t in sorted(tasks, key=lambda t: t.get_name())] + [
            f"fd {fd} {sockets.get(fd, target)}" for fd, target in sorted(fds.items())
        ]

    def _new_tasks(self) -> set[asyncio.Task[object]]:
        current = asyncio.current_task()
        return {t for t in asyncio.all_tasks() if t is not current and t not in self.tasks and not t.done()}

    def _new_fds(self, *, collect: bool) -> dict[int, str]:
        if collect:  # what only garbage holds is closed now (and an unclosed one warns: a failure of its own)
            gc.collect()
        return {fd: target for fd, target in _fds().items() if self.fds.get(fd) != target}
