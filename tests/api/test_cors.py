"""Browsers: CORS for listed origins only, no loopback trust for other pages; paths without /v1."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import openai
import pytest

from quorum_node.errors import ConfigError
from quorum_node.node import Node
from quorum_node.settings import load_settings
from tests.fakes.engines import FakeEngine

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
APP = "http://localhost:5173"
EVIL = "https://evil.example"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }


async def _setup(start_node: StartNode, fake: StartFake, **settings) -> tuple[FakeEngine, Node]:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}], **settings)
    return eng, node


async def test_allowed_origin_preflight_and_request(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng, node = await _setup(start_node, fake, cors_origins=[APP + "/"])
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
        async with http.options(node.url + path, headers=_preflight(APP)) as r:
            assert r.status == 204, path
            assert r.headers["Access-Control-Allow-Origin"] == APP
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "x-stainless-os" in r.headers["Access-Control-Allow-Headers"]
    assert eng.requests == []  # a preflight never reaches an engine
    async with http.post(node.url + "/v1/chat/completions", json=CHAT, headers={"Origin": APP}) as r:
        assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == "Hello, world!"
        assert r.headers["Access-Control-Allow-Origin"] == APP
        assert "X-Quorum-Node" in r.headers["Access-Control-Expose-Headers"]
        assert "Origin" in r.headers.getall("Vary")
    async with http.post(
        node.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"Origin": APP}
    ) as r:
        assert r.headers["Access-Control-Allow-Origin"] == APP  # streamed answers too
        assert b"[DONE]" in await r.read()
    async with http.post(
        node.url + "/v1/chat/completions", json={**CHAT, "model": "nope"}, headers={"Origin": APP}
    ) as r:
        assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == APP  # errors are readable


async def test_other_origins_are_refused_even_from_loopback(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng, node = await _setup(start_node, fake, cors_origins=[APP])
    async with http.options(node.url + "/v1/chat/completions", headers=_preflight(EVIL)) as r:
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    async with http.post(node.url + "/v1/chat/completions", json=CHAT, headers={"Origin": EVIL}) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in r.headers
    async with http.post(node.url + "/v1/messages", json={}, headers={"Origin": "null"}) as r:
        body = await r.json()
        assert r.status == 403 and body["error"]["type"] == "permission_error" and body["type"] == "error"
    # a page that sends no Origin but says it is another site's (Sec-Fetch-Site) is refused too
    async with http.post(node.url + "/v1/chat/completions", json=CHAT, headers={"Sec-Fetch-Site": "cross-site"}) as r:
        assert r.status == 403
    assert eng.requests == []
    async with http.post(node.url + "/v1/chat/completions", json=CHAT) as r:  # no Origin: SDKs, curl
        assert r.status == 200


async def test_the_nodes_own_pages_are_same_origin_but_rebound_names_are_not(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    _, node = await _setup(start_node, fake)
    async with http.post(node.url + "/v1/chat/completions", json=CHAT, headers={"Origin": node.url}) as r:
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    port = node.url.rsplit(":", 1)[1]
    rebound = f"http://attacker.example:{port}"  # a name resolved to 127.0.0.1 by its owner
    async with http.post(
        node.url + "/v1/chat/completions", json=CHAT, headers={"Origin": rebound, "Host": f"attacker.example:{port}"}
    ) as r:
        assert r.status == 403


async def test_no_origins_by_default(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> None:
    _, node = await _setup(start_node, fake)
    async with http.options(node.url + "/v1/models", headers=_preflight(APP, "GET")) as r:
        assert r.status == 403
    async with http.get(node.url + "/v1/models", headers={"Origin": APP}) as r:
        assert r.status == 403


async def test_star_allows_every_origin(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> None:
    _, node = await _setup(start_node, fake, cors_origins=["*"])
    async with http.options(node.url + "/v1/models", headers=_preflight(EVIL, "GET")) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == EVIL
    async with http.get(node.url + "/v1/models", headers={"Origin": EVIL}) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == EVIL


def test_cors_origins_from_env_and_validation() -> None:
    s = load_settings({}, env={"QUORUM_CORS_ORIGINS": "http://LOCALHOST:5173, https://app.example:443"})
    assert s.cors_origins == ("http://localhost:5173", "https://app.example")
    for bad in ("localhost:5173", "http://x/path", "ftp://x", "http://x:99999"):
        with pytest.raises(ConfigError):
            load_settings({"cors_origins": [bad]}, env={})


async def test_openai_paths_without_v1(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> None:
    _, node = await _setup(start_node, fake)
    client = openai.AsyncOpenAI(base_url=node.url, api_key="unused", max_retries=0)  # no /v1
    try:
        chat = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        assert chat.choices[0].message.content == "Hello, world!"
        assert (await client.completions.create(model=MODEL, prompt="x")).choices[0].text
        assert len((await client.embeddings.create(model=MODEL, input="x")).data) == 1
        assert [m.id for m in (await client.models.list()).data] == [MODEL]
        assert (await client.models.retrieve(MODEL)).id == MODEL
    finally:
        await client.close()
