"""The Ollama surface (issue 10): the real ``ollama`` Python client against a node of a two-node cluster.

Node ``a`` has an Ollama engine (``llama3.2:latest``, ``nomic-embed-text:latest``);
node ``b`` has another Ollama engine holding ``llama3.2:latest`` too, and a vLLM
engine (``meta-llama/Llama-3.1-8B-Instruct``). The client talks to ``a`` only:
everything ``b`` holds is reached over the signed LAN hop, and nothing below
the surface knows the client spoke Ollama's API.
"""

from __future__ import annotations

import base64
import json
import math
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quorum_node.api.app import create_app
from quorum_node.node import Node
from quorum_node.records import Record
from tests.conftest import StartFake, StartNode
from tests.fakes.base import FakeEngine
from tests.support import eventually, json_values

CLUSTER = {"cluster": "ollama", "cluster_secret": "o" * 32}
LLAMA = "llama3.2:latest"
EMBED = "nomic-embed-text:latest"
VLLM = "meta-llama/Llama-3.1-8B-Instruct"
HI = [{"role": "user", "content": "hi"}]
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@dataclass
class Cluster:
    a: Node
    b: Node
    a_ollama: FakeEngine
    b_ollama: FakeEngine
    b_vllm: FakeEngine


@pytest.fixture
async def cluster(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> Cluster:
    a_ollama = await fake("ollama")
    b_ollama = await fake("ollama", models=[LLAMA])
    b_vllm = await fake("vllm")
    # Without affinity, a model both nodes hold is served by the node asked (these tests read where it went)
    a = await start_node(name="a", backends=[{"kind": "ollama", "url": a_ollama.url}], affinity=False, **CLUSTER)
    b = await start_node(
        name="b",
        backends=[{"kind": "ollama", "url": b_ollama.url}, {"kind": "vllm", "url": b_vllm.url}],
        affinity=False,
        **CLUSTER,
    )
    assert a.cluster is not None and b.cluster is not None
    a.cluster.table.add_static(f"127.0.0.1:{b.peer_port}")
    b.cluster.table.add_static(f"127.0.0.1:{a.peer_port}")

    async def converged() -> bool:
        async with http.get(a.url + "/v1/models") as r:
            nodes = {m["id"]: m["nodes"] for m in (await r.json())["data"]}
        return nodes.get(VLLM) == ["b"] and nodes.get(LLAMA) == ["a", "b"]

    await eventually(converged, what="node a sees node b's models")
    return Cluster(a, b, a_ollama, b_ollama, b_vllm)


def records_of(node: Node) -> list[Record]:
    got: list[Record] = []
    node.records.add(got.append)
    return got


def ndjson(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"\n"), raw[-80:]
    return [json.loads(line) for line in raw.split(b"\n") if line]


# ------------------------------------------------------------------- the catalog


async def test_list_shows_every_model_of_the_cluster_once_with_details(cluster: Cluster, client_of) -> None:
    listed = await client_of(cluster.a).list()
    names = [m.model for m in listed.models]
    assert sorted(names) == sorted([LLAMA, EMBED, VLLM])  # llama3.2 is on both nodes, listed once
    by = {m.model: m for m in listed.models}
    d = by[LLAMA].details
    assert (d.family, d.parameter_size, d.quantization_level, d.format) == ("llama", "3.2B", "Q4_K_M", "gguf")
    assert by[EMBED].details.family == "nomic-bert"
    assert by[VLLM].details.format == "safetensors"  # served by vLLM on node b, under its catalog id
    assert all(len(m.digest) == 64 and not m.digest.startswith("sha256:") for m in listed.models)
    assert all(m.modified_at is not None for m in listed.models)


async def test_show_and_ps(cluster: Cluster, client_of) -> None:
    client = client_of(cluster.a)
    shown = await client.show("llama3.2")  # :latest implied
    assert shown.details.family == "llama"
    assert shown.modelinfo["llama.context_length"] == 131072  # the trained context, from the engine's /api/show
    assert "completion" in shown.capabilities
    assert "embedding" in (await client.show(EMBED)).capabilities
    assert (await client.show(VLLM)).modelinfo["general.basename"] == VLLM

    running = {m.model: m for m in (await client.ps()).models}
    assert VLLM in running and running[VLLM].context_length == 4096  # vLLM's models are loaded while it is up
    assert LLAMA not in running  # Ollama loads lazily: nothing used yet
    await client.chat(model="llama3.2", messages=HI)

    async def llama_loaded() -> bool:
        return LLAMA in {m.model for m in (await client.ps()).models}

    await eventually(llama_loaded, what="/api/ps shows the model once an engine loaded it")

    with pytest.raises(ollama.ResponseError) as info:
        await client.show("nope")
    assert info.value.status_code == 404 and info.value.error == "model 'nope' not found"


async def test_version_root_and_head(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with http.get(cluster.a.url + "/api/version") as r:
        assert r.status == 200 and isinstance((await r.json())["version"], str)
    async with http.get(cluster.a.url + "/") as r:
        assert r.status == 200 and await r.text() == "Ollama is running"
        assert r.headers["Content-Type"].startswith("text/plain")
    async with http.head(cluster.a.url + "/") as r:
        assert r.status == 200
    async with http.head(cluster.a.url + "/api/tags") as r:
        assert r.status == 200
    # a browser asking for HTML goes to the dashboard if the node has one, else gets what Ollama says
    assert cluster.a.app is not None
    has_dashboard = any(r.canonical == "/dashboard" for r in cluster.a.app.router.resources())
    async with http.get(cluster.a.url + "/", headers={"Accept": "text/html,*/*"}, allow_redirects=False) as r:
        if has_dashboard:
            assert r.status == 302 and r.headers["Location"] == "/dashboard"
        else:
            assert r.status == 200 and await r.text() == "Ollama is running"


async def test_a_browser_at_the_root_is_sent_to_the_dashboard_where_there_is_one(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    app = create_app(cluster.a.parts())

    async def dashboard(request: web.Request) -> web.Response:
        return web.Response(text="<html>dashboard</html>", content_type="text/html")

    if not any(r.canonical == "/dashboard" for r in app.router.resources()):
        app.router.add_get("/dashboard", dashboard)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/"))
        async with http.get(url, headers={"Accept": "text/html"}, allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/dashboard"
        async with http.get(url, headers={"Accept": "text/html"}) as r:
            assert r.status == 200 and r.url.path == "/dashboard" and "html" in await r.text()
        async with http.get(url) as r:  # curl, scripts, health checks
            assert await r.text() == "Ollama is running"
    finally:
        await server.close()


# ------------------------------------------------------------------- generation


async def test_chat_whole_and_streamed(cluster: Cluster, client_of) -> None:
    client = client_of(cluster.a)
    seen = records_of(cluster.a)
    whole = await client.chat(model="llama3.2", messages=HI, stream=False)
    assert whole.message.role == "assistant" and whole.message.content == "Hello, world!"
    assert whole.done is True and whole.done_reason == "stop" and whole.model == "llama3.2"
    assert whole.eval_count == 4 and whole.prompt_eval_count == 1
    assert isinstance(whole.total_duration, int) and whole.total_duration > 0
    assert cluster.a_ollama.requests[-1]["model"] == LLAMA  # served here: node a's own engine

    parts = [p async for p in await client.chat(model=VLLM, messages=HI, stream=True)]
    assert "".join(p.message.content for p in parts) == "Hello, world!"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count == 4 and last.prompt_eval_count == 1
    assert last.total_duration >= last.eval_duration >= 0 and last.prompt_eval_duration >= 0
    assert len(cluster.b_vllm.requests) == 1  # over the LAN, to vLLM on node b

    by_model = {r.model: r for r in seen if r.surface == "ollama"}
    assert by_model["llama3.2"].operation == "chat" and by_model["llama3.2"].route == "local"
    assert by_model[VLLM].route == "lan" and by_model[VLLM].serving_node == "b"
    assert by_model[VLLM].completion_tokens == 4 and by_model[VLLM].stream is True


async def test_answers_carry_provenance_and_stream_ndjson(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    body = {"model": VLLM, "messages": HI}
    async with http.post(cluster.a.url + "/api/chat", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        assert (r.headers["X-Quorum-Node"], r.headers["X-Quorum-Route"]) == ("b", "lan")
        assert r.headers["X-Request-Id"]
        lines = ndjson(await r.read())
    assert all(set(ln) >= {"model", "created_at", "message", "done"} for ln in lines)
    assert lines[-1]["done"] is True and lines[-1]["message"] == {"role": "assistant", "content": ""}
    assert all(isinstance(lines[-1][k], int) for k in ("total_duration", "eval_count", "eval_duration"))


async def test_generate_whole_and_streamed(cluster: Cluster, client_of) -> None:
    client = client_of(cluster.a)
    whole = await client.generate(model="llama3.2", prompt="Say hello", system="Be brief")
    assert whole.response == "Hello, world!" and whole.done_reason == "stop" and whole.eval_count == 4
    sent = cluster.a_ollama.requests[-1]
    assert sent.path == "/v1/chat/completions"  # the prompt goes through the model's chat template
    assert sent["messages"] == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Say hello"}]

    parts = [p async for p in await client.generate(model=VLLM, prompt="Say hello", stream=True)]
    assert "".join(p.response for p in parts) == "Hello, world!"
    assert parts[-1].done is True and parts[-1].response == "" and parts[-1].eval_count == 4

    raw = await client.generate(model=VLLM, prompt="def f(", raw=True)
    assert raw.response == "Hello, world!"
    assert cluster.b_vllm.requests[-1].path == "/v1/completions"  # raw: no template, a plain completion


async def test_empty_prompt_or_messages_load_the_model(cluster: Cluster, client_of) -> None:
    client = client_of(cluster.a)
    loaded = await client.generate(model="llama3.2", prompt="", stream=False)
    assert loaded.done is True and loaded.done_reason == "load"
    unloaded = await client.chat(model=VLLM, messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert cluster.b_vllm.requests == []  # nothing to generate: no engine was bothered
    with pytest.raises(ollama.ResponseError) as info:
        await client.generate(model="nope", prompt="")
    assert info.value.status_code == 404


async def test_options_format_and_images_map_to_the_engine(cluster: Cluster, client_of) -> None:
    client = client_of(cluster.a)
    short = await client.chat(
        model=VLLM,
        messages=HI,
        options={
            "num_predict": 2,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "seed": 7,
            "stop": ["\n"],
            "num_ctx": 8192,
            "num_gpu": 99,
            "repeat_penalty": 1.1,
            "mirostat": 2,
        },
    )  # the last four: ignored
    assert short.message.content == "Hello," and short.done_reason == "length"
    sent = cluster.b_vllm.requests[-1]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["top_k"], sent["seed"], sent["stop"]) == (
        2,
        0.2,
        0.9,
        40,
        7,
        ["\n"],
    )
    assert not {"num_ctx", "num_gpu", "options", "mirostat", "repeat_penalty"} & set(sent)
    # whole numbers sent as JSON floats are whole numbers (Ollama converts them too)
    again = await client.generate(model=VLLM, prompt="hi", options={"num_predict": 2.0, "seed": 7.0})
    assert again.response == "Hello," and cluster.b_vllm.requests[-1]["max_tokens"] == 2

    await client.chat(model=VLLM, messages=HI, format="json")
    assert cluster.b_vllm.requests[-1]["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    await client.generate(model=VLLM, prompt="hi", format=schema)
    rf = cluster.b_vllm.requests[-1]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == schema

    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
    await client.chat(model=VLLM, messages=[{"role": "user", "content": "what is this?", "images": [png]}])
    content = cluster.b_vllm.requests[-1]["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}},
    ]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", [LLAMA, VLLM])
async def test_tool_calls_round_trip(cluster: Cluster, client_of, model: str, stream: bool) -> None:
    client = client_of(cluster.a)
    eng = cluster.a_ollama if model == LLAMA else cluster.b_vllm
    eng.tool_arguments = {"city": "Tokyo", "days": 3}
    if stream:
        parts = [
            p
            async for p in await client.chat(
                model=model, messages=[{"role": "user", "content": "weather?"}], tools=WEATHER, stream=True
            )
        ]
        calls = [tc for p in parts for tc in (p.message.tool_calls or ())]
        assert parts[-1].done is True and parts[-1].done_reason == "stop"
    else:
        answer = await client.chat(model=model, messages=[{"role": "user", "content": "weather?"}], tools=WEATHER)
        calls = list(answer.message.tool_calls or ())
    assert len(calls) == 1  # whole, in one piece, as Ollama sends them
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "Tokyo", "days": 3}  # an object, not OpenAI's string
    sent_tools = eng.requests[-1]["tools"]
    assert sent_tools[0]["function"]["name"] == "get_weather"

    # the conversation goes on: Ollama's objects and tool_name become OpenAI's strings and ids
    eng.tool_arguments = {}
    history = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo", "days": 3}}}],
        },
        {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"},
    ]
    final = await client.chat(model=model, messages=history)
    assert final.message.content == "Hello, world!"
    sent = eng.requests[-1]["messages"]
    call = sent[1]["tool_calls"][0]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"]) == {"city": "Tokyo", "days": 3}
    assert sent[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": call["id"], "name": "get_weather"}


async def test_embed_and_legacy_embeddings(cluster: Cluster, client_of) -> None:
    client = client_of(cluster.a)
    out = await client.embed(model="nomic-embed-text", input=["one two", "three"])
    assert len(out.embeddings) == 2 and all(len(v) == 8 for v in out.embeddings)
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-6) for v in out.embeddings)  # L2-normalised
    assert out.prompt_eval_count and out.total_duration > 0
    one = await client.embed(model=EMBED, input="one two")
    assert one.embeddings == out.embeddings[:1]
    legacy = await client.embeddings(model="nomic-embed-text", prompt="one two")
    assert len(legacy.embedding) == 8
    assert (await client.embeddings(model="nomic-embed-text", prompt="")).embedding == []
    vllm = await client.embed(model=VLLM, input="one two")  # an embedding from vLLM on node b
    assert math.isclose(math.hypot(*vllm.embeddings[0]), 1.0, rel_tol=1e-6)


# ----------------------------------------------------------------------- errors


async def test_unknown_models_are_404_as_ollama_words_it(cluster: Cluster, client_of) -> None:
    client = client_of(cluster.a)
    for call in (
        lambda: client.chat(model="nope", messages=HI),
        lambda: client.generate(model="nope:7b", prompt="hi"),
        lambda: client.embed(model="nope", input="x"),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            await call()
        assert info.value.status_code == 404
        assert info.value.error.startswith("model 'nope") and info.value.error.endswith("' not found")
    with pytest.raises(ollama.ResponseError) as info:
        async for _ in await client.chat(model="nope", messages=HI, stream=True):
            pass
    assert info.value.status_code == 404


async def test_management_endpoints_are_refused_and_say_what_to_use(
    cluster: Cluster, client_of, http: aiohttp.ClientSession
) -> None:
    client = client_of(cluster.a)
    seen = records_of(cluster.a)
    for call in (
        lambda: client.pull("llama3.2"),
        lambda: client.push("me/llama"),
        lambda: client.delete("llama3.2"),
        lambda: client.copy("llama3.2", "mine"),
        lambda: client.create(model="mine", from_="llama3.2"),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            await call()
        assert info.value.status_code == 403
        assert "Quorum does not manage model weights" in info.value.error
        assert cluster.a_ollama.url in info.value.error  # which engine to use instead: this machine's Ollama
    with pytest.raises(ollama.ResponseError) as info:
        async for _ in await client.pull("llama3.2", stream=True):
            pass
    assert info.value.status_code == 403
    assert {r.operation for r in seen if r.surface == "ollama"} == {"pull", "push", "delete", "copy", "create"}
    assert cluster.a_ollama.models == [LLAMA, EMBED]  # nothing changed on the machine


async def test_node_without_ollama_names_the_engines_to_use(start_node: StartNode, fake: StartFake, client_of) -> None:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    with pytest.raises(ollama.ResponseError) as info:
        await client_of(node).pull("llama3.2")
    assert info.value.status_code == 403 and "ollama pull" in info.value.error and "vLLM" in info.value.error


@pytest.mark.parametrize("model", [LLAMA, VLLM])
async def test_mid_stream_failure_raises_in_the_client(
    cluster: Cluster, client_of, http: aiohttp.ClientSession, model: str
) -> None:
    eng = cluster.a_ollama if model == LLAMA else cluster.b_vllm
    eng.fail_after_tokens = 2
    client = client_of(cluster.a)
    text = ""
    with pytest.raises(ollama.ResponseError) as info:
        async for part in await client.chat(model=model, messages=HI, stream=True):
            assert part.done is False
            text += part.message.content
    assert text == "Hello," and info.value.error

    async with http.post(cluster.a.url + "/api/generate", json={"model": model, "prompt": "hi"}) as r:
        assert r.status == 200
        lines = ndjson(await r.read())
    assert [ln.get("response") for ln in lines[:-1]] == ["Hello", ","]
    assert set(lines[-1]) == {"error"} and isinstance(lines[-1]["error"], str) and lines[-1]["error"]
    assert not any(ln.get("done") for ln in lines)


async def test_errors_are_in_ollamas_envelope(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    url = cluster.a.url
    cases = [
        ("POST", "/api/chat", b"{", 400),
        ("POST", "/api/chat", b"", 400),
        ("POST", "/api/chat", b"[1, 2]", 400),
        ("POST", "/api/chat", b'{"messages": []}', 400),  # no model
        ("POST", "/api/chat", b'{"model": 5, "messages": []}', 400),
        ("POST", "/api/chat", b'{"model": "llama3.2", "messages": [{"content": "no role"}]}', 400),
        ("POST", "/api/chat", b'{"model": "llama3.2", "messages": "hi"}', 400),
        ("POST", "/api/chat", b'{"model": "llama3.2", "messages": [], "options": {"temperature": "hot"}}', 400),
        ("POST", "/api/generate", b'{"model": "llama3.2", "prompt": "x", "format": "xml"}', 400),
        ("POST", "/api/generate", b'{"model": "llama3.2", "prompt": ["x"]}', 400),
        ("POST", "/api/generate", b'{"model": "llama3.2", "prompt": "x", "options": {"num_predict": 2.5}}', 400),
        ("POST", "/api/embed", b'{"model": "nomic-embed-text", "input": []}', 400),
        ("POST", "/api/embed", b'{"model": "nomic-embed-text", "input": 5}', 400),
        ("POST", "/api/chat", b"[" * 100_000 + b"]" * 100_000, 400),
        ("POST", "/api/chat", b'{"model": "\xff"}', 400),
        ("GET", "/api/chat", b"", 405),
        ("GET", "/api/nothing-here", b"", 404),
        ("POST", "/api/show", b'{"verbose": true}', 400),
    ]
    for method, path, body, status in cases:
        async with http.request(method, url + path, data=body) as r:
            assert r.status == status, (path, body[:60], r.status, await r.text())
            err = await r.json()
            assert set(err) == {"error"} and isinstance(err["error"], str) and err["error"], err
            assert r.headers["X-Request-Id"]
    # refusals made before any handler runs are in the envelope too
    async with http.post(url + "/api/chat", json={"model": LLAMA, "messages": HI}, headers={"X-Quorum-Hop": "1"}) as r:
        assert r.status == 401 and set(await r.json()) == {"error"}
    async with http.get(url + "/v1/nothing") as r:  # the OpenAI surface keeps its own
        assert r.status == 404 and set((await r.json())["error"]) == {"message", "type", "param", "code"}


async def test_body_over_the_limit_is_413_in_ollamas_envelope(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng = await fake("ollama")
    node = await start_node(backends=[{"kind": "ollama", "url": eng.url}], max_body_bytes=4096)
    body = json.dumps({"model": LLAMA, "messages": [{"role": "user", "content": "x" * 10_000}]})
    async with http.post(node.url + "/api/chat", data=body) as r:
        assert r.status == 413 and set(await r.json()) == {"error"}
    assert eng.requests == []


# ------------------------------------------------------------ the second listener


async def test_ollama_port_serves_the_same_api(start_node: StartNode, fake: StartFake, client_of) -> None:
    eng = await fake("ollama")
    node = await start_node(backends=[{"kind": "ollama", "url": eng.url}], ollama_port=0)
    assert node.ollama_port and node.ollama_port != node.port
    client = ollama.AsyncClient(host=f"http://127.0.0.1:{node.ollama_port}")
    try:
        assert (await client.chat(model="llama3.2", messages=HI)).message.content == "Hello, world!"
        assert LLAMA in [m.model for m in (await client.list()).models]
    finally:
        await client._client.aclose()
    port = node.ollama_port
    await node.stop()
    with pytest.raises(OSError):  # stopped with the node
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def test_ollama_port_setting_is_off_by_default_and_checked() -> None:
    from quorum_node.errors import ConfigError
    from quorum_node.settings import load_settings

    assert load_settings({}, env={}).ollama_port is None
    assert load_settings({}, env={"QUORUM_OLLAMA_PORT": "11435"}).ollama_port == 11435
    with pytest.raises(ConfigError):
        load_settings({"ollama_port": 70000}, env={})


# --------------------------------------------------------------------- fuzzing


class _NodeThread:
    """A node with a fake Ollama engine on an event loop of its own (hypothesis is synchronous)."""

    def __init__(self, tmp: Path) -> None:
        import asyncio

        from tests.conftest import node_settings
        from tests.fakes.engines import start_fake

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> tuple[FakeEngine, Node]:
            eng = await start_fake("ollama")
            node = Node(node_settings(tmp, 0, backends=[{"kind": "ollama", "url": eng.url}], max_body_bytes=1 << 20))
            await node.start()
            return eng, node

        self.engine, self.node = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def close(self) -> None:
        import asyncio

        async def stop() -> None:
            await self.node.stop()
            await self.engine.close()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_NodeThread]:
    t = _NodeThread(tmp_path_factory.mktemp("ollama-fuzz"))
    yield t
    t.close()


near_valid = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["llama3.2", LLAMA, EMBED, "nope"]), json_values)},
    optional={
        "messages": st.one_of(
            st.lists(
                st.dictionaries(
                    st.sampled_from(["role", "content", "images", "tool_calls", "tool_name", "tool_call_id"]),
                    st.one_of(st.sampled_from(["user", "assistant", "tool"]), json_values),
                    max_size=4,
                ),
                max_size=3,
            ),
            json_values,
        ),
        "prompt": json_values,
        "input": json_values,
        "system": json_values,
        "suffix": json_values,
        "raw": json_values,
        "images": json_values,
        "tools": json_values,
        "keep_alive": json_values,
        "stream": st.one_of(st.booleans(), json_values),
        "format": st.one_of(st.sampled_from(["json", ""]), json_values),
        "options": st.one_of(
            st.dictionaries(
                st.sampled_from(["num_predict", "temperature", "top_k", "stop", "seed"]), json_values, max_size=3
            ),
            json_values,
        ),
    },
)


def _post(port: int, path: str, body: bytes) -> tuple[int, bytes, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type") or ""
    finally:
        conn.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    path=st.sampled_from(["/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"]),
    body=near_valid.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200),
)
def test_bodies_never_break_the_ollama_surface(target: _NodeThread, path: str, body: bytes) -> None:
    status, data, ctype = _post(target.node.port, path, body)
    assert status not in (500, 502), data[:300]
    if status >= 400:
        err = json.loads(data)
        assert set(err) == {"error"} and isinstance(err["error"], str)
    elif ctype.startswith("application/x-ndjson"):
        lines = [json.loads(ln) for ln in data.split(b"\n") if ln]
        assert lines[-1].get("done") is True, lines[-1]
    else:
        assert isinstance(json.loads(data), dict)
