"""The link seam's types: a request head going out, an answer coming back (status, headers, a body to read).

Every way a request leaves this node hands back the same ``Answer``: HTTP to
an engine or to a peer on the LAN (``upstream.py``, over aiohttp) and a stream
through the relay (``cluster/relay/``). The readers above
(``stream.py``, ``upstream.read_whole``, ``PeerTarget``) read a ``Body`` and
never see the transport: what httpcore's network backend is to httpx.

A body raises ``LinkBroken`` when its connection breaks mid-read; no
transport's own exception (aiohttp's, websockets') passes above the link.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import msgspec

__all__ = ["Answer", "Body", "LinkBroken", "RequestHead"]


class LinkBroken(ConnectionError):
    """The connection carrying an answer broke while it was being read."""


class RequestHead(msgspec.Struct, frozen=True, kw_only=True):
    """One request to send: method, path (with its query), headers and the whole body."""

    method: str
    path: str
    headers: dict[str, str] = {}
    body: bytes = b""


class Body(Protocol):
    """An answer's body, read in chunks as they arrive."""

    @property
    def content_length(self) -> int | None:
        """The declared length, if the sender declared one."""
        ...

    @property
    def total_bytes(self) -> int:
        """Bytes received so far (a stream's watchdog reads it as a sign of life)."""
        ...

    async def readany(self) -> bytes:
        """The next bytes that arrived; ``b""`` once the body has ended. Raises ``LinkBroken``."""
        ...

    def at_eof(self) -> bool: ...

    def interrupt(self, exc: BaseException) -> None:
        """Make a pending read, and every later one, raise ``exc`` (a watchdog's timeout)."""
        ...

    def release(self) -> None:
        """Done, read to the end: the connection may carry another request."""
        ...

    def abort(self) -> None:
        """Done before the end: cut it, so the sender sees it and stops."""
        ...


class Answer(Protocol):
    """The head of an answer, and its body."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Case-insensitive."""
        ...

    @property
    def body(self) -> Body: ...
