"""The usage ledger: every request's record in SQLite, in the data dir.

A durable sink of ``Records`` (``node.records.add_durable(ledger.write)``):
``write`` returns once the record is committed, and the request path awaits
it before the answer's last byte, so a client that has its whole answer
knows its record is stored.

Durability. The file is in WAL mode with ``synchronous=NORMAL``: a commit
appends the transaction's frames to the ``-wal`` file with ``write(2)`` and
does not ``fsync``. Once ``write`` has returned, the frames are in the
operating system's page cache, which belongs to the kernel, not to the
process: a SIGKILL (or any crash of quorum-node) loses nothing committed.
Only a crash of the whole machine (power, kernel panic) can lose the last
commits before the next checkpoint's ``fsync``; that is the trade the WAL
documentation describes for NORMAL, and what keeps a commit in the tens of
microseconds instead of an fsync's milliseconds.

Inline when idle, batched under load. A commit is one ``write(2)`` of a
few KiB (tens of microseconds), while handing a record to a thread and
waking the loop again costs a request about ten times that in latency. So a
record that finds the writer idle (nothing queued, the write connection
free) is committed inline, on the loop. Otherwise it is queued for the
writer thread, which does *group commit*: records queued from the loop are
drained all at once, inserted in one transaction and committed; then one
``loop.call_soon_threadsafe`` resolves every waiter of that batch. Under
load a batch holds every record that arrived during the previous commit, so
the cost per record falls as the rate rises.

What could stall the loop stays in the thread: automatic checkpoints (which
``fsync``) are off on the write connection, and the writer thread runs a
passive checkpoint after every ``checkpoint_commits`` commits, so the
``-wal`` file stays bounded.

Bounds. At most ``max_queue`` records wait for the writer; beyond that a
``write`` waits for room (backpressure: the requests wait, memory does not
grow). If as many writers are already waiting for room, the record is
dropped, counted in ``dropped`` and logged: the node keeps serving rather
than grow without limit behind a stuck disk.

Retention. Records older than ``retention_days`` (0: keep forever) are
deleted by the writer thread, in small chunks between batches, at start and
every ``prune_interval_s``.

Queries (``query``, ``series``, ``recent``) read through a second
connection in a worker thread; WAL readers never block the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import structlog

from ..errors import ConfigError
from ..records import Record

__all__ = ["BY", "LEDGER_FILE", "Ledger", "SeriesPoint", "UsageRow", "query_rows", "recent_records",
           "series_rows", "open_readonly"]

log = structlog.get_logger(__name__)

LEDGER_FILE = "ledger.sqlite3"
_SCHEMA_VERSION = 2  # 2: no index on request_id (nothing reads by it; it cost each insert a page)

By = Literal["key", "model", "node", "day", "surface"]
# The SQL expression each grouping reads; the only strings ever put into SQL text.
BY: dict[str, str] = {
    "key": "COALESCE(key_name, '-')",
    "model": "COALESCE(model, '-')",
    "node": "COALESCE(serving_node, '-')",  # where it was served ('-': nowhere, refused)
    "day": "date(time, 'unixepoch')",  # UTC days
    "surface": "COALESCE(surface, '-')",
}

_Group = Annotated[str, msgspec.Meta(max_length=1024)]
_Count = Annotated[int, msgspec.Meta(ge=0)]


class UsageRow(msgspec.Struct, frozen=True, kw_only=True):
    """Totals of one group (a key, a model, a serving node, a day, a surface)."""

    group: _Group
    requests: _Count
    prompt_tokens: _Count
    completion_tokens: _Count
    errors: _Count  # answered with a status >= 400 (a client that went away, 499, is not an error)
    estimated: _Count = 0  # requests among these whose tokens are an estimate (the engine gave no usage)


class SeriesPoint(msgspec.Struct, frozen=True, kw_only=True):
    t: float  # the bucket's start (epoch seconds)
    group: _Group
    requests: _Count
    prompt_tokens: _Count
    completion_tokens: _Count


_CREATE = """
CREATE TABLE IF NOT EXISTS records (
    time REAL NOT NULL,
    request_id TEXT NOT NULL,
    node TEXT NOT NULL,
    peer TEXT,
    surface TEXT,
    operation TEXT,
    model TEXT,
    key_id TEXT,
    key_name TEXT,
    serving_node TEXT,
    route TEXT,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    tokens_estimated INTEGER NOT NULL,
    ttft_ms REAL,
    duration_ms REAL NOT NULL,
    raw BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_time ON records (time);
DROP INDEX IF EXISTS records_request;
"""
_INSERT = ("INSERT INTO records (time, request_id, node, peer, surface, operation, model, key_id, key_name, "
           "serving_node, route, status, outcome, prompt_tokens, completion_tokens, tokens_estimated, ttft_ms, "
           "duration_ms, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_PRUNE_CHUNK = 5000
BUSY_WAIT_S = 10.0  # how long the writer thread waits for a write lock another connection holds

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(Record).decode


def _row(r: Record) -> tuple[Any, ...]:
    return (r.time, r.request_id, r.node, r.peer, r.surface, r.operation, r.model, r.key_id, r.key_name,
            r.serving_node, r.route, r.status, r.outcome, r.prompt_tokens, r.completion_tokens,
            int(r.tokens_estimated), r.ttft_ms, r.duration_ms, _pack(r))


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def open_readonly(path: Path) -> sqlite3.Connection:
    """The ledger of a node that is not running, for reading (``quorum-node usage``)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    return conn


def _where(since: float | None, entry_only: bool) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if since is not None:
        clauses.append("time >= ?")
        params.append(since)
    if entry_only:
        clauses.append("peer IS NULL")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def query_rows(conn: sqlite3.Connection, since: float | None, by: str, *, entry_only: bool = True) -> list[UsageRow]:
    """Totals per group. ``entry_only``: only requests that entered the cluster here (``peer`` None), so
    summing these over every node counts each request once."""
    expr = BY[by]
    where, params = _where(since, entry_only)
    sql = (f"SELECT {expr} AS g, COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
           f"SUM(status >= 400 AND status != 499), SUM(tokens_estimated) FROM records{where} "
           f"GROUP BY g ORDER BY g")
    return [UsageRow(group=str(g), requests=n, prompt_tokens=p, completion_tokens=c, errors=e or 0,
                     estimated=x or 0) for g, n, p, c, e, x in conn.execute(sql, params)]


def series_rows(conn: sqlite3.Connection, since: float, bucket_s: int, by: str, *,
                entry_only: bool = True) -> list[SeriesPoint]:
    expr = BY[by]
    where, params = _where(since, entry_only)
    sql = (f"SELECT CAST(time / ? AS INTEGER) * ? AS t, {expr} AS g, COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
           f"COALESCE(SUM(completion_tokens), 0) FROM records{where} GROUP BY t, g ORDER BY t, g")
    return [SeriesPoint(t=float(t), group=str(g), requests=n, prompt_tokens=p, completion_tokens=c)
            for t, g, n, p, c in conn.execute(sql, [bucket_s, bucket_s, *params])]


def recent_records(conn: sqlite3.Connection, limit: int) -> list[Record]:
    out = []
    for (raw,) in conn.execute("SELECT raw FROM records ORDER BY rowid DESC LIMIT ?", (limit,)):
        try:
            out.append(_unpack(raw))
        except msgspec.DecodeError:  # a row written by a newer, incompatible version
            continue
    return out


class Ledger:
    """The usage ledger of one node. ``await open()``; ``write`` is the durable sink; ``await close()``."""

    def __init__(self, path: Path, *, retention_days: float = 90.0, max_queue: int = 10_000,
                 prune_interval_s: float = 3600.0, checkpoint_commits: int = 500) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.max_queue = max_queue
        self.prune_interval_s = prune_interval_s
        self.checkpoint_commits = checkpoint_commits
        self.inline = 0  # records committed on the loop (the writer was idle)
        self.checkpoints = 0
        self._commits = 0  # since the last checkpoint
        self._conn_lock = threading.Lock()  # the write connection: the loop (inline) or the writer thread
        self.dropped = 0  # records not stored because the writer was too far behind
        self.failed = 0  # records whose insert failed (disk full, I/O error)
        self.written = 0
        self._queue: list[tuple[Record, asyncio.Future[None]]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room: asyncio.Event | None = None
        self._waiting = 0
        self._last_drop_log = 0.0

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        try:
            await asyncio.to_thread(self._open_sync)
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(f"usage ledger {self.path}: {e} (or run with --no-ledger)") from None
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        log.info("ledger_opened", path=str(self.path), retention_days=self.retention_days)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the writer thread checkpoints, never a commit on the loop
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.executescript(_CREATE)
        if version < _SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        conn.execute("PRAGMA busy_timeout=0")  # a lock held elsewhere: the loop hands over, the thread waits
        self._conn = conn
        self._reader = _connect(self.path)

    async def close(self) -> None:
        """Write what is queued, stop the writer, close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        for conn in (self._conn, self._reader):
            if conn is not None:
                conn.close()
        log.info("ledger_closed", path=str(self.path), written=self.written, dropped=self.dropped)

    # -- the durable sink ----------------------------------------------------

    async def write(self, record: Record) -> None:
        """Store ``record``; returns once it is committed (see the module docstring for the bounds)."""
        if self._closing:
            log.warning("ledger_closed_record_lost", request_id=record.request_id)
            return
        while len(self._queue) >= self.max_queue:
            if self._waiting >= self.max_queue:
                self._drop(record)
                return
            assert self._room is not None
            room = self._room
            self._waiting += 1
            try:
                await room.wait()
            finally:
                self._waiting -= 1
        # The writer is idle: commit here, one write(2), no thread round trip. When a checkpoint is due,
        # the record goes to the thread, which checkpoints right after it: the -wal file stays bounded
        # however the threads are scheduled.
        if not self._queue and self._commits < self.checkpoint_commits and self._conn_lock.acquire(blocking=False):
            try:
                done = self._commit(self._conn, [record])  # type: ignore[arg-type]
            finally:
                self._conn_lock.release()
            if done:
                self.inline += 1
                return
            # another connection holds the write lock: the writer thread waits for it, the loop does not
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        with self._cond:
            self._queue.append((record, fut))
            if len(self._queue) == 1:
                self._cond.notify()
        await fut

    def _drop(self, record: Record) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log > 1.0:
            self._last_drop_log = now
            log.warning("ledger_behind_record_dropped", dropped=self.dropped, queued=len(self._queue),
                        request_id=record.request_id)

    def _batch_done(self, futs: list[asyncio.Future[None]]) -> None:
        for f in futs:
            if not f.done():
                f.set_result(None)
        if self._room is not None and self._waiting:
            self._room.set()
            self._room = asyncio.Event()

    # -- the writer thread -----------------------------------------------------

    def _run(self) -> None:
        conn = self._conn
        assert conn is not None and self._loop is not None
        next_prune = time.monotonic()
        pruning = self.retention_days > 0
        while True:
            with self._cond:
                while not self._queue and not self._closing and self._commits < self.checkpoint_commits:
                    if pruning and time.monotonic() >= next_prune:
                        break
                    wait = max(0.05, next_prune - time.monotonic()) if pruning else None
                    self._cond.wait(timeout=wait)
                batch, self._queue = self._queue, []
                closing = self._closing
            with self._conn_lock:
                if batch:
                    self._insert(conn, batch)
                if self._commits >= self.checkpoint_commits or (closing and not batch):
                    self._checkpoint(conn)
                if pruning and time.monotonic() >= next_prune:
                    if self._prune_chunk(conn) < _PRUNE_CHUNK:  # done for now
                        next_prune = time.monotonic() + self.prune_interval_s
            if closing and not batch:
                break

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        self._commits = 0
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.checkpoints += 1
        except sqlite3.Error as e:
            log.error("ledger_checkpoint_failed", error=str(e))

    def _commit(self, conn: sqlite3.Connection, records: list[Record]) -> bool:
        """Insert and commit ``records`` (holding ``_conn_lock``). False: another connection holds the
        database's write lock, nothing was written (the write connection never waits for it)."""
        try:
            if len(records) == 1:  # autocommit: one statement, its own transaction
                conn.execute(_INSERT, _row(records[0]))
            else:
                conn.execute("BEGIN")
                conn.executemany(_INSERT, [_row(r) for r in records])
                conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                return False
            self._failed(len(records), str(e))
            return True
        self.written += len(records)
        self._commits += 1
        return True

    def _failed(self, n: int, error: str) -> None:
        self.failed += n
        log.error("ledger_write_failed", records=n, error=error)

    def _insert(self, conn: sqlite3.Connection, batch: list[tuple[Record, asyncio.Future[None]]]) -> None:
        """The writer thread's commit of a batch (waiting up to ``BUSY_WAIT_S`` for a lock another
        connection holds); then every waiter of the batch is resolved on the loop."""
        records = [r for r, _ in batch]
        deadline = time.monotonic() + BUSY_WAIT_S
        while not self._commit(conn, records):
            if time.monotonic() > deadline:
                self._failed(len(records), "the database stayed locked by another connection")
                break
            time.sleep(0.01)
        try:
            self._loop.call_soon_threadsafe(self._batch_done, [f for _, f in batch])  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _prune_chunk(self, conn: sqlite3.Connection) -> int:
        cutoff = time.time() - self.retention_days * 86400
        try:
            cur = conn.execute("DELETE FROM records WHERE rowid IN (SELECT rowid FROM records WHERE time < ? "
                               "LIMIT ?)", (cutoff, _PRUNE_CHUNK))
            if cur.rowcount:
                log.info("ledger_pruned", records=cur.rowcount, retention_days=self.retention_days)
            return cur.rowcount
        except sqlite3.Error as e:
            log.error("ledger_prune_failed", error=str(e))
            return 0

    # -- queries ------------------------------------------------------------------

    def _read(self, fn: Any, *args: Any, **kw: Any) -> Any:
        with self._read_lock:
            assert self._reader is not None
            return fn(self._reader, *args, **kw)

    async def query(self, since: float | None, by: str, *, entry_only: bool = True) -> list[UsageRow]:
        """Totals per ``by`` group (key, model, node, day, surface) since ``since`` (epoch seconds)."""
        if by not in BY:
            raise ValueError(f"by: one of {', '.join(BY)}")
        return await asyncio.to_thread(self._read, query_rows, since, by, entry_only=entry_only)

    async def series(self, since: float, bucket_s: int, by: str, *, entry_only: bool = True) -> list[dict[str, Any]]:
        """Totals per time bucket and group, oldest first: dicts of t, group, requests, prompt/completion tokens."""
        if by not in BY:
            raise ValueError(f"by: one of {', '.join(BY)}")
        points = await asyncio.to_thread(self._read, series_rows, since, max(1, int(bucket_s)), by,
                                         entry_only=entry_only)
        return [msgspec.structs.asdict(p) for p in points]

    async def recent(self, limit: int) -> list[Record]:
        """The last ``limit`` records made on this node, newest first."""
        return await asyncio.to_thread(self._read, recent_records, max(0, int(limit)))
