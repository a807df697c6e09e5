"""Sending one request upstream (to an engine or a peer) and reading what comes back.

The foreign exceptions of the HTTP client are mapped here, once, into
``EngineUnavailable``: nothing has reached the client yet, so the router may
try the next holder.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from ..errors import EngineUnavailable
from .base import Timeouts

__all__ = ["post", "read_error_body", "read_whole"]


async def post(
    session: aiohttp.ClientSession,
    url: str,
    data: bytes,
    headers: dict[str, str],
    t: Timeouts,
    *,
    stream: bool,
    who: str,
    on_refused: Callable[[], None] | None = None,
) -> aiohttp.ClientResponse:
    """POST and wait for the response head; the status is the caller's to judge."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=None)
    try:
        async with asyncio.timeout(t.first_token_s if stream else t.request_s):
            return await session.post(url, data=data, headers=headers, timeout=timeout, allow_redirects=False)
    except TimeoutError:
        raise EngineUnavailable(f"{who} gave no answer in time", status=504, engine=who) from None
    except aiohttp.ClientConnectorError as e:
        if on_refused is not None:
            on_refused()
        raise EngineUnavailable(f"{who} unreachable: {e}", engine=who) from None
    except (aiohttp.ClientError, OSError) as e:
        raise EngineUnavailable(f"{who} unreachable: {e}", engine=who) from None


async def read_error_body(resp: aiohttp.ClientResponse) -> bytes:
    """The body of an error answer, or b"" if even that fails."""
    try:
        return await resp.read()
    except (aiohttp.ClientError, OSError):
        return b""
    finally:
        resp.release()


async def read_whole(resp: aiohttp.ClientResponse, t: Timeouts, who: str) -> bytes:
    """The body of a whole (non-streamed) answer."""
    try:
        async with asyncio.timeout(t.request_s):
            return await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        resp.close()
        raise EngineUnavailable(f"{who} broke off its answer: {e}", engine=who) from None
    finally:
        resp.release()
