"""Engines that misbehave: what a user of the node sees, and that the node stays well.

Each misbehaving engine here is a small real aiohttp server on 127.0.0.1
(port 0) that answers with exactly the bytes a test scripts: malformed chunks,
redirects, slow heads, error answers, endless events. Healthy holders are the
shared fakes. The client is the real openai SDK; raw bytes are read with
aiohttp where the SDK would hide what matters.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from quorum_node.api.server import close_runner
from quorum_node.backends.base import BackendState, JsonReply, Op, Reply
from quorum_node.backends.detect import identify
from quorum_node.backends.errors import engine_failed
from quorum_node.backends.ollama import OllamaBackend
from quorum_node.backends.openai_compat import OpenAICompatBackend
from quorum_node.backends.registry import Registry
from quorum_node.breaker import BreakerState
from quorum_node.errors import ApiError, EngineUnavailable
from quorum_node.node import Node
from quorum_node.router import Router
from tests.conftest import StartFake, StartNode, node_settings
from tests.support import eventually

ClientFor = Callable[..., openai.AsyncOpenAI]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MODEL = "m"
MSGS = [{"role": "user", "content": "hi"}]
HELLO = "Hello, world!"  # the shared fakes' answer
CLUSTER = {"cluster": "t", "cluster_secret": "s3cret"}
USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
# llama.cpp's answer to an image part sent to a text-only model: deterministic, the request's fault
IMAGE_ERROR = {"error": {"code": 500, "message": "image input is not supported by this model", "type": "server_error"}}


# -- a scriptable engine ----------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    obj = {
        "id": "chatcmpl-raw",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


ROLE = chunk({"role": "assistant", "content": ""})
DONE = b"data: [DONE]\n\n"


def answer(text: str = "raw") -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-raw",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": USAGE,
        }
    ).encode()


def healthy_stream(text: str = "raw") -> list[bytes]:
    return [ROLE, chunk({"content": text}), chunk({}, "stop"), DONE]


def reply(status: int, body: bytes, headers: dict[str, str] | None = None) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=status, body=body, headers={"Content-Type": "application/json", **(headers or {})})

    return handle


def sse(
    *events: bytes, head_delay_s: float = 0.0, first_delay_s: float = 0.0, gap_s: float = 0.0, hold_s: float = 0.0
) -> Handler:
    """Answer a stream: the head after ``head_delay_s``, the first event ``first_delay_s`` later,
    the others ``gap_s`` apart, each exactly as given; then hold the connection ``hold_s``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(head_delay_s)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await resp.prepare(request)
            for i, ev in enumerate(events):
                await asyncio.sleep(gap_s if i else first_delay_s)
                await resp.write(ev)
            await asyncio.sleep(hold_s)
        except ConnectionError:  # the node hung up, as it should
            pass
        return resp

    return handle


def slow_json(body: bytes, *, head_delay_s: float, body_delay_s: float) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(head_delay_s)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        try:
            await resp.prepare(request)
            await asyncio.sleep(body_delay_s)
            await resp.write(body)
        except ConnectionError:
            pass
        return resp

    return handle


def endless(prefix: bytes, content_type: str, *, chunk_bytes: int = 1 << 20) -> Handler:
    """``prefix``, then ``x`` forever (until the node hangs up)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        resp.enable_chunked_encoding()
        filler = b"x" * chunk_bytes
        try:
            await resp.prepare(request)
            await resp.write(prefix)
            for _ in range(1000):  # 1 GB: far past any limit
                await resp.write(filler)
        except ConnectionError:
            pass
        return resp

    return handle


class RawEngine:
    """An OpenAI-compatible engine (``/v1/models`` lists ``models``) whose generation routes answer
    with whatever ``generate`` is set to; any other route can be scripted in ``routes``."""

    def __init__(self, models: tuple[str, ...] = (MODEL,)) -> None:
        self.models = list(models)
        self.generate: Handler = reply(200, answer())
        self.routes: dict[str, Handler] = {}
        self.hits = 0  # generation requests received
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.2, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        if self._runner is not None:
            await close_runner(self._runner)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        scripted = self.routes.get(request.path)
        if scripted is not None:
            return await scripted(request)
        if request.path in ("/v1/chat/completions", "/v1/completions"):
            self.hits += 1
            return await self.generate(request)
        if request.path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 1, "owned_by": "raw"} for m in self.models]
            return web.json_response({"object": "list", "data": data})
        if request.path == "/api/tags":  # enough Ollama for its adapter
            return web.json_response(
                {
                    "models": [
                        {"name": f"{m}:latest", "model": f"{m}:latest", "digest": m, "details": {"family": "raw"}}
                        for m in self.models
                    ]
                }
            )
        if request.path == "/api/ps":
            return web.json_response({"models": []})
        if request.path == "/api/show":
            return web.json_response({"model_info": {"raw.context_length": 4096}})
        if request.path == "/health":
            return web.json_response({"status": "ok"})
        return web.json_response({"error": {"message": "File Not Found", "type": "not_found_error"}}, status=404)


StartRaw = Callable[..., Awaitable[RawEngine]]


@pytest.fixture
async def raw_engine() -> AsyncIterator[StartRaw]:
    engines: list[RawEngine] = []

    async def _start(**kw: Any) -> RawEngine:
        eng = RawEngine(**kw)
        await eng.start()
        engines.append(eng)
        return eng

    yield _start
    for eng in engines:
        await eng.close()


def sse_data(raw: bytes) -> list[bytes]:
    out = []
    for block in raw.split(b"\n\n"):
        lines = [ln[5:].removeprefix(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(lines))
    return out


async def node_for(start_node: StartNode, *engines: Any, kind: str = "openai", **settings: Any) -> Node:
    """A node over ``engines``, tried in the order given: these tests are about what happens holder by holder
    (affinity, which would pick a holder per conversation, is off unless a test turns it on)."""
    settings.setdefault("affinity", False)
    return await start_node(backends=[{"kind": kind, "url": e.url} for e in engines], **settings)


async def text_of(client: openai.AsyncOpenAI, *, stream: bool, model: str = MODEL) -> str:
    if stream:
        chunks = await client.chat.completions.create(model=model, messages=MSGS, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    done = await client.chat.completions.create(model=model, messages=MSGS)
    return done.choices[0].message.content or ""


# -- 3, 4: malformed engine output ------------------------------------------------------

MALFORMED_EVENTS = [
    b'{"choices":[1],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}',  # the attack
    b'{"choices":5}',
    b'{"choices":[{"index":0,"delta":"text"}]}',
    b'{"choices":[{"index":0,"delta":{"content":7}}]}',
    b'{"choices":[],"usage":{"prompt_tokens":"many"}}',
    b"not json at all",
    b"null",
    b"",
]


@pytest.mark.parametrize("bad", MALFORMED_EVENTS)
async def test_malformed_chunk_mid_stream_ends_it_with_an_error_event(
    start_node: StartNode, raw_engine: StartRaw, client_for: ClientFor, http: aiohttp.ClientSession, bad: bytes
) -> None:
    eng = await raw_engine()
    # the engine even claims a clean end after the bad chunk
    eng.generate = sse(ROLE, chunk({"content": "Hel"}), b"data: " + bad + b"\n\n", DONE, gap_s=0.05)
    node = await node_for(start_node, eng)
    stream = await client_for(node).chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    got = ""
    with pytest.raises(openai.APIError) as info:
        async for c in stream:
            got += "".join(ch.delta.content or "" for ch in c.choices)
    assert got == "Hel"
    assert "malformed" in info.value.message
    assert not isinstance(info.value, openai.APIStatusError)  # it came as the SSE error event

    async with http.post(
        node.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "stream": True}
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = sse_data(raw)
    assert b"[DONE]" not in raw and bad not in events  # never forwarded verbatim
    last = json.loads(events[-1])
    assert set(last) == {"error"} and last["error"]["code"] == "malformed_event"

    # the node is fine: the same engine, behaving again, is served
    eng.generate = sse(*healthy_stream("fine"))
    assert await text_of(client_for(node), stream=True) == "fine"
    async with http.get(node.url + "/health") as r:
        assert r.status == 200


@pytest.mark.parametrize("bad", [*MALFORMED_EVENTS[:4], b"not json at all"])
async def test_malformed_first_event_is_served_by_the_other_holder(
    start_node: StartNode, raw_engine: StartRaw, fake: StartFake, client_for: ClientFor, bad: bytes
) -> None:
    eng = await raw_engine()
    eng.generate = sse(b"data: " + bad + b"\n\n", *healthy_stream())
    other = await fake("openai", models=[MODEL])
    node = await node_for(start_node, eng, other)
    raw = await client_for(node).chat.completions.with_raw_response.create(model=MODEL, messages=MSGS, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert text == HELLO
    assert eng.hits == 1 and len(other.requests) == 1  # tried, failed before the first byte, retried


MALFORMED_ANSWERS = [
    b'{"choices": 5}',
    b'{"choices": [1, 2]}',
    b'{"choices": [{"index": 0, "finish_reason": "stop"}]}',  # no message
    b'{"choices": [{"message": {"role": "assistant", "content": ["a"]}}]}',
    b'{"id": "x", "object": "chat.completion"}',  # no choices at all
    b"[1, 2, 3]",
    b'{"choices": [], "usage": {"prompt_tokens": -1}}',
    b"<html>Bad Gateway</html>",
]


@pytest.mark.parametrize("bad", MALFORMED_ANSWERS)
async def test_malformed_answer_is_retried_elsewhere_else_502(
    start_node: StartNode, raw_engine: StartRaw, fake: StartFake, client_for: ClientFor, bad: bytes
) -> None:
    eng = await raw_engine()
    eng.generate = reply(200, bad)
    other = await fake("openai", models=[MODEL])
    node = await node_for(start_node, eng, other)
    assert await text_of(client_for(node), stream=False) == HELLO
    assert eng.hits == 1 and len(other.requests) == 1

    alone = await node_for(start_node, eng)
    with pytest.raises(openai.APIStatusError) as info:
        await client_for(alone).chat.completions.create(model=MODEL, messages=MSGS)
    assert info.value.status_code == 502 and info.value.code == "bad_gateway"


async def test_an_sse_event_without_end_is_cut_at_the_limit(
    start_node: StartNode, raw_engine: StartRaw, client_for: ClientFor
) -> None:
    eng = await raw_engine()
    eng.generate = endless(b"data: ", "text/event-stream")  # an event that never ends
    node = await node_for(start_node, eng)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        await client_for(node).chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    assert info.value.status_code == 502 and "larger than" in info.value.message
    assert time.monotonic() - t0 < 2.5

    # after the first event, the same is an error event
    eng.generate = sse(ROLE, chunk({"content": "Hel"}), b"data: " + b"x" * (9 << 20), hold_s=5, gap_s=0.05)
    stream = await client_for(node).chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    with pytest.raises(openai.APIError) as err:
        async for _ in stream:
            pass
    assert "larger than" in err.value.message


async def test_an_endless_answer_is_cut_at_the_limit(
    start_node: StartNode, raw_engine: StartRaw, client_for: ClientFor
) -> None:
    eng = await raw_engine()
    eng.generate = endless(b'{"choices": [{"message": {"content": "', "application/json")
    node = await node_for(start_node, eng)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        await client_for(node).chat.completions.create(model=MODEL, messages=MSGS)
    assert info.value.status_code == 502 and "larger than" in info.value.message
    assert time.monotonic() - t0 < 2.5


# -- 3: model lists, health and load signals ------------------------------------------------


async def test_malformed_model_lists_mark_the_engine_down_never_crash(
    raw_engine: StartRaw, start_node: StartNode, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng = await raw_engine()
    async with aiohttp.ClientSession() as session:
        backend = OpenAICompatBackend("openai", eng.url, session)
        for body in (b'{"data": 5}', b"[1, 2]", b'{"data": [1, "x"]', b"", b'"models"'):
            eng.routes["/v1/models"] = reply(200, body)
            await backend.refresh()
            assert backend.state is BackendState.DOWN and backend.models == [], body
        # one bad entry, or a bad field, costs only itself
        eng.routes["/v1/models"] = reply(
            200,
            json.dumps(
                {
                    "data": [
                        {"id": 5},
                        "text",
                        {"id": "ok", "created": "yesterday", "owned_by": 7},
                        {"id": "full", "created": 3, "max_model_len": 2048},
                    ]
                }
            ).encode(),
        )
        await backend.refresh()
        assert backend.state is BackendState.READY
        assert [(m.id, m.created, m.context_length) for m in backend.models] == [("ok", 0, None), ("full", 3, 2048)]
        # too large to be a model list
        eng.routes["/v1/models"] = reply(200, b'{"data": [' + b" " * (9 << 20) + b"]}")
        await backend.refresh()
        assert backend.state is BackendState.DOWN

    # through a node: down, so 503, and the node answers everything else
    eng.routes["/v1/models"] = reply(200, b'{"data": {"id": "m"}}')
    node = await node_for(start_node, eng)
    with pytest.raises(openai.InternalServerError) as info:
        await client_for(node).chat.completions.create(model=MODEL, messages=MSGS)
    assert info.value.status_code == 503
    async with http.get(node.url + "/ready") as r:
        assert [e["state"] for e in (await r.json())["engines"]] == ["down"]


@pytest.mark.parametrize(
    ("kind", "path", "body"),
    [
        ("vllm", "/load", b'{"server_load": "lots"}'),
        ("vllm", "/load", b"[1]"),
        ("llamacpp", "/slots", b"[1, 2]"),
        ("llamacpp", "/slots", b'[{"is_processing": "yes"}]'),
        ("llamacpp", "/slots", b'{"slots": 1}'),
    ],
)
async def test_malformed_load_signals_are_ignored(raw_engine: StartRaw, kind: str, path: str, body: bytes) -> None:
    eng = await raw_engine()
    eng.routes[path] = reply(200, body)
    async with aiohttp.ClientSession() as session:
        backend = OpenAICompatBackend(kind, eng.url, session)
        await backend.refresh()
        assert backend.state is BackendState.READY
        assert [m.id for m in backend.models] == [MODEL]
        assert backend.engine_load is None


async def test_malformed_ollama_answers_are_ignored_or_mark_it_down(raw_engine: StartRaw) -> None:
    eng = await raw_engine()
    eng.routes["/api/tags"] = reply(
        200,
        json.dumps(
            {
                "models": [
                    {"name": "good:latest", "digest": "d1", "details": {"family": 5, "parameter_size": "3B"}},
                    {"name": 7},
                    "text",
                    {"model": "other:q4", "details": {"family": "llama"}},
                ]
            }
        ).encode(),
    )
    eng.routes["/api/ps"] = reply(200, b'{"models": 5}')
    eng.routes["/api/show"] = reply(200, b"[1, 2]")  # used to escape refresh as an AttributeError
    async with aiohttp.ClientSession() as session:
        backend = OllamaBackend(eng.url, session)
        await backend.refresh()
        assert backend.state is BackendState.READY
        models = {m.id: m for m in backend.models}
        assert set(models) == {"good:latest", "other:q4"}
        assert models["good:latest"].family is None and models["good:latest"].aliases == ("good",)
        assert models["other:q4"].family == "llama" and models["other:q4"].loaded is False
        assert models["other:q4"].context_length is None

        eng.routes["/api/show"] = reply(200, b'{"model_info": {"x.context_length": "long", "y.context_length": 8192}}')
        eng.routes["/api/ps"] = reply(200, b'{"models": [{"name": "other:q4", "context_length": 2048}, 3]}')
        backend = OllamaBackend(eng.url, session)
        await backend.refresh()
        models = {m.id: m for m in backend.models}
        assert models["good:latest"].context_length == 8192
        assert models["other:q4"].context_length == 2048 and models["other:q4"].loaded is True

        for body in (b'{"models": "x"}', b"[]", b"{", b""):
            eng.routes["/api/tags"] = reply(200, body)
            await backend.refresh()
            assert backend.state is BackendState.DOWN, body


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": 5}',
        b'{"data": [1, {"owned_by": 3}]}',
        b'[{"data": []}]',
        b"{" * 5000,
        b'{"data": [' + b" " * (2 << 20) + b"]}",
    ],
)
async def test_detection_survives_whatever_answers_on_a_default_port(raw_engine: StartRaw, body: bytes) -> None:
    eng = await raw_engine()
    eng.routes["/v1/models"] = reply(200, body)
    async with aiohttp.ClientSession() as session:
        assert await identify(session, eng.url) is None  # no engine we know, and no exception


# -- 6: redirects ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_an_engine_redirect_is_a_failed_engine_never_followed(
    start_node: StartNode, raw_engine: StartRaw, fake: StartFake, client_for: ClientFor, status: int
) -> None:
    trap = await raw_engine()  # where the redirect points: must never be called
    eng = await raw_engine()
    eng.generate = reply(status, b'{"moved": true}', headers={"Location": trap.url + "/v1/chat/completions"})
    other = await fake("openai", models=[MODEL])
    node = await node_for(start_node, eng, other)
    client = client_for(node)
    for stream in (False, True):
        assert await text_of(client, stream=stream) == HELLO
    assert eng.hits == 2 and len(other.requests) == 2

    alone = await node_for(start_node, eng)
    with pytest.raises(openai.APIStatusError) as info:
        await client_for(alone).chat.completions.create(model=MODEL, messages=MSGS)
    assert info.value.status_code == 502
    assert "redirect" in info.value.message and "moved" not in info.value.message
    assert trap.hits == 0


# -- 9: holders out for now are 503, not 404 --------------------------------------------------


async def start_pair(start_node: StartNode, engine: Any, **a_settings: Any) -> tuple[Node, Node]:
    """Node A (no engine) and node B (``engine``), peers of each other; returns once A sees B's model."""
    b = await start_node(backends=[{"kind": "openai", "url": engine.url}], **CLUSTER)
    a = await start_node(**CLUSTER, **a_settings)
    assert a.cluster is not None and b.cluster is not None
    a.cluster.table.add_static(f"127.0.0.1:{b.peer_port}")
    b.cluster.table.add_static(f"127.0.0.1:{a.peer_port}")

    async def sees() -> bool:
        return MODEL in a.router.known_models()

    await eventually(sees, what="A sees B's model")
    return a, b


def breaker_of(a: Node, b: Node, model: str | None = None):
    """A's breaker for peer B (its links), or for B holding ``model`` (what B's engines answer for it)."""
    assert a.cluster is not None and b.cluster is not None
    peer = a.cluster.table.get(b.cluster.node_id)
    assert peer is not None
    return peer.breaker if model is None else a.cluster.table.model_breakers.get((peer.node_id, model))


async def test_a_model_whose_holder_has_an_open_breaker_is_503_not_404(
    start_node: StartNode, raw_engine: StartRaw, client_for: ClientFor
) -> None:
    eng = await raw_engine()
    eng.generate = reply(503, b'{"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}')
    a, b = await start_pair(start_node, eng)
    client = client_for(a)
    for _ in range(3):  # PeerTable's breaker_threshold
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=MODEL, messages=MSGS)
    # B answered each time (its link works): B is ejected for this model, not as a whole
    assert breaker_of(a, b, MODEL).state(time.monotonic()) is BreakerState.OPEN
    assert breaker_of(a, b).state(time.monotonic()) is BreakerState.CLOSED
    assert MODEL in [m.id async for m in client.models.list()]  # still listed ...
    with pytest.raises(openai.APIStatusError) as info:  # ... so it exists: 503, not 404
        await client.chat.completions.create(model=MODEL, messages=MSGS)
    err = info.value
    assert err.status_code == 503 and err.code == "holders_unavailable"
    assert 1 <= int(err.response.headers["Retry-After"]) <= 5  # until the breaker half-opens
    assert eng.hits == 3  # not sent while the breaker is open
    with pytest.raises(openai.NotFoundError):  # a model nobody holds is still 404
        await client.chat.completions.create(model="nobody-has-it", messages=MSGS)


# -- 10: one first-token deadline ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_first_token_deadline_is_counted_once_from_the_request(
    start_node: StartNode, raw_engine: StartRaw, client_for: ClientFor, kind: str
) -> None:
    eng = await raw_engine()
    model = MODEL if kind == "openai" else f"{MODEL}:latest"
    # head after 0.6 s, first event 0.6 s later: each under the 1 s limit, together over it
    eng.generate = sse(*healthy_stream(), head_delay_s=0.6, first_delay_s=0.6)
    node = await node_for(start_node, eng, kind=kind, first_token_timeout_s=1.0, request_timeout_s=1.0)
    client = client_for(node)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=model, messages=MSGS, stream=True)
    elapsed = time.monotonic() - t0
    assert info.value.status_code == 504
    assert 0.95 <= elapsed < 1.4, elapsed

    # the same for a whole answer: head and body within one request deadline
    eng.generate = slow_json(answer(), head_delay_s=0.6, body_delay_s=0.6)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=model, messages=MSGS)
    elapsed = time.monotonic() - t0
    assert info.value.status_code == 504
    assert 0.95 <= elapsed < 1.4, elapsed

    # in time: served
    eng.generate = sse(*healthy_stream("quick"), head_delay_s=0.3, first_delay_s=0.3)
    assert await text_of(client, stream=True, model=model) == "quick"


async def test_first_token_deadline_holds_across_a_peer(
    start_node: StartNode, raw_engine: StartRaw, client_for: ClientFor
) -> None:
    eng = await raw_engine()
    eng.generate = sse(*healthy_stream(), first_delay_s=1.5)  # B's engine: head at once, first token after 1.5 s
    a, _ = await start_pair(start_node, eng, first_token_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        await client_for(a).chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    assert info.value.status_code == 504
    assert 0.95 <= time.monotonic() - t0 < 1.4


# -- 11, 12: engine errors caused by the request ---------------------------------------------------


async def test_an_engine_500_with_an_error_body_from_every_holder_reaches_the_client_once(
    start_node: StartNode, raw_engine: StartRaw, client_for: ClientFor
) -> None:
    first, second = await raw_engine(), await raw_engine()
    for eng in (first, second):
        eng.generate = reply(500, json.dumps(IMAGE_ERROR).encode())
    node = await node_for(start_node, first, second)
    client = client_for(node, max_retries=2)  # the SDK's default
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model=MODEL, messages=MSGS, stream=stream)
        err = info.value
        assert err.status_code == 500 and err.code == "engine_error" and err.type == "server_error"
        assert err.body["message"] == IMAGE_ERROR["error"]["message"]  # type: ignore[index]
        assert err.response.headers["x-should-retry"] == "false"
        assert "Retry-After" not in err.response.headers
    assert first.hits == 2 and second.hits == 2  # every holder once per request; the SDK did not retry

    # an engine 500 that says nothing is a failing engine: retryable 503, as before
    first.generate = second.generate = reply(500, b"<html>oops</html>", headers={"Content-Type": "text/html"})
    with pytest.raises(openai.InternalServerError) as info:
        await client_for(node).chat.completions.create(model=MODEL, messages=MSGS)
    assert info.value.status_code == 503 and "x-should-retry" not in info.value.response.headers


async def test_an_engine_refusing_the_request_is_served_by_the_holder_that_can(
    start_node: StartNode, raw_engine: StartRaw, fake: StartFake, client_for: ClientFor
) -> None:
    eng = await raw_engine()
    eng.generate = reply(500, json.dumps(IMAGE_ERROR).encode())
    other = await fake("openai", models=[MODEL])
    node = await node_for(start_node, eng, other)
    for stream in (False, True):
        assert await text_of(client_for(node), stream=stream) == HELLO
    assert eng.hits == 2 and len(other.requests) == 2


async def test_a_request_caused_engine_error_through_a_peer_never_trips_its_breaker(
    start_node: StartNode, raw_engine: StartRaw, client_for: ClientFor
) -> None:
    eng = await raw_engine()
    eng.generate = reply(500, json.dumps(IMAGE_ERROR).encode())
    a, b = await start_pair(start_node, eng)
    client = client_for(a, max_retries=2)
    for i in range(1, 5):  # more than the breaker's threshold
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model=MODEL, messages=MSGS)
        err = info.value
        assert err.status_code == 500 and err.code == "engine_error"
        assert err.response.headers["x-should-retry"] == "false"
        assert err.response.headers["X-Quorum-Route"] == "local"  # A's own answer, passing on B's
        assert eng.hits == i  # one engine request per call: no SDK retries, and still sent
    for breaker in (breaker_of(a, b), breaker_of(a, b, MODEL)):
        assert breaker.state(time.monotonic()) is BreakerState.CLOSED and breaker.failures == 0

    eng.generate = reply(200, answer("now it works"))
    assert await text_of(client, stream=False) == "now it works"


# -- retry budget ------------------------------------------------------------------------------------


async def test_retries_stay_within_budget_when_every_engine_fails(
    start_node: StartNode, raw_engine: StartRaw, client_for: ClientFor
) -> None:
    engines = [await raw_engine() for _ in range(3)]
    for eng in engines:
        eng.generate = reply(503, b'{"error": {"message": "busy", "type": "unavailable_error"}}')
    # the budget alone: ejecting the failing engines (test_holder_ejection.py) would spare them even more
    node = await node_for(start_node, *engines, holder_failures=1000)
    client = client_for(node)
    requests = 30
    for _ in range(requests):
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=MODEL, messages=MSGS)
    attempts = sum(e.hits for e in engines)
    assert requests < attempts <= 1.2 * requests + 3


# -- the router's bookkeeping, with scripted targets ------------------------------------------------------


class ScriptedTarget:
    """A target (the router's seam) that answers with what it is given and records its verdicts."""

    route = "local"
    helpers: tuple[str, ...] = ()

    def __init__(self, name: str, outcome: Reply | Exception) -> None:
        self.engine = self.node = name
        self.outcome = outcome
        self.verdicts: list[bool | None] = []

    async def open(self, op: Op, body: dict[str, Any], *, stream: bool, want_usage: bool, caller: Any = None) -> Reply:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def begin(self) -> bool:
        return True

    def end(self, ok: bool | None, ttft_s: float | None) -> None:
        self.verdicts.append(ok)


async def router_with(tmp_path: Any, *targets: ScriptedTarget) -> Router:
    router = Router(Registry(node_settings(tmp_path, 0)), "here")
    router.peer_planner = lambda model, op, ids: list(targets)
    return router


async def test_refusing_holders_count_as_failing_only_if_another_served(tmp_path: Any) -> None:
    refuse = ScriptedTarget("a", engine_failed("no images", engine="a"))
    serve = ScriptedTarget("b", JsonReply({"choices": []}))
    router = await router_with(tmp_path, refuse, serve)
    opened = await router.open("chat", MODEL, {}, stream=False, want_usage=False, forwarded=False)
    assert opened.target is serve and opened.attempts == 2
    assert refuse.verdicts == [False]  # it failed what another could do

    refuse2 = ScriptedTarget("c", engine_failed("no images", engine="c"))
    router = await router_with(tmp_path, refuse, refuse2)
    with pytest.raises(ApiError) as info:
        await router.open("chat", MODEL, {}, stream=False, want_usage=False, forwarded=False)
    assert info.value.status == 500 and info.value.retryable is False and info.value.code == "engine_error"
    assert info.value.attempts == 2  # type: ignore[attr-defined]
    assert refuse.verdicts == [False, None] and refuse2.verdicts == [None]  # nobody did better: no verdict


async def test_a_failed_request_tells_how_many_attempts_it_made(tmp_path: Any) -> None:
    down = [ScriptedTarget(n, EngineUnavailable("down", engine=n)) for n in "abc"]
    router = await router_with(tmp_path, *down)
    with pytest.raises(ApiError) as info:
        await router.open("chat", MODEL, {}, stream=False, want_usage=False, forwarded=False)
    assert info.value.status == 503 and info.value.attempts == 3  # type: ignore[attr-defined]
    assert [t.verdicts for t in down] == [[False], [False], [False]]

    router = await router_with(tmp_path)
    with pytest.raises(ApiError) as info:
        await router.open("chat", "nobody", {}, stream=False, want_usage=False, forwarded=False)
    assert info.value.status == 404 and info.value.attempts == 0  # type: ignore[attr-defined]


async def test_one_slow_probe_does_not_take_a_ready_engine_down_two_in_a_row_do(start_node, fake) -> None:
    from tests.faults import FaultProxy

    eng = await fake("vllm")
    async with FaultProxy("127.0.0.1", int(eng.url.rsplit(":", 1)[1])) as proxy:
        node = await start_node(backends=[{"kind": "vllm", "url": proxy.url}], health_interval_s=3600)
        backend = next(iter(node.registry.backends.values()))
        assert backend.state is BackendState.READY
        proxy.latency_s = 3.0  # far past the probe timeout: a machine too busy to answer in time
        await backend.refresh()
        assert backend.state is BackendState.READY  # one miss: still served
        await backend.refresh()
        assert backend.state is BackendState.DOWN and "timed out" in (backend.last_error or "")
        proxy.latency_s = 0.0
        await backend.refresh()
        assert backend.state is BackendState.READY
        proxy.latency_s = 3.0
        await backend.refresh()  # the count started again after the good probe
        assert backend.state is BackendState.READY


async def test_an_engine_that_comes_back_is_listed_only_once_it_serves(start_node, fake, monkeypatch) -> None:
    eng = await fake("llamacpp")
    node = await start_node(backends=[{"kind": "llamacpp", "url": eng.url}], health_interval_s=3600)
    backend = next(iter(node.registry.backends.values()))
    assert isinstance(backend, OpenAICompatBackend) and backend.state is BackendState.READY
    model = backend.models[0].id
    await eng.set_refuse(True)
    await backend.refresh()
    assert backend.state is BackendState.DOWN
    await eng.set_refuse(False)
    seen: list[tuple[bool, int]] = []
    probe = backend._probe_native

    async def probe_while_a_client_looks() -> None:  # the refresh's last step before it says ready
        async with aiohttp.ClientSession() as http:
            async with http.get(node.url + "/v1/models") as resp:
                listed = model in {m["id"] for m in (await resp.json())["data"]}
            async with http.post(
                node.url + "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            ) as resp:
                seen.append((listed, resp.status))
        await probe()

    monkeypatch.setattr(backend, "_probe_native", probe_while_a_client_looks)
    await backend.refresh()
    assert backend.state is BackendState.READY
    assert seen == [(False, 503)]  # not listed yet, and unavailable for now (it was this node's model)


async def test_a_connection_the_engine_closes_unanswered_is_tried_once_more(raw_engine, start_node, client_for) -> None:
    eng = await raw_engine()
    normal = eng.generate

    async def close_once(request: web.Request) -> web.StreamResponse:
        if eng.hits in (1, 3, 4):  # as an engine that ends a kept-alive connection just as a request comes
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        return await normal(request)

    eng.generate = close_once
    node = await node_for(start_node, eng)
    client = client_for(node)
    assert await text_of(client, stream=False) == "raw" and eng.hits == 2  # closed, then served
    with pytest.raises(openai.APIStatusError) as caught:  # closed twice in a row: the engine's answer
        await text_of(client, stream=False)
    assert caught.value.status_code == 503 and eng.hits == 4
