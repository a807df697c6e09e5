"""The usage ledger: every request's record in SQLite, in the data dir.

A durable sink of ``Records`` (``node.records.add_durable(ledger.write)``):
the request path awaits ``write`` before the answer's last byte, and when it
returns the record survives the node being killed.

The journal. ``write`` appends the record (msgpack, framed with its length
and a CRC-32) to an append-only journal file next to the database, mapped
shared into memory: the append is a copy into the operating system's page
cache, about a microsecond and no system call, where an SQLite commit costs
tens (B-tree pages, WAL frames, file locks: about ten system calls). The
page cache belongs to the kernel, not to the process: a SIGKILL (or any
crash of quorum-node) loses nothing written. Only a crash of the whole
machine (power, kernel panic) can lose the last records before the kernel
writes them out, the same trade as SQLite's WAL with ``synchronous=NORMAL``,
which the database itself uses.

The database. One writer thread moves the journaled records into SQLite in
batches: it wakes when ``batch_records`` are waiting, when a query wants them
(``flush``), or every ``batch_wait_s``, and inserts the batch and the
journal position it reached (``journal_mark``) in one transaction. So
replaying is idempotent: ``open`` inserts what the journal holds past the
mark (what a killed node had not moved yet), and a torn tail (a machine
crash mid-write) is detected by its length or CRC and dropped. The journal
moves to a new file every ``journal_max_bytes``; a file is deleted once the
mark has passed it, so the journal stays small. The event loop never waits
for SQLite: checkpoints (which ``fsync``), locks another connection holds
and disk stalls are the writer thread's.

Bounds. At most ``max_queue`` records wait for the writer; beyond that a
``write`` waits for room (backpressure: the requests wait, memory does not
grow). If as many writers are already waiting for room, the record is
dropped, counted in ``dropped`` and logged: the node keeps serving rather
than grow without limit behind a stuck disk.

Retention. Records older than ``retention_days`` (0: keep forever) are
deleted by the writer thread, in small chunks between batches, at start and
every ``prune_interval_s``.

Queries (``query``, ``series``, ``recent``) first wait for the writer to
move every record written so far (read your writes), then read through a
second connection in a worker thread; WAL readers never block the writer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import mmap
import os
import sqlite3
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import structlog

from ..errors import ConfigError
from ..records import Record

__all__ = [
    "BY",
    "LEDGER_FILE",
    "Ledger",
    "SeriesPoint",
    "UsageRow",
    "journal_files",
    "open_readonly",
    "query_rows",
    "recent_records",
    "recover",
    "replay_journal",
    "series_rows",
]

log = structlog.get_logger(__name__)

LEDGER_FILE = "ledger.sqlite3"
_SCHEMA_VERSION = 3  # 2: no index on request_id (nothing reads by it); 3: the journal mark

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
CREATE TABLE IF NOT EXISTS journal_mark (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    gen INTEGER NOT NULL,
    offset INTEGER NOT NULL
);
INSERT OR IGNORE INTO journal_mark (id, gen, offset) VALUES (0, 0, 0);
"""
_INSERT = (
    "INSERT INTO records (time, request_id, node, peer, surface, operation, model, key_id, key_name, "
    "serving_node, route, status, outcome, prompt_tokens, completion_tokens, tokens_estimated, ttft_ms, "
    "duration_ms, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PRUNE_CHUNK = 5000
BUSY_WAIT_S = 10.0  # how long the writer thread waits for a write lock another connection holds
_MARK = "UPDATE journal_mark SET gen = ?, offset = ? WHERE id = 0"
_FRAME = struct.Struct("<II")  # a journal frame: payload length, CRC-32 of the payload; then the payload
MAX_FRAME = 1 << 20  # a record is a few hundred bytes; a longer "frame" is a torn or foreign tail

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(Record).decode


def _row(r: Record, raw: bytes) -> tuple[Any, ...]:
    return (
        r.time,
        r.request_id,
        r.node,
        r.peer,
        r.surface,
        r.operation,
        r.model,
        r.key_id,
        r.key_name,
        r.serving_node,
        r.route,
        r.status,
        r.outcome,
        r.prompt_tokens,
        r.completion_tokens,
        int(r.tokens_estimated),
        r.ttft_ms,
        r.duration_ms,
        raw,
    )


# -- the journal -----------------------------------------------------------------


def _journal_path(path: Path, gen: int) -> Path:
    return path.with_name(f"{path.stem}-journal.{gen:08d}")


def journal_files(path: Path) -> list[tuple[int, Path]]:
    """The journal files of the ledger at ``path``, oldest first (generation, file)."""
    out = []
    for f in path.parent.glob(f"{path.stem}-journal.*"):
        suffix = f.name.rsplit(".", 1)[1]
        if suffix.isdigit():
            out.append((int(suffix), f))
    return sorted(out)


def _lock(path: Path) -> int:
    """Take the ledger's lock file (held while a node has the ledger open; the kernel drops it when the
    process dies, however it dies), or raise OSError if another process holds it."""
    lock = path.with_name(f"{path.stem}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(f"{lock} is held by another quorum-node process: one node per data dir") from None
    return fd


def recover(path: Path) -> int:
    """Move the journal of a ledger no node has open into its database (``quorum-node usage`` with no node
    running, after one was killed). Returns the records moved; raises OSError if a node has it open."""
    fd = _lock(path)
    try:
        conn = _connect(path)
        try:
            conn.executescript(_CREATE)
            return replay_journal(conn, path)[0]
        finally:
            conn.close()
    finally:
        os.close(fd)


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _read_frames(f: Path, start: int) -> tuple[list[tuple[Record, bytes]], int, int]:
    """The records of journal file ``f`` from byte ``start``: (records and their payloads, the end of the
    last whole frame, bytes past it that are not a whole frame: a torn tail)."""
    data = f.read_bytes()
    pos, out = start, []
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if length == 0 or length > MAX_FRAME or end > len(data):  # 0: the file's unwritten rest (zeros)
            break
        payload = data[pos + _FRAME.size : end]
        if zlib.crc32(payload) != crc:
            break
        try:
            out.append((_unpack(payload), payload))
        except msgspec.DecodeError:  # whole, but not a record this version reads: passed over
            log.warning("ledger_journal_record_unreadable", file=str(f), offset=pos)
        pos = end
    return out, pos, len(data[pos:].rstrip(b"\0"))


def replay_journal(conn: sqlite3.Connection, path: Path) -> tuple[int, int]:
    """Insert what the journal holds past the database's mark (records of a node that was killed before
    its writer moved them), then delete the journal files. Idempotent. Returns (records inserted, the
    next journal generation)."""
    gen0, off0 = conn.execute("SELECT gen, offset FROM journal_mark").fetchone()
    files = journal_files(path)
    last, n = gen0, 0
    for gen, f in files:
        last = max(last, gen)
        if gen < gen0:  # the mark has passed it: every record of it is in the database
            continue
        records, end, torn = _read_frames(f, off0 if gen == gen0 else 0)
        if torn:
            log.warning("ledger_journal_torn_tail", file=str(f), bytes=torn)
        if records:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, [_row(r, p) for r, p in records])
                conn.execute(_MARK, (gen, end))
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            n += len(records)
    nxt = last + 1
    conn.execute(_MARK, (nxt, 0))
    for _, f in files:
        f.unlink(missing_ok=True)
    if n:
        log.info("ledger_journal_replayed", records=n, path=str(path))
    return n, nxt


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
    sql = (
        f"SELECT {expr} AS g, COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
        f"SUM(status >= 400 AND status != 499), SUM(tokens_estimated) FROM records{where} "
        f"GROUP BY g ORDER BY g"
    )
    return [
        UsageRow(group=str(g), requests=n, prompt_tokens=p, completion_tokens=c, errors=e or 0, estimated=x or 0)
        for g, n, p, c, e, x in conn.execute(sql, params)
    ]


def series_rows(
    conn: sqlite3.Connection, since: float, bucket_s: int, by: str, *, entry_only: bool = True
) -> list[SeriesPoint]:
    expr = BY[by]
    where, params = _where(since, entry_only)
    sql = (
        f"SELECT CAST(time / ? AS INTEGER) * ? AS t, {expr} AS g, COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
        f"COALESCE(SUM(completion_tokens), 0) FROM records{where} GROUP BY t, g ORDER BY t, g"
    )
    return [
        SeriesPoint(t=float(t), group=str(g), requests=n, prompt_tokens=p, completion_tokens=c)
        for t, g, n, p, c in conn.execute(sql, [bucket_s, bucket_s, *params])
    ]


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

    def __init__(
        self,
        path: Path,
        *,
        retention_days: float = 90.0,
        max_queue: int = 10_000,
        prune_interval_s: float = 3600.0,
        batch_records: int = 256,
        batch_wait_s: float = 0.2,
        journal_max_bytes: int = 4 << 20,
    ) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.max_queue = max_queue
        self.prune_interval_s = prune_interval_s
        self.batch_records = batch_records
        self.batch_wait_s = batch_wait_s
        self.journal_max_bytes = journal_max_bytes
        self.written = 0  # records committed to the database
        self.commits = 0  # the writer's transactions
        self.replayed = 0  # records found in the journal at open (the node before was killed)
        self.dropped = 0  # records not stored because the writer was too far behind
        self.failed = 0  # records whose insert failed (disk full, I/O error)
        self.journal_failed = 0  # records whose journal write failed (they wait in memory only)
        # (record, its msgpack, the journal generation and offset just past it), oldest first. The loop
        # appends, the writer thread pops: a deque's append and popleft are atomic.
        self._queue: collections.deque[tuple[Record, bytes, int, int]] = collections.deque()
        self._appended = 0  # records queued so far (the loop's count)
        self._done = 0  # of those, the ones the writer has finished with (stored or failed)
        self._cond = threading.Condition()  # wakes the writer; the writer wakes flushes
        self._flush_wanted = False
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
        self._map: mmap.mmap | None = None  # the journal file being appended to (the loop's), mapped
        self._gen = 0  # its generation
        self._offset = 0  # the end of its last frame
        self._reopen_at = 0.0  # after a journal failure: when to try a new file
        self._mark_gen = 0  # the generation the database's mark is in (the writer's)
        self._mark: tuple[int, int] = (0, 0)  # the database's mark: the journal position it has reached
        self._lock_fd: int | None = None

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
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            raise ConfigError(f"usage ledger {self.path}: {e} (or run with --no-ledger)") from None
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        log.info("ledger_opened", path=str(self.path), retention_days=self.retention_days, replayed=self.replayed)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.path)
        conn = _connect(self.path)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.executescript(_CREATE)
        if version < _SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        self.replayed, self._gen = replay_journal(conn, self.path)
        self._mark_gen = self._gen
        self._mark = (self._gen, 0)
        self._map = self._open_journal(self._gen)
        self._conn = conn
        self._reader = _connect(self.path)

    def _open_journal(self, gen: int) -> mmap.mmap:
        """A new journal file, its blocks allocated up front (a full disk fails here, not as a SIGBUS on a
        later store into the mapping), mapped shared: a record is a copy into the kernel's page cache."""
        fd = os.open(_journal_path(self.path, gen), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.journal_max_bytes)
            return mmap.mmap(fd, self.journal_max_bytes)
        finally:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Move what is queued into the database, stop the writer, close the files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._map is not None:
            self._map.close()
            self._map = None
        # Every journaled record is in the database: no journal is left. Otherwise (the last inserts
        # failed) the files stay, and the next open replays them from the mark.
        if self._thread is not None and not self._queue and self._mark == (self._gen, self._offset):
            for _, f in journal_files(self.path):
                f.unlink(missing_ok=True)
        for conn in (self._conn, self._reader):
            if conn is not None:
                conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with it
            self._lock_fd = None
        log.info("ledger_closed", path=str(self.path), written=self.written, dropped=self.dropped)

    # -- the durable sink ----------------------------------------------------

    async def write(self, record: Record) -> None:
        """Store ``record``: when this returns, it is in the journal (see the module docstring)."""
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
        payload = _pack(record)
        self._journal(payload)
        queue = self._queue
        queue.append((record, payload, self._gen, self._offset))
        self._appended += 1
        if len(queue) == self.batch_records:  # a batch is ready: no need to wait for the writer's timer
            with self._cond:
                self._cond.notify_all()

    def _journal(self, payload: bytes) -> None:
        """Append one record to the journal: a copy into the mapped file, no system call. A file that is
        full is followed by the next; one that cannot be made leaves the record to the database alone."""
        frame = _frame(payload)
        end = self._offset + len(frame)
        if self._map is None or end > self.journal_max_bytes:
            if (self._map is None and time.monotonic() < self._reopen_at) or not self._next_journal():
                self.journal_failed += 1
                return
            end = len(frame)
            if end > self.journal_max_bytes:  # a record bigger than a journal file: the database only
                self.journal_failed += 1
                return
        self._map[self._offset : end] = frame  # type: ignore[index]
        self._offset = end

    def _next_journal(self) -> bool:
        """Go on in the journal's next file (its files stay small; the writer deletes the ones it has moved)."""
        if self._map is not None:
            self._map.close()
            self._map = None
        try:
            self._map = self._open_journal(self._gen + 1)
        except (OSError, ValueError) as e:
            log.error("ledger_journal_open_failed", error=str(e), path=str(self.path))
            self._reopen_at = time.monotonic() + 1.0
            return False
        self._gen, self._offset = self._gen + 1, 0
        return True

    def _drop(self, record: Record) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log > 1.0:
            self._last_drop_log = now
            log.warning(
                "ledger_behind_record_dropped",
                dropped=self.dropped,
                queued=len(self._queue),
                request_id=record.request_id,
            )

    def _room_free(self) -> None:
        if self._room is not None and self._waiting:
            self._room.set()
            self._room = asyncio.Event()

    # -- the writer thread -----------------------------------------------------

    def _run(self) -> None:
        conn = self._conn
        assert conn is not None and self._loop is not None
        next_prune = time.monotonic()
        pruning = self.retention_days > 0
        queue = self._queue
        while True:
            with self._cond:
                if not (self._flush_wanted or self._closing or len(queue) >= self.batch_records):
                    wait = self.batch_wait_s
                    if pruning:
                        wait = max(0.0, min(wait, next_prune - time.monotonic()))
                    self._cond.wait(timeout=wait)
                self._flush_wanted = False
                closing = self._closing
            while queue:  # a batch: what is there now (more may come while it commits)
                batch = [queue.popleft() for _ in range(min(len(queue), self.max_queue))]
                self._insert(conn, batch)
                with self._cond:
                    self._done += len(batch)
                    self._cond.notify_all()  # flushes waiting for these
                if self._waiting:
                    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                        self._loop.call_soon_threadsafe(self._room_free)
            if pruning and time.monotonic() >= next_prune and self._prune_chunk(conn) < _PRUNE_CHUNK:  # done for now
                next_prune = time.monotonic() + self.prune_interval_s
            if closing and not queue:
                break

    def _insert(self, conn: sqlite3.Connection, batch: list[tuple[Record, bytes, int, int]]) -> None:
        """One transaction: the batch's rows and the journal position they reach."""
        gen, offset = batch[-1][2], batch[-1][3]
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT, [_row(r, p) for r, p, _, _ in batch])
                conn.execute(_MARK, (gen, offset))
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.OperationalError) and "locked" in str(e) and time.monotonic() < deadline:
                    time.sleep(0.01)  # another connection holds the write lock: wait for it, here
                    continue
                self._failed(len(batch), str(e))
                return
            break
        self.written += len(batch)
        self.commits += 1
        for g in range(self._mark_gen, gen):  # the mark has passed these files
            with contextlib.suppress(OSError):
                _journal_path(self.path, g).unlink(missing_ok=True)
        self._mark_gen = max(self._mark_gen, gen)
        self._mark = (gen, offset)

    def _failed(self, n: int, error: str) -> None:
        self.failed += n
        log.error("ledger_write_failed", records=n, error=error)

    def flush(self, target: int | None = None, timeout_s: float = BUSY_WAIT_S + 5) -> bool:
        """Wait (in a worker thread, never on the loop) until the writer has moved the first ``target``
        records (default: all written so far) into the database. False if it did not in time."""
        target = self._appended if target is None else target
        with self._cond:
            if self._done >= target:
                return True
            if self._thread is None or not self._thread.is_alive():
                return False
            self._flush_wanted = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target, timeout_s)

    def _prune_chunk(self, conn: sqlite3.Connection) -> int:
        cutoff = time.time() - self.retention_days * 86400
        try:
            cur = conn.execute(
                "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records WHERE time < ? LIMIT ?)",
                (cutoff, _PRUNE_CHUNK),
            )
            if cur.rowcount:
                log.info("ledger_pruned", records=cur.rowcount, retention_days=self.retention_days)
            return cur.rowcount
        except sqlite3.Error as e:
            log.error("ledger_prune_failed", error=str(e))
            return 0

    # -- queries ------------------------------------------------------------------

    def _read(self, target: int, fn: Any, *args: Any, **kw: Any) -> Any:
        self.flush(target)  # read your writes: what was written before the query was asked is in it
        with self._read_lock:
            assert self._reader is not None
            return fn(self._reader, *args, **kw)

    async def query(self, since: float | None, by: str, *, entry_only: bool = True) -> list[UsageRow]:
        """Totals per ``by`` group (key, model, node, day, surface) since ``since`` (epoch seconds)."""
        if by not in BY:
            raise ValueError(f"by: one of {', '.join(BY)}")
        return await asyncio.to_thread(self._read, self._appended, query_rows, since, by, entry_only=entry_only)

    async def series(self, since: float, bucket_s: int, by: str, *, entry_only: bool = True) -> list[dict[str, Any]]:
        """Totals per time bucket and group, oldest first: dicts of t, group, requests, prompt/completion tokens."""
        if by not in BY:
            raise ValueError(f"by: one of {', '.join(BY)}")
        points = await asyncio.to_thread(
            self._read, self._appended, series_rows, since, max(1, int(bucket_s)), by, entry_only=entry_only
        )
        return [msgspec.structs.asdict(p) for p in points]

    async def recent(self, limit: int) -> list[Record]:
        """The last ``limit`` records made on this node, newest first."""
        return await asyncio.to_thread(self._read, self._appended, recent_records, max(0, int(limit)))
