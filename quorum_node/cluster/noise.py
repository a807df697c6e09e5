"""The Noise protocol (revision 34), pattern NNpsk0 with 25519, ChaChaPoly and SHA256.

End-to-end encryption between two nodes whose traffic crosses a relay: the
relay carries the handshake and transport messages and can read neither. The
construction is Noise's, unchanged (https://noiseprotocol.org/noise.html);
the primitives are ``cryptography``'s (X25519, ChaCha20-Poly1305, SHA-256,
HMAC). Nothing here is invented: the implementation is checked against the
published cacophony test vectors in ``tests/vectors/noise.json``.

``NNpsk0``::

    -> psk, e
    <- e, ee

Both sides know the pre-shared key (derived from the cluster secret under its
own HKDF label); fresh ephemeral keys on both sides give fresh session keys for
every handshake. Transport messages use 64-bit nonces that never repeat; a
received message must carry exactly the next nonce (so a replayed, dropped,
reordered or tampered message fails), and a cipher rekeys (Noise's ``REKEY``)
every ``REKEY_EVERY`` messages, long before the nonce could run out.

Where a carrier may drop messages (the relay drops the frames of a stream it
has seen reset), transport messages carry their nonce explicitly, as Noise
allows for unreliable transports (§11.4) and WireGuard does: ``NumberedSender``
prefixes each ciphertext with its 8-byte counter, and ``NumberedReceiver``
accepts each counter at most once within a sliding window of
``REPLAY_WINDOW`` (older or repeated ones are replays). Such a session is not
rekeyed in place; its owner starts a new handshake after
``NumberedSender.LIMIT`` messages, far below the nonce's end.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["PROTOCOL_NAME", "REKEY_EVERY", "CipherState", "Handshake", "NoiseError", "NumberedReceiver",
           "NumberedSender", "REPLAY_WINDOW"]

PROTOCOL_NAME = b"Noise_NNpsk0_25519_ChaChaPoly_SHA256"
HASHLEN = 32
DHLEN = 32
TAGLEN = 16
MAX_NONCE = 2**64 - 1
REKEY_EVERY = 2**32


class NoiseError(Exception):
    """A handshake or transport message failed authentication (or broke the protocol)."""


def _hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _hkdf(chaining_key: bytes, ikm: bytes, n: int) -> list[bytes]:
    """Noise's HKDF: 2 or 3 outputs of HASHLEN bytes."""
    temp = _hmac(chaining_key, ikm)
    out = [_hmac(temp, b"\x01")]
    for i in range(2, n + 1):
        out.append(_hmac(temp, out[-1] + bytes([i])))
    return out


def _nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class CipherState:
    """One direction of an established session: a key and a message counter."""

    __slots__ = ("_aead", "_key", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce exhausted")
        out = self._aead.encrypt(_nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce exhausted")
        try:
            out = self._aead.decrypt(_nonce(self.n), ciphertext, ad)
        except InvalidTag:
            raise NoiseError("message failed authentication (tampered, replayed or out of order)") from None
        self.n += 1
        return out

    def rekey(self) -> None:
        """Noise's REKEY: the next key is derived from this one; the counter keeps going."""
        assert self._aead is not None
        key = self._aead.encrypt(_nonce(MAX_NONCE), bytes(32), b"")[:32]
        self._key = key
        self._aead = ChaCha20Poly1305(key)

    # transport messages: associated data is empty, rekeying is automatic

    def seal(self, plaintext: bytes) -> bytes:
        out = self.encrypt(b"", plaintext)
        if self.n % REKEY_EVERY == 0:
            self.rekey()
        return out

    def open(self, ciphertext: bytes) -> bytes:
        out = self.decrypt(b"", ciphertext)
        if self.n % REKEY_EVERY == 0:
            self.rekey()
        return out


REPLAY_WINDOW = 4096


class NumberedSender:
    """Seals transport messages with their nonce in front (8 bytes, little-endian)."""

    LIMIT = 2**48  # then the session's owner handshakes anew (never near MAX_NONCE)

    __slots__ = ("_cipher",)

    def __init__(self, cipher: CipherState) -> None:
        self._cipher = cipher

    @property
    def sent(self) -> int:
        return self._cipher.n

    def seal(self, plaintext: bytes) -> bytes:
        c = self._cipher
        n = c.n
        if n >= self.LIMIT:
            raise NoiseError("this session has sent its share of messages; handshake anew")
        assert c._aead is not None
        out = n.to_bytes(8, "little") + c._aead.encrypt(_nonce(n), plaintext, b"")
        c.n = n + 1
        return out


class NumberedReceiver:
    """Opens numbered messages: each nonce at most once, within a sliding window (replays and forgeries fail)."""

    __slots__ = ("_cipher", "_top", "_seen")

    def __init__(self, cipher: CipherState) -> None:
        self._cipher = cipher
        self._top = -1  # the highest nonce accepted
        self._seen = 0  # bit i: nonce top - i was accepted

    def open(self, message: bytes) -> bytes:
        if len(message) < 8 + TAGLEN:
            raise NoiseError("message too short")
        n = int.from_bytes(message[:8], "little")
        if n >= NumberedSender.LIMIT:
            raise NoiseError("nonce out of range")
        behind = self._top - n
        if behind >= REPLAY_WINDOW or (behind >= 0 and self._seen >> behind & 1):
            raise NoiseError("message replayed (or too old)")
        aead = self._cipher._aead
        assert aead is not None
        try:
            out = aead.decrypt(_nonce(n), message[8:], b"")
        except InvalidTag:
            raise NoiseError("message failed authentication (tampered or forged)") from None
        if behind < 0:  # newer than all before: slide the window
            shift = -behind
            self._seen = ((self._seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            self._top = n
        else:
            self._seen |= 1 << behind
        return out


class _Symmetric:
    def __init__(self, prologue: bytes) -> None:
        name = PROTOCOL_NAME
        self.h = name.ljust(HASHLEN, b"\x00") if len(name) <= HASHLEN else _hash(name)
        self.ck = self.h
        self.cipher = CipherState()
        self.mix_hash(prologue)

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, key = _hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(key)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, key = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher = CipherState(key)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        out = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(out)
        return out

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        out = self.cipher.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return out

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return CipherState(k1), CipherState(k2)


class Handshake:
    """One NNpsk0 handshake. The initiator writes message 1, the responder reads it and writes message 2.

    After the initiator reads message 2, both call ``split()`` to get
    ``(send, receive)`` cipher states. ``ephemeral`` is for test vectors only.
    """

    def __init__(self, *, initiator: bool, psk: bytes, prologue: bytes,
                 ephemeral: X25519PrivateKey | None = None) -> None:
        if len(psk) != 32:
            raise ValueError("the pre-shared key must be 32 bytes")
        self.initiator = initiator
        self._psk = psk
        self._ss = _Symmetric(prologue)
        self._e = ephemeral or X25519PrivateKey.generate()
        self._re: X25519PublicKey | None = None
        self._step = 0
        self.done = False

    @property
    def handshake_hash(self) -> bytes:
        return self._ss.h

    def _write_e(self) -> bytes:
        pub = _pub(self._e)
        self._ss.mix_hash(pub)
        self._ss.mix_key(pub)  # psk handshakes mix ephemeral keys into the key too
        return pub

    def _read_e(self, message: bytes) -> bytes:
        if len(message) < DHLEN:
            raise NoiseError("handshake message too short")
        pub, rest = message[:DHLEN], message[DHLEN:]
        self._re = X25519PublicKey.from_public_bytes(pub)
        self._ss.mix_hash(pub)
        self._ss.mix_key(pub)
        return rest

    def _ee(self) -> None:
        assert self._re is not None
        shared = self._e.exchange(self._re)
        if shared == bytes(DHLEN):
            raise NoiseError("the peer's ephemeral key is a low-order point")
        self._ss.mix_key(shared)

    def write_message(self, payload: bytes = b"") -> bytes:
        if self.initiator and self._step == 0:  # -> psk, e
            self._ss.mix_key_and_hash(self._psk)
            out = self._write_e()
        elif not self.initiator and self._step == 1:  # <- e, ee
            out = self._write_e()
            self._ee()
            self.done = True
        else:
            raise NoiseError("not this side's turn to write")
        self._step += 1
        return out + self._ss.encrypt_and_hash(payload)

    def read_message(self, message: bytes) -> bytes:
        try:
            if not self.initiator and self._step == 0:  # -> psk, e
                self._ss.mix_key_and_hash(self._psk)
                rest = self._read_e(message)
            elif self.initiator and self._step == 1:  # <- e, ee
                rest = self._read_e(message)
                self._ee()
                self.done = True
            else:
                raise NoiseError("not this side's turn to read")
            payload = self._ss.decrypt_and_hash(rest)
        except ValueError as e:  # a malformed public key
            raise NoiseError(f"malformed handshake message: {e}") from None
        self._step += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """``(send, receive)`` for this side."""
        if not self.done:
            raise NoiseError("the handshake is not finished")
        c1, c2 = self._ss.split()
        return (c1, c2) if self.initiator else (c2, c1)
