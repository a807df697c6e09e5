"""The ledger's writer: records committed inline when it is idle, batched under load, the WAL bounded.

Real SQLite files in a temporary directory; what is checked is what a user
would see in the file (every record there, the ``-wal`` file not growing
without bound), plus which path took the records.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from quorum_node.control.ledger import Ledger
from quorum_node.records import Record


def rec(i: int) -> Record:
    return Record(time=time.time(), request_id=f"r{i}", node="n", method="POST", path="/v1/chat/completions",
                  surface="openai", operation="chat", model="m", status=200, prompt_tokens=3, completion_tokens=5,
                  duration_ms=1.0)


def stored_ids(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r for (r,) in conn.execute("SELECT request_id FROM records")}


async def test_one_at_a_time_records_are_committed_inline_and_the_wal_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, checkpoint_commits=200)
    await ledger.open()
    try:
        for i in range(3000):  # one commit each: without checkpoints the -wal file grows by a page per commit
            await ledger.write(rec(i))
            if i % 50 == 0:
                await asyncio.sleep(0)  # as a request path would, now and then
        # nothing else was writing: no thread round trip, except while a checkpoint held the connection
        assert ledger.inline >= 1500, ledger.inline  # most of them
        assert ledger.checkpoints >= 3000 // 200 - 1
        wal = path.with_name(path.name + "-wal")
        # unbounded it would be ~42 MiB (three pages a commit); a checkpoint every 200 commits keeps it near 2.4 MiB
        assert wal.stat().st_size < 6 * 1024 * 1024, wal.stat().st_size
        assert stored_ids(path) == {f"r{i}" for i in range(3000)}
    finally:
        await ledger.close()


async def test_concurrent_records_are_batched_by_the_writer_and_all_stored(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    await ledger.open()
    try:
        await asyncio.gather(*(ledger.write(rec(i)) for i in range(2000)))
        assert ledger.written == 2000
        assert ledger.inline < 2000  # the first went inline; those that came while it was busy were queued
        assert stored_ids(path) == {f"r{i}" for i in range(2000)}  # every write had returned: all are in the file
    finally:
        await ledger.close()
    await ledger.close()  # idempotent


async def test_a_write_lock_held_elsewhere_never_blocks_the_loop(tmp_path: Path) -> None:
    # Another process holding the file's write lock (a second node pointed at the same data dir, a
    # person's sqlite3 shell): the writer thread waits for it, the event loop goes on serving.
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, retention_days=0)  # no pruning pass: the write finds the writer idle
    await ledger.open()
    await ledger.write(rec(0))
    assert ledger.inline == 1
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock
        write = asyncio.create_task(ledger.write(rec(1)))
        t0 = time.monotonic()
        await asyncio.sleep(0.05)  # the loop runs: this timer fires on time
        assert time.monotonic() - t0 < 0.5
        assert not write.done()  # the record waits for the lock, in the writer thread
        other.execute("COMMIT")
        await asyncio.wait_for(write, 5)
        assert ledger.inline == 1 and ledger.failed == 0  # the locked write went to the thread
        assert stored_ids(path) == {"r0", "r1"}
    finally:
        other.close()
        await ledger.close()
