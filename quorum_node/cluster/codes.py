"""Join with a short code (issue 23): a number and two words, like a phone pairing, instead of a long token.

``quorum-node invite`` (where the node runs) makes an ordinary invite token (``membership``)
and gives it to the running node under a short code, ``NAMEPLATE-WORD-WORD``
(``7-harbor-lantern``): the nameplate says which invitation, the whole code is
the password of a SPAKE2 exchange (the ``spake2`` package, Warner's; a
password-authenticated key exchange). ``quorum-node join CODE`` on the new
machine runs the other half against the inviter's peer port:

1. ``POST /quorum/v1/join/code/start`` ``{nameplate, message}`` → ``{session, message}``:
   both sides' SPAKE2 messages; each derives a key, the same only if both
   used the same code;
2. ``POST /quorum/v1/join/code/finish`` ``{session, proof}``: the joiner's proof
   that it holds the key (a ChaCha20-Poly1305 seal, under a key HKDF-SHA256
   derives from SPAKE2's, of a fixed text) → ``{token}``: the invite token,
   sealed under the same key.

The joiner then joins with that token as ``quorum-node join TOKEN`` would
(``join.py``: TLS to the inviter, pinned by the token, one use). What the
code protects is the token's way to the new machine.

**Through the relay**, for a new machine on another network: where the
inviter is on a relay that carries join codes, the relay holds the code's
nameplate for it (``wire.Claim``), and the code names the relay:
``7-harbor-lantern@relay.example.com`` (``wss://`` unless a scheme is
written). The new machine opens the relay's ``/v1/join/7`` with no token
and says ``RelayStart`` (as ``start`` above) and then ``RelayJoin``: the
proof, with its own ``Candidate`` sealed under the key. The inviter admits it
with the invitation's token (``JoinHandler.admit``, as a token join) and
answers ``RelayJoined``: the join answer, this relay's URL and token and the
inviter's id, sealed under the key. The relay forwards these messages and can
read or change none of them; nothing it could do with them would let it in.

A wrong code fails the proof and teaches the guesser nothing (SPAKE2: one
online guess per exchange, nothing to test offline); each wrong proof costs
the invitation a try, and after ``GUESSES`` the invitation is burnt: its token
is spent, and the right code fails too. A code works once, and for as long as
its token.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B  # type: ignore[import-untyped]
from spake2.spake2 import SPAKEError  # type: ignore[import-untyped]

__all__ = [
    "RELAY_ANSWER",
    "RELAY_CANDIDATE",
    "RelayAsk",
    "RelayJoin",
    "RelayJoined",
    "RelayRefused",
    "RelayStart",
    "RelayStarted",
    "SealedJoin",
    "code_with_relay",
    "relay_of",
    "CODE_FINISH_PATH",
    "CODE_START_PATH",
    "GUESSES",
    "MAX_CODE_BYTES",
    "CodeFinish",
    "CodeStart",
    "WORDS",
    "CodeError",
    "CodeInvites",
    "Joiner",
    "make_code",
    "open_sealed",
    "parse_code",
    "seal",
]

CODE_START_PATH = "/quorum/v1/join/code/start"
CODE_FINISH_PATH = "/quorum/v1/join/code/finish"
#: The largest code message a node reads.
MAX_CODE_BYTES = 4096


class CodeStart(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nameplate: Annotated[int, msgspec.Meta(ge=1, le=999)]
    message: Annotated[bytes, msgspec.Meta(max_length=256)]


class CodeFinish(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nameplate: Annotated[int, msgspec.Meta(ge=1, le=999)]
    session: Annotated[str, msgspec.Meta(pattern=r"\A[0-9a-f]{32}\Z")]
    proof: Annotated[bytes, msgspec.Meta(max_length=256)]


class RelayStart(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="start"):
    """Joining machine → inviter, through the relay: as ``CodeStart``."""

    nameplate: Annotated[int, msgspec.Meta(ge=1, le=999)]
    message: Annotated[bytes, msgspec.Meta(max_length=256)]


class RelayJoin(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="join"):
    """Joining machine → inviter, through the relay: the proof, and its ``Candidate`` sealed under the key."""

    nameplate: Annotated[int, msgspec.Meta(ge=1, le=999)]
    session: Annotated[str, msgspec.Meta(pattern=r"\A[0-9a-f]{32}\Z")]
    proof: Annotated[bytes, msgspec.Meta(max_length=256)]
    candidate: Annotated[bytes, msgspec.Meta(max_length=4096)]


RelayAsk = RelayStart | RelayJoin


class RelayStarted(msgspec.Struct, frozen=True, kw_only=True, tag="started"):
    session: Annotated[str, msgspec.Meta(pattern=r"\A[0-9a-f]{32}\Z")]
    message: Annotated[bytes, msgspec.Meta(max_length=256)]


class RelayJoined(msgspec.Struct, frozen=True, kw_only=True, tag="joined"):
    sealed: bytes  # a ``SealedJoin``, under the key


class RelayRefused(msgspec.Struct, frozen=True, kw_only=True, tag="refused"):
    status: int
    message: Annotated[str, msgspec.Meta(max_length=512)]


class SealedJoin(msgspec.Struct, frozen=True, kw_only=True):
    """What the inviter seals for a machine that joined through the relay."""

    answer: msgspec.Raw  # the ``JoinAnswer``
    inviter: str
    relay: str
    relay_token: str


#: The nonces of the sealed candidate and answer (the proof and the token have theirs).
RELAY_CANDIDATE = b"\x00" * 11 + b"\x03"
RELAY_ANSWER = b"\x00" * 11 + b"\x04"


def code_with_relay(code: str, relay_url: str) -> str:
    """``code`` naming the relay it works through: ``7-harbor-lantern@relay.example.com`` (wss:// unwritten)."""
    scheme, _, rest = relay_url.rstrip("/").partition("://")
    return f"{code}@{rest if scheme == 'wss' else relay_url.rstrip('/')}"


def relay_of(text: str) -> tuple[str, str | None]:
    """A code, and the URL of the relay it names (None: none; it is found on the LAN)."""
    code, at, relay = text.strip().partition("@")
    if not at:
        return code, None
    if not relay or any(c.isspace() for c in relay):
        raise ValueError(f"{text!r}: no relay after the @")
    return code, relay if "://" in relay else f"wss://{relay}"


#: Wrong proofs an invitation takes before it is burnt.
GUESSES = 3
#: Exchanges started and not finished that one invitation keeps at once (the oldest goes first).
_SESSIONS = 8
#: How long a started exchange waits for its proof.
_SESSION_S = 60.0
_ID_JOINER = b"quorum-join"
_ID_INVITER = b"quorum-inviter"
_PROOF = b"quorum join code: the joiner holds the key"
_NONCE_PROOF = b"\x00" * 11 + b"\x01"
_NONCE_TOKEN = b"\x00" * 11 + b"\x02"

_WORD_LIST = """
    acorn actor adobe agent album alert alpine amber anchor angle ankle apple april arena arrow atlas attic
    autumn avenue badge bagel baker bamboo banjo barley barrel basil basket beacon beaver bellow berry bicycle
    bishop blanket blossom bonnet border bottle boulder bracket branch breeze bridge bronze bucket buffalo
    bundle burrow button cabin cactus camera canal candle canyon captain carbon carpet castle cattle cellar
    cement census cherry chimney cinder circus citrus clover cobalt coconut comet copper corner cotton cradle
    crater crayon cricket crystal cupboard curtain cushion dagger dahlia dancer debris delta denim desert
    diesel dinner dolphin domino donkey dragon drawer dusty eagle easel echo eclipse elbow ember empire engine
    falcon fathom feather fennel ferry fiddle figure filter flannel flint forest fossil fountain fox galaxy
    garden garlic gazelle geyser ginger glacier gravel guitar hammer harbor harvest hazel helmet hermit hollow
    honey horizon hornet island ivory jacket jaguar jasmine jelly jigsaw jungle kettle kiosk kitten ladder
    lagoon lantern lava lemon lentil lilac linen lizard lobster locket lotus magnet mango maple marble meadow
    melon mercury meteor mirror mitten monsoon mosaic muffin mustard napkin nectar needle nickel noodle nutmeg
    oasis ocean olive onion opal orbit orchard otter oyster paddle pagoda panda paper parrot pebble pepper
    pillow pilot pinecone planet plaza pocket pollen poppy potato prairie puzzle quartz quiver rabbit radar
    radish raven ribbon river rocket saddle saffron salmon sandal satin scarf shadow silver sierra signal
    sparrow spider spinach spruce squirrel stable summit sunset tablet tango temple thistle thunder tiger
    timber tomato topaz tornado trellis trumpet tulip tundra turnip umbrella valley velvet violin
"""
#: The words of a code: short, common, unlike one another (256: two words are 16 bits, with the nameplate).
WORDS = tuple(_WORD_LIST.split())


class CodeError(Exception):
    """A code invitation cannot go on: ``status`` (404: none such now, 403: wrong code) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _key(spake_key: bytes) -> ChaCha20Poly1305:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"quorum join code v1")
    return ChaCha20Poly1305(hkdf.derive(spake_key))


def seal(spake_key: bytes, nonce: bytes, data: bytes) -> bytes:
    return _key(spake_key).encrypt(nonce, data, None)


def open_sealed(spake_key: bytes, nonce: bytes, data: bytes) -> bytes | None:
    try:
        return _key(spake_key).decrypt(nonce, data, None)
    except InvalidTag:
        return None


def make_code(nameplate: int, rng: secrets.SystemRandom | None = None) -> str:
    r = rng or secrets.SystemRandom()
    return f"{nameplate}-{r.choice(WORDS)}-{r.choice(WORDS)}"


def parse_code(code: str) -> tuple[int, str]:
    """A code's nameplate, and the code itself (the password), normalised; ``ValueError`` if it is none."""
    parts = code.strip().lower().split("-")
    if len(parts) != 3 or not parts[0].isdigit() or not all(p in WORDS for p in parts[1:]):
        raise ValueError(f"{code!r} is not a join code (a number and two words: 7-harbor-lantern)")
    nameplate = int(parts[0])
    if not 1 <= nameplate <= 999:
        raise ValueError(f"{code!r}: its number is 1 to 999")
    return nameplate, "-".join(parts)


#: Exchanges one invitation starts at once, and one more every this many seconds: each costs a SPAKE2
#: computation (~8 ms of the event loop), and its number is easy to guess while few are out.
_STARTS = 8
_START_EVERY_S = 2.0


@dataclass
class _Invitation:
    password: bytes
    token: str
    expires: float
    guesses: int = GUESSES
    starts: float = _STARTS  # a token bucket: exchanges it may start now
    started_at: float = 0.0
    sessions: dict[str, tuple[bytes, float]] = field(default_factory=dict)  # session -> (key, started)


class CodeInvites:
    """The inviter's side: code invitations by nameplate (in memory: a code lives as long as the node runs)."""

    def __init__(self, on_gone: Callable[[int], None] = lambda nameplate: None) -> None:
        self._by_plate: dict[int, _Invitation] = {}
        self.burnt = 0
        self._on_gone = on_gone  # an invitation ended (used, burnt, expired): its nameplate is free

    def add(self, token: str, ttl_s: float, now: float | None = None, nameplate: int | None = None) -> str:
        """A new code for ``token`` (the invite's encoded token); it lasts ``ttl_s``. ``nameplate``: the one
        the relay holds for it, else one of ours."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        rng = secrets.SystemRandom()
        if nameplate is not None:
            if nameplate in self._by_plate or not 1 <= nameplate <= 999:
                raise CodeError(409, f"nameplate {nameplate} is in use here")
        else:
            free = [n for n in range(1, 1000) if n not in self._by_plate]
            if not free:
                raise CodeError(409, "too many code invitations at once")
            nameplate = min(free) if len(free) > 900 else rng.choice(free)  # short numbers while few are out
        code = make_code(nameplate, rng)
        self._by_plate[nameplate] = _Invitation(code.encode(), token, now + ttl_s, started_at=now)
        return code

    def start(self, nameplate: int, message: bytes, now: float | None = None) -> tuple[str, bytes]:
        """The joiner's SPAKE2 message in, ours out, and the session they share (``CodeError`` 404: none)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        inv = self._by_plate.get(nameplate)
        if inv is None:
            raise CodeError(404, "no such invitation (wrong number, used, burnt or expired)")
        inv.starts = min(_STARTS, inv.starts + (now - inv.started_at) / _START_EVERY_S)
        inv.started_at = now
        if inv.starts < 1:
            raise CodeError(429, "too many exchanges with this invitation at once: try again in a few seconds")
        inv.starts -= 1
        side = SPAKE2_B(inv.password, idA=_ID_JOINER, idB=_ID_INVITER)
        ours = side.start()
        try:
            key = side.finish(message)
        except (SPAKEError, ValueError) as e:  # a malformed message
            raise CodeError(400, f"not a SPAKE2 message: {type(e).__name__}") from None
        while len(inv.sessions) >= _SESSIONS:
            inv.sessions.pop(next(iter(inv.sessions)))
        session = secrets.token_hex(16)
        inv.sessions[session] = (key, now)
        return session, ours

    def finish(self, nameplate: int, session: str, proof: bytes, now: float | None = None) -> bytes:
        """The joiner's proof in; the sealed token out, once. A wrong proof costs a guess (``CodeError`` 403)."""
        key, token = self.prove(nameplate, session, proof, now)
        return seal(key, _NONCE_TOKEN, token.encode())

    def prove(self, nameplate: int, session: str, proof: bytes, now: float | None = None) -> tuple[bytes, str]:
        """The joiner's proof in; the exchange's key and the invitation's token out, once (the invitation
        ends). A wrong proof costs a guess (``CodeError`` 403)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        inv = self._by_plate.get(nameplate)
        started = inv.sessions.pop(session, None) if inv is not None else None
        if inv is None or started is None:
            raise CodeError(404, "no such exchange (start again)")
        key = started[0]
        if open_sealed(key, _NONCE_PROOF, proof) != _PROOF:
            inv.guesses -= 1
            if inv.guesses <= 0:
                self._end(nameplate)
                self.burnt += 1
                raise CodeError(403, "wrong code; too many wrong codes: this invitation is burnt, ask for another")
            raise CodeError(403, f"wrong code ({inv.guesses} more tries before this invitation is burnt)")
        self._end(nameplate)  # once
        return key, inv.token

    def pending(self) -> int:
        return len(self._by_plate)

    def sweep(self) -> None:
        """End the invitations that expired (their nameplates go back to the relay)."""
        self._expire(time.monotonic())

    def _end(self, plate: int) -> None:
        del self._by_plate[plate]
        self._on_gone(plate)

    def _expire(self, now: float) -> None:
        for plate in [p for p, inv in self._by_plate.items() if inv.expires <= now]:
            self._end(plate)
        for inv in self._by_plate.values():
            for s in [s for s, (_, at) in inv.sessions.items() if now - at > _SESSION_S]:
                del inv.sessions[s]


class Joiner:
    """The new machine's side of one exchange: ``message`` to send, then ``key_from(theirs)``, ``proof()``,
    and ``token(sealed)`` (None: the inviter's answer does not open: not the inviter, or not this code)."""

    def __init__(self, code: str) -> None:
        self.nameplate, password = parse_code(code)
        self._side = SPAKE2_A(password.encode(), idA=_ID_JOINER, idB=_ID_INVITER)
        self.message: bytes = self._side.start()
        self._key: bytes | None = None

    def key_from(self, theirs: bytes) -> None:
        try:
            self._key = self._side.finish(theirs)
        except (SPAKEError, ValueError) as e:  # a malformed answer
            raise ValueError(f"the inviter's SPAKE2 message is malformed: {type(e).__name__}") from None

    def proof(self) -> bytes:
        assert self._key is not None
        return seal(self._key, _NONCE_PROOF, _PROOF)

    def token(self, sealed: bytes) -> str | None:
        plain = self.open(_NONCE_TOKEN, sealed)
        return plain.decode() if plain is not None else None

    def seal(self, nonce: bytes, data: bytes) -> bytes:
        assert self._key is not None
        return seal(self._key, nonce, data)

    def open(self, nonce: bytes, sealed: bytes) -> bytes | None:
        assert self._key is not None
        return open_sealed(self._key, nonce, sealed)
