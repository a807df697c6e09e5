"""The HTTP server under the API: connection limits and deadlines, errors in the OpenAI shape.

aiohttp parses requests well but leaves a node open to slow and hostile
clients: no deadline on request headers, a keep-alive timeout of an hour, no
cap on connections per address, and its own parser errors in plain text. This
module closes those holes where they open, in the connection protocol, the way
nginx and HAProxy do:

- ``header_timeout_s``: once the first byte of a request has arrived, its
  headers must be complete within this time, else the connection gets a 408
  and is closed (slowloris).
- ``keepalive_timeout_s``: an idle connection (before its first request, or
  between two) is closed after this time.
- ``max_connections_per_address``: one more connection from an address that
  has this many open gets a 429 and is closed at once (loopback is not capped:
  it is this machine, trusted as it is for keys).
- The body deadline (``body_timeout_s``) is enforced where the body is read
  (``api/body.py``), since only a handler knows it wants one.
- Every error aiohttp's parser answers (oversized or malformed headers, bad
  chunk sizes) is an OpenAI error body, never plain text.

It relies on aiohttp's ``RequestHandler`` internals (the pinned version in
``constraints.txt``): ``_waiter`` is pending exactly while the connection waits
for the next request.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ..errors import error_body
from ..names import is_loopback

__all__ = ["ConnectionLimits", "InFlight", "NodeRunner", "raise_fd_limit"]

log = structlog.get_logger(__name__)

# How long a refused request's unread body is drained before the connection is
# closed (so the client can read the answer); aiohttp's default is 10 s.
_LINGER_S = 2.0


class ConnectionLimits:
    """Open connections per source address, and the connection-level deadlines."""

    __slots__ = ("header_timeout_s", "keepalive_timeout_s", "max_per_address", "_open")

    def __init__(self, *, header_timeout_s: float, keepalive_timeout_s: float, max_per_address: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_per_address = max_per_address
        self._open: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        n = self._open.get(address, 0)
        if n >= self.max_per_address:
            return False
        self._open[address] = n + 1
        return True

    def release(self, address: str) -> None:
        n = self._open.get(address, 0) - 1
        if n > 0:
            self._open[address] = n
        else:
            self._open.pop(address, None)

    def open_connections(self, address: str | None = None) -> int:
        return self._open.get(address, 0) if address is not None else sum(self._open.values())


def _raw_error(status: int, reason: str, message: str, type_: str, code: str, extra: str = "") -> bytes:
    body = error_body(message, type_, None, code)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


class _GuardedHandler(RequestHandler):
    """aiohttp's connection protocol with the limits above."""

    def __init__(self, manager: _GuardedServer, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(
            manager,
            keepalive_timeout=limits.keepalive_timeout_s,
            lingering_time=_LINGER_S,
            auto_decompress=False,
            **kwargs,
        )
        self._limits = limits
        self._address: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        inner = self._request_handler
        assert inner is not None

        async def handle(request: BaseRequest) -> web.StreamResponse:
            # What escapes the application's middlewares (its Expect handling, say) is still ours to word.
            try:
                return await inner(request)
            except web.HTTPException as e:
                if e.status < 400:
                    raise
                return web.Response(
                    status=e.status,
                    body=error_body(e.text or e.reason, "invalid_request_error"),
                    content_type="application/json",
                    headers={"x-should-retry": "false"},
                )

        self._request_handler = handle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        # Loopback is this machine (its apps, and the node itself serving what came through the relay):
        # trusted like it is for keys, and not capped.
        if is_loopback(address) or transport.get_extra_info("quorum_pipe"):
            return  # the pipe (cluster/pipe.py): relayed requests, capped by the relay link's own limits
        if not self._limits.admit(address):
            log.warning(
                "connection_refused", remote=address, reason="too_many_connections", limit=self._limits.max_per_address
            )
            self._refuse(
                _raw_error(
                    429,
                    "Too Many Requests",
                    f"Too many open connections from {address} (the limit is "
                    f"{self._limits.max_per_address}); close some and try again",
                    "rate_limit_error",
                    "too_many_connections",
                    "Retry-After: 1\r\n",
                )
            )
            return
        self._address = address

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        if self._address is not None:
            self._limits.release(self._address)
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting = self._waiter is not None and not self._waiter.done()
        if waiting and data and self._header_timer is None:
            # the first byte of a new request: its headers are now due
            self._header_timer = self._loop.call_later(self._limits.header_timeout_s, self._headers_late)
        super().data_received(data)
        if self._header_timer is not None and self._messages:
            self._stop_header_timer()  # parsed (or refused by the parser): no longer late

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._waiter is None or self._waiter.done() or self._messages:
            return  # the headers made it after all
        log.warning(
            "connection_closed", remote=self._address, reason="header_timeout", limit_s=self._limits.header_timeout_s
        )
        self._refuse(
            _raw_error(
                408,
                "Request Timeout",
                f"The request headers did not arrive within {self._limits.header_timeout_s:g} s",
                "invalid_request_error",
                "header_timeout",
            )
        )

    def _refuse(self, raw: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(raw)
        self.force_close()

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """Errors of aiohttp's own (parser, escaped exceptions) in the OpenAI shape."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already under way; the connection is closed instead")
        if status >= 500:
            log.error("request_crashed", path=getattr(request, "path", None), error=repr(exc))
            body = error_body("Internal error in quorum-node (see its log)", "server_error", None, "internal_error")
        else:
            text = (message or (str(exc) if exc else "") or "Bad request").replace("\n", " ").strip()
            body = error_body(f"Malformed HTTP request: {text[:300]}", "invalid_request_error", None, "bad_http")
        resp = web.Response(status=status, body=body, content_type="application/json")
        resp.force_close()
        return resp


class _GuardedServer(web.Server):
    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(self, limits=self.limits, loop=self._loop, **self._kwargs)


class NodeRunner(web.AppRunner):
    """``AppRunner`` whose connections are ``_GuardedHandler`` s."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        # What AppRunner._make_server and Application._make_handler do, with our Server class.
        app = self._app
        loop = asyncio.get_running_loop()
        app._set_loop(loop)
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        kwargs = dict(self._kwargs)
        kwargs["debug"] = app._debug
        return _GuardedServer(app._handle, request_factory=app._make_request, loop=loop, limits=self.limits, **kwargs)

    @property
    def connections(self) -> list[RequestHandler]:
        return self.server.connections if self.server is not None else []


#: Loop turns an accept under way takes to become a connection the server knows of.
_ACCEPT_TURNS = 3


async def stop_accepting(runner: web.BaseRunner) -> None:
    """Stop every site of ``runner`` accepting connections, keeping those already accepted.

    Python 3.11's asyncio loses a connection whose accept is under way when its
    server closes (setting it up fails an assertion, and nothing closes it): its
    client would wait on it forever. So the listening sockets stop being watched
    first, the accepts under way finish, and only then do the servers close; the
    connections they made are the runner's, and close with the rest.
    """
    loop = asyncio.get_running_loop()
    if isinstance(loop, asyncio.SelectorEventLoop):  # uvloop accepts (and closes) its own way
        for site in runner.sites:
            server = getattr(site, "_server", None)  # aiohttp keeps a site's asyncio server private
            for sock in getattr(server, "sockets", None) or ():
                loop.remove_reader(sock.fileno())
        for _ in range(_ACCEPT_TURNS):
            await asyncio.sleep(0)
    for site in list(runner.sites):
        await site.stop()


async def close_runner(runner: web.BaseRunner) -> None:
    """``runner.cleanup()``, losing no connection accepted as it began (``stop_accepting``)."""
    await stop_accepting(runner)
    await runner.cleanup()


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (as servers do); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


class InFlight:
    """The requests being answered, so that a stopping node can drain them in order.

    ``drain(deadline_s)`` waits for them to finish; those still running at the
    deadline are cancelled with ``cutting`` set, which the API handlers read as
    "end this answer with an error now" (an SSE error event for a stream, a 503
    otherwise) instead of as a client that went away.
    """

    __slots__ = ("_tasks", "_empty", "cutting")

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._empty = asyncio.Event()
        self._empty.set()
        self.cutting = False

    def __len__(self) -> int:
        return len(self._tasks)

    def enter(self) -> asyncio.Task[Any] | None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            self._empty.clear()
        return task

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks.discard(task)
            if not self._tasks:
                self._empty.set()

    def is_cut(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether this task's cancellation is the drain's (then it is un-cancelled, to answer)."""
        if not self.cutting or task is None or task not in self._tasks:
            return False
        task.uncancel()
        return True

    async def drain(self, deadline_s: float, *, margin_s: float = 1.0) -> int:
        """Wait up to ``deadline_s`` for in-flight requests; cut the rest. Returns how many were cut."""
        try:
            async with asyncio.timeout(deadline_s):
                await self._empty.wait()
            return 0
        except TimeoutError:
            pass
        remaining = list(self._tasks)
        self.cutting = True
        for task in remaining:
            task.cancel()
        try:
            async with asyncio.timeout(margin_s):
                await self._empty.wait()
        except TimeoutError:
            log.warning("drain_incomplete", left=len(self._tasks))
        return len(remaining)
