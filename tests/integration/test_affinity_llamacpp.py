"""Conversations keep to one engine, so its prompt cache serves their later turns: real llama-servers (issue 21).

Each conversation opens with its own short document and goes on for a few
turns, every answer appended to its history. An engine that served a turn keeps
that prompt in a slot and evaluates only what is new at the next; any other
engine evaluates the whole prompt again. What each engine evaluated is read
from the engines themselves (``llamacpp:prompt_tokens_total`` of ``/metrics``),
what was sent from the answers' ``usage.prompt_tokens``; the node is only the
way in. ``tests/cluster/test_affinity_cluster.py`` checks the routing itself
with fake engines; ``scripts/bench-cluster`` is this at the issue's scale.

The conversations of a turn are sent together (the way a client with several
users does), turns in order. With ``affinity`` off, the node picks the least
loaded engine, so the turns of a conversation land wherever there is room.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from quorum_node.embedded.supervisor import LlamaServerProcess
from quorum_node.node import Node
from tests.conversations import opening, sentences
from tests.members_support import CLUSTER
from tests.support import eventually

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
READY_TIMEOUT_S = 30.0
ENGINES = ("e0", "e1", "e2")
# Conversations of the test (the seeds of their documents): for the node "node0" and the engines above these
# are placed 2/2/2 by the node (quorum_node/affinity.py places new conversations evenly), so every engine
# is some conversation's home.
CONVERSATIONS = (0, 1, 2, 5, 7, 13)
TURNS = 3
MAX_TOKENS = 8
DOC_WORDS = 140  # about 200 tokens with the template: short, for two cores

# func_only: the limit covers the test body, not the session fixtures (a cold cache compiles llama.cpp).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(90, func_only=True)]


def document(seed: int, words: int = DOC_WORDS) -> str:
    """A deterministic text of its own for each seed (the opening of one conversation), about ``words`` long."""
    out: list[str] = []
    for sentence in sentences(seed):
        out.append(sentence)
        if sum(len(s.split()) for s in out) >= words:
            return " ".join(out)
    raise AssertionError("unreachable: sentences never ends")


# --- engines and their counters ----------------------------------------------------


@pytest.fixture
async def engines(llama_server: Path, model: Path) -> AsyncIterator[Callable[[int], Awaitable[list[str]]]]:
    """Start ``n`` ready llama-servers with ``/metrics`` (URLs); every one is stopped afterwards."""
    started: list[LlamaServerProcess] = []

    async def _start(n: int) -> list[str]:
        procs = [
            # one thread each: three engines share two cores; four slots (llama-server's own default)
            LlamaServerProcess(llama_server, model, ctx_size=4096, threads=1, extra_args=["--metrics", "-np", "4"])
            for _ in range(n)
        ]
        started.extend(procs)
        for p in procs:
            await p.start()
        for p in procs:
            await p.wait_ready(READY_TIMEOUT_S)
        return [p.url for p in procs]

    yield _start
    for p in started:
        await p.stop()


async def evaluated(http: aiohttp.ClientSession, url: str) -> int:
    """The prompt tokens an engine has evaluated so far (those it took from its cache are not counted)."""
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("llamacpp:prompt_tokens_total "):
            return int(float(line.split()[1]))
    raise AssertionError(f"no llamacpp:prompt_tokens_total in {url}/metrics")


@dataclass
class Run:
    """What one workload sent: its prompt tokens, each conversation's first prompt, the nodes that served each."""

    sent: int = 0
    first: dict[int, int] = field(default_factory=dict)
    served: dict[int, set[str]] = field(default_factory=lambda: {c: set() for c in CONVERSATIONS})


async def converse(entries: Sequence[openai.AsyncOpenAI]) -> Run:
    """The workload: turn t of every conversation enters at ``entries[t % len(entries)]``, the conversations of
    a turn together, each answer and a new question appended to its conversation."""
    history = {c: opening(document(c)) for c in CONVERSATIONS}
    run = Run()

    async def turn(c: int, t: int) -> None:
        raw = await entries[t % len(entries)].chat.completions.with_raw_response.create(
            model=MODEL_ID, messages=history[c], max_tokens=MAX_TOKENS, temperature=0
        )
        answer = raw.parse()
        assert answer.usage is not None
        run.sent += answer.usage.prompt_tokens
        run.first.setdefault(c, answer.usage.prompt_tokens)
        run.served[c].add(raw.headers["X-Quorum-Node"])
        history[c] = [
            *history[c],
            {"role": "assistant", "content": answer.choices[0].message.content or ""},
            {"role": "user", "content": f"And what does it say about point {t + 2}?"},
        ]

    for t in range(TURNS):
        async with asyncio.TaskGroup() as tg:
            for c in CONVERSATIONS:
                tg.create_task(turn(c, t))
    return run


async def one_node_run(
    engines: Callable[[int], Awaitable[list[str]]], start_node: Any, client_for: Any, http: Any, **settings: Any
) -> tuple[Run, list[int]]:
    """The workload through one node in front of three fresh engines: what it sent, what each engine evaluated."""
    urls = await engines(len(ENGINES))
    node = await start_node(
        backends=[{"kind": "llamacpp", "url": u, "name": n} for u, n in zip(urls, ENGINES, strict=True)], **settings
    )
    before = [await evaluated(http, u) for u in urls]  # the node's probes evaluate nothing, but be exact
    run = await converse([client_for(node)])
    return run, [await evaluated(http, u) - b for u, b in zip(urls, before, strict=True)]


# --- one node, three engines -------------------------------------------------------


async def test_later_turns_hit_the_engines_cache_every_engine_serves_and_without_affinity_not(
    engines, start_node, client_for, http
) -> None:
    run, work = await one_node_run(engines, start_node, client_for, http)

    # ideal: each opening evaluated once, then only what each turn adds (about 0.35 of what is sent here);
    # every turn somewhere new would be all of it
    assert sum(work) <= 0.5 * run.sent, (work, run.sent)
    # every engine evaluated at least one whole opening: it is some conversation's home
    assert min(work) >= min(run.first.values()), (work, run.first)

    # the control: the same workload with ``affinity = false`` (the routing before it), on fresh engines
    off, work_off = await one_node_run(engines, start_node, client_for, http, affinity=False)

    assert off.sent == pytest.approx(run.sent, rel=0.05)  # the same workload (the answers may differ a little)
    assert sum(work_off) >= 1.5 * sum(work), (work_off, work)


# --- three nodes, one engine each -----------------------------------------------------


async def test_a_conversation_keeps_its_engine_whichever_node_each_turn_enters_at(
    engines, start_node, client_for, http
) -> None:
    urls = await engines(len(ENGINES))
    nodes: list[Node] = [
        await start_node(backends=[{"kind": "llamacpp", "url": u, "name": n}], **CLUSTER)
        for u, n in zip(urls, ENGINES, strict=True)
    ]
    for a in nodes:
        assert a.cluster is not None
        for b in nodes:
            if b is not a:
                a.cluster.table.add_static(f"127.0.0.1:{b.peer_port}")
    for n in nodes:  # every node knows its peers' engines (their catalogs name them) before the workload

        async def knows_engines(node: Node = n) -> bool:
            assert node.cluster is not None
            cards = node.cluster.model_entries()
            return len(cards) == 2 and all(c.holder for c in cards)

        await eventually(knows_engines, f"{n.name} knows its peers' engines", timeout_s=15)
    before = [await evaluated(http, u) for u in urls]

    run = await converse([client_for(n) for n in nodes])

    work = [await evaluated(http, u) - b for u, b in zip(urls, before, strict=True)]
    # each conversation was served by one node (so one engine), whichever node its turns entered at
    assert all(len(names) == 1 for names in run.served.values()), run.served
    assert sum(work) <= 0.5 * run.sent, (work, run.sent)
