"""Conversations keep to one holder, chosen the same way from every node (quorum_node/affinity.py).

An engine keeps the prompt of the conversations it served in its cache; a
conversation whose turns are scattered over the holders is evaluated anew at
every turn. The real-engine tier (``tests/integration/test_affinity_llamacpp.py``)
measures the cache itself; here fake engines tell which holder got each turn.
"""

from __future__ import annotations

import collections
from typing import Any

import openai

from tests.members_support import CLUSTER, model_holders
from tests.support import eventually

MODEL = "m"
SYSTEM = {"role": "system", "content": "Answer questions about the document."}


def opening(conversation: int) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": f"Document {conversation}: ... What is it about?"}]


async def converse(clients: list[openai.AsyncOpenAI], conversations: int, turns: int) -> None:
    """``conversations`` conversations of ``turns`` turns, sent in turn order; turn t enters at clients[t % n]."""
    history = {c: opening(c) for c in range(conversations)}
    for t in range(turns):
        for c in range(conversations):
            client = clients[(t + c) % len(clients)]
            answer = await client.chat.completions.create(model=MODEL, messages=history[c])
            history[c] += [
                {"role": "assistant", "content": answer.choices[0].message.content or ""},
                {"role": "user", "content": f"And question {t + 2}?"},
            ]


def served_by(engines: dict[str, Any]) -> dict[int, set[str]]:
    """Conversation -> the engines that got any of its turns (read from what each fake engine was sent)."""
    out: dict[int, set[str]] = collections.defaultdict(set)
    for name, eng in engines.items():
        for req in eng.requests:
            first_user = next(m["content"] for m in req["messages"] if m["role"] == "user")
            out[int(first_user.split()[1].rstrip(":"))].add(name)
    return out


async def test_each_conversation_keeps_to_one_engine_of_a_node_and_every_engine_serves(
    start_node, fake, client_for
) -> None:
    engines = {f"e{i}": await fake("openai", models=[MODEL]) for i in range(3)}
    node = await start_node(backends=[{"kind": "openai", "url": e.url, "name": name} for name, e in engines.items()])
    await converse([client_for(node)], conversations=12, turns=5)
    served = served_by(engines)
    assert len(served) == 12 and all(len(names) == 1 for names in served.values()), served
    assert all(len(e.requests) >= 5 for e in engines.values())  # every engine has at least one conversation


async def test_without_affinity_a_conversation_is_scattered(start_node, fake, client_for) -> None:
    """The control: the same workload with ``affinity = false`` spreads turns over the engines (the old way)."""
    engines = {f"e{i}": await fake("openai", models=[MODEL], token_delay_s=0.001) for i in range(3)}
    node = await start_node(
        backends=[{"kind": "openai", "url": e.url, "name": name} for name, e in engines.items()], affinity=False
    )
    await converse([client_for(node)], conversations=12, turns=5)
    kept = all(len(names) == 1 for names in served_by(engines).values())
    assert not (kept and all(len(e.requests) >= 5 for e in engines.values()))


async def test_a_conversation_gets_the_same_engine_whichever_node_it_enters_at(start_cluster, client_for, http) -> None:
    members = await start_cluster([MODEL], [MODEL], [MODEL])
    for m in members:  # every node knows each peer's engines (its catalog) before the workload starts

        async def knows_engines(node: Any = m.node) -> bool:
            cards = node.cluster.model_entries()
            return len(cards) == 2 and all(c.holder for c in cards)

        await eventually(knows_engines, f"{m.name} knows its peers' engines")
    await converse([client_for(m.node) for m in members], conversations=12, turns=5)
    served = served_by({m.name: m.engine for m in members})
    assert len(served) == 12 and all(len(names) == 1 for names in served.values()), served


async def test_a_peer_failing_one_model_is_ejected_for_it_alone(start_node, fake, client_for, http) -> None:
    """Node b's engine for `beta` answers every stream with a malformed first event; its `gamma` is fine.

    Entering at a: 12 of 12 `beta` conversations are served (a's own engine), b is tried for `beta` only a
    few times, and b still serves `gamma`: the peer is ejected for the model, not as a whole.
    """
    a_engine = await fake("openai", models=["beta"])
    broken = await fake("openai", models=["beta"], fail_after_tokens=0, fail_mode="malformed_json")
    gamma = await fake("openai", models=["gamma"])
    a = await start_node(backends=[{"kind": "openai", "url": a_engine.url, "name": "a-beta"}], **CLUSTER)
    b = await start_node(
        backends=[
            {"kind": "openai", "url": broken.url, "name": "b-beta"},
            {"kind": "openai", "url": gamma.url, "name": "b-gamma"},
        ],
        **CLUSTER,
        holder_reset_s=60.0,
    )
    assert a.cluster is not None and b.cluster is not None
    a.cluster.table.add_static(f"127.0.0.1:{b.peer_port}")
    b.cluster.table.add_static(f"127.0.0.1:{a.peer_port}")

    async def converged() -> bool:
        return await model_holders(http, a) == {"beta": ["node0", "node1"], "gamma": ["node1"]}

    await eventually(converged, "a sees b's models")
    client = client_for(a)
    for c in range(12):
        stream = await client.chat.completions.create(
            model="beta", messages=[{"role": "user", "content": f"conversation {c}"}], stream=True
        )
        assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert len(broken.requests) <= 3  # b ejects its own engine after three failures in a row
    assert len(a_engine.requests) == 12
    reply = await client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content and len(gamma.requests) == 1
