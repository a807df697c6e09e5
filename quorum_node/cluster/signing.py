"""Signatures on node-to-node HTTP requests.

Every request one node sends another over the LAN carries four headers::

    X-Quorum-Node-Id     the sender's node id
    X-Quorum-Timestamp   wall-clock seconds (integer) when it was signed
    X-Quorum-Nonce       16 random bytes, hex
    X-Quorum-Signature   hex HMAC-SHA256 over the canonical string below

The canonical string binds the signature to everything a replaying or
tampering middlebox could change::

    QRM1-HMAC-SHA256
    <METHOD>
    <path, including the query string>
    <timestamp>
    <nonce>
    <node id>
    <hex sha256 of the body>
    <cluster fingerprint>

The HMAC key is derived from the cluster secret with HKDF-SHA256; the secret
itself never keys anything directly, so a future key for payload encryption can
be derived under another label without ever being related to this one. The
fingerprint (also HKDF output, under its own label) is a public name for the
cluster: it goes into mDNS TXT records and lets a node skip peers of other
clusters without being able to sign for them.

Verification checks, in order: all headers present and well-formed, timestamp
within the window, signature (constant-time), and only then the nonce. The
nonce is recorded only for requests with a valid signature, so unauthenticated
garbage cannot fill the replay guard.

Bodies are hashed whole: peer requests are small JSON documents, so reading the
body before verifying is fine.
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
    "HEADER_NODE_ID",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SIGNATURE_HEADERS",
    "ClusterKeys",
    "ReplayGuard",
    "VerifyResult",
    "derive_keys",
    "sign",
    "verify",
]

HEADER_NODE_ID = "X-Quorum-Node-Id"
HEADER_TIMESTAMP = "X-Quorum-Timestamp"
HEADER_NONCE = "X-Quorum-Nonce"
HEADER_SIGNATURE = "X-Quorum-Signature"
#: All headers ``sign`` produces; a proxy must never forward these to an engine.
SIGNATURE_HEADERS = (HEADER_NODE_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)

_SCHEME = "QRM1-HMAC-SHA256"
_HKDF_SALT = b"quorum-cluster-v1"
_INFO_SIGN = b"quorum/v1/request-signing"
_INFO_FINGERPRINT = b"quorum/v1/fingerprint"

_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")
_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TIMESTAMP_RE = re.compile(r"-?[0-9]{1,12}")
_METHOD_RE = re.compile(r"[A-Z]{1,16}")


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


def _canonical(
    *, method: str, path: str, timestamp: str, nonce: str, node_id: str, body: bytes, fingerprint: str
) -> bytes:
    return "\n".join(
        (
            _SCHEME,
            method,
            path,
            timestamp,
            nonce,
            node_id,
            hashlib.sha256(body).hexdigest(),
            fingerprint,
        )
    ).encode("utf-8")


def _mac(keys: ClusterKeys, canonical: bytes) -> str:
    return hmac.new(keys.sign_key, canonical, hashlib.sha256).hexdigest()


def _signature(
    keys: ClusterKeys, *, method: str, path: str, timestamp: str, nonce: str, node_id: str, body: bytes
) -> str:
    """The MAC of one request, as both ``sign`` and ``verify`` compute it."""
    return _mac(
        keys,
        _canonical(
            method=method, path=path, timestamp=timestamp, nonce=nonce, node_id=node_id, body=body,
            fingerprint=keys.fingerprint,
        ),
    )


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
    now: float,
    nonce: str | None = None,
) -> dict[str, str]:
    """Return the headers that authenticate one request to a peer.

    ``path`` is the request target exactly as sent (path plus ``?query``);
    ``now`` is wall-clock seconds (``time.time()``). ``nonce`` is for tests;
    leave it ``None`` to get 16 fresh random bytes.
    """
    method = method.upper()
    if not _METHOD_RE.fullmatch(method):
        raise ValueError(f"bad HTTP method {method!r}")
    _check_path(path)
    if not _NODE_ID_RE.fullmatch(node_id):
        raise ValueError(f"bad node id {node_id!r}")
    if nonce is None:
        nonce = secrets.token_hex(16)
    elif not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 32 lowercase hex characters")
    timestamp = str(int(now))
    signature = _signature(keys, method=method, path=path, timestamp=timestamp, nonce=nonce, node_id=node_id, body=body)
    return {
        HEADER_NODE_ID: node_id,
        HEADER_TIMESTAMP: timestamp,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: signature,
    }


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
    """Outcome of ``verify``.

    ``reason`` is ``"ok"`` or one of ``missing_signature``, ``malformed``,
    ``stale_timestamp``, ``bad_signature``, ``replayed``, ``overloaded``.
    ``node_id`` is the claimed sender; trust it only when ``ok``.
    """

    ok: bool
    reason: str
    node_id: str | None = None


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


def verify(
    keys: ClusterKeys,
    guard: ReplayGuard,
    *,
    method: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    now: float,
) -> VerifyResult:
    """Check a signed peer request; ``now`` is wall-clock seconds.

    The signature is compared in constant time, and the nonce is recorded in
    ``guard`` only after the signature proved valid.
    """
    node_id = _header(headers, HEADER_NODE_ID)
    timestamp = _header(headers, HEADER_TIMESTAMP)
    nonce = _header(headers, HEADER_NONCE)
    signature = _header(headers, HEADER_SIGNATURE)
    if signature is None:
        return VerifyResult(ok=False, reason="missing_signature", node_id=node_id)
    if node_id is None or timestamp is None or nonce is None:
        return VerifyResult(ok=False, reason="malformed", node_id=node_id)
    method = method.upper()
    if (
        not _NODE_ID_RE.fullmatch(node_id)
        or not _TIMESTAMP_RE.fullmatch(timestamp)
        or not _NONCE_RE.fullmatch(nonce)
        or not _SIGNATURE_RE.fullmatch(signature)
        or not _METHOD_RE.fullmatch(method)
    ):
        return VerifyResult(ok=False, reason="malformed", node_id=None)
    try:
        _check_path(path)
    except ValueError:
        return VerifyResult(ok=False, reason="malformed", node_id=node_id)
    ts = int(timestamp)
    if not guard.fresh_timestamp(ts, now):
        return VerifyResult(ok=False, reason="stale_timestamp", node_id=node_id)
    expected = _signature(keys, method=method, path=path, timestamp=timestamp, nonce=nonce, node_id=node_id, body=body)
    if not hmac.compare_digest(expected, signature):
        return VerifyResult(ok=False, reason="bad_signature", node_id=node_id)
    refused = guard._admit(nonce, ts, now)
    if refused is not None:
        return VerifyResult(ok=False, reason=refused, node_id=node_id)
    return VerifyResult(ok=True, reason="ok", node_id=node_id)
