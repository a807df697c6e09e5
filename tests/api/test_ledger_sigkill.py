"""A node SIGKILLed in the middle of a workload keeps the record of every request whose answer was complete.

The node is a real ``quorum-node run`` process; the engine a fake in this
test's process; the clients the openai SDK, many at once, streamed and not.
The record is journaled before the answer's last byte leaves, so every
answer a client holds whole has its row in the SQLite file once the ledger
is opened again (as a restart or ``quorum-node usage`` does), whatever
instant the kill lands on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
from pathlib import Path

import openai

from quorum_node.control.ledger import LEDGER_FILE, journal_files
from tests.cluster.test_ledger import usage_cli
from tests.conftest import StartFake

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MESSAGES = [{"role": "user", "content": "hi"}]
WORKERS = 24


async def start_node_process(engine_url: str, data_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "quorum_node.cli",
        "run",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--name",
        "victim",
        "--data-dir",
        str(data_dir),
        "--backend",
        f"vllm={engine_url}",
        "--no-detect",
        "--no-embedded-engine",
        "--no-mdns",
        "--log-format",
        "json",
        "--log-level",
        "info",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while True:
            line = await proc.stderr.readline()
            assert line, "the node exited before it started"
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if ev.get("event") == "node_started":
                    return proc, f"http://127.0.0.1:{ev['port']}"


async def test_sigkill_mid_workload_loses_no_completed_record(fake: StartFake, tmp_path: Path) -> None:
    eng = await fake("vllm", token_delay_s=0.004)
    proc, url = await start_node_process(eng.url, tmp_path / "data")
    assert proc.stderr is not None
    drain = asyncio.create_task(proc.stderr.read())  # a full stderr pipe would stall the node
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)
    completed: list[str] = []
    broken: list[str] = []
    enough = asyncio.Event()

    async def worker(w: int) -> None:
        i = 0
        while True:
            rid = f"w{w}-{i}"
            i += 1
            try:
                if i % 2:
                    stream = await client.chat.completions.create(
                        model=MODEL, messages=MESSAGES, stream=True, extra_headers={"X-Request-Id": rid}
                    )
                    finished = [
                        ch.choices[0].finish_reason async for ch in stream if ch.choices and ch.choices[0].finish_reason
                    ]
                    assert finished == ["stop"]
                else:
                    reply = await client.chat.completions.create(
                        model=MODEL, messages=MESSAGES, extra_headers={"X-Request-Id": rid}
                    )
                    assert reply.choices[0].message.content
            except (openai.APIError, AssertionError):
                broken.append(rid)
                return  # the node is gone
            completed.append(rid)
            if len(completed) >= 150:
                enough.set()

    try:
        workers = [asyncio.create_task(worker(w)) for w in range(WORKERS)]
        async with asyncio.timeout(30):
            await enough.wait()
        proc.send_signal(signal.SIGKILL)  # mid-workload: every worker has a request in flight
        async with asyncio.timeout(20):
            await asyncio.gather(*workers)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await client.close()
        await drain
    assert proc.returncode == -signal.SIGKILL
    assert len(broken) == WORKERS  # each worker's last request was cut by the kill

    # `quorum-node usage` with the node gone reads the file itself, after moving the journal in (what the
    # writer had not moved yet), as a restart would: it counts every completed request.
    path = tmp_path / "data" / LEDGER_FILE
    offline = await asyncio.to_thread(usage_cli, "--url", url, "--data-dir", str(path.parent))
    assert offline["source"].startswith("ledger ")
    assert sum(r["requests"] for r in offline["rows"]) >= len(completed)
    assert journal_files(path) == []
    db = sqlite3.connect(path)
    stored = {rid for (rid,) in db.execute("SELECT request_id FROM records")}
    statuses = {status for (status,) in db.execute("SELECT DISTINCT status FROM records")}
    db.close()
    missing = sorted(set(completed) - stored)
    assert not missing, f"{len(missing)} completed requests have no record: {missing[:10]}"
    assert statuses == {200}
