"""Signatures on node-to-node HTTP requests.

Every request one node sends another carries these headers::

    X-Quorum-Node-Id         the sender's node id
    X-Quorum-To              the destination's node id ("*": only a GET of
                             /quorum/v1/health, which is how a static peer's id
                             is learnt in the first place)
    X-Quorum-Timestamp       wall-clock milliseconds when it was signed
    X-Quorum-Nonce           16 random bytes, hex
    X-Quorum-Content-SHA256  hex sha256 of the body
    X-Quorum-Signature       hex HMAC-SHA256 over the canonical string below
    X-Quorum-Key             (forwarded requests) the id of the API key the
                             entry node authenticated the client with; never
                             the key itself

The canonical string binds the signature to everything a replaying or
tampering middlebox could change::

    QRM3-HMAC-SHA256
    <METHOD>
    <path, including the query string>
    <timestamp>
    <nonce>
    <sender node id>
    <destination node id>
    <X-Quorum-Hop value, or "">
    <X-Quorum-Origin value, or "">
    <X-Quorum-Key value, or "">
    <hex sha256 of the body>
    <cluster fingerprint>

So a captured request cannot be replayed to another node (the destination is
signed), nor turned into a different hop (hop and origin are signed), nor credited to
another API key (the key id is signed). A node
also refuses requests signed before it started (``not_before``), so a restart,
which empties the in-memory replay guard, does not reopen the replay window.

The HMAC key is derived from the cluster secret with HKDF-SHA256; the secret
itself never keys anything directly, so a future key for payload encryption can
be derived under another label without ever being related to this one. The
fingerprint (also HKDF output, under its own label) is a public name for the
cluster: it goes into mDNS TXT records and lets a node skip peers of other
clusters without being able to sign for them. API key records replicated
between nodes are signed with a third key (``derive_records_key``), under its
own label.

Verification happens in two steps, so that nobody without the cluster key
makes a node read a body: ``verify_head`` checks, in order, all headers
present and well-formed, destination, timestamp within the window and not
before ``not_before``, signature (constant-time), and only then the nonce (it
is recorded only for requests with a valid signature, so unauthenticated
garbage cannot fill the replay guard). ``body_matches`` then checks the body
that was read against the signed digest.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets
from collections.abc import Mapping

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "ANY_DESTINATION",
    "HEADER_DIGEST",
    "HEADER_NODE_ID",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "HEADER_TO",
    "HOP_HEADER",
    "KEY_HEADER",
    "ORIGIN_HEADER",
    "SIGNATURE_HEADERS",
    "ClusterKeys",
    "ReplayGuard",
    "VerifyResult",
    "body_matches",
    "derive_keys",
    "derive_records_key",
    "sign",
    "verify",
    "verify_head",
]

HEADER_NODE_ID = "X-Quorum-Node-Id"
HEADER_TIMESTAMP = "X-Quorum-Timestamp"
HEADER_NONCE = "X-Quorum-Nonce"
HEADER_SIGNATURE = "X-Quorum-Signature"
HEADER_TO = "X-Quorum-To"
HEADER_DIGEST = "X-Quorum-Content-SHA256"
HOP_HEADER = "X-Quorum-Hop"
ORIGIN_HEADER = "X-Quorum-Origin"
KEY_HEADER = "X-Quorum-Key"  # the API key id a forwarded request was authorised with
#: All headers ``sign`` produces; a proxy must never forward these to an engine.
SIGNATURE_HEADERS = (HEADER_NODE_ID, HEADER_TO, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_DIGEST, HEADER_SIGNATURE,
                     KEY_HEADER)
#: The destination of a request sent before the peer's id is known (health probes only).
ANY_DESTINATION = "*"
_ANY_ALLOWED = ("GET", "/quorum/v1/health")

_SCHEME = "QRM3-HMAC-SHA256"
_HKDF_SALT = b"quorum-cluster-v1"
_INFO_SIGN = b"quorum/v1/request-signing"
_INFO_FINGERPRINT = b"quorum/v1/fingerprint"
_INFO_KEY_RECORDS = b"quorum/v1/api-key-records"

_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")
_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TIMESTAMP_RE = re.compile(r"[0-9]{1,15}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_HOP_RE = re.compile(r"[0-9]{0,3}")
_METHOD_RE = re.compile(r"[A-Z]{1,16}")
_KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{0,64}")


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_HKDF_SALT, info=info).derive(secret)


class ClusterKeys:
    """Keys derived from one cluster secret.

    ``sign_key`` is secret (32 bytes, HMAC key); ``fingerprint`` is public
    (16 hex chars) and reveals neither the secret nor the sign key. Immutable;
    ``repr`` never shows the key.
    """

    __slots__ = ("_sign_key", "_fingerprint")

    def __init__(self, *, sign_key: bytes, fingerprint: str) -> None:
        object.__setattr__(self, "_sign_key", sign_key)
        object.__setattr__(self, "_fingerprint", fingerprint)

    @property
    def sign_key(self) -> bytes:
        """The 32-byte HMAC-SHA256 key for request signatures (secret)."""
        return self._sign_key

    @property
    def fingerprint(self) -> str:
        """Public cluster id: 16 lowercase hex characters."""
        return self._fingerprint

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ClusterKeys is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterKeys):
            return NotImplemented
        return hmac.compare_digest(self._sign_key, other._sign_key)

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return f"ClusterKeys(fingerprint={self._fingerprint!r}, sign_key=<hidden>)"


def derive_keys(secret: bytes) -> ClusterKeys:
    """Derive the signing key and public fingerprint from a cluster secret."""
    if not secret:
        raise ValueError("cluster secret must not be empty")
    return ClusterKeys(
        sign_key=_hkdf(secret, _INFO_SIGN, 32),
        fingerprint=_hkdf(secret, _INFO_FINGERPRINT, 8).hex(),
    )


def derive_records_key(secret: bytes) -> bytes:
    """The 32-byte HMAC key that signs replicated API key records (never the request-signing key)."""
    if not secret:
        raise ValueError("cluster secret must not be empty")
    return _hkdf(secret, _INFO_KEY_RECORDS, 32)


class _Signed(msgspec.Struct, frozen=True, kw_only=True):
    """The signed facts of one request, in canonical order."""

    method: str
    path: str
    timestamp: str
    nonce: str
    node_id: str
    to: str
    hop: str
    origin: str
    key_id: str
    digest: str


def _signature(keys: ClusterKeys, f: _Signed) -> str:
    """The MAC of one request, as both ``sign`` and ``verify_head`` compute it."""
    canonical = "\n".join(
        (_SCHEME, f.method, f.path, f.timestamp, f.nonce, f.node_id, f.to, f.hop, f.origin, f.key_id, f.digest,
         keys.fingerprint)
    ).encode("utf-8")
    return hmac.new(keys.sign_key, canonical, hashlib.sha256).hexdigest()


def _check_path(path: str) -> None:
    # A newline would let two different (method, path) pairs share a canonical string.
    if not path.startswith("/") or any(ord(c) < 0x21 or c == "\x7f" for c in path):
        raise ValueError("path must start with '/' and contain no spaces or control characters")


def sign(
    keys: ClusterKeys,
    *,
    method: str,
    path: str,
    body: bytes,
    node_id: str,
    to: str,
    now: float,
    hop: str = "",
    origin: str = "",
    key_id: str = "",
    nonce: str | None = None,
) -> dict[str, str]:
    """Return the headers that authenticate one request to the peer ``to``.

    ``path`` is the request target exactly as sent (path plus ``?query``);
    ``now`` is wall-clock seconds (``time.time()``); ``hop``/``origin`` are the
    values of the hop headers the request carries (they are added to the
    returned headers when given); ``key_id`` is the id of the API key the
    request was authorised with (``X-Quorum-Key``, added when given). ``nonce`` is for tests; leave it ``None`` to
    get 16 fresh random bytes.
    """
    method = method.upper()
    if not _METHOD_RE.fullmatch(method):
        raise ValueError(f"bad HTTP method {method!r}")
    _check_path(path)
    for what, value in (("node id", node_id), ("origin", origin or "x")):
        if not _NODE_ID_RE.fullmatch(value):
            raise ValueError(f"bad {what} {value!r}")
    if to != ANY_DESTINATION and not _NODE_ID_RE.fullmatch(to):
        raise ValueError(f"bad destination {to!r}")
    if not _HOP_RE.fullmatch(hop):
        raise ValueError(f"bad hop {hop!r}")
    if not _KEY_ID_RE.fullmatch(key_id):
        raise ValueError(f"bad key id {key_id!r}")
    if nonce is None:
        nonce = secrets.token_hex(16)
    elif not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 32 lowercase hex characters")
    facts = _Signed(method=method, path=path, timestamp=str(int(now * 1000)), nonce=nonce, node_id=node_id, to=to,
                    hop=hop, origin=origin, key_id=key_id, digest=hashlib.sha256(body).hexdigest())
    headers = {
        HEADER_NODE_ID: node_id,
        HEADER_TO: to,
        HEADER_TIMESTAMP: facts.timestamp,
        HEADER_NONCE: nonce,
        HEADER_DIGEST: facts.digest,
        HEADER_SIGNATURE: _signature(keys, facts),
    }
    if hop:
        headers[HOP_HEADER] = hop
    if origin:
        headers[ORIGIN_HEADER] = origin
    if key_id:
        headers[KEY_HEADER] = key_id
    return headers


class ReplayGuard:
    """Remembers nonces of accepted requests for as long as they could be replayed.

    A request is fresh when its timestamp is within ``window_s`` of ``now`` and
    its nonce has not been seen. A nonce is remembered until its timestamp falls
    out of the window, after which the timestamp check alone refuses it. Memory
    is bounded by ``max_entries``; when full (more than ``max_entries`` requests
    per window), new requests are refused rather than forgetting nonces early,
    because forgetting would re-open the replay hole.
    """

    def __init__(self, window_s: float = 30.0, max_entries: int = 100_000) -> None:
        if window_s <= 0 or max_entries <= 0:
            raise ValueError("window_s and max_entries must be positive")
        self.window_s = window_s
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def fresh_timestamp(self, timestamp: float, now: float) -> bool:
        """Whether ``timestamp`` is within the window around ``now``."""
        return abs(now - timestamp) <= self.window_s

    def prune(self, now: float) -> None:
        """Forget nonces whose timestamps have left the window."""
        heap = self._heap
        while heap and heap[0][0] < now:
            _, nonce = heapq.heappop(heap)
            self._expiry.pop(nonce, None)

    def _admit(self, nonce: str, timestamp: float, now: float) -> str | None:
        if not self.fresh_timestamp(timestamp, now):
            return "stale_timestamp"
        self.prune(now)
        if nonce in self._expiry:
            return "replayed"
        if len(self._expiry) >= self.max_entries:
            return "overloaded"
        expiry = timestamp + self.window_s
        self._expiry[nonce] = expiry
        heapq.heappush(self._heap, (expiry, nonce))
        return None

    def check(self, nonce: str, timestamp: float, now: float) -> bool:
        """Record ``nonce`` and return True if the request is fresh, else False."""
        return self._admit(nonce, timestamp, now) is None


class VerifyResult(msgspec.Struct, frozen=True, kw_only=True):
    """Outcome of ``verify_head`` / ``verify``.

    ``reason`` is ``"ok"`` or one of ``missing_signature``, ``malformed``,
    ``wrong_destination``, ``stale_timestamp``, ``before_start``,
    ``bad_signature``, ``replayed``, ``overloaded``, ``body_mismatch``.
    ``node_id`` is the claimed sender; trust it only when ``ok``. ``digest``
    is the signed body digest, for ``body_matches``; ``key_id`` the signed
    ``X-Quorum-Key`` ("" when the request carried none).
    """

    ok: bool
    reason: str
    node_id: str | None = None
    digest: str = ""
    key_id: str = ""


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    # Plain dicts are case-sensitive; aiohttp's CIMultiDict already is not.
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def verify_head(
    keys: ClusterKeys,
    guard: ReplayGuard,
    *,
    method: str,
    path: str,
    headers: Mapping[str, str],
    self_id: str,
    now: float,
    not_before: float = 0.0,
) -> VerifyResult:
    """Check a signed peer request from its head alone; ``now`` is wall-clock seconds.

    ``self_id`` is this node's id (the only destination accepted, besides
    ``*`` on a health probe); requests signed before ``not_before`` (the
    node's start) are refused. The signature is compared in constant time,
    and the nonce is recorded in ``guard`` only after the signature proved
    valid. The body is checked afterwards with ``body_matches``.
    """
    node_id = _header(headers, HEADER_NODE_ID)
    to = _header(headers, HEADER_TO)
    timestamp = _header(headers, HEADER_TIMESTAMP)
    nonce = _header(headers, HEADER_NONCE)
    digest = _header(headers, HEADER_DIGEST)
    signature = _header(headers, HEADER_SIGNATURE)
    hop = _header(headers, HOP_HEADER) or ""
    origin = _header(headers, ORIGIN_HEADER) or ""
    key_id = _header(headers, KEY_HEADER) or ""
    if signature is None:
        return VerifyResult(ok=False, reason="missing_signature", node_id=node_id)
    if node_id is None or to is None or timestamp is None or nonce is None or digest is None:
        return VerifyResult(ok=False, reason="malformed", node_id=node_id)
    method = method.upper()
    if (
        not _NODE_ID_RE.fullmatch(node_id)
        or not (to == ANY_DESTINATION or _NODE_ID_RE.fullmatch(to))
        or not _TIMESTAMP_RE.fullmatch(timestamp)
        or not _NONCE_RE.fullmatch(nonce)
        or not _DIGEST_RE.fullmatch(digest)
        or not _SIGNATURE_RE.fullmatch(signature)
        or not _METHOD_RE.fullmatch(method)
        or not _HOP_RE.fullmatch(hop)
        or not (origin == "" or _NODE_ID_RE.fullmatch(origin))
        or not _KEY_ID_RE.fullmatch(key_id)
    ):
        return VerifyResult(ok=False, reason="malformed", node_id=None)
    try:
        _check_path(path)
    except ValueError:
        return VerifyResult(ok=False, reason="malformed", node_id=node_id)
    if to != self_id and not (to == ANY_DESTINATION and (method, path) == _ANY_ALLOWED):
        return VerifyResult(ok=False, reason="wrong_destination", node_id=node_id)
    ts = int(timestamp) / 1000
    if not guard.fresh_timestamp(ts, now):
        return VerifyResult(ok=False, reason="stale_timestamp", node_id=node_id)
    if ts < not_before:
        return VerifyResult(ok=False, reason="before_start", node_id=node_id)
    facts = _Signed(method=method, path=path, timestamp=timestamp, nonce=nonce, node_id=node_id, to=to, hop=hop,
                    origin=origin, key_id=key_id, digest=digest)
    if not hmac.compare_digest(_signature(keys, facts), signature):
        return VerifyResult(ok=False, reason="bad_signature", node_id=node_id)
    refused = guard._admit(nonce, ts, now)
    if refused is not None:
        return VerifyResult(ok=False, reason=refused, node_id=node_id)
    return VerifyResult(ok=True, reason="ok", node_id=node_id, digest=digest, key_id=key_id)


def body_matches(result: VerifyResult, body: bytes) -> bool:
    """Whether ``body`` is the one the verified head signed."""
    return result.ok and hmac.compare_digest(hashlib.sha256(body).hexdigest(), result.digest)


def verify(
    keys: ClusterKeys,
    guard: ReplayGuard,
    *,
    method: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    self_id: str,
    now: float,
    not_before: float = 0.0,
) -> VerifyResult:
    """``verify_head`` and ``body_matches`` in one step, for a body already read."""
    result = verify_head(keys, guard, method=method, path=path, headers=headers, self_id=self_id, now=now,
                         not_before=not_before)
    if result.ok and not body_matches(result, body):
        return VerifyResult(ok=False, reason="body_mismatch", node_id=result.node_id)
    return result
