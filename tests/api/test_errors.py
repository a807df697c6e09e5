"""Bad input and failing engines get clear errors in the OpenAI shape, with the right status.

Every error body is ``{"error": {"message", "type", "param", "code"}}`` (so the
SDK fills ``err.type``/``err.param``/``err.code``) and carries the provenance
headers like any other answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from quorum_node.node import Node
from tests.fakes.engines import KINDS, FakeEngine
from tests.support import eventually

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]
ClientFor = Callable[..., openai.AsyncOpenAI]

MSGS = [{"role": "user", "content": "hi"}]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # the vLLM fake's model
CHAT_MODEL = {
    "ollama": "llama3.2",
    "llamacpp": "SmolLM2-135M-Instruct.Q4_1",
    "vllm": MODEL,
    "sglang": MODEL,
    "tgi": MODEL,
    "lmstudio": "qwen2.5-7b-instruct",
    "localai": "gpt-4",
    "mlx": "mlx-community/Qwen2.5-7B-Instruct-4bit",
    "openai": "gpt-4o-mini",
}


async def vllm_node(start_node: StartNode, fake: StartFake, **settings: Any) -> tuple[FakeEngine, Node]:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}], **settings)
    return eng, node


def assert_openai_error(body: Any, *, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == type_
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def assert_provenance(headers: Any, node: Node) -> None:
    assert headers["X-Quorum-Node"] == node.name
    assert headers["X-Quorum-Route"] == "local"


# ---------------------------------------------------------------- bad requests


async def test_malformed_json_is_400(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng, node = await vllm_node(start_node, fake)
    for raw in (b'{"model": "x", "messages": [', b"", b"[1, 2]", b"\xff\xfe"):
        async with http.post(
            node.url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400, raw
            assert_openai_error(await resp.json(), type_="invalid_request_error", code="invalid_json")
            assert_provenance(resp.headers, node)
    assert eng.requests == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "hot"),
        ("max_tokens", "10"),
        ("max_tokens", 0),
        ("stream", "yes"),
        ("stop", [1, 2]),
        ("tools", {"type": "function"}),
        ("messages", "hello"),
        ("model", 42),
    ],
)
async def test_wrong_field_types_name_the_param(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession, field: str, value: Any
) -> None:
    eng, node = await vllm_node(start_node, fake)
    body = {"model": MODEL, "messages": MSGS, field: value}
    async with http.post(node.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 400
        err = assert_openai_error(await resp.json(), type_="invalid_request_error", param=field)
        assert field in err["message"]
    assert eng.requests == []


async def test_wrong_types_through_the_sdk(start_node: StartNode, fake: StartFake, client_for: ClientFor) -> None:
    eng, node = await vllm_node(start_node, fake)
    client = client_for(node)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=MSGS, temperature="hot")
    assert info.value.param == "temperature" and info.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=MODEL, prompt={"not": "a prompt"})
    assert info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model=MODEL, input=[])
    assert info.value.param == "input"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=[])
    assert info.value.param == "messages"
    assert eng.requests == []


async def test_missing_model_is_400(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> None:
    _eng, node = await vllm_node(start_node, fake)
    async with http.post(node.url + "/v1/chat/completions", json={"messages": MSGS}) as resp:
        assert resp.status == 400
        assert_openai_error(
            await resp.json(), type_="invalid_request_error", param="model", code="missing_required_parameter"
        )


async def test_unknown_model_is_404_listing_the_models(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    eng, node = await vllm_node(start_node, fake)
    other = await fake("ollama")
    await node.stop()
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}, {"kind": "ollama", "url": other.url}])
    client = client_for(node)
    for call in (
        client.chat.completions.with_raw_response.create(model="gpt-7", messages=MSGS),
        client.completions.with_raw_response.create(model="gpt-7", prompt="x"),
        client.embeddings.with_raw_response.create(model="gpt-7", input="x"),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            await call
        err = info.value
        assert err.code == "model_not_found" and err.param == "model"
        assert err.type == "invalid_request_error"
        assert "gpt-7" in err.message
        for known in (MODEL, "llama3.2:latest", "nomic-embed-text:latest"):
            assert known in err.message
        assert_provenance(err.response.headers, node)
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("gpt-7")
    assert info.value.code == "model_not_found" and MODEL in info.value.message
    assert eng.requests == [] and other.requests == []


async def test_body_over_the_limit_is_413(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng, node = await vllm_node(start_node, fake, max_body_bytes=2048)
    client = client_for(node)
    big = [{"role": "user", "content": "x" * 4096}]
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=MODEL, messages=big)
    assert info.value.status_code == 413 and info.value.code == "body_too_large"
    assert "2048" in info.value.message
    async with http.post(node.url + "/v1/embeddings", json={"model": MODEL, "input": "y" * 5000}) as resp:
        assert resp.status == 413
        assert_openai_error(await resp.json(), type_="invalid_request_error", code="body_too_large")
        assert_provenance(resp.headers, node)
    # just under the limit still works
    done = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 1500}])
    assert done.choices[0].message.content == "Hello, world!"
    assert len(eng.requests) == 1


async def test_wrong_method_is_405(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> None:
    _eng, node = await vllm_node(start_node, fake)
    async with http.get(node.url + "/v1/chat/completions") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        assert_openai_error(await resp.json(), type_="invalid_request_error", code="method_not_allowed")
        assert_provenance(resp.headers, node)
    async with http.delete(node.url + "/v1/models") as resp:
        assert resp.status == 405
        assert_openai_error(await resp.json(), type_="invalid_request_error")


async def test_unknown_path_is_404(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> None:
    _eng, node = await vllm_node(start_node, fake)
    for path in ("/v1/nope", "/v2/chat/completions", "/nope"):  # "/" is the Ollama surface's (test_ollama_surface)
        async with http.post(node.url + path, json={}) as resp:
            assert resp.status == 404, path
            err = assert_openai_error(await resp.json(), type_="invalid_request_error", code="unknown_path")
            assert path in err["message"]
            assert_provenance(resp.headers, node)


# ------------------------------------------------------------- engine failures


async def test_engine_503_is_503_with_retry_after_and_the_sdk_retries(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng, node = await vllm_node(start_node, fake)
    eng.next_status = 503
    async with http.post(node.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS}) as resp:
        assert resp.status == 503
        assert float(resp.headers["Retry-After"]) > 0
        assert_openai_error(await resp.json(), type_="unavailable_error")
        assert_provenance(resp.headers, node)
    assert len(eng.requests) == 1
    # The SDK honours Retry-After and retries; the engine answers the second attempt.
    eng.next_status = 503
    client = client_for(node, max_retries=1)
    done = await client.chat.completions.create(model=MODEL, messages=MSGS)
    assert done.choices[0].message.content == "Hello, world!"
    assert len(eng.requests) == 3


async def test_engine_down_is_503_with_retry_after(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng = await fake("vllm")
    unaware = await start_node(probe_interval_s=60, backends=[{"kind": "vllm", "url": eng.url}])
    aware = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    await eng.stop_listening()

    async def noticed() -> bool:
        async with http.get(aware.url + "/ready") as r:
            return r.status == 503

    await eventually(noticed, what="node notices the engine is down")
    # Whether the node finds out on the request itself or already knows: 503, never "no such model".
    for node in (unaware, aware):
        client = client_for(node)
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model=MODEL, messages=MSGS)
        err = info.value
        assert err.status_code == 503 and err.type == "unavailable_error"
        assert float(err.response.headers["Retry-After"]) > 0
        assert_provenance(err.response.headers, node)
    await eng.resume_listening()
    client = client_for(aware)

    async def served() -> bool:
        try:
            await client.chat.completions.create(model=MODEL, messages=MSGS)
        except openai.APIStatusError:
            return False
        return True

    await eventually(served, what="engine back in service")


async def test_configured_engine_down_from_the_start_is_503(
    start_node: StartNode, fake: StartFake, client_for: ClientFor
) -> None:
    eng = await fake("ollama")
    await eng.stop_listening()
    node = await start_node(backends=[{"kind": "ollama", "url": eng.url}])
    with pytest.raises(openai.InternalServerError) as info:
        await client_for(node).chat.completions.create(model="llama3.2", messages=MSGS)
    assert info.value.status_code == 503 and "Retry-After" in info.value.response.headers


async def test_engine_still_loading_is_503_and_not_ready(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng = await fake("llamacpp", loading=True)
    node = await start_node(backends=[{"kind": "llamacpp", "url": eng.url}])
    client = client_for(node)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=MSGS)
    assert info.value.status_code == 503
    assert float(info.value.response.headers["Retry-After"]) > 0
    assert info.value.code == "engine_loading"
    async with http.get(node.url + "/ready") as resp:
        assert resp.status == 503 and "Retry-After" in resp.headers
        body = await resp.json()
        assert body["status"] == "not_ready"
        assert [e["state"] for e in body["engines"]] == ["loading"]
        assert_provenance(resp.headers, node)
    async with http.get(node.url + "/health") as resp:
        assert resp.status == 200  # alive, just not ready
    eng.loading = False

    async def ready() -> bool:
        async with http.get(node.url + "/ready") as r:
            return r.status == 200

    await eventually(ready, what="/ready turns 200 once the model is loaded")
    done = await client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=MSGS)
    assert done.choices[0].message.content == "Hello, world!"


@pytest.mark.parametrize("kind", KINDS)
async def test_engine_4xx_in_its_own_envelope_is_a_clear_400(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, kind: str
) -> None:
    eng = await fake(kind, next_status=400)
    node = await start_node(backends=[{"kind": kind, "url": eng.url}])
    client = client_for(node)
    for stream in (False, True):
        eng.next_status = 400
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=CHAT_MODEL[kind], messages=MSGS, stream=stream)
        err = info.value
        # The engine's own message, unwrapped from whatever envelope it used.
        assert err.body["message"] == "Bad Request", err.body
        assert err.type == "invalid_request_error"
        assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}
        assert_provenance(err.response.headers, node)
    assert len(eng.requests) == 2  # a client error is not retried


async def test_lmstudio_http_200_error_is_a_real_error(
    start_node: StartNode, fake: StartFake, client_for: ClientFor, http: aiohttp.ClientSession
) -> None:
    eng = await fake("lmstudio")
    node = await start_node(backends=[{"kind": "lmstudio", "url": eng.url}])
    eng.next_status = 400  # LM Studio answers it as HTTP 200 {"error": "Bad Request"}
    async with http.post(
        node.url + "/v1/chat/completions", json={"model": "qwen2.5-7b-instruct", "messages": MSGS}
    ) as resp:
        assert resp.status == 400
        err = assert_openai_error(await resp.json(), type_="invalid_request_error")
        assert err["message"] == "Bad Request"
    # A model LM Studio does not know: its 200 "Invalid model identifier" becomes an error too.
    eng.models.append("ghost-model")
    client = client_for(node)

    async def listed() -> bool:
        return "ghost-model" in [m.id async for m in client.models.list()]

    await eventually(listed, what="LM Studio's new model listed")
    eng.models.remove("ghost-model")
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="ghost-model", messages=MSGS)
    assert "Invalid model identifier" in info.value.body["message"]
    assert "ghost-model" in info.value.body["message"]


async def test_errors_never_leak_a_traceback(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng, node = await vllm_node(start_node, fake)
    cases = [
        ({"model": MODEL, "messages": [None]}, "messages[0]"),
        ({"model": MODEL, "messages": [{"content": "no role"}]}, "messages[0]"),
        ({"model": MODEL, "messages": MSGS, "stream_options": "x"}, "stream_options"),
        ({"model": "", "messages": MSGS}, "model"),
        ({"model": MODEL, "messages": MSGS, "temperature": True}, "temperature"),
    ]
    results = await asyncio.gather(*(http.post(node.url + "/v1/chat/completions", json=b) for b, _ in cases))
    for resp, (_, param) in zip(results, cases, strict=True):
        async with resp:
            assert resp.status == 400
            assert "Traceback" not in await resp.text()
            assert_openai_error(await resp.json(), type_="invalid_request_error", param=param)
    assert eng.requests == []


async def test_absurdly_nested_json_is_a_400_not_a_crash(start_node, http) -> None:
    node = await start_node()
    async with http.post(node.url + "/v1/chat/completions", data=b"[" * 100_000) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["type"] == "invalid_request_error" and "nested" in body["error"]["message"]
