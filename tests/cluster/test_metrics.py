"""``GET /metrics``: Prometheus text that the Prometheus parser reads, with counters equal to the workload."""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.test_cluster import MESSAGES
from tests.conftest import StartFake, StartNode

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[str, dict[tuple[str, frozenset], float]]:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = await r.text()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def test_metrics_counters_match_the_workload(
    start_node: StartNode, fake: StartFake, client_for: Any, http: aiohttp.ClientSession
) -> None:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    client = client_for(node)
    prompt = completion = 0
    for _ in range(3):
        reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert reply.usage is not None
        prompt += reply.usage.prompt_tokens
        completion += reply.usage.completion_tokens
    for _ in range(2):
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        usage = [ch.usage async for ch in stream][-1]
        assert usage is not None
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
    secret_name = "client-chosen-model-name-7f3a"
    with contextlib.suppress(openai.NotFoundError):
        await client.chat.completions.create(model=secret_name, messages=MESSAGES)
    async with http.post(node.url + "/v1/chat/completions", data=b"{") as r:
        assert r.status == 400

    text, s = await scrape(http, node.url)
    assert value(s, "quorum_requests_total", surface="openai", model=MODEL, route="local", status="200") == 5
    assert value(s, "quorum_requests_total", surface="openai", model="unknown", route="none", status="404") == 1
    assert value(s, "quorum_requests_total", surface="none", model="none", route="none", status="400") == 1
    assert secret_name not in text  # a client's string never becomes a label
    assert value(s, "quorum_tokens_total", direction="in", model=MODEL) == prompt
    assert value(s, "quorum_tokens_total", direction="out", model=MODEL) == completion
    assert value(s, "quorum_time_to_first_token_seconds_count", model=MODEL, route="local") == 5
    assert value(s, "quorum_request_duration_seconds_count", model=MODEL, route="local") == 5
    assert value(s, "quorum_request_duration_seconds_bucket", model=MODEL, route="local", le="+Inf") == 5
    assert value(s, "quorum_in_flight") == 0
    assert (
        value(
            s,
            "quorum_engine_state",
            engine=node.registry.backends[next(iter(node.registry.backends))].name,
            kind="vllm",
            state="ready",
        )
        == 1
    )
    assert total(s, "quorum_engine_state", state="down") == 0
    # each record was journaled before its answer ended: in the database, or queued for it
    assert value(s, "quorum_ledger_records_written_total") + value(s, "quorum_ledger_queued") >= 5

    # An engine that goes down shows as down at the next scrape.
    await eng.close()

    async def down() -> bool:
        _, s2 = await scrape(http, node.url)
        return total(s2, "quorum_engine_state", state="down") == 1

    from tests.support import eventually

    await eventually(down, what="the engine's state is down in /metrics")


async def test_in_flight_counts_streams_being_answered(
    start_node: StartNode, fake: StartFake, client_for: Any, http: aiohttp.ClientSession
) -> None:
    eng = await fake("vllm", endless=True, token_delay_s=0.01)
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    streams = [
        await client_for(node).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) for _ in range(3)
    ]
    for st in streams:
        await anext(aiter(st))
    _, s = await scrape(http, node.url)
    assert value(s, "quorum_in_flight") == 3
    for st in streams:
        await st.close()


async def test_peer_states_and_forwarded_requests(
    start_cluster: Any, client_for: Any, http: aiohttp.ClientSession
) -> None:
    a, b = await start_cluster(["alpha"], ["beta"])
    reply = await client_for(a.node).chat.completions.create(model="beta", messages=MESSAGES)
    assert reply.usage is not None
    _, s = await scrape(http, a.node.url)
    assert value(s, "quorum_peer_state", peer=b.name, state="up") == 1
    assert value(s, "quorum_peer_state", peer=b.name, state="down") == 0
    assert value(s, "quorum_requests_total", surface="openai", model="beta", route="lan", status="200") == 1
    assert value(s, "quorum_tokens_total", direction="out", model="beta") == reply.usage.completion_tokens
    _, sb = await scrape(http, b.node.url)  # the serving node counts it too, as served locally for a peer
    assert value(sb, "quorum_requests_total", surface="openai", model="beta", route="local", status="200") == 1


async def test_metrics_can_be_turned_off(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    node = await start_node(metrics=False)
    async with http.get(node.url + "/metrics") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "metrics_off"
