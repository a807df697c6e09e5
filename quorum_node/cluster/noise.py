"""The Noise protocol (revision 34): handshake patterns with 25519, ChaChaPoly and SHA256; ``IK`` is ours.

End-to-end encryption between two nodes whose traffic crosses a relay: the
relay carries the handshake and transport messages and can read neither. The
construction is Noise's, unchanged (https://noiseprotocol.org/noise.html);
the primitives are ``cryptography``'s (X25519, ChaCha20-Poly1305, SHA-256,
HMAC). Nothing here is invented: the implementation is checked against the
published cacophony test vectors in ``tests/vectors/noise.json`` (``NN``,
``XX``, ``KK`` and ``IK``: the same token code runs every pattern).

The relay link uses ``Noise_IK_25519_ChaChaPoly_SHA256``::

    <- s
    ...
    -> e, es, s, ss
    <- e, ee, se

Every node has a static X25519 key (``identity.py``); membership says which
key each member has. The initiator knows the responder's static key before it
starts (the pre-message); it sends its own static key encrypted, so the relay
never sees who speaks to whom beyond the ids it routes by. The responder
learns the initiator's static key from message 1 (``remote_static``) and must
check it against membership before it answers. Message 1 alone authenticates
its sender only weakly (``ss``: whoever stole the responder's key could forge
it, and a relay may replay it); the session keys also mix ``se``, so the first
transport message from the initiator is what proves it holds its key. A
responder therefore serves nothing from a handshake payload (ours carry only
which frames a node reads). Fresh ephemeral keys on both sides give fresh
session keys, with forward secrecy, for every handshake.

Transport messages use 64-bit nonces that never repeat; a received message
must carry exactly the next nonce (so a replayed, dropped, reordered or
tampered message fails), and a cipher rekeys (Noise's ``REKEY``) every
``REKEY_EVERY`` messages, long before the nonce could run out.

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
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "PATTERNS",
    "REKEY_EVERY",
    "REPLAY_WINDOW",
    "CipherState",
    "Handshake",
    "NoiseError",
    "NumberedReceiver",
    "NumberedSender",
    "protocol_name",
]

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
    def __init__(self, name: bytes, prologue: bytes) -> None:
        self.h = name.ljust(HASHLEN, b"\x00") if len(name) <= HASHLEN else _hash(name)
        self.ck = self.h
        self.cipher = CipherState()
        self.mix_hash(prologue)

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, key = _hkdf(self.ck, ikm, 2)
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


class _Pattern(NamedTuple):
    initiator_pre: tuple[str, ...]  # "-> s ..." before the handshake
    responder_pre: tuple[str, ...]  # "<- s ..."
    messages: tuple[tuple[str, ...], ...]  # alternating, the initiator's first


# Noise §7.4/§7.5, as written there. IK is the relay link's; the others are here for their test vectors.
PATTERNS: dict[str, _Pattern] = {
    "NN": _Pattern((), (), (("e",), ("e", "ee"))),
    "XX": _Pattern((), (), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
    "KK": _Pattern(("s",), ("s",), (("e", "es", "ss"), ("e", "ee", "se"))),
    "IK": _Pattern((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
}


def protocol_name(pattern: str) -> bytes:
    return f"Noise_{pattern}_25519_ChaChaPoly_SHA256".encode()


def _public(key: bytes) -> X25519PublicKey:
    if len(key) != DHLEN:
        raise NoiseError("a public key is 32 bytes")
    try:
        return X25519PublicKey.from_public_bytes(key)
    except ValueError as e:
        raise NoiseError(f"malformed public key: {e}") from None


class Handshake:
    """One handshake of ``pattern``: the sides take turns, ``write_message`` then the other's ``read_message``.

    ``static`` is this side's static key, ``remote_static`` the peer's public
    key where the pattern has it known in advance (IK's initiator, both sides
    of KK); a side that learns it during the handshake finds it in
    ``remote_static`` once the message carrying it was read. When ``done``,
    ``split()`` gives ``(send, receive)`` cipher states. ``ephemeral`` is for
    test vectors only.
    """

    def __init__(
        self,
        *,
        pattern: str = "IK",
        initiator: bool,
        prologue: bytes,
        static: X25519PrivateKey | None = None,
        remote_static: bytes | None = None,
        ephemeral: X25519PrivateKey | None = None,
    ) -> None:
        try:
            self._pattern = PATTERNS[pattern]
        except KeyError:
            raise ValueError(f"unknown handshake pattern {pattern!r}") from None
        self.initiator = initiator
        self._ss = _Symmetric(protocol_name(pattern), prologue)
        self._s = static
        self._e: X25519PrivateKey | None = ephemeral
        self._rs: X25519PublicKey | None = None
        self._re: X25519PublicKey | None = None
        self._rs_raw: bytes | None = None
        mine, theirs = (
            (self._pattern.initiator_pre, self._pattern.responder_pre)
            if initiator
            else (self._pattern.responder_pre, self._pattern.initiator_pre)
        )
        if ("s" in mine or self._uses_s()) and static is None:
            raise ValueError(f"{pattern} needs this side's static key")
        if "s" in theirs:
            if remote_static is None:
                raise ValueError(f"{pattern} needs the peer's static key in advance")
            self._rs, self._rs_raw = _public(remote_static), remote_static
        elif remote_static is not None:
            raise ValueError(f"{pattern} learns the peer's static key in the handshake")
        # pre-messages: the initiator's first, then the responder's (§7.1)
        for side, tokens in ((True, self._pattern.initiator_pre), (False, self._pattern.responder_pre)):
            for token in tokens:
                assert token == "s"
                self._ss.mix_hash(_pub(self._s) if side == initiator else remote_static)  # type: ignore[arg-type]
        self._step = 0
        self._broken = False  # a message failed: this handshake is over (its state is half-mixed)

    def _uses_s(self) -> bool:
        turn = 0 if self.initiator else 1
        return any("s" in m for m in self._pattern.messages[turn::2])

    @property
    def done(self) -> bool:
        return self._step >= len(self._pattern.messages)

    @property
    def handshake_hash(self) -> bytes:
        return self._ss.h

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key (32 bytes): known in advance, or read from its message; else None."""
        return self._rs_raw

    def _my_turn(self) -> bool:
        return (self._step % 2 == 0) == self.initiator

    def _dh(self, mine: X25519PrivateKey | None, theirs: X25519PublicKey | None) -> None:
        assert mine is not None and theirs is not None
        try:
            shared = mine.exchange(theirs)
        except ValueError:  # cryptography refuses an all-zero result (a low-order point)
            raise NoiseError("the peer's key is a low-order point") from None
        if shared == bytes(DHLEN):
            raise NoiseError("the peer's key is a low-order point")
        self._ss.mix_key(shared)

    def _token_dh(self, token: str) -> None:
        # "es": the initiator's ephemeral with the responder's static; "se" the other way round (§7.3)
        if token == "ee":
            self._dh(self._e, self._re)
        elif token == "ss":
            self._dh(self._s, self._rs)
        elif (token == "es") == self.initiator:  # our ephemeral, their static
            self._dh(self._e, self._rs)
        else:  # our static, their ephemeral
            self._dh(self._s, self._re)

    def write_message(self, payload: bytes = b"") -> bytes:
        if self._broken or self.done or not self._my_turn():
            raise NoiseError("not this side's turn to write")
        out = bytearray()
        for token in self._pattern.messages[self._step]:
            if token == "e":
                if self._e is None:
                    self._e = X25519PrivateKey.generate()
                pub = _pub(self._e)
                out += pub
                self._ss.mix_hash(pub)
            elif token == "s":
                assert self._s is not None
                out += self._ss.encrypt_and_hash(_pub(self._s))
            else:
                self._token_dh(token)
        out += self._ss.encrypt_and_hash(payload)
        self._step += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """The payload of the peer's next message; ``NoiseError`` (and the handshake is over) if it fails."""
        if self._broken or self.done or self._my_turn():
            raise NoiseError("not this side's turn to read")
        try:
            return self._read(message)
        except NoiseError:
            self._broken = True
            raise

    def _read(self, message: bytes) -> bytes:
        rest = message
        for token in self._pattern.messages[self._step]:
            if token == "e":
                if len(rest) < DHLEN:
                    raise NoiseError("handshake message too short")
                self._re = _public(rest[:DHLEN])
                self._ss.mix_hash(rest[:DHLEN])
                rest = rest[DHLEN:]
            elif token == "s":
                n = DHLEN + (TAGLEN if self._ss.cipher.has_key else 0)
                if len(rest) < n:
                    raise NoiseError("handshake message too short")
                raw = self._ss.decrypt_and_hash(rest[:n])
                self._rs, self._rs_raw = _public(raw), raw
                rest = rest[n:]
            else:
                self._token_dh(token)
        payload = self._ss.decrypt_and_hash(rest)
        self._step += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """``(send, receive)`` for this side."""
        if self._broken or not self.done:
            raise NoiseError("the handshake is not finished")
        c1, c2 = self._ss.split()
        return (c1, c2) if self.initiator else (c2, c1)
