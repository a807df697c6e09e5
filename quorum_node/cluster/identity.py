"""This node's own key pair: who it is, provably.

Every node has two private keys, made on its first start and kept in the data
dir (``identity.json``, 0600, written atomically):

- an **Ed25519** key: it signs membership and API key records, proves the
  node's id to the relay, and is the key of the node's TLS certificate on the
  LAN;
- an **X25519** key: the node's static key in the end-to-end Noise sessions
  through the relay (``Noise_IK``).

The node id is derived from the Ed25519 public key
(``node_id_for``: the first 12 bytes of SHA-256 over a label and the key, as
24 hex characters), so an id names exactly one key: nobody can claim another
node's id without its private key.

The certificate is self-signed and deterministic (Ed25519 signatures are; its
serial is derived from the key and its validity is fixed), so it never needs
renewing and is the same every time it is rebuilt. It is not trusted for
anything by itself: peers pin it through the membership records
(``cluster/members.py``), never through a CA.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import NameOID

from .membership import _ensure_dir, _write_private

__all__ = [
    "IDENTITY_FILE",
    "NodeIdentity",
    "cert_sign_key",
    "load_or_create_identity",
    "node_id_for",
    "verify_signature",
]

IDENTITY_FILE = "identity.json"
_ID_LABEL = b"quorum/v1/node-id"
_NOT_BEFORE = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
MAX_CERT_BYTES = 2048


def node_id_for(sign_key: bytes) -> str:
    """The node id of an Ed25519 public key (32 raw bytes): 24 lowercase hex characters."""
    if len(sign_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(_ID_LABEL + sign_key).digest()[:12].hex()


def verify_signature(sign_key: bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``data`` by the key ``sign_key`` (never raises)."""
    if len(sign_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(sign_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def cert_sign_key(der: bytes) -> bytes:
    """The Ed25519 public key a certificate is for (raw bytes); ValueError if it is not an Ed25519 certificate."""
    if len(der) > MAX_CERT_BYTES:
        raise ValueError("certificate too large")
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except Exception as e:  # noqa: BLE001 — cryptography raises ValueError, and Rust panics surface as other types
        raise ValueError(f"not a certificate: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 certificate")
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_public(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _self_signed(key: Ed25519PrivateKey, node_id: str) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"quorum-node {node_id}")])
    serial = int.from_bytes(hashlib.sha256(b"quorum/v1/cert-serial" + _raw_public(key)).digest()[:16], "big") >> 1
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial or 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{node_id}.quorum.invalid")]), critical=False)
        .sign(key, None)
    )
    return cert.public_bytes(Encoding.DER)


class NodeIdentity:
    """The node's key pair, id and certificate. ``repr`` never shows a private key."""

    __slots__ = ("_sign", "_dh", "sign_key", "dh_key", "node_id", "cert_der")

    def __init__(self, sign: Ed25519PrivateKey, dh: X25519PrivateKey) -> None:
        self._sign = sign
        self._dh = dh
        self.sign_key: bytes = _raw_public(sign)  # Ed25519 public, 32 bytes
        self.dh_key: bytes = _raw_public(dh)  # X25519 public, 32 bytes
        self.node_id: str = node_id_for(self.sign_key)
        self.cert_der: bytes = _self_signed(sign, self.node_id)

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data`` (64 bytes)."""
        return self._sign.sign(data)

    @property
    def dh_private(self) -> X25519PrivateKey:
        """The X25519 static key of this node's Noise sessions."""
        return self._dh

    @property
    def sign_private(self) -> Ed25519PrivateKey:
        return self._sign

    def cert_pem(self) -> bytes:
        return x509.load_der_x509_certificate(self.cert_der).public_bytes(Encoding.PEM)

    def key_pem(self) -> bytes:
        return self._sign.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    def to_file(self) -> bytes:
        return _encode(_IdentityFile(sign=_b64(_raw_private(self._sign)), dh=_b64(_raw_private(self._dh))))

    def __repr__(self) -> str:
        return f"NodeIdentity(node_id={self.node_id!r}, keys=<hidden>)"


class _IdentityFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: int = 1
    sign: str  # Ed25519 private key, 32 raw bytes, base64
    dh: str  # X25519 private key, 32 raw bytes, base64


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_IdentityFile).decode


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError("not base64") from e


def load_or_create_identity(data_dir: Path) -> NodeIdentity:
    """This node's identity, made and stored (0600) on first use."""
    _ensure_dir(data_dir)
    path = data_dir / IDENTITY_FILE
    if not path.exists():
        _write_private(path, NodeIdentity.generate().to_file(), replace=False)
    try:
        stored = _decode(path.read_bytes())
        if stored.version != 1:
            raise ValueError(f"unsupported version {stored.version}")
        sign_raw, dh_raw = _unb64(stored.sign), _unb64(stored.dh)
        if len(sign_raw) != 32 or len(dh_raw) != 32:
            raise ValueError("keys must be 32 bytes")
        return NodeIdentity(Ed25519PrivateKey.from_private_bytes(sign_raw), X25519PrivateKey.from_private_bytes(dh_raw))
    except (msgspec.DecodeError, ValueError) as e:
        raise ValueError(
            f"{path} is damaged ({e}); it is this node's identity: restore it from a backup, or "
            "delete it to become a new node (which must be invited into the cluster again)"
        ) from None
