"""Which holder serves a conversation: the same one from every node, while it has room.

A conversation's later turns repeat its earlier ones. The engine that served
them keeps their prompt in its cache (llama-server keeps one per slot) and
evaluates only what is new; sent anywhere else, the whole prompt is evaluated
again. So each request gets a *conversation key*, and the holders of its model
are ranked by rendezvous (highest random weight) hashing of that key with each
holder's id: every node computes the same order with no shared state, and a
holder that joins or leaves moves only the conversations it wins or held.

The key, the first of:

1. a session the client names: the ``X-Session-Id`` header;
2. ``prompt_cache_key`` (OpenAI's own name for this hint) or ``user``, in the body;
3. the conversation's opening: its system (or developer) messages and its first
   user message. Every later turn starts the same way, and a Responses
   ``previous_response_id`` chain reaches the router as that same history;
4. a completion's prompt, its first ``PROMPT_PREFIX`` characters.

A request with none of these (an embedding) has no key; its holders keep the
router's order.

Rendezvous hashing picks the *node*: the same from every entry node. Among
the engines of that node, a conversation is placed once and then kept
(``Assignments``): a new one goes to the first engine in its key's order that
holds fewer than ``bound`` times the mean number of conversations per engine
(consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam,
2018, counting conversations), and its later turns follow it there. A busy
engine keeps its conversations: llama-server queues what its slots cannot
run yet and keeps idle slots' prompts in RAM, so waiting for the warm engine
costs less than evaluating the whole conversation again on a cold one. Only
an engine that is gone, ejected or still loading loses them (loading ones are
tried last). Measured on real engines, spilling to an engine with a free slot
evaluated twice the prompt tokens of keeping to one (``scripts/bench-cluster``).

A holder id is ``node id/engine name``: the entry node ranks a peer by the best
of its engines' ids (the peer's catalog names them), and that peer, ranking its
own engines for the request it was forwarded, picks the same engine.

Pure logic: no I/O, nothing awaits.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

__all__ = [
    "PROMPT_PREFIX",
    "SESSION_HEADER",
    "Assignments",
    "Slot",
    "conversation_key",
    "holder_id",
    "rank",
    "score",
]

#: The header a client names its session with.
SESSION_HEADER = "X-Session-Id"
#: How much of a completion's prompt makes its key (a prompt template's opening is in it).
PROMPT_PREFIX = 4096
#: The longest session, ``prompt_cache_key`` or ``user`` taken as given (longer ones are hashed as well).
_NAME_MAX = 512

_encode = msgspec.json.Encoder().encode


def holder_id(node_id: str, engine: str) -> str:
    """The id a holder is ranked by: the same string on every node."""
    return f"{node_id}/{engine}"


def conversation_key(body: Mapping[str, Any], session: str | None = None) -> str | None:
    """The key of the conversation ``body`` belongs to (a hex digest), or None where it has none."""
    h = hashlib.blake2b(digest_size=16)
    if session:
        h.update(b"session\0" + session[:_NAME_MAX].encode("utf-8", "replace"))
        return h.hexdigest()
    for field in ("prompt_cache_key", "user"):
        named = body.get(field)
        if isinstance(named, str) and named:
            h.update(field.encode() + b"\0" + named[:_NAME_MAX].encode("utf-8", "replace"))
            return h.hexdigest()
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        opening = _opening(messages)
        if opening:
            h.update(b"messages\0")
            for message in opening:
                h.update(_encode(message))
            return h.hexdigest()
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        h.update(b"prompt\0" + prompt[:PROMPT_PREFIX].encode("utf-8", "replace"))
        return h.hexdigest()
    return None


def _opening(messages: list[Any]) -> list[tuple[Any, Any]]:
    """The system and developer messages before the first user message, and that message (role, content)."""
    out: list[tuple[Any, Any]] = []
    for m in messages:
        if not isinstance(m, dict):
            return []
        role = m.get("role")
        if role in ("system", "developer"):
            out.append((role, m.get("content")))
        elif role == "user":
            out.append((role, m.get("content")))
            return out
        else:
            return out  # no user turn before it: what came first is the opening
    return out


def score(key: str, holder: str) -> int:
    """``holder``'s rendezvous weight for ``key``: the highest serves it."""
    digest = hashlib.blake2b(f"{key}\0{holder}".encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Slot(msgspec.Struct, frozen=True):
    """One place the router may send a request: a local engine, or a peer (all of its engines that hold the model).

    ``ids``: the holder ids it stands for; ``load``: this node's requests on it now (exact); ``reported``: its
    requests as it last said them, everyone's (a poll or a health answer: seconds old); ``capacity``: how many
    it runs at once (None: unknown, no limit of its own).
    """

    ids: tuple[str, ...]
    load: int = 0
    capacity: int | None = None
    ready: bool = True  # False: its engine is still loading (tried only after the ready ones)
    reported: int = 0

    @property
    def busy(self) -> int:
        """How many it runs now, best known: ours, or what it said if more."""
        return max(self.load, self.reported)

    def room(self) -> int | None:
        """How many more it may start now (None: it sets no limit of its own): the admission queue's measure."""
        return None if self.capacity is None else max(0, self.capacity - self.busy)


def rank(key: str, slots: Sequence[Slot]) -> list[int]:
    """The order (indices into ``slots``) to try them in for ``key``: by rendezvous weight, ready ones first."""
    weights = [max((score(key, i) for i in s.ids), default=0) for s in slots]
    return sorted(range(len(slots)), key=lambda i: (not slots[i].ready, -weights[i], i))


class Assignments:
    """Where this node has placed the conversations its engines serve: key -> holder id, most recent last.

    Bounded (``max_keys``, least recently used out first) and forgetful (a conversation idle for
    ``idle_s`` is forgotten): what it holds is a cache of placements, never needed for correctness.
    """

    def __init__(self, *, max_keys: int = 65536, idle_s: float = 1800.0) -> None:
        self.max_keys = max_keys
        self.idle_s = idle_s
        self._placed: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._count: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._placed)

    def place(self, key: str, holders: Sequence[str], bound: float, now: float) -> str:
        """The holder of ``holders`` (in ``key``'s rendezvous order) that serves ``key``: where it was placed,
        if that one is still among them, else the first holding fewer than ``bound`` times the mean."""
        self._expire(now)
        placed = self._placed.get(key)
        if placed is not None and placed[0] in holders:
            self._placed[key] = (placed[0], now)
            self._placed.move_to_end(key)
            return placed[0]
        total = sum(self._count[h] for h in holders)
        share = math.ceil(bound * (total + 1) / len(holders))
        chosen = next((h for h in holders if self._count[h] + 1 <= share), holders[0])
        self._drop(key)
        self._placed[key] = (chosen, now)
        self._count[chosen] += 1
        while len(self._placed) > self.max_keys:
            self._drop(next(iter(self._placed)))
        return chosen

    def _drop(self, key: str) -> None:
        placed = self._placed.pop(key, None)
        if placed is not None:
            self._count[placed[0]] -= 1
            if self._count[placed[0]] <= 0:
                del self._count[placed[0]]

    def _expire(self, now: float) -> None:
        while self._placed:
            key, (_, used) = next(iter(self._placed.items()))
            if now - used < self.idle_s:
                return
            self._drop(key)
