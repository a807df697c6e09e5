"""Helpers every tier shares: waiting for a condition, never for a fixed time.

``eventually`` is the one polling loop of the suite. A test that waits for
something to happen (a peer to be seen, a slot to be released, a file to be
written) names what it waits for and polls a predicate; when the time is up it
fails with that name and the predicate's last value, so a red test says what
never happened rather than "timeout".
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import strategies as st

__all__ = ["DEFAULT_TIMEOUT_S", "eventually", "json_values"]

T = TypeVar("T")

#: How long ``eventually`` waits unless told otherwise: ample on a loaded 2-core runner, short enough to fail fast.
DEFAULT_TIMEOUT_S = 5.0
#: The polling period: short next to every deadline the tests use, long enough not to starve the servers under test.
POLL_S = 0.02


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    what: str = "",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = POLL_S,
) -> T:
    """Poll ``check`` (sync or async) until it returns something truthy, and return that value.

    Fails with an ``AssertionError`` naming ``what`` and the last value ``check`` returned once
    ``timeout_s`` has passed. An exception from ``check`` fails at once: a predicate that raises is a
    broken test, not a condition that does not hold yet.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what or _name(check)} (last: {value!r})")
        await asyncio.sleep(interval_s)


def _name(check: Callable[..., Any]) -> str:
    return getattr(check, "__qualname__", None) or repr(check)


#: Any JSON value, nested a little: what the fuzz tests put where a request's fields go.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


#: The ``quorum-node`` command of this environment.
QN = str(Path(sys.executable).with_name("quorum-node"))


def clean_env() -> dict[str, str]:
    """This process's environment without the ``QUORUM_*`` settings (a command sees only its own flags)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")}


async def cli(*args: str) -> tuple[int, str, str]:
    """Run ``quorum-node ARGS``: its exit status, stdout and stderr (within 30 s)."""
    proc = await asyncio.create_subprocess_exec(
        QN, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env()
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
