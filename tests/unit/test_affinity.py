"""Conversation keys and rendezvous ranking with bounded loads (quorum_node/affinity.py)."""

from __future__ import annotations

import collections

from hypothesis import given

from quorum_node.affinity import Assignments, Slot, conversation_key, holder_id, rank, score
from tests.support import json_values

SYSTEM = {"role": "system", "content": "You answer questions about the document."}


def turn(n: int, doc: str = "doc A") -> list[dict[str, str]]:
    """A conversation's messages at its ``n``-th turn."""
    out = [SYSTEM, {"role": "user", "content": f"{doc}: first question"}]
    for i in range(1, n):
        out += [{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": f"question {i + 1}"}]
    return out


def test_every_turn_of_a_conversation_has_its_first_turns_key() -> None:
    keys = {conversation_key({"messages": turn(n)}) for n in range(1, 6)}
    assert len(keys) == 1 and None not in keys


def test_conversations_that_open_differently_have_different_keys() -> None:
    a, b = conversation_key({"messages": turn(3, "doc A")}), conversation_key({"messages": turn(3, "doc B")})
    other_system = [{"role": "system", "content": "Be terse."}, *turn(1)[1:]]
    assert len({a, b, conversation_key({"messages": other_system})}) == 3


def test_a_named_session_wins_over_the_body_and_prompt_cache_key_over_user() -> None:
    body = {"messages": turn(2), "user": "u1", "prompt_cache_key": "chat-7"}
    assert conversation_key(body, "s1") == conversation_key({"messages": turn(1, "other")}, "s1")
    assert conversation_key(body) == conversation_key({"prompt_cache_key": "chat-7", "messages": []})
    assert conversation_key({"user": "u1", "messages": turn(1)}) != conversation_key({"messages": turn(1)})


def test_a_completion_is_keyed_by_its_prompts_opening_and_an_embedding_has_no_key() -> None:
    assert conversation_key({"prompt": "x" * 5000 + "tail 1"}) == conversation_key({"prompt": "x" * 5000 + "tail 2"})
    assert conversation_key({"input": "embed me"}) is None
    assert conversation_key({"messages": []}) is None


@given(json_values)
def test_any_body_gives_a_key_or_none_and_never_raises(value: object) -> None:
    body = value if isinstance(value, dict) else {"messages": value}
    key = conversation_key(body)
    assert key is None or len(key) == 32


def holders(n: int) -> list[Slot]:
    return [Slot((holder_id("node", f"engine{i}"),)) for i in range(n)]


def test_a_conversation_gets_the_same_holder_whatever_the_order_holders_are_listed_in() -> None:
    slots = holders(3)
    for k in range(50):
        key = f"{k:032x}"
        first = slots[rank(key, slots)[0]]
        assert slots[::-1][rank(key, slots[::-1])[0]] == first


def test_conversations_spread_over_every_holder() -> None:
    slots = holders(3)
    firsts = collections.Counter(rank(f"{k:032x}", slots)[0] for k in range(3000))
    assert all(900 <= firsts[i] <= 1100 for i in range(3)), firsts


def test_a_holder_leaving_moves_only_the_conversations_it_served() -> None:
    slots = holders(4)
    before = {k: slots[rank(f"{k:032x}", slots)[0]] for k in range(2000)}
    left = slots[:2] + slots[3:]
    after = {k: left[rank(f"{k:032x}", left)[0]] for k in range(2000)}
    moved = [k for k in before if before[k] != after[k]]
    assert moved and all(before[k] == slots[2] for k in moved)


def test_an_engine_still_loading_is_tried_last_and_a_busy_one_keeps_its_place() -> None:
    key = "0" * 32
    slots = holders(3)
    order = rank(key, slots)
    loading = list(slots)
    loading[order[0]] = Slot(slots[order[0]].ids, ready=False)
    assert rank(key, loading) == [order[1], order[2], order[0]]
    busy = list(slots)
    busy[order[0]] = Slot(slots[order[0]].ids, load=4, capacity=4)  # every slot busy: its cache is still warm
    assert rank(key, busy)[0] == order[0]


def test_a_peer_with_several_engines_ranks_by_its_best_engine() -> None:
    local = [Slot((holder_id("a", "e1"),)), Slot((holder_id("a", "e2"),))]
    peer = Slot((holder_id("b", "e1"), holder_id("b", "e2")))
    flat = local + [Slot((i,)) for i in peer.ids]
    for k in range(200):
        key = f"{k:032x}"
        winner = flat[rank(key, flat)[0]]
        grouped = ([*local, peer])[rank(key, [*local, peer])[0]]
        assert (winner in local and grouped == winner) or (winner.ids[0] in peer.ids and grouped == peer)


def test_conversations_are_placed_evenly_and_then_kept() -> None:
    placed = Assignments()
    engines = ["e0", "e1", "e2"]
    where = {}
    for k in range(12):
        key = f"{k:032x}"
        order = sorted(engines, key=lambda e: -score(key, e))  # the key's rendezvous order
        where[key] = placed.place(key, order, 1.0, now=0.0)
    assert sorted(collections.Counter(where.values()).values()) == [4, 4, 4]  # bound 1: even
    for turn in range(1, 5):  # later turns, in another order: each conversation stays where it is
        for key in reversed(list(where)):
            order = sorted(engines, key=lambda e: -score(key, e))
            assert placed.place(key, order, 1.0, now=float(turn)) == where[key]


def test_a_conversation_whose_engine_is_gone_is_placed_again_and_idle_ones_are_forgotten() -> None:
    placed = Assignments(max_keys=3, idle_s=10.0)
    assert placed.place("k1", ["e0", "e1"], 1.25, now=0.0) == "e0"
    assert placed.place("k1", ["e1"], 1.25, now=1.0) == "e1"  # e0 is gone
    for k in ("k2", "k3", "k4"):
        placed.place(k, ["e0", "e1"], 1.25, now=2.0)
    assert len(placed) == 3  # at most max_keys: the least recently used went first
    placed.place("k5", ["e0"], 1.25, now=20.0)
    assert len(placed) == 1  # the rest were idle for more than idle_s
