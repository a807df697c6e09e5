"""The peer port's listener: TLS through asyncio's own ``SSLProtocol``, so the node owns every connection.

aiohttp learns of a TLS connection only once its handshake is done, and the
event loop's TLS server keeps a connection that never finishes its handshake
for its handshake timeout (uvloop's: 60 s), out of reach of the node's
shutdown. ``PeerSite`` wraps each accepted connection itself (the ``ssl``
module's OpenSSL, the contexts of ``tls.py``): a handshake has
``HANDSHAKE_TIMEOUT_S``, and stopping the site drops the connections still in
theirs, so a stopped node leaves no socket behind.

The cost per record is the loop's own TLS layer's, within the bench's noise
(CPU per delivered token at 256 streams on the serving node: 35.8 µs with
this site, 34.6 µs with uvloop's; the client side stays uvloop's: asyncio's
layer there cost 79.5 µs a token for both nodes against 71.6).
"""

from __future__ import annotations

import asyncio
import weakref
from asyncio import sslproto

from aiohttp import web

__all__ = ["HANDSHAKE_TIMEOUT_S", "PeerSite"]

HANDSHAKE_TIMEOUT_S = 10.0


class _SSLProtocol(sslproto.SSLProtocol):
    # asyncio reads into a 256 KiB buffer per connection; a TLS record is at most 16 KiB, and a node may hold
    # hundreds of peer connections (one per concurrent stream)
    max_size = 32 * 1024


class PeerSite(web.TCPSite):
    """A TCP site whose connections are TLS through asyncio's ``SSLProtocol`` (``ssl_context`` is required)."""

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        loop = asyncio.get_running_loop()
        server = self._runner.server
        context = self._ssl_context
        assert server is not None and context is not None

        accepted: weakref.WeakSet[_SSLProtocol] = weakref.WeakSet()
        self._accepted = accepted

        def protocol() -> asyncio.BaseProtocol:
            # typeshed types SSLProtocol's waiter as a Future and its handshake timeout as an int; asyncio takes
            # None (no waiter: nobody awaits the handshake) and any positive number of seconds
            tls = _SSLProtocol(
                loop,
                server(),
                context,
                None,  # type: ignore[arg-type]  # typeshed: waiter is Future[Any], asyncio accepts None
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,  # type: ignore[arg-type]  # typeshed: int | None
            )
            accepted.add(tls)
            return tls

        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    @property
    def bound_port(self) -> int:
        """The port it listens on: known once it is started."""
        port = self._bound_port
        assert port is not None, "PeerSite.bound_port: the site is not started"
        return port

    async def stop(self) -> None:
        """Stop accepting, and drop the connections still in their handshake.

        The runner's request handler of a connection is told of it only once
        its handshake is done, so the runner's shutdown never closes one that
        is still shaking hands: left alone, it would live on past the node
        until ``HANDSHAKE_TIMEOUT_S``.
        """
        await super().stop()
        for tls in list(getattr(self, "_accepted", ())):
            if tls._state in (sslproto.SSLProtocolState.UNWRAPPED, sslproto.SSLProtocolState.DO_HANDSHAKE):
                tls._abort()
