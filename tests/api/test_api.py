"""The node's API contracts on one machine: provenance, the failure contract,
cancellation, the choice between two holders, and the trust rule."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import openai
import pytest

from quorum_node.names import is_loopback
from quorum_node.node import Node
from tests.fakes.engines import FakeEngine
from tests.support import eventually

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]
ClientFor = Callable[..., openai.AsyncOpenAI]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # held by the vLLM, SGLang and TGI fakes
MSGS = [{"role": "user", "content": "hi"}]


def sse_data(raw: bytes) -> list[str]:
    """The data of each SSE event, in order."""
    out = []
    for block in raw.decode().split("\n\n"):
        lines = [ln[5:].removeprefix(" ") for ln in block.split("\n") if ln.startswith("data:")]
        if lines:
            out.append("\n".join(lines))
    return out


def provenance(headers: Mapping[str, str]) -> tuple[str, str]:
    return headers["X-Quorum-Node"], headers["X-Quorum-Route"]


# ----------------------------------------------------------------- provenance


async def test_every_answer_says_who_served_it(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng = await fake("vllm")
    node = await start_node(name="kitchen", backends=[{"kind": "vllm", "url": eng.url}])
    client = client_for(node)
    expected = ("kitchen", "local")

    raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
    assert provenance(raw.headers) == expected
    assert raw.parse().choices[0].message.content == "Hello, world!"
    raw = await client.completions.with_raw_response.create(model=MODEL, prompt="x")
    assert provenance(raw.headers) == expected
    raw = await client.embeddings.with_raw_response.create(model=MODEL, input="x")
    assert provenance(raw.headers) == expected
    raw = await client.models.with_raw_response.list()
    assert provenance(raw.headers) == expected
    async with client.chat.completions.with_streaming_response.create(model=MODEL, messages=MSGS, stream=True) as resp:
        assert provenance(resp.headers) == expected
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert (
            "".join([c.choices[0].delta.content or "" async for c in await resp.parse() if c.choices])
            == "Hello, world!"
        )
    for method, path in (
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/nowhere"),
        ("PUT", "/v1/models"),
        ("POST", "/v1/chat/completions"),
    ):
        async with http.request(method, node.url + path, data=b"{") as r:
            assert provenance(r.headers) == expected, (method, path, r.status)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="nope", messages=MSGS)
    assert provenance(info.value.response.headers) == expected


async def test_health_and_ready(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("sglang")
    node = await start_node(name="desk", backends=[{"kind": "sglang", "url": eng.url}])
    async with http.get(node.url + "/health") as r:
        assert r.status == 200 and (await r.json())["node"] == "desk"
    async with http.get(node.url + "/ready") as r:
        body = await r.json()
        assert r.status == 200 and body["status"] == "ready"
        assert [(e["kind"], e["state"], e["models"]) for e in body["engines"]] == [("sglang", "ready", 1)]


async def test_node_without_engines_is_not_ready(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    node = await start_node()
    async with http.get(node.url + "/ready") as r:
        assert r.status == 503 and "Retry-After" in r.headers
    async with http.get(node.url + "/v1/models") as r:
        assert r.status == 200 and (await r.json()) == {"object": "list", "data": []}


# ----------------------------------------------------------- failure contract


async def test_engine_failing_before_first_byte_is_served_by_the_next_holder(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    first = await fake("vllm")
    second = await fake("vllm")
    # the order listed is the order tried (affinity would pick a holder per conversation)
    node = await start_node(
        backends=[{"kind": "vllm", "url": first.url}, {"kind": "vllm", "url": second.url}], affinity=False
    )
    client = client_for(node)
    for i, stream in enumerate((False, True), start=1):
        # Equal holders are tried in configured order: the first refuses, the second answers.
        first.next_status = 503
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS, stream=stream)
        assert raw.http_response.status_code == 200
        if stream:
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        else:
            text = raw.parse().choices[0].message.content
        assert text == "Hello, world!"
        assert first.next_status is None and len(first.requests) == i  # it was tried, and failed
        assert len(second.requests) == i and second.requests[-1].get("stream", False) is stream


async def test_engine_that_stopped_listening_is_skipped_transparently(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    first = await fake("vllm")
    second = await fake("vllm")
    # Slow probing: the node has not noticed yet that the first engine went away.
    node = await start_node(
        probe_interval_s=60, backends=[{"kind": "vllm", "url": first.url}, {"kind": "vllm", "url": second.url}]
    )
    client = client_for(node)
    await first.stop_listening()
    for stream in (False, True):
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS, stream=stream)
        assert raw.headers["X-Quorum-Route"] == "local"
        if stream:
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        else:
            text = raw.parse().choices[0].message.content
        assert text == "Hello, world!"
    assert len(second.requests) == 2 and first.requests == []


@pytest.mark.parametrize("fail_mode", ["error", "drop"])
@pytest.mark.parametrize("kind", ["vllm", "ollama", "tgi", "llamacpp"])
async def test_mid_stream_failure_is_an_error_never_a_clean_end(
    start_node: StartNode,
    fake: StartFake,
    client_for: ClientFor,
    http: aiohttp.ClientSession,
    kind: str,
    fail_mode: str,
) -> None:
    eng = await fake(kind, fail_after_tokens=2, fail_mode=fail_mode)
    backup = await fake(kind)  # after the first byte, no retry may hide the failure
    node = await start_node(
        backends=[{"kind": kind, "url": eng.url}, {"kind": kind, "url": backup.url}],
        affinity=False,  # eng first
    )
    model = {"ollama": "llama3.2", "llamacpp": "SmolLM2-135M-Instruct.Q4_1"}.get(kind, MODEL)
    client = client_for(node)
    stream = await client.chat.completions.create(model=model, messages=MSGS, stream=True)
    text = ""
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                assert choice.finish_reason is None
    assert text == "Hello,"  # what came before the failure arrived
    assert backup.requests == []

    body = {"model": model, "messages": MSGS, "stream": True}
    async with http.post(node.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = sse_data(raw)
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert set(last) == {"error"} and last["error"]["message"]
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert raw.endswith(b"\n\n")
    assert backup.requests == []


async def test_client_disconnect_cancels_the_engine_stream(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng = await fake("vllm", tokens=["tok "] * 400, token_delay_s=0.02)
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    client = client_for(node)

    stream = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    got = 0
    async for _chunk in stream:
        got += 1
        if got == 3:
            break
    await stream.close()
    await asyncio.wait_for(eng.cancelled_event().wait(), 2)
    await asyncio.wait_for(eng.wait_until(lambda e: e.active_streams == 0), 2)
    assert eng.cancelled == 1

    eng.cancelled_event().clear()
    body = {"model": MODEL, "messages": MSGS, "stream": True}
    async with http.post(node.url + "/v1/chat/completions", json=body) as resp:
        await resp.content.readline()
        resp.close()  # hang up without reading the rest
    await asyncio.wait_for(eng.cancelled_event().wait(), 2)
    assert eng.cancelled == 2
    assert node.registry.backends[eng.url].in_flight == 0


async def test_finished_streams_leave_their_engine_connection_for_the_next_request(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    # A stream read only up to its [DONE] (not to the end of the chunked body) cannot go back to the
    # pool: every request then cost the engine a new connection, which at hundreds of streams is
    # a good part of the node's CPU.
    eng = await fake("vllm", eof_delay_s=0.005)  # the body ends a moment after [DONE], as it does on most servers
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    client = client_for(node)
    for _ in range(6):
        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Hello, world!"
    ports = {r.peer[1] for r in eng.requests if r.path == "/v1/chat/completions"}
    assert len(ports) <= 2, ports  # one connection, or two if a probe held it at the moment
    assert node.registry.backends[eng.url].in_flight == 0


async def test_last_events_that_come_with_the_end_are_delivered_with_it(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    # The finish, usage and [DONE] in one packet: the node sends them on with its own last bytes.
    eng = await fake("vllm", tail_in_one_write=True, token_delay_s=0.02)
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    client = client_for(node)
    stream = await client.chat.completions.create(
        model=MODEL, messages=MSGS, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    body = {"model": MODEL, "messages": MSGS, "stream": True}  # no usage asked: none shown, [DONE] last
    async with http.post(node.url + "/v1/chat/completions", json=body) as resp:
        events = sse_data(await resp.read())
    assert events[-1] == "[DONE]" and '"finish_reason":"stop"' in events[-2].replace(" ", "")
    assert not any('"usage":{' in e.replace(" ", "") for e in events)


# ------------------------------------------------------ choosing between holders


async def test_prefers_the_ready_engine(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    loading = await fake("sglang")
    ready = await fake("sglang")
    # One attempt only: picking the loading engine would fail the request.
    node = await start_node(
        max_attempts=1, backends=[{"kind": "sglang", "url": loading.url}, {"kind": "sglang", "url": ready.url}]
    )
    client = client_for(node)
    loading.loading = True  # warming up: 503 everywhere, the model still listed before

    async def noticed() -> bool:
        async with http.get(node.url + "/ready") as r:
            states = {e["name"]: e["state"] for e in (await r.json())["engines"]}
        return sorted(states.values()) == ["loading", "ready"]

    await eventually(noticed, what="node sees one engine loading")
    for _ in range(3):
        done = await client.chat.completions.create(model=MODEL, messages=MSGS)
        assert done.choices[0].message.content == "Hello, world!"
    assert len(ready.requests) == 3


async def test_prefers_the_less_loaded_engine(start_node: StartNode, fake: StartFake, client_for: ClientFor) -> None:
    a = await fake("vllm", tokens=["tok "] * 400, token_delay_s=0.02)
    b = await fake("vllm", tokens=["tok "] * 400, token_delay_s=0.02)
    # without affinity (one conversation would keep to its engine while it has room: test_affinity_cluster.py)
    node = await start_node(backends=[{"kind": "vllm", "url": a.url}, {"kind": "vllm", "url": b.url}], affinity=False)
    client = client_for(node)
    long = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    await anext(aiter(long))  # the stream is under way on one engine
    busy, idle = (a, b) if a.active_streams else (b, a)
    assert busy.active_streams == 1 and idle.active_streams == 0
    idle.tokens = ["quick"]
    busy.tokens = ["slow"]
    for _ in range(2):
        done = await client.chat.completions.create(model=MODEL, messages=MSGS)
        assert done.choices[0].message.content == "quick"
    await long.close()
    assert len(busy.requests) == 1 and len(idle.requests) == 2


async def test_prefers_the_engine_that_reports_itself_less_busy(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http
) -> None:
    """An engine busy with other people's requests (not through us) is avoided too."""
    a = await fake("vllm", tokens=["tok "] * 400, token_delay_s=0.02)
    b = await fake("vllm", tokens=["tok "] * 400, token_delay_s=0.02)
    # someone talks to engine a directly, bypassing the node
    direct = await http.post(a.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "stream": True})
    await direct.content.readany()
    node = await start_node(backends=[{"kind": "vllm", "url": a.url}, {"kind": "vllm", "url": b.url}], affinity=False)

    async def load_seen() -> bool:
        ready = await (await http.get(node.url + "/ready")).json()
        return any(e["load"] == 1 for e in ready["engines"])

    await eventually(load_seen, what="the node reads engine a's own load")
    a.tokens, b.tokens = ["busy"], ["free"]
    for _ in range(2):
        done = await client_for(node).chat.completions.create(model=MODEL, messages=MSGS)
        assert done.choices[0].message.content == "free"
    direct.close()


# ------------------------------------------------------------------------ trust


@pytest.mark.parametrize(
    ("remote", "ok"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("fe80::1%lo", False),
        ("::1%lo", True),
        ("192.168.1.20", False),
        ("10.0.0.1", False),
        ("::ffff:192.168.1.20", False),
        ("2001:db8::1", False),
        ("0.0.0.0", False),
        ("", False),
        (None, False),
        ("localhost", False),  # a name is not an address
        ("not an ip", False),
    ],
)
def test_is_loopback(remote: str | None, ok: bool) -> None:
    assert is_loopback(remote) is ok


async def test_a_peer_claim_on_the_public_port_is_refused_even_from_loopback(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    """A peer is whoever its link proved (the peer port's mutual TLS, or the relay's session): a request on the
    public port that says it comes from a node is refused, whatever else it carries — even a valid API key."""
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    _, key = node.keys.create("app")
    body = {"model": MODEL, "messages": MSGS}
    for headers in (
        {"X-Quorum-Hop": "1"},
        {"X-Quorum-Node-Id": "0123456789abcdef01234567"},
        {"X-Quorum-Hop": "1", "X-Quorum-Signature": "v1=deadbeef"},
        {"X-Quorum-Hop": "1", "Authorization": f"Bearer {key}"},
    ):
        async with http.post(node.url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 401, headers
            err = (await r.json())["error"]
            assert err["type"] == "authentication_error" and err["message"]
            assert set(err) == {"message", "type", "param", "code"}
            assert r.headers["X-Quorum-Node"] == node.name
    assert eng.requests == []  # nothing reached the engine
    async with http.post(node.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200  # the same request without the claim is served


async def test_llamacpp_answers_name_the_model_as_users_know_it_not_by_host_path(
    start_node: StartNode, fake: StartFake, client_for
) -> None:
    eng = await fake("llamacpp")
    node = await start_node(backends=[{"kind": "llamacpp", "url": eng.url}])
    client = client_for(node)
    path = eng.models[0]
    stem = path.rsplit("/", 1)[-1].removesuffix(".gguf")
    whole = await client.chat.completions.create(model=stem, messages=[{"role": "user", "content": "hi"}])
    assert whole.model == stem
    stream = await client.chat.completions.create(
        model=stem, messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    models = {chunk.model async for chunk in stream}
    assert models == {stem}
