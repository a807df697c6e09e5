"""How a request reaches a peer: the link seam (one peer protocol, several transports).

A link opens one request (a ``RequestHead``) to one peer and hands back its
``Answer``: a status, the headers and a ``Body`` to read (``backends/answer.py``;
what httpcore's network backends are to httpx). ``PeerTarget``
(``forward.py``), the health prober and the catalog fetcher talk to links
only; they never know whether an HTTP connection on the LAN or a stream
through the relay carried a request.

Failures before the answer's head are mapped here, once, into
``EngineUnavailable`` (nothing has reached the client yet: another holder, or
another link to the same peer, may be tried); a body that breaks raises
``LinkBroken``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Protocol

import aiohttp

from ..backends.answer import Answer, RequestHead
from ..backends.base import Timeouts
from ..backends.upstream import HttpAnswer, send
from ..errors import EngineUnavailable
from .relay import RelayAnswer, RelayLink, RelayLinkError

__all__ = ["HttpLink", "PeerLink", "RelayPeerLink"]


class PeerLink(Protocol):
    """One way to reach one peer."""

    route: str  # "lan" | "relay"

    async def open(self, head: RequestHead, t: Timeouts, *, deadline: float, stream: bool, who: str) -> Answer:
        """Send ``head``; its answer's head, by ``deadline`` (else ``EngineUnavailable``)."""
        ...


class HttpLink:
    """A peer on the LAN: HTTPS to its peer port, mutual TLS, the certificate pinned (``tls.py``)."""

    route = "lan"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        address: str,
        ssl_context: ssl.SSLContext,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self._session = session
        self.address = address
        self._ssl = ssl_context
        self._on_refused = on_refused

    async def open(self, head: RequestHead, t: Timeouts, *, deadline: float, stream: bool, who: str) -> HttpAnswer:
        return await send(
            self._session,
            f"https://{self.address}",
            head,
            t,
            stream=stream,
            who=who,
            on_refused=self._on_refused,
            deadline=deadline,
            ssl_context=self._ssl,
        )


class RelayPeerLink:
    """A peer through the relay: one multiplexed, end-to-end encrypted stream per request."""

    route = "relay"

    def __init__(self, relay: RelayLink, node_id: str) -> None:
        self._relay = relay
        self.node_id = node_id

    async def open(self, head: RequestHead, t: Timeouts, *, deadline: float, stream: bool, who: str) -> RelayAnswer:
        loop = asyncio.get_running_loop()
        try:
            return await self._relay.request(
                self.node_id,
                head.method,
                head.path,
                head.headers,
                head.body,
                timeout_s=max(0.0, deadline - loop.time()),
            )
        except TimeoutError:
            limit = t.first_token_s if stream else t.request_s
            raise EngineUnavailable(
                f"{who} gave no answer in {limit:g} s (through the relay)", status=504, engine=who
            ) from None
        except RelayLinkError as e:
            raise EngineUnavailable(f"{who} unreachable through the relay: {e}", engine=who) from None
