"""API keys: who may call the cluster, kept by every node, agreed between them.

A key is ``qk_`` + 43 characters of ``secrets.token_urlsafe(32)`` (256 bits).
It is shown once, when it is made; the nodes keep only its SHA-256 (the
secret is high-entropy, so a plain hash cannot be brute-forced) and compare
hashes in constant time.

Each key is one ``KeyRecord``: its id, name, display prefix, hash, scopes
(model globs), expiry, rate, whether it may administer keys, and whether it was
revoked. A record is *versioned* (``version``, ``origin``: the node that wrote
it) and *signed* with the Ed25519 key of that node (``cluster/identity.py``),
so a record that was changed on the way, or made by anyone but a member of
the cluster, is refused wherever it arrives (``RecordSigner``: a record is
taken from a peer only if its origin is a member at the time; records held
already stay when their origin is removed later).

Merging is a max over a total order, so it is commutative, associative and
idempotent (nodes converge whatever order records arrive in, however often)::

    rank(r) = (r.revoked is not None, r.version, r.origin, r.sig)

A tombstone (a revoked record) outranks every live version of its key: once
any node has revoked a key, no older or concurrent record brings it back.

Compaction (``compactable``): a store forgets a record, and refuses it from
peers, once

- its key expired more than ``EXPIRED_GRACE_S`` (7 days) ago, live or
  revoked: a key's expiry never changes between versions, so every node
  refuses that key whatever record of it it holds (the grace covers clocks
  that disagree, and lets ``keys list`` show expired keys for a while); this
  is always safe;
- it is a tombstone revoked more than ``tombstone_retention_s`` ago
  (``key_tombstone_retention_days``, 90 by default; 0 keeps tombstones for
  good). This one is a trade: a node that was offline for longer than that,
  still holding the key as live, brings it back when it returns (revoke it
  again then). Without it a cluster that makes and revokes keys would reach
  ``MAX_RECORDS`` one day and could make no more.

The store lives in ``<data_dir>/keys.json`` (0600, written atomically: temp
file, fsync, rename).

``last_used`` is advisory and kept out of the signed records (it would make
them churn): each node notes its own last request with a key in memory (no
disk write, no message per request), merges its peers' notes by taking the
maximum, and the replication exchanges the notes that changed once every
``keys_last_used_sync_s`` (``take_used_changes``, ``merge_used``). They are
saved in the same file, at most once per such interval.

Pure logic: no asyncio. ``now`` is wall-clock seconds (expiry is a date) for
records and ``time.monotonic()`` for rate buckets.
"""

from __future__ import annotations

import builtins
import fnmatch
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Protocol

import msgspec
import structlog

from ..errors import BadRequest, ConfigError, NotFound

__all__ = [
    "EXPIRED_GRACE_S",
    "KEYS_FILE",
    "KEY_PREFIX",
    "Grant",
    "KeyInfo",
    "KeyRecord",
    "KeyStore",
    "RecordSigner",
    "compactable",
    "merge_rank",
    "open_keystore",
    "parse_duration",
]

log = structlog.get_logger(__name__)

KEY_PREFIX = "qk_"
KEYS_FILE = "keys.json"
_DISPLAY_CHARS = 8  # of the random part shown in listings: enough to tell keys apart, useless to guess
_MAX_SECRET_CHARS = 128
MAX_RECORDS = 10_000  # live keys and tombstones together
MAX_PATTERNS = 32
EXPIRED_GRACE_S = 7 * 86400.0  # a record of a key expired longer ago than this is forgotten (see compactable)

_Id = Annotated[str, msgspec.Meta(pattern=r"^k_[0-9a-f]{12}$")]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_Pattern = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
_Hash = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
_Prefix = Annotated[str, msgspec.Meta(max_length=16)]
# Ed25519 (128 hex); 64 hex: an HMAC of the shared-secret days, signed anew on load
_Sig = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{64}|[0-9a-f]{128})?$")]
_NodeId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
_Time = Annotated[float, msgspec.Meta(ge=0, le=1e11)]
_Rate = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
_Version = Annotated[int, msgspec.Meta(ge=1, le=2**31)]


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One API key as every node stores and replicates it (never the key itself)."""

    id: _Id
    name: _Name
    prefix: _Prefix
    hash: _Hash
    models: Annotated[tuple[_Pattern, ...], msgspec.Meta(max_length=MAX_PATTERNS)] = ()
    created: _Time
    expires: _Time | None = None
    rate_per_min: _Rate | None = None
    admin: bool = False
    revoked: _Time | None = None  # when; a record with this set is a tombstone
    version: _Version = 1
    origin: _NodeId  # the node that wrote this version
    sig: _Sig = ""  # Ed25519 signature of ``_canonical`` by ``origin``, hex


class KeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What may be shown about a key: everything but the key and its hash."""

    id: str
    name: str
    prefix: str
    models: list[str]
    created: float
    expires: float | None
    last_used: float | None  # anywhere in the cluster, as far as this node has heard (advisory)
    rate_per_min: int | None
    admin: bool
    revoked: bool
    revoked_at: float | None


class _KeysFile(msgspec.Struct, kw_only=True):
    version: int = 1
    records: Annotated[list[KeyRecord], msgspec.Meta(max_length=MAX_RECORDS)] = []
    used: dict[str, float] = {}


_file_decoder = msgspec.json.Decoder(_KeysFile)
_encode = msgspec.json.Encoder().encode


def compactable(r: KeyRecord, now: float, tombstone_retention_s: float) -> bool:
    """Whether a store may forget ``r`` (and refuse it from peers) at wall-clock ``now``.

    Always for a key expired more than ``EXPIRED_GRACE_S`` ago (refused
    everywhere anyway); for a tombstone, once it is older than
    ``tombstone_retention_s`` (0: never).
    """
    if r.expires is not None and now >= r.expires + EXPIRED_GRACE_S:
        return True
    return r.revoked is not None and tombstone_retention_s > 0 and now >= r.revoked + tombstone_retention_s


def merge_rank(r: KeyRecord) -> tuple[bool, int, str, str]:
    """The order merges take the maximum of: tombstones first, then the newest version."""
    return (r.revoked is not None, r.version, r.origin, r.sig)


def _canonical(r: KeyRecord) -> bytes:
    return _encode(
        [
            "quorum-key-record-v1",
            r.id,
            r.name,
            r.prefix,
            r.hash,
            list(r.models),
            r.created,
            r.expires,
            r.rate_per_min,
            r.admin,
            r.revoked,
            r.version,
            r.origin,
        ]
    )


class RecordSigner(Protocol):
    """Who signs this node's key records, and whose signatures it takes (``cluster/members_sync.py``)."""

    origin: str  # this node's id

    def sign(self, data: bytes) -> bytes: ...

    def verify(self, origin: str, data: bytes, signature: bytes, *, current: bool) -> bool:
        """Whether ``origin`` signed ``data``: a member now (``current``), or one at some time."""
        ...


def sign_record(signer: RecordSigner, r: KeyRecord) -> KeyRecord:
    r = msgspec.structs.replace(r, origin=signer.origin)
    return msgspec.structs.replace(r, sig=signer.sign(_canonical(r)).hex())


def record_verifies(signer: RecordSigner, r: KeyRecord, *, current: bool = True) -> bool:
    if len(r.sig) != 128:
        return False
    return signer.verify(r.origin, _canonical(r), bytes.fromhex(r.sig), current=current)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``30d``, ``2w``, ``1d12h`` or plain seconds → seconds (> 0)."""
    t = text.strip().lower()
    try:
        seconds = float(t)
    except ValueError:
        parts = _DURATION_RE.findall(t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise ValueError(f"bad duration {text!r} (e.g. 90s, 15m, 12h, 30d, 2w)") from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not (0 < seconds < 1e10) or math.isnan(seconds):
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


class _Bucket:
    """A token bucket: ``rate_per_min`` requests a minute, bursts up to a minute's worth."""

    __slots__ = ("rate_s", "capacity", "tokens", "t")

    def __init__(self, rate_per_min: int, now: float) -> None:
        self.rate_s = rate_per_min / 60.0
        self.capacity = float(rate_per_min)
        self.tokens = self.capacity
        self.t = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there is."""
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate_s)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_s


class Grant:
    """A key that authenticated a request: what it may do (scopes compiled once, its rate bucket)."""

    __slots__ = ("id", "name", "admin", "info", "_match", "_bucket")

    def __init__(self, record: KeyRecord, info: KeyInfo, bucket: _Bucket | None) -> None:
        self.id = record.id
        self.name = record.name
        self.admin = record.admin
        self.info = info
        self._match = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in record.models)).match if record.models else None
        )
        self._bucket = bucket

    def allows(self, model: str) -> bool:
        """Whether the key's model scopes (fnmatch globs, case-sensitive) cover ``model``."""
        return self._match is None or self._match(model) is not None

    def take(self, now: float) -> float:
        """Spend one request of the key's rate on this node: 0.0, or the seconds to wait."""
        return 0.0 if self._bucket is None else self._bucket.take(now)


class KeyStore:
    """Every key this node knows, persisted in the data dir; merges records from peers.

    ``signer``: signs this node's records with its key and checks the others'
    against membership (None: records stay unsigned, for tests of the store
    alone). ``origin``: this node's id.
    ``on_change`` callbacks run after every change of the records (create,
    revoke, a merge that changed something): the replication pushes then.
    ``tombstone_retention_s``: how long a tombstone is kept (0: for good; see
    ``compactable``).
    """

    def __init__(
        self,
        path: Path | None,
        *,
        signer: RecordSigner | None,
        origin: str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        tombstone_retention_s: float = 0.0,
    ) -> None:
        self.path = path
        self.signer = signer
        self.origin = origin
        self.tombstone_retention_s = tombstone_retention_s
        self._clock = clock
        self._monotonic = monotonic
        self._records: dict[str, KeyRecord] = {}
        self._by_hash: dict[str, str] = {}
        self._grants: dict[str, Grant] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._used: dict[str, float] = {}  # key id -> last use anywhere we heard of (wall clock)
        self._used_sent: dict[str, float] = {}  # what take_used_changes last handed out
        self.digest = ""
        self.on_change: list[Callable[[], None]] = []
        if path is not None:
            self._load(path)
        self._reindex()

    # -- persistence -----------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror}") from None
        try:
            stored = _file_decoder.decode(raw)
        except msgspec.DecodeError as e:
            # Never start without the revocations it holds: a node that forgot them would accept revoked keys.
            raise ConfigError(f"{path} is damaged ({e}); restore it or delete it to start with no keys") from None
        resigned = 0
        for r in stored.records:
            if self.signer is not None and not record_verifies(self.signer, r, current=False):
                # Written by `keys create` while no node ran, or signed with the shared secret of before keys:
                # this data dir (0600, next to this node's key) is this node's own, so it signs them now.
                r = sign_record(self.signer, r)
                resigned += 1
            self._records[r.id] = r
        self._used = {k: v for k, v in stored.used.items() if k in self._records}
        self._used_sent = dict(self._used)  # peers heard of these before the restart, or learn them on a full push
        dropped = self._compact(self._clock())
        if resigned:
            log.info("key_records_signed", count=resigned)
        if resigned or dropped:
            self.save()

    def snapshot(self) -> bytes:
        """The store file's bytes (encoded on the loop; written by ``write``, maybe in a thread)."""
        records = sorted(self._records.values(), key=lambda r: r.created)
        return _encode(_KeysFile(records=records, used=dict(self._used)))

    def write(self, data: bytes) -> None:
        if self.path is None:
            return
        from ..cluster.membership import _ensure_dir, _write_private

        _ensure_dir(self.path.parent)
        _write_private(self.path, data, replace=True)

    def save(self) -> None:
        self.write(self.snapshot())

    # -- indexes -----------------------------------------------------------------

    def _reindex(self) -> None:
        self._by_hash = {r.hash: r.id for r in self._records.values()}
        self._grants = {}
        now = self._monotonic()
        for r in self._records.values():
            if r.revoked is not None:
                continue
            bucket = None
            if r.rate_per_min is not None:
                bucket = self._buckets.get(r.id)
                if bucket is None or bucket.capacity != r.rate_per_min:
                    bucket = self._buckets[r.id] = _Bucket(r.rate_per_min, now)
            self._grants[r.id] = Grant(r, self._info(r), bucket)
        lines = sorted(
            f"{r.id}:{r.version}:{r.origin}:{r.sig}:{int(r.revoked is not None)}" for r in self._records.values()
        )
        self.digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32] if lines else ""

    def _changed(self) -> None:
        self._reindex()
        for fn in list(self.on_change):
            try:
                fn()
            except Exception:  # a listener's bug never undoes a change
                log.exception("key_change_listener_failed")

    def _info(self, r: KeyRecord) -> KeyInfo:
        return KeyInfo(
            id=r.id,
            name=r.name,
            prefix=r.prefix,
            models=list(r.models),
            created=r.created,
            expires=r.expires,
            last_used=self._used.get(r.id),
            rate_per_min=r.rate_per_min,
            admin=r.admin,
            revoked=r.revoked is not None,
            revoked_at=r.revoked,
        )

    def _sign(self, r: KeyRecord) -> KeyRecord:
        return sign_record(self.signer, r) if self.signer is not None else r

    # -- compaction --------------------------------------------------------------------

    def _compact(self, now: float) -> int:
        gone = [r.id for r in self._records.values() if compactable(r, now, self.tombstone_retention_s)]
        for kid in gone:
            del self._records[kid]
            self._used.pop(kid, None)
            self._used_sent.pop(kid, None)
            self._buckets.pop(kid, None)
        if gone:
            log.info("key_records_compacted", count=len(gone))
        return len(gone)

    def compact(self, now: float | None = None) -> int:
        """Forget the records ``compactable`` at ``now`` (default: the clock); how many.

        Not a change to push (every node compacts on its own clock); the caller
        persists (``save``, or ``snapshot``/``write``) when it returns more than 0.
        """
        dropped = self._compact(self._clock() if now is None else now)
        if dropped:
            self._reindex()
        return dropped

    # -- what the node and the CLI call ----------------------------------------------

    def create(
        self,
        name: str,
        *,
        models: Iterable[str] = (),
        expires_s: float | None = None,
        rate_per_min: int | None = None,
        admin: bool = False,
    ) -> tuple[KeyInfo, str]:
        """Make a key; returns its info and the key itself (the only time it exists anywhere)."""
        name = name.strip() if isinstance(name, str) else name
        if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
            raise BadRequest("A key's name is 1-64 printable characters", param="name", code="invalid_key_name")
        if name.startswith(("k_", KEY_PREFIX)):
            raise BadRequest("A key's name must not look like a key id or a key", param="name", code="invalid_key_name")
        if any(r.name == name and r.revoked is None for r in self._records.values()):
            raise ApiConflict(f"A key named {name!r} exists already; revoke it first or choose another name")
        patterns = tuple(dict.fromkeys(m.strip() for m in models))
        if len(patterns) > MAX_PATTERNS or any(not p or len(p) > 200 or not p.isprintable() for p in patterns):
            raise BadRequest(
                f"Model scopes are up to {MAX_PATTERNS} globs of 1-200 printable characters",
                param="models",
                code="invalid_scope",
            )
        if rate_per_min is not None and (isinstance(rate_per_min, bool) or not 1 <= rate_per_min <= 1_000_000):
            raise BadRequest("The rate is 1-1000000 requests a minute", param="rate", code="invalid_rate")
        if expires_s is not None and not (0 < expires_s < 1e10):
            raise BadRequest("Expiry must be a positive duration", param="expires", code="invalid_expiry")
        now = self._clock()
        if len(self._records) >= MAX_RECORDS and not self.compact(now):
            raise BadRequest(
                f"This cluster holds {MAX_RECORDS} keys already, revoked ones included (a revoked "
                f"key is kept for key_tombstone_retention_days); no more can be made until some are "
                f"forgotten",
                code="too_many_keys",
            )
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = self._sign(
            KeyRecord(
                id="k_" + secrets.token_hex(6),
                name=name,
                prefix=secret[: len(KEY_PREFIX) + _DISPLAY_CHARS],
                hash=_hash(secret),
                models=patterns,
                created=now,
                expires=now + expires_s if expires_s else None,
                rate_per_min=rate_per_min,
                admin=admin,
                origin=self.origin,
            )
        )
        self._records[record.id] = record
        self.save()
        self._changed()
        return self._info(record), secret

    def find(self, name_or_id: str) -> KeyRecord:
        """The key with this id, else the one live key with this name (else the newest revoked one)."""
        r = self._records.get(name_or_id)
        if r is not None:
            return r
        named = [r for r in self._records.values() if r.name == name_or_id]
        live = [r for r in named if r.revoked is None]
        if len(live) > 1:  # two nodes made the same name at the same time
            raise BadRequest(
                f"{len(live)} keys are named {name_or_id!r}: give the id ({', '.join(sorted(r.id for r in live))})",
                code="ambiguous_key",
            )
        if live:
            return live[0]
        if named:
            return max(named, key=lambda r: r.created)
        raise NotFound(f"No key named or with the id {name_or_id!r}", code="key_not_found")

    def revoke(self, name_or_id: str) -> KeyInfo:
        """Revoke a key (a signed tombstone, which outranks every version of it); idempotent."""
        r = self.find(name_or_id)
        if r.revoked is None:
            r = self._sign(
                msgspec.structs.replace(r, revoked=self._clock(), version=r.version + 1, origin=self.origin, sig="")
            )
            self._records[r.id] = r
            self.save()
            self._changed()
        return self._info(r)

    def list(self) -> list[KeyInfo]:
        return [self._info(r) for r in sorted(self._records.values(), key=lambda r: r.created)]

    def __len__(self) -> int:
        return len(self._records)

    def lookup(self, secret: str) -> tuple[Grant | None, str]:
        """The grant of a presented key, or None and why: ``unknown``, ``expired`` or ``revoked``."""
        if not secret.startswith(KEY_PREFIX) or len(secret) > _MAX_SECRET_CHARS or not secret.isascii():
            return None, "unknown"
        h = _hash(secret)
        kid = self._by_hash.get(h)
        r = self._records.get(kid) if kid is not None else None
        if r is None or not hmac.compare_digest(r.hash, h):
            return None, "unknown"
        if r.revoked is not None:
            return None, "revoked"
        now = self._clock()
        if r.expires is not None and now >= r.expires:
            return None, "expired"
        self._used[r.id] = now
        return self._grants[r.id], "ok"

    def authenticate(self, secret: str) -> KeyInfo | None:
        grant, _ = self.lookup(secret)
        return grant.info if grant is not None else None

    def name_of(self, key_id: str) -> str | None:
        r = self._records.get(key_id)
        return r.name if r is not None else None

    def monotonic(self) -> float:
        return self._monotonic()

    # -- replication -------------------------------------------------------------------

    def records(self) -> builtins.list[KeyRecord]:  # ``list`` in this class is the method above
        return list(self._records.values())

    def merge(self, incoming: Iterable[KeyRecord]) -> tuple[int, int]:
        """Take what peers sent where it outranks ours; returns (changed, rejected).

        A record is refused unless it is signed by its origin, a member of the
        cluster now (a node in no cluster merges nothing); one held already,
        unchanged, is passed over (it was checked when it came). A record this store
        would compact is passed over (not a rejection: the peer has not
        compacted it yet). The caller persists (``snapshot``/``write``) when
        something changed.
        """
        changed = rejected = 0
        now = self._clock()
        for r in incoming:
            if r == self._records.get(r.id):
                continue  # held already, as it is: nothing to check (its origin may have been removed since)
            if self.signer is None or not record_verifies(self.signer, r):
                rejected += 1
                continue
            if compactable(r, now, self.tombstone_retention_s):
                continue
            mine = self._records.get(r.id)
            if mine is not None and mine.hash != r.hash:
                rejected += 1  # the same id for another key: never let a record swap a key's secret
                continue
            if mine is None and len(self._records) >= MAX_RECORDS:
                rejected += 1
                continue
            if mine is None or merge_rank(r) > merge_rank(mine):
                self._records[r.id] = r
                changed += 1
        if rejected:
            log.warning("key_records_rejected", count=rejected)
        if changed:
            self._changed()
        return changed, rejected

    # -- last use, across the cluster (advisory, never signed) -------------------------

    def used(self) -> dict[str, float]:
        """Every key's last use this node knows of (for a full push or a peer's pull)."""
        return dict(self._used)

    def take_used_changes(self) -> dict[str, float]:
        """The last uses that are newer than what the previous call handed out (ours and merged ones)."""
        sent = self._used_sent
        out = {k: t for k, t in self._used.items() if t > sent.get(k, 0.0)}
        sent.update(out)
        return out

    def merge_used(self, used: dict[str, float]) -> int:
        """Take a peer's last uses where they are newer (max); uses of keys this store does not hold are
        dropped, so the map stays bounded by the records. Returns how many changed."""
        changed = 0
        mine = self._used
        for kid, t in used.items():
            if kid in self._records and t > mine.get(kid, 0.0):
                mine[kid] = t
                changed += 1
        return changed


class ApiConflict(BadRequest):
    status = 409
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="name", code="key_exists")


def open_keystore(data_dir: Path, signer: RecordSigner | None, *, tombstone_retention_s: float = 0.0) -> KeyStore:
    """The store of ``data_dir``, signing its records with ``signer`` (this node's key; ``signer.origin`` is its id).

    ``tombstone_retention_s`` is the node's ``key_tombstone_retention_days``; the CLI, which edits the
    store of a node that is not running, passes none (0: it forgets only the records of expired keys,
    which is always safe)."""
    return KeyStore(
        data_dir / KEYS_FILE,
        signer=signer,
        origin=signer.origin if signer is not None else "local",
        tombstone_retention_s=tombstone_retention_s,
    )
