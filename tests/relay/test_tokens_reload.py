"""Token reload (what SIGHUP does): kept nodes stay, revoked ones are closed; and the real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from quorum_relay.errors import ConfigError
from quorum_relay.wire import CLOSE_TOKEN_REVOKED, Hello, Left

from .conftest import WAIT_S, Connect, StartRelay, joined, nid

KEEP = "keep-0123456789abcdef"
DROP = "drop-0123456789abcdef"
NEW = "new0-0123456789abcdef"
MOVE = "move-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]


async def test_reload_revokes_removed_tokens_and_keeps_the_rest(
    start_relay: StartRelay, join: Connect, tmp_path: Path
) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"{KEEP} team\n{DROP} team\n{MOVE} team\n")
    relay = await start_relay(tokens=(), tokens_file=str(f))
    keep = await join(relay, "keep", KEEP)
    drop = await join(relay, "drop", DROP)
    move = await join(relay, "move", MOVE)
    await joined(keep, "drop", "move")
    await joined(drop, "move")
    # DROP removed; MOVE now admits into another namespace, so its node must go too
    f.write_text(f"# rotated\n{KEEP} team\n{NEW} team\n{MOVE} other\n")
    assert relay.reload_tokens() == 2
    assert await drop.closed_with() == CLOSE_TOKEN_REVOKED
    assert await move.closed_with() == CLOSE_TOKEN_REVOKED
    assert {await keep.expect(Left), await keep.expect(Left)} == {Left(node_id=nid("drop")), Left(node_id=nid("move"))}
    # the kept node is still connected and routable, the new token joins it, the old one is refused
    new = await join(relay, "new", NEW)
    assert [p.node_id for p in new.welcome.peers] == [nid("keep")]
    await joined(keep, "new")
    await new.send(Hello(peer=nid("keep"), payload=b"still here?"))
    assert await keep.expect(Hello) == Hello(peer=nid("new"), payload=b"still here?")
    with pytest.raises(InvalidStatus) as e:
        await join(relay, "drop", DROP)
    assert e.value.response.status_code == 401
    assert relay.stats.closes["token_revoked"] == 2


async def test_bad_tokens_file_on_reload_keeps_the_old_tokens(
    start_relay: StartRelay, join: Connect, tmp_path: Path
) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"{KEEP}\n")
    relay = await start_relay(tokens=(), tokens_file=str(f))
    keep = await join(relay, "keep", KEEP)
    f.write_text(f"{KEEP}\nshort\n")
    with pytest.raises(ConfigError, match=":2:"):
        relay.reload_tokens()
    await join(relay, "other", KEEP)
    await joined(keep, "other")


async def _read_event(stream: asyncio.StreamReader, event: str) -> dict:
    async with asyncio.timeout(WAIT_S * 2):
        while True:
            line = await stream.readline()
            assert line, f"relay exited before logging {event}"
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                return record


async def test_real_process_sighup_reload_and_sigterm_stop(join: Connect, tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"{KEEP} team\n{DROP} team\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "quorum_relay",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--tokens-file",
        str(f),
        "--log-format",
        "json",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        started = await _read_event(proc.stderr, "relay_started")

        class Addr:  # what join() needs of a relay
            url = f"ws://127.0.0.1:{started['port']}"

        keep = await join(Addr, "keep", KEEP)  # type: ignore[arg-type]
        drop = await join(Addr, "drop", DROP)  # type: ignore[arg-type]
        await joined(keep, "drop")
        f.write_text(f"{KEEP} team\n")
        proc.send_signal(signal.SIGHUP)
        reloaded = await _read_event(proc.stderr, "tokens_reloaded")
        assert reloaded["revoked"] == 1 and reloaded["tokens"] == 1
        assert await drop.closed_with() == CLOSE_TOKEN_REVOKED
        assert await keep.expect(Left) == Left(node_id=nid("drop"))
        proc.send_signal(signal.SIGTERM)
        assert await keep.closed_with() == 1001
        async with asyncio.timeout(WAIT_S):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
