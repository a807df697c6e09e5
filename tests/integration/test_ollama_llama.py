"""The Ollama surface on the real llama-server: the same prompt and seed give the same text as the OpenAI surface.

The real ``ollama`` client and the real ``openai`` SDK ask one node, in the
same run, for the same sampled (not greedy) completion; the texts must be
identical, streamed or not, which shows that options, messages and the answer
survive the translation both ways.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import ollama
import pytest

from quorum_node.embedded.supervisor import LlamaServerProcess

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
PROMPT = "Write a short poem about the sea."
SEED = 1234
TEMPERATURE = 0.9  # sampled: only the same seed reaching the engine makes the texts agree
TOKENS = 24

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60, func_only=True)]


@pytest.fixture
async def engine(llama_server: Path, model: Path) -> AsyncIterator[LlamaServerProcess]:
    proc = LlamaServerProcess(llama_server, model, port=0)
    await proc.start()
    try:
        await proc.wait_ready(30.0)
        yield proc
    finally:
        await proc.stop()


async def test_same_seed_same_text_through_openai_and_ollama(
    engine: LlamaServerProcess, start_node, client_for
) -> None:
    node = await start_node(backends=[{"kind": "llamacpp", "url": engine.url}])
    openai_client = client_for(node)
    messages = [{"role": "user", "content": PROMPT}]
    via_openai = await openai_client.chat.completions.create(
        model=MODEL_ID, messages=messages, seed=SEED, temperature=TEMPERATURE, max_tokens=TOKENS
    )
    expected = via_openai.choices[0].message.content
    assert expected and via_openai.usage is not None

    client = ollama.AsyncClient(host=node.url)
    try:
        options = {"seed": SEED, "temperature": TEMPERATURE, "num_predict": TOKENS, "num_ctx": 4096}
        whole = await client.chat(model=MODEL_ID, messages=messages, options=options)
        assert whole.message.content == expected
        assert whole.eval_count == via_openai.usage.completion_tokens
        assert whole.prompt_eval_count == via_openai.usage.prompt_tokens
        assert whole.done_reason == ("length" if via_openai.choices[0].finish_reason == "length" else "stop")
        assert whole.eval_duration and whole.eval_duration > 0  # llama.cpp's own timings, in nanoseconds

        parts = [p async for p in await client.chat(model=MODEL_ID, messages=messages, options=options, stream=True)]
        assert "".join(p.message.content for p in parts) == expected
        assert parts[-1].done and parts[-1].eval_count == via_openai.usage.completion_tokens

        generated = await client.generate(model=MODEL_ID, prompt=PROMPT, options=options)
        assert generated.response == expected  # /api/generate goes through the same chat template
    finally:
        await client._client.aclose()
