"""What engines say about how busy they are: a full engine gets no more requests, a busy one is not broken.

vLLM and SGLang tell, in their ``/metrics``, how many requests run and how many wait in their own queue
(``backends/gauges.py``). While some wait, the node counts the engine as full: new requests wait in the
node's queue, fair across keys, instead of behind everyone in the engine's. Ollama answers a full queue
with 503 "server busy": that is a 429 for the client, and no reason to eject the engine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from quorum_node.backends.gauges import Gauges, Queueing, capacity_of, read_gauges

MSGS = [{"role": "user", "content": "hi"}]
VLLM = Gauges("vllm:num_requests_running", "vllm:num_requests_waiting")


def sdk(node: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
async def test_an_engine_whose_own_queue_has_waiters_gets_no_more_they_wait_at_the_node(
    kind: str, start_node, fake
) -> None:
    model = "meta-llama/Llama-3.1-8B-Instruct"
    eng = await fake(kind, models=[model])
    eng.gauges = (6, 2)  # other clients keep it full: six run, two wait in its queue
    node = await start_node(backends=[{"kind": kind, "url": eng.url}], queue_timeout_s=0.4, affinity=False)
    await node.registry.refresh_once()
    (backend,) = node.registry.backends.values()
    assert (backend.capacity, backend.load) == (6, 8)
    async with sdk(node) as client:
        with pytest.raises(openai.RateLimitError) as refused:  # it waited its time at the node, then 429
            await client.chat.completions.create(model=model, messages=MSGS)
        assert refused.value.code == "queue_timeout" and int(refused.value.response.headers["Retry-After"]) >= 1
        assert eng.requests == []  # never sent to the full engine

        waiting = asyncio.create_task(client.chat.completions.create(model=model, messages=MSGS, timeout=10))
        await asyncio.sleep(0.1)
        eng.gauges = (5, 0)  # its queue drained: room again
        await node.registry.refresh_once()
        answer = await asyncio.wait_for(waiting, 10)  # the queue looks again by itself (admission.py recheck)
    assert answer.choices[0].message.content
    assert backend.capacity is None  # nothing waits: no limit known, it takes what it is sent
    assert len(eng.requests) == 1


async def test_ollamas_server_busy_is_a_429_and_does_not_eject_it(start_node, fake) -> None:
    eng = await fake("ollama", models=["llama3.2:latest"])
    node = await start_node(backends=[{"kind": "ollama", "url": eng.url}], holder_failures=2)
    eng.status_always = 503  # "server busy, please try again.  maximum pending requests exceeded"
    async with sdk(node) as client:
        for _ in range(4):  # twice the failures that would eject a failing engine
            with pytest.raises(openai.RateLimitError) as busy:
                await client.chat.completions.create(model="llama3.2", messages=MSGS)
            assert "server busy" in busy.value.message and busy.value.response.headers["Retry-After"]
        eng.status_always = None  # a moment later it has room: served at once, not after an ejection's wait
        answer = await client.chat.completions.create(model="llama3.2", messages=MSGS)
    assert answer.choices[0].message.content
    assert len(eng.requests) == 5


def test_the_gauges_are_summed_over_the_engines_models() -> None:
    page = (
        b"# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        b"# TYPE vllm:num_requests_running gauge\n"
        b'vllm:num_requests_running{engine="0",model_name="a"} 3.0\n'
        b'vllm:num_requests_running{engine="1",model_name="a"} 2.0\n'
        b"# TYPE vllm:num_requests_waiting gauge\n"
        b'vllm:num_requests_waiting{engine="0",model_name="a"} 4.0\n'
        b"# TYPE vllm:prompt_tokens_total counter\n"
        b'vllm:prompt_tokens_total{engine="0",model_name="a"} 1234.0\n'
    )
    said = read_gauges(page, VLLM)
    assert said == Queueing(running=5, waiting=4) and capacity_of(said) == 5
    assert capacity_of(Queueing(running=5, waiting=0)) is None  # nothing waits: it may take more
    assert capacity_of(Queueing(running=0, waiting=3)) is None  # still loading what waits: no number to go by


@pytest.mark.parametrize(
    "page",
    [
        b"",  # no gauges at all (SGLang without --enable-metrics answers 404 before this)
        b"<html>not metrics</html>",
        b'vllm:num_requests_running{engine="0" 3.0\n',  # a broken label set
        b"vllm:num_requests_running NaN\n",
        b"vllm:num_requests_running -1\n",
        b"vllm:num_requests_running 1e300\n",
        b"vllm:num_requests_running 1\nvllm:num_requests_waiting +Inf\n",
        b"\xff\xfe\x00garbage",
        b"# TYPE x gauge\n" + b"x 1\n" * 200_000,  # over the cap: not read
    ],
)
def test_a_hostile_metrics_page_says_nothing(page: bytes) -> None:
    assert read_gauges(page, VLLM) is None
