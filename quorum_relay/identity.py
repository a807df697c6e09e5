"""Who a node is: its Ed25519 public key, and the node id derived from it (pure logic).

A node id names exactly one key: ``node_id_for`` is SHA-256 over a label and
the key, its first 12 bytes as 24 hex characters (the same one line as
``quorum_node.cluster.identity.node_id_for``, written again here because the
relay never imports ``quorum_node``; a test holds the two equal). A node
proves it holds the key by signing the relay's challenge (``wire.proof_message``);
``verify_proof`` checks that signature with ``cryptography``'s Ed25519. The
relay keeps nothing of a node's key once it has checked it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .wire import proof_message

__all__ = ["KEY_BYTES", "decode_key", "node_id_for", "verify_proof"]

KEY_BYTES = 32
_ID_LABEL = b"quorum/v1/node-id"


def node_id_for(sign_key: bytes) -> str:
    """The node id of an Ed25519 public key (32 raw bytes): 24 lowercase hex characters."""
    if len(sign_key) != KEY_BYTES:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(_ID_LABEL + sign_key).digest()[:12].hex()


def decode_key(header: str) -> bytes | None:
    """The raw key of an ``X-Quorum-Node-Key`` header (standard base64 of 32 bytes), or None if it is not one."""
    if len(header) != 44:
        return None
    try:
        raw = base64.b64decode(header, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_BYTES else None


def verify_proof(sign_key: bytes, node_id: str, nonce: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the key's signature of this connection's challenge (never raises)."""
    if len(sign_key) != KEY_BYTES or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(sign_key).verify(signature, proof_message(nonce, node_id, sign_key))
    except (InvalidSignature, ValueError):
        return False
    return True
