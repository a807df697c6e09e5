"""Sending one request upstream (to an engine or a peer) and reading what comes back.

``send`` puts a ``RequestHead`` on aiohttp and hands back its answer as an
``Answer`` (``answer.py``): ``HttpAnswer``, whose body raises ``LinkBroken``
for whatever aiohttp or the OS raise mid-read. The readers here
(``read_capped``, ``read_error_body``, ``read_whole``) and the stream reader
(``stream.py``) read any ``Answer``: a relay stream's as well.

The foreign exceptions of the HTTP client are mapped here, once: before the
answer's head into ``EngineUnavailable`` (nothing has reached the client yet,
so the router may try the next holder), after it into ``LinkBroken``. What
comes back is bounded: an answer larger than ``MAX_ANSWER_BYTES`` is a
malformed answer, not unbounded memory.

One deadline per attempt: ``deadline`` (event-loop time) covers the response
head *and* the answer (for a stream, its first event), so a slow head cannot
double the time a client waits.

Whole answers together are bounded too: ``read_whole`` counts what it reads
against the request's share of the node's budget (``budget.ANSWER_HOLD``) and
raises ``NodeBusy`` when there is no room; a read that fails gives back what it took.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import aiohttp
from multidict import CIMultiDictProxy

from ..errors import EngineUnavailable, NodeBusy
from .answer import Answer, LinkBroken, RequestHead
from .base import Timeouts
from .budget import ANSWER_HOLD, Hold

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_ERROR_BYTES",
    "HttpAnswer",
    "HttpBody",
    "deadline_for",
    "read_capped",
    "read_error_body",
    "read_whole",
    "send",
]

#: A whole (non-streamed) answer larger than this is malformed.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: Of an error answer, only this much is read (more is not a well-formed error body).
MAX_ERROR_BYTES = 1024 * 1024
#: An error body not read by the attempt's deadline (or this long, without one) is no error body.
ERROR_BODY_TIMEOUT_S = 10.0


class HttpBody:
    """An aiohttp response's body as a ``Body``: aiohttp's and the OS's errors come out as ``LinkBroken``.

    A timeout is no broken link: aiohttp's own (a ``TimeoutError``) passes as it is.
    """

    __slots__ = ("_content", "_resp")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._content = resp.content

    @property
    def content_length(self) -> int | None:
        return self._resp.content_length

    @property
    def total_bytes(self) -> int:
        return self._content.total_bytes

    async def readany(self) -> bytes:
        try:
            return await self._content.readany()
        except TimeoutError:
            raise
        except (aiohttp.ClientError, OSError) as e:
            raise LinkBroken(str(e)) from e

    def at_eof(self) -> bool:
        return self._content.at_eof()

    def interrupt(self, exc: BaseException) -> None:
        self._content.set_exception(exc)

    def release(self) -> None:
        self._resp.release()

    def abort(self) -> None:
        self._resp.close()


class HttpAnswer:
    """An aiohttp response as an ``Answer`` (``answer.py``): what the readers above see of HTTP."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.status: int = resp.status
        self.headers: CIMultiDictProxy[str] = resp.headers
        self.body = HttpBody(resp)


def deadline_for(t: Timeouts, *, stream: bool) -> float:
    """When an attempt started now must have its answer (a stream: its first event), in loop time."""
    return asyncio.get_running_loop().time() + (t.first_token_s if stream else t.request_s)


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    head: RequestHead,
    t: Timeouts,
    *,
    stream: bool,
    who: str,
    on_refused: Callable[[], None] | None = None,
    deadline: float | None = None,
    ssl_context: ssl.SSLContext | bool = True,
) -> HttpAnswer:
    """Send ``head`` to ``base_url``; its answer's head, by ``deadline`` (the status is the caller's to judge).

    A connection closed without a byte of answer is most often a kept-alive one the engine had just closed
    (llama-server ends one after a number of requests) as the request went out on it: the request is sent
    once more, on another connection. A second close is the engine's answer.
    """
    if deadline is None:
        deadline = deadline_for(t, stream=stream)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=None)
    url = base_url + head.path
    try:
        async with asyncio.timeout_at(deadline):

            def request() -> Awaitable[aiohttp.ClientResponse]:
                return session.request(
                    head.method,
                    url,
                    data=head.body or None,
                    headers=head.headers,
                    timeout=timeout,
                    allow_redirects=False,
                    ssl=ssl_context,
                )

            try:
                return HttpAnswer(await request())
            except aiohttp.ServerDisconnectedError:
                return HttpAnswer(await request())
    except TimeoutError:
        limit = t.first_token_s if stream else t.request_s
        raise EngineUnavailable(f"{who} gave no answer in {limit:g} s", status=504, engine=who) from None
    except aiohttp.ClientConnectorError as e:
        if on_refused is not None:
            on_refused()
        raise EngineUnavailable(f"{who} unreachable: {e}", engine=who) from None
    except (aiohttp.ClientError, OSError) as e:
        raise EngineUnavailable(f"{who} unreachable: {e}", engine=who) from None


async def read_capped(answer: Answer, limit: int, *, hold: Hold | None = None, who: str = "") -> bytes | None:
    """The body, or None if it is larger than ``limit`` (then nothing more is read).

    With ``hold``, its bytes are taken from the hold's budget (a declared length at once, before a
    byte is read; else as they come), and ``NodeBusy`` is raised where the budget has no room; what
    this read took stays in the hold (the caller gives it back if the read failed).
    """
    body = answer.body
    length = body.content_length
    if length is not None and length > limit:
        return None
    counted = 0
    if hold is not None and length is not None:
        if not hold.grow(length):
            raise _busy(who)
        counted = length
    buf = bytearray()
    while chunk := await body.readany():
        buf += chunk
        if len(buf) > limit:
            return None
        if hold is not None and len(buf) > counted:
            if not hold.grow(len(buf) - counted):
                raise _busy(who)
            counted = len(buf)
    return bytes(buf)


def _busy(who: str) -> NodeBusy:
    return NodeBusy(
        "This node is holding as many whole answers as it may (max_buffered_answers_bytes); "
        "try again shortly, or stream the answer",
        engine=who or None,
    )


async def read_error_body(answer: Answer, *, deadline: float | None = None) -> bytes:
    """The body of an error answer, or b"" if even that fails, is too large to be one, or comes too late."""
    now = asyncio.get_running_loop().time()
    # a head that came just before the deadline still gets a moment for its body
    deadline = now + ERROR_BODY_TIMEOUT_S if deadline is None else max(deadline, now + 0.5)
    raw: bytes | None = None
    try:
        async with asyncio.timeout_at(deadline):
            raw = await read_capped(answer, MAX_ERROR_BYTES)
    except OSError:  # LinkBroken, TimeoutError
        raw = None
    finally:
        if raw is None:
            answer.body.abort()  # an unread rest must not go back to the pool
        else:
            answer.body.release()
    return raw or b""


async def read_whole(
    answer: Answer,
    t: Timeouts,
    who: str,
    *,
    deadline: float | None = None,
    limit: int = MAX_ANSWER_BYTES,
) -> bytes:
    """The body of a whole (non-streamed) answer, by ``deadline`` and at most ``limit`` bytes."""
    if deadline is None:
        deadline = deadline_for(t, stream=False)
    ok = False
    hold = ANSWER_HOLD.get()
    held = hold.size if hold is not None else 0
    try:
        async with asyncio.timeout_at(deadline):
            raw = await read_capped(answer, limit, hold=hold, who=who)
        if raw is None:
            raise EngineUnavailable(f"{who} sent an answer larger than {limit} bytes", status=502, engine=who)
        ok = True
        return raw
    except TimeoutError:
        raise EngineUnavailable(f"{who} did not finish its answer in time", status=504, engine=who) from None
    except OSError as e:  # LinkBroken
        raise EngineUnavailable(f"{who} broke off its answer: {e}", engine=who) from None
    finally:
        if ok:
            answer.body.release()
        else:
            answer.body.abort()
            if hold is not None:
                hold.shrink_to(held)  # what this read took: nothing of it is kept
