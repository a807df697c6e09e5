"""The fault tools themselves: `tests.faults.FaultProxy` and the fake engines' fault modes.

Everything here is seen from a client: real sockets on 127.0.0.1, raw asyncio
streams where the exact TCP ending matters (FIN or RST, chunked terminator or
not), aiohttp where HTTP is enough.  Where a test proves that nothing arrives,
it waits a short bounded time (`QUIET_S`): absence has no event to await.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from tests.fakes.engines import KINDS, FakeEngine
from tests.faults import FaultProxy

StartFake = Callable[..., Awaitable[FakeEngine]]  # the `fake` fixture (tests/conftest.py)
QUIET_S = 0.15  # how long "nothing arrives" is watched for
MSGS = [{"role": "user", "content": "hi there"}]


# ------------------------------------------------------------------ helpers


class Target:
    """A TCP server behind the proxy: echoes what it gets, or sends `payload` and waits.

    Closes its side when the client's EOF arrives (stamping `closed_at`), and records
    the size of every read so that slicing can be seen.
    """

    def __init__(self, *, payload: bytes | None = None) -> None:
        self.payload = payload
        self.reads: list[int] = []
        self.closed_at: float | None = None
        self.errors: list[BaseException] = []
        self.sent_all = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._changed = asyncio.Event()

    async def start(self) -> Target:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.payload is not None:
                for i in range(0, len(self.payload), 65536):
                    writer.write(self.payload[i : i + 65536])
                    await writer.drain()
                self.sent_all.set()
            while data := await reader.read(65536):
                self.reads.append(len(data))
                if self.payload is None:
                    writer.write(data)
                    await writer.drain()
        except OSError as exc:
            self.errors.append(exc)
        finally:
            self.closed_at = asyncio.get_running_loop().time()
            writer.close()
            self._writers.discard(writer)
            self._changed.set()

    async def wait_closed_once(self) -> None:
        while self.closed_at is None:
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[Target]:
    target = await Target().start()
    yield target
    await target.close()


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_to_end(reader: asyncio.StreamReader) -> tuple[bytes, BaseException | None]:
    """Everything until EOF, and the error that ended it instead (an RST), if any."""
    out = b""
    try:
        while data := await reader.read(65536):
            out += data
    except ConnectionResetError as exc:
        return out, exc
    return out, None


async def raw_post(port: int, path: str, body: dict) -> tuple[bytes, BaseException | None]:
    """One HTTP/1.1 request over a bare socket; the raw answer and how the TCP stream ended."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    async with connect(port) as (reader, writer):
        writer.write(head + data)
        return await read_to_end(reader)


def chat_body(eng: FakeEngine, **extra: object) -> dict:
    return {"model": eng.models[0], "messages": MSGS, **extra}


def events_of(raw: bytes) -> list[str]:
    """SSE data payloads in a raw (possibly chunked, possibly cut) HTTP answer."""
    out = []
    for line in raw.decode(errors="replace").split("\n"):
        if line.startswith("data:"):
            out.append(line[5:].removeprefix(" ").rstrip("\r"))
    return out


def contents(events: list[str]) -> list[str]:
    """The content pieces of the chat chunks among `events` (bad ones skipped)."""
    out = []
    for e in events:
        try:
            obj = json.loads(e)
            out.append(obj["choices"][0]["delta"]["content"])
        except (ValueError, KeyError, IndexError, TypeError):
            continue
    return [c for c in out if c]


async def stream_lines(resp: aiohttp.ClientResponse, n: int) -> list[bytes]:
    """The first `n` non-empty lines of a streamed body (SSE `data:` lines or NDJSON)."""
    lines: list[bytes] = []
    while len(lines) < n:
        line = await resp.content.readline()
        assert line, f"stream ended after {lines}"
        if line.strip() and not line.startswith(b":"):
            lines.append(line.strip())
    return lines


async def assert_quiet(resp: aiohttp.ClientResponse) -> None:
    """Nothing more (but the blank end of an event already sent) arrives on `resp` while
    it is watched for QUIET_S, and the body does not end either."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + QUIET_S
    while (left := deadline - loop.time()) > 0:
        try:
            line = await asyncio.wait_for(resp.content.readline(), left)
        except TimeoutError:
            return
        assert line and not line.strip(), f"expected silence, got {line!r}"


# ---------------------------------------------------------------- the proxy


async def test_proxy_forwards_and_counts(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        assert proxy.port > 0 and proxy.url == f"http://127.0.0.1:{proxy.port}"
        payload = bytes(range(256)) * 40
        async with connect(proxy.port) as (reader, writer):
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload
            assert (proxy.accepted, proxy.connections) == (1, 1)
            writer.write_eof()
            assert await reader.read() == b""  # the target's FIN comes through
        await proxy.wait_until(lambda p: p.connections == 0)
        assert (proxy.bytes_up, proxy.bytes_down) == (len(payload), len(payload))
        await proxy.close()
        await proxy.close()  # idempotent
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", proxy.port)


async def test_latency_and_jitter_delay_every_chunk_in_order(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        loop = asyncio.get_running_loop()
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"warm")
            t0 = loop.time()
            assert await reader.readexactly(4) == b"warm"
            fast = loop.time() - t0
            proxy.latency_s, proxy.jitter_s = 0.1, 0.05  # changed on an open connection
            t0 = loop.time()
            for i in range(30):
                writer.write(b"%03d" % i)
                await asyncio.sleep(0)  # separate chunks, each with its own jitter
            got = await reader.readexactly(90)
            elapsed = loop.time() - t0
        assert got == b"".join(b"%03d" % i for i in range(30))  # order kept
        assert fast < 0.1 and 0.2 <= elapsed < 1.0  # both directions: 2 x latency at least


async def test_bandwidth_caps_each_direction(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.bandwidth_bps = 40_000
        loop = asyncio.get_running_loop()
        async with connect(proxy.port) as (reader, writer):
            t0 = loop.time()
            writer.write(b"x" * 20_000)
            assert await reader.readexactly(20_000) == b"x" * 20_000
            elapsed = loop.time() - t0
            proxy.bandwidth_bps = None  # lifted, on the same connection
            t0 = loop.time()
            writer.write(b"y" * 20_000)
            await reader.readexactly(20_000)
            lifted = loop.time() - t0
        # 20 kB at 40 kB/s is 0.5 s (less the last pacing quantum, 800 B)
        assert 0.45 <= elapsed < 2.0 and lifted < 0.2


async def test_stall_holds_bytes_and_resumes(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy, connect(proxy.port) as (reader, writer):
        await proxy.wait_until(lambda p: p.connections == 1)
        proxy.stall = True
        writer.write(b"ping")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(4), QUIET_S)
        assert proxy.bytes_up == 0 and proxy.connections == 1 and echo.reads == []
        proxy.stall = False
        assert await reader.readexactly(4) == b"ping"


async def test_reset_after_bytes_sends_exactly_then_rst(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.reset_after_bytes = 100
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"z" * 1000)
            got, err = await read_to_end(reader)
        assert got == b"z" * 100 and isinstance(err, ConnectionResetError)
        await proxy.wait_until(lambda p: p.connections == 0)
        assert proxy.bytes_down == 100


async def test_close_after_bytes_sends_exactly_then_fin(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.close_after_bytes = 100
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"z" * 1000)
            got, err = await read_to_end(reader)
        assert got == b"z" * 100 and err is None  # a clean EOF, not a reset
        await echo.wait_closed_once()  # the target was let go too


async def test_reset_all_resets_open_connections(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        async with connect(proxy.port) as (r1, w1), connect(proxy.port) as (r2, w2):
            for r, w in ((r1, w1), (r2, w2)):
                w.write(b"a")
                assert await r.readexactly(1) == b"a"
            proxy.stall = True  # even stalled connections go
            proxy.reset_all()
            for r in (r1, r2):
                assert isinstance((await read_to_end(r))[1], ConnectionResetError)
            await proxy.wait_until(lambda p: p.connections == 0)
        assert proxy.accepted == 2


async def test_slow_close_delays_the_fin(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.slow_close_s = 0.3
        loop = asyncio.get_running_loop()
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"bye")
            writer.write_eof()  # the target answers and closes its side
            assert await reader.readexactly(3) == b"bye"
            assert await reader.read() == b""
            eof_at = loop.time()
        assert echo.closed_at is not None and 0.3 <= eof_at - echo.closed_at < 1.0


async def test_slice_bytes_forwards_in_tiny_writes(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.slice_bytes = 1
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"0123456789" * 5)
            assert await reader.readexactly(50) == b"0123456789" * 5
        # the target saw many small reads instead of one 50-byte one
        assert len(echo.reads) >= 5 and max(echo.reads) < 50


async def test_refuse_and_stop_listening(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.refuse = True  # accept, then RST at once
        async with connect(proxy.port) as (reader, _):
            assert isinstance((await read_to_end(reader))[1], ConnectionResetError)
        assert (proxy.accepted, proxy.connections) == (1, 0) and echo.reads == []
        proxy.refuse = False
        port = proxy.port
        await proxy.stop_listening()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        await proxy.resume_listening()
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"back")
            assert proxy.port == port and await reader.readexactly(4) == b"back"


async def test_target_down_shows_as_rst(fake: StartFake) -> None:
    eng = await fake("vllm", refuse=True)  # a bound port that refuses
    async with FaultProxy("127.0.0.1", eng.port) as proxy:
        async with connect(proxy.port) as (reader, _):
            assert isinstance((await read_to_end(reader))[1], ConnectionResetError)
        await proxy.wait_until(lambda p: p.connections == 0)


async def test_backpressure_reaches_the_target() -> None:
    """A client that does not read stops the target's writes: the proxy buffers boundedly."""
    size = 64 * 1024 * 1024
    target = await Target(payload=b"p" * size).start()
    try:
        async with FaultProxy("127.0.0.1", target.port) as proxy:
            async with connect(proxy.port) as (reader, _):
                await proxy.wait_until(lambda p: p.bytes_down > 0)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(target.sent_all.wait(), QUIET_S)
                assert proxy.bytes_down < size // 2
                got = 0
                while got < size:
                    got += len(await reader.read(1 << 20))
                await target.sent_all.wait()
            assert proxy.bytes_down == size
    finally:
        await target.close()


async def test_close_cuts_open_connections_and_cleans_up(echo: Target) -> None:
    proxy = await FaultProxy("127.0.0.1", echo.port).start()
    async with connect(proxy.port) as (reader, writer):
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        proxy.stall = True
        writer.write(b"b")
        await proxy.close()
        got, _ = await read_to_end(reader)  # EOF or RST, but it ends
        assert got == b""
    assert proxy.connections == 0
    await proxy.close()


async def test_http_stream_survives_latency_jitter_and_slicing(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("vllm")
    async with FaultProxy("127.0.0.1", eng.port) as proxy:
        proxy.latency_s, proxy.jitter_s, proxy.slice_bytes = 0.01, 0.02, 3
        async with http.post(proxy.url + "/v1/chat/completions", json=chat_body(eng, stream=True)) as resp:
            raw = await resp.read()
        assert contents(events_of(raw)) == eng.tokens and events_of(raw)[-1] == "[DONE]"
        assert proxy.bytes_down > len(raw)  # headers too


# ------------------------------------------------------- engine: whole-request


async def test_refuse_means_connection_refused(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("openai", refuse=True)
    with pytest.raises(aiohttp.ClientConnectorError):
        await http.get(eng.url + "/v1/models")
    await eng.set_refuse(False)
    async with http.get(eng.url + "/v1/models") as resp:
        assert resp.status == 200
    await eng.set_refuse(True)
    with pytest.raises(aiohttp.ClientConnectorError):
        await http.get(eng.url + "/v1/models")
    await eng.set_refuse(False)
    eng.refuse = True  # the plain attribute, while listening: each request is reset
    with pytest.raises(aiohttp.ClientOSError):
        await http.post(eng.url + "/v1/chat/completions", json=chat_body(eng))
    assert eng.requests == []


@pytest.mark.parametrize("kind", KINDS)
async def test_status_always_persists_in_the_engines_envelope(
    fake: StartFake, http: aiohttp.ClientSession, kind: str
) -> None:
    eng = await fake(kind, next_status=502)
    url = eng.url + "/v1/chat/completions"
    async with http.post(url, json=chat_body(eng)) as resp:
        once = (resp.status, await resp.read())
    eng.status_always = 502
    for _ in range(3):
        async with http.post(url, json=chat_body(eng, stream=True)) as resp:
            assert (resp.status, await resp.read()) == once
    eng.status_always = None
    async with http.post(url, json=chat_body(eng)) as resp:
        assert resp.status == 200 and "choices" in await resp.json()
    assert len(eng.requests) == 5 and eng.active_streams == 0


@pytest.mark.parametrize("status", [307, 302])
async def test_redirect(fake: StartFake, http: aiohttp.ClientSession, status: int) -> None:
    eng = await fake("llamacpp", redirect_status=status)
    async with http.post(eng.url + "/v1/chat/completions?x=1", json=chat_body(eng), allow_redirects=False) as resp:
        assert resp.status == status and await resp.json() == {"moved": True}
        assert resp.headers["Location"] == "http://127.0.0.1:9/v1/chat/completions?x=1"
    eng.redirect_location = "http://elsewhere.invalid/v1/completions"
    async with http.post(eng.url + "/v1/completions", json={"prompt": "x"}, allow_redirects=False) as resp:
        assert resp.headers["Location"] == "http://elsewhere.invalid/v1/completions"


# ------------------------------------------------------------ engine: streams


@pytest.mark.parametrize("kind", KINDS)
async def test_200_then_stall(fake: StartFake, http: aiohttp.ClientSession, kind: str) -> None:
    eng = await fake(kind, fail_after_tokens=0, fail_mode="stall")
    async with http.post(eng.url + "/v1/chat/completions", json=chat_body(eng, stream=True)) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        await assert_quiet(resp)  # not even an SSE comment or the role chunk
        assert eng.active_streams == 1
    await asyncio.wait_for(eng.cancelled_event().wait(), 2)
    await eng.wait_until(lambda e: e.active_streams == 0)
    assert eng.cancelled == 1


async def test_stall_mid_stream(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("openai", fail_after_tokens=2, fail_mode="stall")
    async with http.post(eng.url + "/v1/chat/completions", json=chat_body(eng, stream=True)) as resp:
        lines = await stream_lines(resp, 3)  # role chunk, "Hello", ","
        assert contents([ln.decode()[6:] for ln in lines]) == ["Hello", ","]
        await assert_quiet(resp)
    await asyncio.wait_for(eng.cancelled_event().wait(), 2)
    await eng.wait_until(lambda e: e.active_streams == 0)


@pytest.mark.parametrize("kind", ["openai", "tgi", "vllm"])
async def test_cut_with_fin(fake: StartFake, kind: str) -> None:
    eng = await fake(kind, fail_after_tokens=2, fail_mode="fin")
    raw, err = await raw_post(eng.port, "/v1/chat/completions", chat_body(eng, stream=True))
    assert err is None and raw.startswith(b"HTTP/1.1 200")
    assert contents(events_of(raw)) == ["Hello", ","] and "[DONE]" not in events_of(raw)
    assert not raw.endswith(b"0\r\n\r\n")  # the chunked body never ended: a bare FIN
    await eng.wait_until(lambda e: e.active_streams == 0)
    assert eng.cancelled == 0


@pytest.mark.parametrize("kind", ["openai", "tgi", "vllm"])
async def test_cut_with_rst(fake: StartFake, kind: str) -> None:
    eng = await fake(kind, fail_after_tokens=2, fail_mode="rst")
    raw, err = await raw_post(eng.port, "/v1/chat/completions", chat_body(eng, stream=True))
    assert isinstance(err, ConnectionResetError)
    assert contents(events_of(raw)) == ["Hello", ","] and "[DONE]" not in events_of(raw)
    await eng.wait_until(lambda e: e.active_streams == 0)
    assert eng.cancelled == 0


async def test_eof_ends_the_body_early(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("mlx", fail_after_tokens=3, fail_mode="eof")
    async with http.post(eng.url + "/v1/chat/completions", json=chat_body(eng, stream=True)) as resp:
        events = events_of(await resp.read())  # a complete HTTP body: no payload error
    assert contents(events) == ["Hello", ",", " world"] and "[DONE]" not in events
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events)
    await eng.wait_until(lambda e: e.active_streams == 0)
    assert eng.cancelled == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_malformed_json_as_the_first_event(fake: StartFake, http: aiohttp.ClientSession, kind: str) -> None:
    eng = await fake(kind, fail_after_tokens=0, fail_mode="malformed_json")
    async with http.post(eng.url + "/v1/chat/completions", json=chat_body(eng, stream=True)) as resp:
        events = events_of(await resp.read())
    assert events[0] == '{"choices": ['
    with pytest.raises(ValueError):
        json.loads(events[0])
    assert contents(events) == eng.tokens and events[-1] == "[DONE]"  # then the rest


async def test_malformed_json_after_n_chunks(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("sglang", fail_after_tokens=2, fail_mode="malformed_json")
    async with http.post(
        eng.url + "/v1/completions", json={"model": eng.models[0], "prompt": "x", "stream": True}
    ) as resp:
        events = events_of(await resp.read())
    texts = [json.loads(e)["choices"][0]["text"] if e.startswith('{"id"') else e for e in events]
    assert texts[:3] == ["Hello", ",", '{"choices": [']
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (None, {"choices": [1], "usage": {"prompt_tokens": 1}}),
        ('{"choices":"x"}', {"choices": "x"}),
    ],
)
async def test_malformed_shape(
    fake: StartFake, http: aiohttp.ClientSession, payload: str | None, expected: dict
) -> None:
    eng = await fake("localai", fail_after_tokens=1, fail_mode="malformed_shape", malformed_payload=payload)
    async with http.post(eng.url + "/v1/chat/completions", json=chat_body(eng, stream=True)) as resp:
        events = events_of(await resp.read())
    assert json.loads(events[2]) == expected  # after the role chunk and "Hello"
    assert contents(events) == eng.tokens and events[-1] == "[DONE]"


@pytest.mark.parametrize("kind", ["openai", "ollama", "tgi"])
async def test_endless_stream_stops_when_the_client_goes(
    fake: StartFake, http: aiohttp.ClientSession, kind: str
) -> None:
    eng = await fake(kind, endless=True, token_delay_s=0.001)
    async with http.post(eng.url + "/v1/chat/completions", json=chat_body(eng, stream=True, max_tokens=2)) as resp:
        lines = await stream_lines(resp, 40)
    pieces = contents([ln.decode()[5:].strip() for ln in lines])
    assert len(pieces) >= 30 and set(pieces) == {"Hello", ","}  # max_tokens=2, repeated
    assert all(b"[DONE]" not in ln and b'"finish_reason":"' not in ln for ln in lines)
    await asyncio.wait_for(eng.cancelled_event().wait(), 2)
    await eng.wait_until(lambda e: e.active_streams == 0)
    assert eng.cancelled == 1


async def test_endless_non_streamed_never_answers(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("vllm", endless=True)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(http.post(eng.url + "/v1/chat/completions", json=chat_body(eng)), QUIET_S)
    await eng.wait_until(lambda e: e.abandoned == 1)


# ----------------------------------------------------- engine: non-streamed


@pytest.mark.parametrize(
    ("mode", "status", "body"),
    [
        ("malformed_json", 200, b'{"choices": ['),
        ("malformed_shape", 200, b'{"choices": 5}'),
        ("eof", 200, b""),
        ("error", 500, None),
    ],
)
async def test_non_streamed_bad_answers(
    fake: StartFake, http: aiohttp.ClientSession, mode: str, status: int, body: bytes | None
) -> None:
    eng = await fake("openai", fail_after_tokens=0, fail_mode=mode)
    async with http.post(eng.url + "/v1/chat/completions", json=chat_body(eng)) as resp:
        assert resp.status == status and resp.content_type == "application/json"
        raw = await resp.read()
    assert raw == body if body is not None else "error" in json.loads(raw)


async def test_non_streamed_stall_fin_rst(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("llamacpp", fail_after_tokens=0, fail_mode="stall")
    async with http.post(eng.url + "/v1/chat/completions", json=chat_body(eng)) as resp:
        assert resp.status == 200
        await assert_quiet(resp)
    await eng.wait_until(lambda e: e.abandoned == 1)
    eng.fail_mode = "fin"
    raw, err = await raw_post(eng.port, "/v1/chat/completions", chat_body(eng))
    assert (raw, err) == (b"", None)
    eng.fail_mode = "rst"
    raw, err = await raw_post(eng.port, "/v1/chat/completions", chat_body(eng))
    assert raw == b"" and isinstance(err, ConnectionResetError)
    assert eng.abandoned == 1 and len(eng.requests) == 3


# ------------------------------------------------------ engine: Ollama native


async def test_ollama_native_faults(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("ollama", fail_after_tokens=1, fail_mode="malformed_json")
    body = {"model": "llama3.2", "messages": MSGS}
    async with http.post(eng.url + "/api/chat", json=body) as resp:
        lines = (await resp.read()).splitlines()
    assert lines[1] == b'{"message": {"content": ' and json.loads(lines[-1])["done"] is True
    eng.fail_mode = "malformed_shape"
    async with http.post(eng.url + "/api/chat", json={**body, "stream": False}) as resp:
        assert resp.status == 200 and await resp.read() == b'{"message": 5, "done": true}'
    eng.fail_mode, eng.fail_after_tokens = "stall", 0
    async with http.post(eng.url + "/api/generate", json={"model": "llama3.2", "prompt": "x"}) as resp:
        assert resp.status == 200 and resp.content_type == "application/x-ndjson"
        await assert_quiet(resp)
    await asyncio.wait_for(eng.cancelled_event().wait(), 2)
    eng.fail_mode, eng.fail_after_tokens = "rst", 2
    raw, err = await raw_post(eng.port, "/api/chat", body)
    assert isinstance(err, ConnectionResetError) and raw.count(b'"done":false') == 2
    eng.fail_after_tokens, eng.endless = None, True
    async with http.post(eng.url + "/api/chat", json=body) as resp:
        lines = await stream_lines(resp, 20)
    assert all(json.loads(ln)["done"] is False for ln in lines)
    await eng.wait_until(lambda e: e.active_streams == 0 and e.cancelled == 2)
