"""The link seam's answer (``backends/answer.py``): the aiohttp side produces it, the stream reader reads any.

``upstream.HttpAnswer`` over real sockets: a body cut mid-read raises
``LinkBroken`` (no aiohttp exception passes above the link), a watchdog's
``interrupt`` fails the pending read. ``stream.stream_events`` over a
``Body`` that is no HTTP at all (an in-memory one, as a relay stream is):
the same events, the same failures, the body released or aborted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from quorum_node.backends.answer import LinkBroken, RequestHead
from quorum_node.backends.base import StreamStats, Timeouts
from quorum_node.backends.sse import StreamNormalizer
from quorum_node.backends.stream import stream_events
from quorum_node.backends.upstream import read_whole, send
from quorum_node.errors import EngineUnavailable, StreamBroken

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _read_head(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def test_a_body_cut_mid_read_is_link_broken_and_no_aiohttp_error_passes() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.close()

    server, url = await _serve(cut)
    async with server, aiohttp.ClientSession() as session:
        answer = await send(session, url, RequestHead(method="GET", path="/"), Timeouts(), stream=False, who="t")
        assert answer.status == 200 and answer.body.content_length == 1000
        got = b""
        with pytest.raises(LinkBroken) as info:
            while chunk := await answer.body.readany():
                got += chunk
        assert got == b"x" * 10 and answer.body.total_bytes == 10
        assert type(info.value) is LinkBroken and isinstance(info.value.__cause__, aiohttp.ClientError)
        answer.body.abort()

        whole = await send(session, url, RequestHead(method="GET", path="/"), Timeouts(), stream=False, who="t")
        with pytest.raises(EngineUnavailable) as failed:
            await read_whole(whole, Timeouts(), "engine t")
        assert "broke off its answer" in failed.value.message


async def test_interrupt_fails_the_pending_read() -> None:
    gone = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client cuts the connection
        gone.set()
        writer.close()

    class Silence(Exception):
        pass

    server, url = await _serve(silent)
    async with server, aiohttp.ClientSession() as session:
        answer = await send(
            session,
            url,
            RequestHead(method="POST", path="/v1/chat/completions", body=b"{}"),
            Timeouts(),
            stream=True,
            who="t",
        )
        pending = asyncio.ensure_future(answer.body.readany())
        await asyncio.sleep(0)
        assert not pending.done()
        answer.body.interrupt(Silence())
        with pytest.raises(Silence):
            await pending
        answer.body.abort()
        async with asyncio.timeout(5):
            await gone.wait()  # the server saw the cut: an engine would stop generating


# -- the stream reader over a Body that is no HTTP ------------------------------------------------------------


class MemoryBody:
    """A ``Body`` fed from a script: bytes, or an exception to raise at that point; then the end."""

    def __init__(self, script: list[bytes | BaseException], *, then_wait: bool = False) -> None:
        self._script: deque[bytes | BaseException] = deque(script)
        self._then_wait = then_wait  # after the script: silence (until interrupted), not the end
        self._interrupt: BaseException | None = None
        self._wake = asyncio.Event()
        self.total_bytes = 0
        self.content_length: int | None = None
        self.released = self.aborted = False

    async def readany(self) -> bytes:
        if self._interrupt is None and not self._script and self._then_wait:
            await self._wake.wait()
        if self._interrupt is not None:
            raise self._interrupt
        if not self._script:
            return b""
        item = self._script.popleft()
        if isinstance(item, BaseException):
            raise item
        self.total_bytes += len(item)
        return item

    def at_eof(self) -> bool:
        return not self._script and not self._then_wait

    def interrupt(self, exc: BaseException) -> None:
        self._interrupt = exc
        self._wake.set()

    def release(self) -> None:
        self.released = True

    def abort(self) -> None:
        self.aborted = True


def _event(text: str, finish: str | None = None) -> bytes:
    fr = f'"{finish}"' if finish else "null"
    return (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
        b'"delta":{"content":"' + text.encode() + b'"},"finish_reason":' + fr.encode() + b"}]}\n\n"
    )


def _events(body: MemoryBody, t: Timeouts | None = None) -> AsyncIterator[list[bytes]]:
    norm = StreamNormalizer(clean=True, want_usage=False, op="chat", stats=StreamStats())
    return stream_events(body, norm, t or Timeouts(), "e")


async def _drain(events: AsyncIterator[list[bytes]]) -> list[bytes]:
    out: list[bytes] = []
    async for batch in events:
        out.extend(batch)
    return out


async def test_a_stream_from_any_body_is_read_and_released_at_its_end() -> None:
    body = MemoryBody([_event("Hel"), _event("lo"), _event("", "stop") + b"data: [DONE]\n\n"])
    out = await _drain(_events(body))
    assert [b'"Hel"' in out[0], b'"lo"' in out[1]] == [True, True]
    assert body.released and not body.aborted


async def test_a_body_that_breaks_mid_stream_is_a_broken_stream_and_is_cut() -> None:
    body = MemoryBody([_event("Hi"), LinkBroken("connection reset")])
    events = _events(body)
    assert b'"Hi"' in (await anext(events))[0]
    with pytest.raises(StreamBroken) as info:
        await anext(events)
    assert info.value.code == "engine_disconnected" and "connection reset" in info.value.message
    assert body.aborted and not body.released


async def test_a_body_that_breaks_before_its_first_event_leaves_the_request_to_another_holder() -> None:
    body = MemoryBody([LinkBroken("connection reset")])
    with pytest.raises(EngineUnavailable):
        await _drain(_events(body))
    assert body.aborted


async def test_a_silent_body_is_interrupted_at_the_first_token_deadline() -> None:
    body = MemoryBody([b": keep-alive\n\n"], then_wait=True)
    with pytest.raises(EngineUnavailable) as info:
        async with asyncio.timeout(5):
            await _drain(_events(body, Timeouts(first_token_s=0.2)))
    assert info.value.status == 504 and body.aborted
