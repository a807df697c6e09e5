"""Reading a request body: bounded in size and time, inflated in small steps, checked.

The API accepts ``Content-Encoding`` ``identity``, ``gzip`` (``x-gzip``) and
``deflate`` (zlib-wrapped, or raw as some clients send it); anything else is a
415. A compressed body is inflated in steps of at most ``_STEP`` bytes of
output, yielding to the event loop every ``_YIELD_EVERY`` bytes, and refused
with a 413 the moment its inflated size passes ``max_body_bytes`` — so a small
"zip bomb" costs the node a few milliseconds, not its event loop. The whole
body (compressed bytes in, inflated bytes out) must arrive within
``body_timeout_s``, else 408 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ..errors import ApiError, BadRequest, PayloadTooLarge, UnsupportedMedia
from .state import SETTINGS

__all__ = ["read_body"]

_STEP = 64 * 1024
_YIELD_EVERY = 1024 * 1024
_ENCODINGS = {"identity": None, "gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _closing(e: ApiError) -> ApiError:
    """The rest of the body will not be read: the connection cannot be reused."""
    e.headers["Connection"] = "close"
    return e


def _too_large(limit: int) -> ApiError:
    return _closing(
        PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes", code="body_too_large")
    )


class _Inflater:
    """Streaming, bounded inflation of one body."""

    def __init__(self, wbits: int, limit: int, raw_fallback: bool) -> None:
        self._d = zlib.decompressobj(wbits)
        self._limit = limit
        self._raw_fallback = raw_fallback  # "deflate" without the zlib wrapper
        self._started = False
        self.out: list[bytes] = []
        self.size = 0
        self._since_yield = 0

    async def feed(self, data: bytes) -> None:
        while data:
            try:
                chunk = self._d.decompress(data, _STEP)
            except zlib.error:
                if self._raw_fallback and not self._started:
                    self._raw_fallback = False
                    self._d = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise BadRequest(
                    "The request body is not valid for its Content-Encoding", code="invalid_encoding"
                ) from None
            self._started = True
            if self._d.eof and self._d.unused_data:
                raise BadRequest("The request body has data after its compressed stream", code="invalid_encoding")
            data = self._d.unconsumed_tail
            self.size += len(chunk)
            if self.size > self._limit:
                raise _too_large(self._limit)
            self.out.append(chunk)
            self._since_yield += len(chunk)
            if self._since_yield >= _YIELD_EVERY:
                self._since_yield = 0
                await asyncio.sleep(0)  # let other requests run between steps

    def finish(self) -> bytes:
        if not self._d.eof:
            raise BadRequest("The request body ends in the middle of its compressed stream", code="invalid_encoding")
        return b"".join(self.out)


async def _read(request: web.Request, limit: int, wbits: int | None, raw_fallback: bool) -> bytes:
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    inflater = _Inflater(wbits, limit, raw_fallback) if wbits is not None else None
    parts: list[bytes] = []
    received = 0
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            break
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        if inflater is not None:
            await inflater.feed(chunk)
        else:
            parts.append(chunk)
    return inflater.finish() if inflater is not None else b"".join(parts)


async def read_body(request: web.Request) -> bytes:
    """The request's body, decoded; every way it can be wrong is an ``ApiError``."""
    settings = request.app[SETTINGS]
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    if encoding not in _ENCODINGS:
        raise _closing(
            UnsupportedMedia(
                f"Content-Encoding {encoding!r} is not supported; send the body as identity, gzip or deflate",
                param=None,
                code="unsupported_encoding",
            )
        )
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            body = await _read(request, settings.max_body_bytes, _ENCODINGS[encoding], encoding == "deflate")
    except TimeoutError:
        raise _closing(
            ApiError(
                f"The request body did not arrive within {settings.body_timeout_s:g} s",
                status=408,
                type_="invalid_request_error",
                code="body_timeout",
            )
        ) from None
    except (RequestPayloadError, HttpProcessingError) as e:
        raise _closing(BadRequest(f"The request body is malformed: {e}", code="bad_body")) from None
    return body
