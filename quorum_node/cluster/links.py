"""How a request reaches a peer: the link seam (one peer protocol, several transports).

A link opens one request to one peer and hands back its answer: a status, the
headers and a body to read (``LinkResponse``, the subset of
``aiohttp.ClientResponse`` that the peer code uses — what httpcore's network
backends are to httpx). ``PeerTarget``, the health prober and the catalog
fetcher talk to links only; they never know whether an HTTP connection on the
LAN or a stream through the relay carried a request.

Failures are mapped here, once, into ``EngineUnavailable`` (nothing has reached
the client yet: another holder, or another link to the same peer, may be tried).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from ..backends.base import Timeouts
from ..backends.upstream import post
from ..errors import EngineUnavailable
from .relay_link import RelayLink, RelayLinkError

__all__ = ["HttpLink", "LinkResponse", "PeerLink", "RelayPeerLink"]


class LinkResponse(Protocol):
    status: int
    headers: Any
    content: Any  # readany(), iter_any(), total_bytes, set_exception()
    content_length: int | None

    async def read(self) -> bytes: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


class PeerLink(Protocol):
    route: str  # "lan" | "relay"

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes, t: Timeouts, *, deadline: float,
        stream: bool, who: str,
    ) -> LinkResponse: ...


class HttpLink:
    """A peer on the LAN: HTTPS to its peer port, mutual TLS, the certificate pinned (``tls.py``)."""

    route = "lan"

    def __init__(self, session: aiohttp.ClientSession, address: str, ssl_context: ssl.SSLContext,
                 on_refused: Callable[[], None] | None = None) -> None:
        self._session = session
        self.address = address
        self._ssl = ssl_context
        self._on_refused = on_refused

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes, t: Timeouts, *, deadline: float,
        stream: bool, who: str,
    ) -> LinkResponse:
        return await post(self._session, f"https://{self.address}{path}", body, headers, t, stream=stream, who=who,
                          on_refused=self._on_refused, deadline=deadline, method=method, ssl_context=self._ssl)


class RelayPeerLink:
    """A peer through the relay: one multiplexed, end-to-end encrypted stream per request."""

    route = "relay"

    def __init__(self, relay: RelayLink, node_id: str) -> None:
        self._relay = relay
        self.node_id = node_id

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes, t: Timeouts, *, deadline: float,
        stream: bool, who: str,
    ) -> LinkResponse:
        loop = asyncio.get_running_loop()
        try:
            return await self._relay.request(self.node_id, method, path, headers, body,
                                             timeout_s=max(0.0, deadline - loop.time()))
        except TimeoutError:
            limit = t.first_token_s if stream else t.request_s
            raise EngineUnavailable(f"{who} gave no answer in {limit:g} s (through the relay)", status=504,
                                    engine=who) from None
        except RelayLinkError as e:
            raise EngineUnavailable(f"{who} unreachable through the relay: {e}", engine=who) from None
