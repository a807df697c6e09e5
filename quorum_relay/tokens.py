"""Tokens and the namespaces they admit into (pure logic: no I/O but reading a file's text).

A token admits a node into one namespace: the token's label when the tokens
file gives one (so several tokens may share a namespace, e.g. while rotating
one), else a name derived from the token. Namespaces never see each other.

Lookup is constant-time in the secret: the presented token is hashed with
SHA-256 and the digest is looked up in a dict. The time taken depends only on
the token's length and on the digest, which an attacker cannot steer towards a
stored one; nothing of a stored token leaks through timing.

Tokens file format: one token per line, optionally followed by whitespace and
a label; ``#`` starts a comment (a whole line, or after whitespace)::

    # team A's cluster, two tokens during a rotation
    3q2+7w-Lr8xkQa9zYvB0cS1d   team-a
    Jm5tQ8pW2xN7rV4kL1cZ6bHy   team-a
    Z8v1N4q7R2w5T0y3U6i9O2p5   # a namespace of its own
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import msgspec

from .errors import ConfigError

__all__ = ["Admission", "TokenTable", "load_tokens_file", "parse_tokens", "token_digest"]

# Visible ASCII usable in an HTTP header, minus the comma (env lists) and
# whitespace: covers base64, base64url and hex tokens.
TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
LABEL_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """What a token admits into; ``digest`` identifies the token without holding it."""

    namespace: str
    digest: bytes
    labelled: bool = False


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _derived_namespace(token: str) -> str:
    # A separate derivation from the lookup digest, and a ':' that no label can
    # hold, so a derived name never equals a label.
    return "t:" + hashlib.sha256(b"quorum-relay namespace\0" + token.encode()).hexdigest()[:20]


def parse_tokens(text: str, *, source: str = "tokens file") -> list[tuple[str, str | None]]:
    """``(token, label)`` pairs of a tokens file's text; ``ConfigError`` naming the line if one is bad."""
    out: list[tuple[str, str | None]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        for i, part in enumerate(parts):
            if part.startswith("#"):
                parts = parts[:i]
                break
        if not parts:
            continue
        if len(parts) > 2:
            raise ConfigError(f"{source}:{lineno}: expected TOKEN [LABEL], got {len(parts)} words")
        token = parts[0]
        if not TOKEN_RE.fullmatch(token):
            raise ConfigError(f"{source}:{lineno}: a token is 16-512 characters of [A-Za-z0-9._~+/=-]")
        label = parts[1] if len(parts) == 2 else None
        if label is not None and not LABEL_RE.fullmatch(label):
            raise ConfigError(f"{source}:{lineno}: a label is 1-64 characters of [A-Za-z0-9._-]")
        out.append((token, label))
    return out


def load_tokens_file(path: str) -> list[tuple[str, str | None]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"tokens file {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    return parse_tokens(text, source=path)


class TokenTable:
    """Digest → admission. Immutable once built; a reload builds a new one."""

    __slots__ = ("_by_digest",)

    def __init__(self, entries: Iterable[tuple[str, str | None]]) -> None:
        by_digest: dict[bytes, Admission] = {}
        for token, label in entries:
            if not TOKEN_RE.fullmatch(token):
                raise ConfigError("a token is 16-512 characters of [A-Za-z0-9._~+/=-]")
            digest = token_digest(token)
            adm = Admission(
                namespace=label if label is not None else _derived_namespace(token),
                digest=digest,
                labelled=label is not None,
            )
            prev = by_digest.get(digest)
            if prev is not None and prev.namespace != adm.namespace:
                raise ConfigError("the same token is given twice with different labels")
            by_digest[digest] = adm
        self._by_digest = by_digest

    def __len__(self) -> int:
        return len(self._by_digest)

    def admit(self, token: str) -> Admission | None:
        """The admission of a presented token, or ``None``."""
        return self._by_digest.get(token_digest(token))

    def still_admits(self, adm: Admission) -> bool:
        """Whether a connected node's token still admits it into the same namespace."""
        now = self._by_digest.get(adm.digest)
        return now is not None and now.namespace == adm.namespace

    def namespaces(self) -> set[str]:
        return {a.namespace for a in self._by_digest.values()}
