"""The node's local admin token: how its own user administers it under ``--require-key``.

The node makes ``<data_dir>/admin.token`` (0600, 32 random bytes, URL-safe
base64) when it starts, if it is not there. A CLI on the same machine that can
read the file (the node's own user: other local users cannot) sends it as
``X-Quorum-Admin``; the node accepts it from a loopback address only, on
``/quorum/admin/*`` only, compared in constant time. So the owner can make the
first admin key of a node that requires keys from everyone without stopping it.
The token is never logged, and the CLIs never send it to a URL off this machine.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import re
import secrets
import urllib.parse
from pathlib import Path

from ..errors import ConfigError

__all__ = ["ADMIN_HEADER", "ADMIN_TOKEN_FILE", "admin_headers", "load_or_create", "matches", "read_token"]

ADMIN_TOKEN_FILE = "admin.token"
ADMIN_HEADER = "X-Quorum-Admin"
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


def _read(path: Path) -> str | None:
    """The token in ``path``, or None if the file is missing or is not one (a write cut short)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    return text if _TOKEN_RE.fullmatch(text) else None


def load_or_create(data_dir: Path) -> bytes:
    """The node's token, made (atomically, 0600) if ``data_dir`` has none. Raises ``ConfigError``."""
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        if not data_dir.exists():
            data_dir.mkdir(mode=0o700, parents=True)
        token = _read(path)
        if token is None:
            token = secrets.token_urlsafe(32)
            tmp = path.with_name(f".{ADMIN_TOKEN_FILE}.{secrets.token_hex(6)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(token + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        os.chmod(path, 0o600)  # one left readable by others (copied, restored) is this user's again
    except OSError as e:
        raise ConfigError(f"admin token {path}: {e}") from None
    return token.encode()


def matches(expected: bytes, given: str) -> bool:
    """Whether ``given`` (a header's value) is the token, in time independent of where they differ."""
    return hmac.compare_digest(expected, given.strip().encode("utf-8", "replace"))


def read_token(data_dir: Path) -> str | None:
    """The token of the node whose data dir is ``data_dir``, if this user may read it (else None)."""
    try:
        return _read(data_dir / ADMIN_TOKEN_FILE)
    except OSError:  # another user's node, or no data dir
        return None


def _on_this_machine(url: str) -> bool:
    host = (urllib.parse.urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_headers(url: str, data_dir: Path) -> dict[str, str]:
    """``X-Quorum-Admin`` for a CLI's request to ``url``: only to a loopback URL, only if the token is readable."""
    if not _on_this_machine(url):
        return {}  # another machine's node never sees this one's token
    token = read_token(data_dir)
    return {ADMIN_HEADER: token} if token is not None else {}
