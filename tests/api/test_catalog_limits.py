"""What a catalog may cost the node, and who sees it.

An engine that lists 20,000 models keeps its first ``max_models_per_engine``;
the listings (``/v1/models``, ``/api/tags``, ``/api/ps``) are served from one
encoding made when the catalog changes; a 404 names a few close matches, not
the catalog; model labels of the metrics are bounded; a key scoped to some
models sees only those, in every list, lookup and 404.
"""

from __future__ import annotations

import json
import re
import time

import aiohttp
import openai
import pytest
import structlog

from quorum_node.records import Draft
from tests.api.test_keys import sdk
from tests.conftest import StartFake, StartNode

MANY = [f"org/model-{i:05d}" for i in range(20_000)]
CAP = 4096  # the default of max_models_per_engine
HI = [{"role": "user", "content": "hi"}]


async def test_an_engine_listing_20000_models_keeps_the_cap_and_404s_stay_small(
    start_node: StartNode, fake: StartFake, client_for, http: aiohttp.ClientSession
) -> None:
    eng = await fake("openai", models=MANY)
    with structlog.testing.capture_logs() as logs:
        node = await start_node(backends=[{"kind": "openai", "url": eng.url}])
    client = client_for(node)

    ids = [m.id for m in (await client.models.list()).data]
    assert ids == MANY[:CAP]  # the first the engine listed; the rest dropped, not the whole list
    capped = [e for e in logs if e["event"] == "engine_models_capped"]
    assert capped and capped[0]["offered"] == 20_000 and capped[0]["kept"] == CAP
    assert capped[0]["log_level"] == "warning" and capped[0]["engine"].startswith("openai@")
    for path in ("/api/tags", "/api/ps"):
        async with http.get(node.url + path) as r:
            assert r.status == 200
            assert len((await r.json())["models"]) == CAP
    # the listings are encoded once per catalog change, not per request
    builds = node.catalog.builds
    for _ in range(3):
        async with http.get(node.url + "/v1/models") as r:
            assert r.status == 200 and len((await r.json())["data"]) == CAP
        async with http.get(node.url + "/api/tags") as r:
            assert r.status == 200
    assert node.catalog.builds == builds

    # a model past the cap is not served; a 404 is small and names a few close matches
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model=MANY[CAP], messages=HI)
    assert (await client.chat.completions.create(model=MANY[CAP - 1], messages=HI)).choices
    for ask in ("org/model-00123x", "org/Model-00123", "model-00123"):
        async with http.post(node.url + "/v1/chat/completions", json={"model": ask, "messages": HI}) as r:
            assert r.status == 404
            raw = await r.read()
        assert len(raw) < 1024, len(raw)
        message = json.loads(raw)["error"]["message"]
        named = re.findall(r"org/model-\d{5}\b", message.split("does not exist", 1)[1])
        assert 1 <= len(named) <= 5 and named[0] == "org/model-00123", message
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("org/model-00123x")
    assert len(info.value.message) < 512 and "org/model-00123," in info.value.message


async def test_metrics_keep_a_bounded_number_of_model_series(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng = await fake("openai", models=MANY[:2000])
    node = await start_node(backends=[{"kind": "openai", "url": eng.url}])
    assert node.metrics is not None
    for m in MANY[:2000]:  # 2,000 models each served once (records fed as the request path seals them)
        draft = Draft(
            request_id="r",
            node=node.name,
            method="POST",
            path="/v1/chat/completions",
            surface="openai",
            operation="chat",
            model=m,
            route="local",
        )
        node.metrics.observe(draft.build(200, time.perf_counter()))
    async with http.get(node.url + "/metrics") as r:
        text = await r.text()
    labels = set(re.findall(r'^quorum_requests_total\{[^}]*model="([^"]*)"', text, re.M))
    assert 2 <= len(labels) <= 513 and "other" in labels  # each past the bound counts under "other"
    assert (
        sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("quorum_requests_total{"))
        == 2000
    )


async def test_a_scoped_key_sees_only_its_models(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng = await fake("openai", models=["llama3.1:8b", "llama3.2:1b", "qwen2.5:7b"])
    node = await start_node(backends=[{"kind": "openai", "url": eng.url}], require_key=True)
    _, scoped = node.keys.create("llama-only", models=["llama3*"])
    _, whole = node.keys.create("everything")
    auth = {"Authorization": f"Bearer {scoped}"}

    async with sdk(node, whole) as client:
        assert [m.id for m in (await client.models.list()).data] == ["llama3.1:8b", "llama3.2:1b", "qwen2.5:7b"]
    async with sdk(node, scoped) as client:
        assert [m.id for m in (await client.models.list()).data] == ["llama3.1:8b", "llama3.2:1b"]
        assert (await client.models.retrieve("llama3.2:1b")).id == "llama3.2:1b"
        with pytest.raises(openai.NotFoundError) as info:  # as if it did not exist
            await client.models.retrieve("qwen2.5:7b")
        assert "qwen" not in info.value.message.replace("`qwen2.5:7b`", "")
        with pytest.raises(openai.NotFoundError) as info:  # in its scope, but no such model: its own names
            await client.chat.completions.create(model="llama3.3:8b", messages=HI)
        assert "llama3.1:8b" in info.value.message and "qwen" not in info.value.message
    async with http.get(node.url + "/api/tags", headers=auth) as r:
        assert [m["name"] for m in (await r.json())["models"]] == ["llama3.1:8b", "llama3.2:1b"]
    async with http.get(node.url + "/api/ps", headers=auth) as r:
        assert "qwen" not in await r.text()
    async with http.post(node.url + "/api/show", json={"model": "qwen2.5:7b"}, headers=auth) as r:
        assert r.status == 404 and await r.json() == {"error": "model 'qwen2.5:7b' not found"}
    async with http.post(node.url + "/api/show", json={"model": "llama3.2:1b"}, headers=auth) as r:
        assert r.status == 200
    async with http.post(node.url + "/api/chat", json={"model": "qwen2.5:7b", "messages": []}, headers=auth) as r:
        assert r.status == 403  # loading a model (an empty chat) is using it: the scope applies
