"""Self-test of the fake engines: the real `openai` SDK works against them, and
each engine's documented quirk is really on the wire (reference/engines.md)."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import pytest

from tests.fakes.engines import KINDS, FakeEngine

StartFake = Callable[..., Awaitable[FakeEngine]]  # the `fake` fixture (tests/conftest.py)
EMBEDDING_KINDS = ("ollama", "llamacpp", "vllm", "sglang", "lmstudio", "localai", "openai")
# Kinds where an injected error raises through the SDK (LM Studio answers errors with 200).
STATUS_KINDS = tuple(k for k in KINDS if k != "lmstudio")


def sdk(eng: FakeEngine, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=eng.url + "/v1", api_key="x", max_retries=0, **kw)


def chat_model(eng: FakeEngine) -> str:
    return eng.models[0]


def sse_events(raw: bytes) -> list[str]:
    """Data payloads of an SSE body, per the spec (one optional space after `data:`)."""
    out = []
    for block in raw.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data:"):
                out.append(line[5:].removeprefix(" "))
    return out


async def raw_chat(http: aiohttp.ClientSession, eng: FakeEngine, **body: object) -> bytes:
    body = {"model": chat_model(eng), "messages": [{"role": "user", "content": "hi there"}], **body}
    async with http.post(eng.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        return await resp.read()


# ------------------------------------------------------------------ via the SDK


@pytest.mark.parametrize("kind", KINDS)
async def test_sdk_chat_plain_and_streamed(fake: StartFake, kind: str) -> None:
    eng = await fake(kind)
    async with sdk(eng) as client:
        models = [m.id async for m in client.models.list()]
        assert models == eng.models
        done = await client.chat.completions.create(
            model=chat_model(eng), messages=[{"role": "user", "content": "hi there"}]
        )
        assert done.choices[0].message.content == "Hello, world!"
        assert done.choices[0].finish_reason == "stop"
        assert done.usage is not None and done.usage.completion_tokens == 4

        stream = await client.chat.completions.create(
            model=chat_model(eng),
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=2,
        )
        text, finish, usage = "", None, None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        assert (text, finish) == ("Hello,", "length")
        assert usage is not None and usage.completion_tokens == 2
    assert [r.path for r in eng.requests] == ["/v1/chat/completions"] * 2
    assert eng.requests[1]["max_tokens"] == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_sdk_tool_calls(fake: StartFake, kind: str) -> None:
    eng = await fake(kind, tool_arguments={"city": "Paris"})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    msgs = [{"role": "user", "content": "weather?"}]
    async with sdk(eng) as client:
        done = await client.chat.completions.create(model=chat_model(eng), messages=msgs, tools=tools)
        call = done.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert done.choices[0].finish_reason == "tool_calls"
        stream = await client.chat.completions.create(model=chat_model(eng), messages=msgs, tools=tools, stream=True)
        args, finish = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                for tc in choice.delta.tool_calls or []:
                    args += tc.function.arguments or ""
                finish = choice.finish_reason or finish
        assert json.loads(args) == {"city": "Paris"} and finish == "tool_calls"


@pytest.mark.parametrize("kind", EMBEDDING_KINDS)
async def test_sdk_embeddings(fake: StartFake, kind: str) -> None:
    eng = await fake(kind)
    async with sdk(eng) as client:
        # The SDK sends encoding_format="base64" unless told otherwise.
        out = await client.embeddings.create(model=eng.models[-1], input=["a b", "c"])
        assert [len(d.embedding) for d in out.data] == [eng.embedding_dim] * 2


@pytest.mark.parametrize("kind", STATUS_KINDS)
async def test_next_status_raises_once(fake: StartFake, kind: str) -> None:
    eng = await fake(kind, next_status=503)
    async with sdk(eng) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=chat_model(eng), messages=[])
        done = await client.chat.completions.create(model=chat_model(eng), messages=[{"role": "user", "content": "x"}])
        assert done.choices[0].message.content == "Hello, world!"


@pytest.mark.parametrize("kind", KINDS)
async def test_mid_stream_error_reaches_sdk(fake: StartFake, kind: str) -> None:
    eng = await fake(kind, fail_after_tokens=2)
    async with sdk(eng) as client:
        stream = await client.chat.completions.create(
            model=chat_model(eng), messages=[{"role": "user", "content": "x"}], stream=True
        )
        text = ""
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
        assert text == "Hello,"


# ------------------------------------------------------------ streams and knobs


@pytest.mark.parametrize("kind", KINDS)
async def test_client_disconnect_is_counted(fake: StartFake, http: aiohttp.ClientSession, kind: str) -> None:
    eng = await fake(kind, token_delay_s=5.0)
    body = {"model": chat_model(eng), "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with http.post(eng.url + "/v1/chat/completions", json=body) as resp:
        await resp.content.readline()
        assert eng.active_streams == 1
    await asyncio.wait_for(eng.cancelled_event().wait(), 5)
    await eng.wait_until(lambda e: e.active_streams == 0)
    assert eng.cancelled == 1


async def test_drop_mode_cuts_the_connection(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("vllm", fail_after_tokens=1, fail_mode="drop")
    with pytest.raises(aiohttp.ClientPayloadError):
        await raw_chat(http, eng, stream=True)
    await eng.wait_until(lambda e: e.active_streams == 0)
    assert eng.cancelled == 0


async def test_refusing_engine_loading_and_listening(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("vllm", loading=True)
    with pytest.raises(aiohttp.ClientConnectorError):
        await http.get(eng.url + "/health")
    port = eng.port
    await eng.set_loading(False)
    async with http.get(eng.url + "/health") as resp:
        assert resp.status == 200 and await resp.read() == b""
    await eng.stop_listening()
    with pytest.raises(aiohttp.ClientConnectorError):
        await http.get(eng.url + "/health")
    await eng.resume_listening()
    async with http.get(eng.url + "/version") as resp:
        assert eng.port == port and "version" in await resp.json()


async def test_lazy_loader_waits_until_loaded(fake: StartFake) -> None:
    eng = await fake("ollama", loading=True)
    async with sdk(eng) as client:
        task = asyncio.create_task(
            client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}])
        )
        await eng.wait_until(lambda e: len(e.requests) == 1)
        assert not task.done()
        eng.loading = False
        assert (await task).choices[0].message.content == "Hello, world!"


# ------------------------------------------------------------ quirks on the wire


async def test_tgi_wire(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("tgi")
    raw = await raw_chat(http, eng, stream=True, stop=["\n"], model="tgi", stream_options={"include_usage": True})
    assert b"data:{" in raw and b"data: " not in raw and raw.rstrip().endswith(b"data:[DONE]")
    assert raw.startswith(b":\n\n")
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert {c["id"] for c in chunks} == {""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert all(d["role"] == "assistant" for d in deltas)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop_sequence"
    assert chunks[-2]["model"] == eng.models[0]
    async with http.get(eng.url + "/v1/models") as resp:
        assert (await resp.json())["data"] == [
            {"id": eng.models[0], "object": "model", "created": 0, "owned_by": eng.models[0]}
        ]
    async with http.post(eng.url + "/v1/embeddings", json={"input": "x"}) as resp:
        assert resp.status == 404 and await resp.read() == b""
    async with http.get(eng.url + "/info") as resp:
        assert (await resp.json())["router"] == "text-generation-router"
    eng.next_status = 422
    async with http.post(eng.url + "/v1/chat/completions", json={"messages": []}) as resp:
        assert resp.status == 422 and (await resp.json())["error_type"] == "validation"
    eng.api_key = "k"
    async with http.get(eng.url + "/v1/models") as resp:
        assert resp.status == 200
    async with http.post(eng.url + "/v1/chat/completions", json={}) as resp:
        assert resp.status == 401 and await resp.read() == b""
    eng.api_key, eng.fail_after_tokens = None, 1
    raw = await raw_chat(http, eng, stream=True)
    assert b'data:{"error":{"message":' in raw and b"[DONE]" not in raw


async def test_ollama_wire(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("ollama")
    async with http.get(eng.url + "/") as resp:
        assert await resp.text() == "Ollama is running"
    async with http.get(eng.url + "/api/version") as resp:
        assert "version" in await resp.json()
    async with http.post(eng.url + "/api/show", json={"model": "llama3.2"}) as resp:
        assert (await resp.json())["model_info"]["llama.context_length"] == 131072
    async with http.post(
        eng.url + "/api/chat", json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}
    ) as resp:
        assert resp.content_type == "application/x-ndjson"
        lines = [json.loads(line) for line in (await resp.read()).splitlines()]
    assert "".join(x["message"]["content"] for x in lines) == "Hello, world!"
    assert lines[-1]["done"] and lines[-1]["eval_count"] == 4
    async with http.get(eng.url + "/api/ps") as resp:
        assert (await resp.json())["models"][0]["context_length"] == 4096
    raw = await raw_chat(http, eng, model="llama3.2", stream=True)
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert chunks[0]["id"].startswith("chatcmpl-") and int(chunks[0]["id"][9:]) < 999
    assert "role" in chunks[0]["choices"][0]["delta"]
    assert "role" not in chunks[1]["choices"][0]["delta"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    async with http.post(eng.url + "/v1/chat/completions", json={"model": "nope", "messages": []}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == {
            "message": "model 'nope' not found",
            "type": "not_found_error",
            "param": None,
            "code": None,
        }
    async with http.post(eng.url + "/api/chat", json={"model": "nope"}) as resp:
        assert resp.status == 404 and await resp.json() == {"error": "model 'nope' not found"}
    eng.fail_after_tokens = 1
    async with http.post(eng.url + "/api/chat", json={"model": "llama3.2", "messages": []}) as resp:
        last = json.loads((await resp.read()).splitlines()[-1])
    assert last == {"error": "generation failed (injected by fake)"}
    eng.models = []
    async with http.get(eng.url + "/v1/models") as resp:
        assert await resp.json() == {"object": "list", "data": None}
    async with http.get(eng.url + "/nope") as resp:
        assert resp.status == 404 and await resp.text() == "404 page not found"


async def test_llamacpp_wire(fake: StartFake, http: aiohttp.ClientSession) -> None:
    eng = await fake("llamacpp")
    async with http.get(eng.url + "/v1/models") as resp:
        body = await resp.json()
        assert resp.headers["Server"] == "llama.cpp"
    assert body["models"][0]["name"] == body["data"][0]["id"] == eng.models[0]
    assert body["data"][0]["meta"]["n_ctx"] == 4096
    assert body["data"][0]["meta"]["n_ctx_train"] == 131072
    async with http.get(eng.url + "/props") as resp:
        assert (await resp.json())["default_generation_settings"]["n_ctx"] == 4096
    raw = await raw_chat(http, eng, stream=True, model="whatever")
    assert b"\n: ping\n" in b"\n" + raw
    first = json.loads(sse_events(raw)[0])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert first["model"] == eng.models[0]
    async with http.get(eng.url + "/nope") as resp:
        assert resp.headers["Server"] == "llama.cpp"
        assert await resp.json() == {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
    eng.api_key = "k"
    async with http.get(eng.url + "/health") as resp:
        assert resp.status == 200
    async with http.post(eng.url + "/v1/chat/completions", json={}) as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == 401
    async with http.post(eng.url + "/v1/chat/completions", headers={"X-Api-Key": "k"}, json={"messages": []}) as resp:
        assert resp.status == 200
    eng.loading = True
    async with http.get(eng.url + "/health") as resp:
        assert resp.status == 503 and await resp.json() == {
            "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}
        }


async def test_vllm_and_sglang_wire(fake: StartFake, http: aiohttp.ClientSession) -> None:
    vllm = await fake("vllm", api_key="k")
    async with http.get(vllm.url + "/version") as resp:
        assert resp.status == 200  # only /v1/* is guarded
    async with http.get(vllm.url + "/v1/models") as resp:
        assert resp.status == 401 and await resp.json() == {"error": "Unauthorized"}
    auth = {"Authorization": "bearer k"}
    async with http.get(vllm.url + "/v1/models", headers=auth) as resp:
        card = (await resp.json())["data"][0]
    assert card["owned_by"] == "vllm" and card["max_model_len"] == 4096
    async with http.post(
        vllm.url + "/v1/chat/completions", headers=auth, json={"model": "nope", "messages": []}
    ) as resp:
        assert resp.status == 404 and (await resp.json())["object"] == "error"
    async with http.post(
        vllm.url + "/v1/chat/completions",
        headers=auth,
        json={"model": vllm.models[0], "messages": [], "stop": ["\n"], "stream_options": {"include_usage": True}},
    ) as resp:
        assert resp.status == 400
    async with http.post(
        vllm.url + "/v1/chat/completions", headers=auth, json={"model": vllm.models[0], "messages": [], "stop": "\n"}
    ) as resp:
        assert (await resp.json())["choices"][0]["stop_reason"] == "\n"
    vllm.api_key, vllm.fail_after_tokens = None, 1
    assert sse_events(await raw_chat(http, vllm, stream=True))[-1] == "[DONE]"

    sglang = await fake("sglang", loading=True)
    async with http.get(sglang.url + "/health") as resp:
        assert resp.status == 503 and await resp.read() == b""
    sglang.loading = False
    async with http.get(sglang.url + "/get_model_info") as resp:
        assert (await resp.json())["model_path"] == sglang.models[0]
    async with http.get(sglang.url + "/v1/models") as resp:
        assert (await resp.json())["data"][0]["owned_by"] == "sglang"


async def test_lmstudio_localai_mlx_openai_wire(fake: StartFake, http: aiohttp.ClientSession) -> None:
    lms = await fake("lmstudio")
    async with http.get(lms.url + "/api/tags") as resp:
        assert resp.status == 200 and resp.headers["X-Powered-By"] == "Express"
        assert await resp.json() == {"error": "Unexpected endpoint or method. (GET /api/tags)"}
    async with http.get(lms.url + "/v1/models") as resp:
        assert all(set(d) == {"id", "object", "owned_by"} for d in (await resp.json())["data"])
    async with http.get(lms.url + "/api/v0/models") as resp:
        assert (await resp.json())["data"][0]["state"] == "not-loaded"
    lms.next_status = 500
    async with sdk(lms) as client:
        done = await client.chat.completions.create(model=lms.models[0], messages=[])
        assert done.choices is None or done.choices == []  # a 200 error parses "successfully"

    lai = await fake("localai", api_key="k")
    async with http.get(lai.url + "/readyz") as resp:
        assert resp.status == 200
    async with http.get(lai.url + "/v1/models") as resp:
        assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    async with http.get(lai.url + "/v1/models", headers={"xi-api-key": "k"}) as resp:
        assert await resp.json() == {"object": "list", "data": [{"id": "gpt-4", "object": "model"}]}
    lai.loading = True
    async with http.get(lai.url + "/readyz") as resp:
        assert resp.status == 503 and (await resp.json())["status"] == "starting"

    mlx = await fake("mlx")
    async with http.get(mlx.url + "/health") as resp:
        assert await resp.json() == {"status": "ok"}
    async with http.get(mlx.url + "/props") as resp:
        assert resp.status == 404 and await resp.read() == b"Not Found"
    raw = await raw_chat(http, mlx, stream=True, stream_options={"include_usage": True})
    assert b": keepalive" in raw
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert chunks[-1]["object"] == "chat.completion" and chunks[-1]["choices"] == []
    assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks[:-1])

    oai = await fake("openai")
    async with http.post(
        oai.url + "/v1/embeddings", json={"model": oai.models[-1], "input": "x", "encoding_format": "base64"}
    ) as resp:
        b64 = (await resp.json())["data"][0]["embedding"]
    floats = struct.unpack(f"<{oai.embedding_dim}f", base64.b64decode(b64))
    assert floats == pytest.approx(oai.embed_vector("x"), abs=1e-6)
