"""The ledger's writer: a record is journaled before ``write`` returns, moved into SQLite in batches.

Real SQLite files and journal files in a temporary directory; what is
checked is what a user would find in the file (every record there, once),
after a clean close, after the process was SIGKILLed, after a torn journal
tail, with the database locked by someone else.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quorum_node.control.ledger import Ledger, journal_files
from quorum_node.errors import ConfigError
from quorum_node.records import Record


def rec(i: int) -> Record:
    return Record(
        time=time.time(),
        request_id=f"r{i}",
        node="n",
        method="POST",
        path="/v1/chat/completions",
        surface="openai",
        operation="chat",
        model="m",
        status=200,
        prompt_tokens=3,
        completion_tokens=5,
        duration_ms=1.0,
    )


def stored(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r for (r,) in conn.execute("SELECT request_id FROM records ORDER BY rowid")]


async def test_records_one_at_a_time_are_stored_in_few_transactions_and_the_files_stay_bounded(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, batch_wait_s=0.02, journal_max_bytes=64 * 1024)
    await ledger.open()
    try:
        for i in range(3000):
            await ledger.write(rec(i))
            if i % 50 == 0:
                await asyncio.sleep(0.001)  # as a request path would, now and then
        rows = await ledger.query(None, "model")  # a query sees every record written before it
        assert [(r.group, r.requests, r.prompt_tokens) for r in rows] == [("m", 3000, 9000)]
        assert ledger.commits < 3000 // 10, ledger.commits  # batches, not a transaction per record
        # the journal moved to a new file every 64 KiB (~200 records) and dropped the files the database has
        assert len(journal_files(path)) <= 2, journal_files(path)
        wal = path.with_name(path.name + "-wal")
        assert wal.stat().st_size < 6 * 1024 * 1024, wal.stat().st_size  # checkpointed by the writer
    finally:
        await ledger.close()
    assert stored(path) == [f"r{i}" for i in range(3000)]
    assert journal_files(path) == []  # a clean close leaves no journal


async def test_concurrent_records_are_all_stored_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    await ledger.open()
    try:
        await asyncio.gather(*(ledger.write(rec(i)) for i in range(2000)))
    finally:
        await ledger.close()
    await ledger.close()  # idempotent
    assert ledger.written == 2000 and ledger.failed == 0
    assert sorted(stored(path)) == sorted(f"r{i}" for i in range(2000))


async def test_a_write_lock_held_elsewhere_never_blocks_the_loop(tmp_path: Path) -> None:
    # Another process holding the file's write lock (a person's sqlite3 shell): the writer thread waits for
    # it, the event loop goes on serving, and a query waits for the records written before it.
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, retention_days=0)
    await ledger.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock
        t0 = time.monotonic()
        for i in range(100):
            await ledger.write(rec(i))
        assert time.monotonic() - t0 < 0.5  # journaled, not committed: nothing waited for the lock
        query = asyncio.create_task(ledger.query(None, "model"))
        await asyncio.sleep(0.3)  # the loop runs on
        assert not query.done()  # the query waits for the writer, which waits for the lock
        other.execute("COMMIT")
        rows = await asyncio.wait_for(query, 15)
        assert [r.requests for r in rows] == [100]
        assert ledger.failed == 0
    finally:
        other.close()
        await ledger.close()


@pytest.mark.parametrize("n", [90, 300])
async def test_a_writer_far_behind_makes_writes_wait_not_memory_grow(tmp_path: Path, n: int) -> None:
    # 90: up to 50 queued and 50 waiting for room, all stored once the lock goes; 300: beyond that, records
    # are dropped (counted), and no write hangs.
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, retention_days=0, max_queue=50, batch_wait_s=0.01)
    await ledger.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        await asyncio.sleep(0.05)
        writes = [asyncio.create_task(ledger.write(rec(i))) for i in range(n)]
        await asyncio.sleep(0.3)
        assert 0 < sum(w.done() for w in writes) < n  # the queue is full: the rest wait for room
        assert ledger.queued <= 50
        other.execute("COMMIT")
        await asyncio.wait_for(asyncio.gather(*writes), 15)
    finally:
        other.close()
        await ledger.close()
    kept = stored(path)
    assert len(kept) == len(set(kept)) == n - ledger.dropped
    assert ledger.dropped == (0 if n == 90 else ledger.dropped) and (n == 90 or ledger.dropped > 0)


KILLED = textwrap.dedent("""
    import asyncio, os, signal, sys, time
    from pathlib import Path
    from quorum_node.control.ledger import Ledger
    from quorum_node.records import Record

    def rec(i):
        return Record(time=time.time(), request_id=f"r{i}", node="n", method="POST", path="/", surface="openai",
                      operation="chat", model="m", status=200, prompt_tokens=3, completion_tokens=5, duration_ms=1.0)

    async def main():
        # a writer that never wakes by itself: only the flush moves records into the database
        ledger = Ledger(Path(sys.argv[1]), batch_wait_s=3600, batch_records=10**9, journal_max_bytes=8192)
        await ledger.open()
        for i in range(200):
            await ledger.write(rec(i))
        await asyncio.to_thread(ledger.flush)  # these 200 are in the database, the mark past them
        for i in range(200, 500):
            await ledger.write(rec(i))  # these only in the journal
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
""")


def kill_mid_journal(path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-c", KILLED, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert p.returncode == -signal.SIGKILL and "written" in p.stdout, (p.returncode, p.stdout, p.stderr[-2000:])


async def test_a_killed_node_loses_no_written_record_and_replay_stores_each_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    kill_mid_journal(path)
    assert len(stored(path)) == 200  # what the writer had moved
    assert len(journal_files(path)) > 1  # the rest is in the journal, over several files (8 KiB each)

    ledger = Ledger(path)
    await ledger.open()  # a restart: the journal is replayed past the mark
    try:
        assert ledger.replayed == 300
        await ledger.write(rec(500))
    finally:
        await ledger.close()
    assert stored(path) == [f"r{i}" for i in range(501)]  # each once, in order
    again = Ledger(path)
    await again.open()
    await again.close()
    assert again.replayed == 0 and len(stored(path)) == 501  # replaying twice adds nothing


async def test_a_torn_journal_tail_is_dropped_and_the_records_before_it_kept(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    kill_mid_journal(path)
    *_, (_, last) = journal_files(path)
    with last.open("ab") as f:  # a machine crash mid-write: a header promising more than is there
        f.write((100).to_bytes(4, "little") + (0).to_bytes(4, "little") + b"\x93partial")
    ledger = Ledger(path)
    await ledger.open()
    await ledger.close()
    assert ledger.replayed == 300
    assert stored(path) == [f"r{i}" for i in range(500)]


@pytest.mark.slow  # waits out the journal's one-second retry
async def test_a_full_disk_for_the_journal_loses_nothing_it_can_still_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, batch_wait_s=0.01, journal_max_bytes=4096)  # a new file every dozen records
    await ledger.open()
    try:
        real = os.posix_fallocate

        def full(fd: int, offset: int, length: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", full)  # the next journal file cannot be made
        for i in range(40):
            await ledger.write(rec(i))  # no write fails or hangs
        assert ledger.journal_failed > 0
        monkeypatch.setattr(os, "posix_fallocate", real)  # room again: the journal goes on within a second
        await asyncio.sleep(1.1)
        failed = ledger.journal_failed
        for i in range(40, 60):
            await ledger.write(rec(i))
        assert ledger.journal_failed == failed
        assert journal_files(path)
    finally:
        await ledger.close()
    assert stored(path) == [f"r{i}" for i in range(60)]  # the unjournaled ones still reached the database


async def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    first = Ledger(path)
    await first.open()
    try:
        await first.write(rec(0))
        with pytest.raises(ConfigError, match="another quorum-node"):
            await Ledger(path).open()  # it would replay (and delete) the journal the first is writing
        await first.write(rec(1))
    finally:
        await first.close()
    assert stored(path) == ["r0", "r1"]
