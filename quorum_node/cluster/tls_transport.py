"""TLS for the peer links through asyncio's own ``SSLProtocol``, over the event loop's plain TCP.

uvloop (the node's event loop) has its own TLS layer, and it costs about twice
what asyncio's does for every record: measured here, one 160-byte message
written and read over TLS costs 19 µs of CPU under uvloop's layer and 10 µs
with asyncio's ``sslproto.SSLProtocol`` on the same uvloop TCP transport (plain
TCP: 4 µs). A streamed answer is one record per token on the peer link, so the
node wraps its peers' connections itself, on both ends:

- ``PeerSite``: the peer port's listener (an aiohttp site) — each accepted
  connection is the runner's own request handler behind an ``SSLProtocol``;
- ``PeerConnector``: the aiohttp connector of the cluster's client session —
  a connection whose request asks for TLS (an ``SSLContext``) is opened plain
  and wrapped the same way; everything else goes through aiohttp as it is.

The TLS itself is the ``ssl`` module's (OpenSSL), with the same contexts
(``tls.py``); only the glue between the socket and OpenSSL changes. The
handshake has ``HANDSHAKE_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from asyncio import sslproto
from typing import Any

import aiohappyeyeballs
import aiohttp
from aiohttp import web
from aiohttp.client_exceptions import (
    ClientConnectorCertificateError,
    ClientConnectorError,
    ClientConnectorSSLError,
)
from aiohttp.helpers import ceil_timeout

__all__ = ["HANDSHAKE_TIMEOUT_S", "PeerConnector", "PeerSite"]

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
            tls = _SSLProtocol(loop, server(), context, None, server_side=True,
                               ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
            accepted.add(tls)
            return tls

        self._server = await loop.create_server(protocol, self._host, self._port, backlog=self._backlog,
                                                reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    @property
    def bound_port(self) -> int:
        return self._bound_port

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


class PeerConnector(aiohttp.TCPConnector):
    """``TCPConnector`` whose TLS connections run through asyncio's ``SSLProtocol`` (see the module)."""

    async def _wrap_create_connection(
        self, *args: Any, addr_infos: Any, req: Any, timeout: Any, client_error: type[Exception] = ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, Any]:
        context = kwargs.get("ssl")
        if not isinstance(context, ssl.SSLContext):
            return await super()._wrap_create_connection(*args, addr_infos=addr_infos, req=req, timeout=timeout,
                                                         client_error=client_error, **kwargs)
        protocol_factory = args[0]
        loop = self._loop
        transport = None
        try:
            async with ceil_timeout(timeout.sock_connect, ceil_threshold=timeout.ceil_threshold):
                sock = await aiohappyeyeballs.start_connection(addr_infos=addr_infos, loop=loop)
                waiter = loop.create_future()
                app = protocol_factory()
                tls = _SSLProtocol(loop, app, context, waiter, server_side=False,
                                           server_hostname=kwargs.get("server_hostname") or None,
                                           ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
                transport, _ = await loop.create_connection(lambda: tls, sock=sock)
                await waiter
                return tls._app_transport, app
        except BaseException as exc:
            if transport is not None:
                transport.close()
            if isinstance(exc, ssl.CertificateError):
                raise ClientConnectorCertificateError(req.connection_key, exc) from exc
            if isinstance(exc, ssl.SSLError):
                raise ClientConnectorSSLError(req.connection_key, exc) from exc
            if isinstance(exc, OSError) and not isinstance(exc, asyncio.TimeoutError):
                raise client_error(req.connection_key, exc) from exc
            raise
