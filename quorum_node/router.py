"""Where does a request go? Local engine first, else a peer; retry before the first byte.

A *target* is anything that can serve a request: a local engine holding the
model, or a peer node holding it. The router orders the targets, opens the
request on the first that answers, and for streams waits for the first batch
of events before anything is committed to the client, so that every failure
up to that point can still be retried elsewhere, transparently.

A request may come in two forms: the Chat Completions body every target
serves, and the client's own API (``native``: an op of ``NATIVE_OPS`` and its
body) for the targets that speak it (``Target.speaks``). Each target gets the
form it serves best, so a retry can go from an engine that speaks the
Responses API to one that does not; ``Opened.op`` says which form answered.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import structlog

from .admission import Admission, Ticket
from .affinity import Assignments, Slot, holder_id, rank
from .backends.base import (
    NATIVE_OPS,
    Backend,
    BackendState,
    Caller,
    Model,
    Op,
    Reply,
    StreamReply,
)
from .breaker import Breakers, BreakerState, CircuitBreaker
from .catalog import Catalog, CatalogView, ModelCard, model_not_found
from .errors import (
    ApiError,
    EngineFailed,
    EngineRejected,
    EngineUnavailable,
    NodeBusy,
    NotSupported,
    Unavailable,
)
from .lineage import name_key
from .retry import RetryBudget

__all__ = ["LocalTarget", "Opened", "PeerPlan", "Router", "Target"]

log = structlog.get_logger(__name__)


class Target(Protocol):
    """Something that can serve one request."""

    engine: str  # engine label (or peer name) for logs
    node: str  # the node whose engine generates the answer
    route: str  # "local" | "lan" | "relay"
    helpers: tuple[str, ...]  # a sharded engine's: the nodes whose memory holds its layers (else ())

    async def open(
        self, op: Op, body: dict[str, Any], *, stream: bool, want_usage: bool, caller: Caller | None = None
    ) -> Reply: ...

    def speaks(self, op: Op, body: dict[str, Any]) -> bool:
        """Whether it serves this request in ``op`` (one of ``NATIVE_OPS``) itself: it gets it as the client sent it."""

    def begin(self) -> bool | None:
        """Claim a slot; False means "do not send" (a breaker is open)."""

    def end(self, ok: bool | None, ttft_s: float | None) -> None:
        """Release the slot: ok True/False, or None for no verdict (the client went away,
        or the answer said nothing about the target's health)."""

    def slot(self) -> Slot:
        """Who it is, how busy, and how much it can run at once (``affinity.py`` ranks by it)."""


class LocalTarget:
    """A model on an engine of this machine, behind its breaker (outlier ejection: ``breaker.py``)."""

    route = "local"

    def __init__(
        self,
        backend: Backend,
        model: Model,
        node: str,
        breaker: CircuitBreaker | None = None,
        *,
        node_id: str | None = None,
        capacity: int | None = None,
    ) -> None:
        self.backend = backend
        self.model = model
        self.engine = backend.name
        self.helpers = backend.helpers
        self.node = node
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.holder = holder_id(node_id if node_id is not None else node, backend.name)
        self.capacity = capacity

    def slot(self) -> Slot:
        b = self.backend
        return Slot((self.holder,), b.in_flight, self.capacity, b.state is BackendState.READY, b.engine_load or 0)

    async def open(
        self, op: Op, body: dict[str, Any], *, stream: bool, want_usage: bool, caller: Caller | None = None
    ) -> Reply:
        return await self.backend.open(op, self.model, body, stream=stream, want_usage=want_usage)

    def speaks(self, op: Op, body: dict[str, Any]) -> bool:
        return op in NATIVE_OPS and self.backend.supports(op) and not self.backend.declines(op, body)

    def begin(self) -> bool:
        if not self.breaker.allow(time.monotonic()):
            return False  # ejected (or its one probe is out): the next holder, no attempt spent
        self.backend.in_flight += 1
        return True

    def end(self, ok: bool | None, ttft_s: float | None) -> None:
        self.backend.in_flight -= 1
        now = time.monotonic()
        if ok is None:
            self.breaker.release(now)
        elif ok:
            if self.breaker.state(now) is not BreakerState.CLOSED:
                log.info("holder_readmitted", engine=self.engine, model=self.model.id)
            self.breaker.on_success(now)
        else:
            was = self.breaker.state(now)
            self.breaker.on_failure(now)
            if was is not BreakerState.OPEN and self.breaker.state(now) is BreakerState.OPEN:
                log.warning(
                    "holder_ejected",
                    engine=self.engine,
                    model=self.model.id,
                    for_s=self.breaker.reset_after_s,
                    failures=self.breaker.failures,
                )


class Opened:
    """A request that has reached its target and produced its first bytes.

    ``finish`` ends it: the target is told how it went, and the slot it held goes to the next request
    waiting for the model (``admission.py``)."""

    __slots__ = ("target", "reply", "first", "ttft_s", "attempts", "op", "queued_s", "_freed")

    def __init__(
        self,
        target: Target,
        reply: Reply,
        first: list[bytes] | None,
        ttft_s: float | None,
        attempts: int,
        op: Op = "chat",
        *,
        queued_s: float = 0.0,
        freed: Callable[[], None] | None = None,
    ):
        self.target = target
        self.reply = reply
        self.first = first
        self.ttft_s = ttft_s
        self.attempts = attempts
        self.op = op  # the form the target was sent (and the reply is in): the request's op, or its native op
        self.queued_s = queued_s  # how long it waited for a holder with room (0: none)
        self._freed = freed

    def finish(self, ok: bool | None, ttft_s: float | None) -> None:
        """The answer is over: ``ok`` as for ``Target.end``. Call it once."""
        self.target.end(ok, ttft_s)
        freed, self._freed = self._freed, None
        if freed is not None:
            freed()


class PeerPlan(list["Target"]):
    """What the cluster offers for a model: the peers to try now, best first.

    ``wait_s``: when the soonest holder that is skipped for now (breaker open,
    peer suspect) may be tried again; None if no holder is skipped. It makes a
    model whose holders are all temporarily out a 503 with Retry-After, not a 404.
    """

    def __init__(self, targets: Iterable[Target] = (), *, wait_s: float | None = None) -> None:
        super().__init__(targets)
        self.wait_s = wait_s


# Peer targets are supplied by the cluster layer, when there is one (a PeerPlan, or any sequence), for the
# model asked for and the ids its holders know it by (``CatalogView.holder_ids``: the asked name first).
PeerPlanner = Callable[[str, Op, tuple[str, ...]], Sequence[Target]]

#: Retries (a second holder for the same request) are at most 20 % of requests, plus
#: a floor of 3 banked and a trickle over time, so a failing cluster is not hammered:
#: with every upstream failing, attempts stay <= 1.2 x requests + 3 (+ 1 per 20 s).
RETRY_RATIO = 0.2
RETRY_FLOOR = 3.0
RETRY_PER_S = 0.05


def _weights(card: ModelCard) -> tuple[Any, ...] | None:
    return card.lineage.weights_key() if card.lineage is not None else None


def _pinned(name: str, cards: list[ModelCard]) -> tuple[Any, ...] | None:
    """The weights ``name`` pins, where it names one holder's (its id or alias, a GGUF stem, a quantized
    tag); None where it names the model (``llama3.2:3b``): then any quantization of it serves."""
    key = name_key(name)
    if any(c.lineage is not None and key in c.lineage.names() for c in cards):
        return None
    for c in cards:
        if name in c.names() or (c.lineage is not None and key in c.lineage.weights_names()):
            return _weights(c)
    return None


#: The room of a holder that sets no limit of its own (a peer that does not say): more than will ever wait.
_UNBOUNDED = 1 << 30


def _tally(err: ApiError, attempts: int) -> ApiError:
    """Mark an error with the number of upstream attempts made before it (for the request log)."""
    err.attempts = attempts  # type: ignore[attr-defined]
    return err


class Router:
    def __init__(
        self, registry: Any, node_name: str, *, max_attempts: int = 3, breakers: Breakers | None = None
    ) -> None:
        self.registry = registry
        self.node_name = node_name
        self.max_attempts = max_attempts
        # one breaker per (local engine, model): a holder that keeps failing is ejected, the others serve
        self.breakers = breakers if breakers is not None else Breakers()
        self.peer_planner: PeerPlanner | None = None
        self.peer_models: Callable[[], list[str]] | None = None
        self.retry_gate: Callable[[], bool] | None = None  # a second budget (the cluster's), if any
        self.catalog: Catalog | None = None  # the cluster's models, as the API lists them (node.py wires it)
        self.budget = RetryBudget(
            RETRY_RATIO, min_per_s=RETRY_PER_S, max_tokens=RETRY_FLOOR, initial_tokens=RETRY_FLOOR
        )
        self.node_id = node_name  # this node's id in holder ids (the cluster's node id, where there is one)
        # Conversations keep to one holder (affinity.py): placed among this node's engines on one holding
        # under this times the mean number of conversations; None: off
        self.affinity_bound: float | None = None
        self.assignments = Assignments()  # where this node's engines serve each conversation (affinity.py)
        self.concurrency: int | None = None  # what a holder whose engine does not say may run at once (None: any)
        self.serve_variants = False  # a name that pins weights may be served by another quantization of them
        # Where requests wait while every holder of their model is at capacity (None: they never wait)
        self.admission: Admission | None = None

    def capacity_of(self, backend: Backend) -> int | None:
        """How many requests ``backend`` runs at once: what it says, else the node's setting (None: no limit)."""
        said = backend.capacity
        return said if said is not None and said > 0 else self.concurrency

    def known_models(self) -> list[str]:
        return list(self.view().ids)

    def view(self) -> CatalogView:
        """The catalog (cached: rebuilt only when it changed), or one made now where no catalog is wired."""
        if self.catalog is not None:
            return self.catalog.view()
        entries = [ModelCard(id=m.id) for _, m in self.registry.models()]
        if self.peer_models is not None:
            entries.extend(ModelCard(id=name) for name in self.peer_models())
        return CatalogView(entries)

    def plan(self, model: str, op: Op, *, forwarded: bool, visible: CatalogView | None = None) -> list[Target]:
        """Ordered targets for ``model``; raises the right client error if there are none.

        No target, but a holder that is only out for now (its engine down or
        loading, its peer suspect or its breaker open): 503 with Retry-After,
        never 404. 404 is for models no holder has; it names a few of the
        models the caller may see (``visible``: a scoped key's view; default all).
        """
        ids = self._holder_ids(model)
        local = self._local_holders(ids)
        capable = [(b, m) for b, m in local if b.supports(op)]
        now = time.monotonic()
        targets: list[Target] = []
        wait_s: float | None = None  # the soonest an ejected holder may be tried again
        for b, m in capable:
            if b.state is BackendState.DOWN:
                continue
            key = (b.name, m.id)
            if not self.breakers.available(key, now):  # ejected: not tried, no retry spent on it
                left = self.breakers.retry_in_s(key, now)
                wait_s = left if wait_s is None else min(wait_s, left)
                continue
            targets.append(
                LocalTarget(
                    b, m, self.node_name, self.breakers.get(key), node_id=self.node_id, capacity=self.capacity_of(b)
                )
            )
        if not forwarded and self.peer_planner is not None:
            peers = self.peer_planner(model, op, ids)
            targets.extend(peers)
            peer_wait = peers.wait_s if isinstance(peers, PeerPlan) else None
            if peer_wait is not None:
                wait_s = peer_wait if wait_s is None else min(wait_s, peer_wait)
        if targets:
            return targets
        if local and not capable:
            kinds = ", ".join(sorted({b.kind for b, _ in local}))
            raise NotSupported(
                f"The model `{model}` is served by {kinds}, which does not support this endpoint",
                code="not_supported",
            )
        if self.registry.loading() or self.registry.pending:
            raise Unavailable("The engine is still loading its model; try again shortly", code="engine_loading")
        down = [b for b in self.registry.backends.values() if b.state is BackendState.DOWN]
        holders_down = [b.name for b in down if any(model in m.names() for m in b.last_models)]
        if holders_down or (down and not len(self.view())):
            raise Unavailable(
                f"The engine serving `{model}` cannot be reached right now "
                f"({', '.join(holders_down or [b.name for b in down])}); try again shortly",
                code="engine_unavailable",
            )
        if wait_s is not None:
            raise Unavailable(
                f"Every holder of `{model}` is failing right now; try again shortly",
                code="holders_unavailable",
                retry_after_s=max(1, math.ceil(wait_s)),
            )
        raise model_not_found(model, visible if visible is not None else self.view())

    def _holder_ids(self, model: str) -> tuple[str, ...]:
        """The ids holders know ``model`` by (``model`` first): one entry of the catalog, whatever each of its
        engines calls it. A name that pins weights (a holder's own id, a GGUF stem) gets only those weights,
        unless ``serve_variants``: then the other quantizations of the model come after them."""
        view = self.view()
        mid = view.find(model)
        if mid is None:
            return (model,)
        cards = view.by_id[mid]
        if len(cards) < 2 or all(c.lineage is None for c in cards):
            return view.holder_ids(model)
        pinned = _pinned(model, cards)
        exact = sorted({c.id for c in cards if pinned is None or _weights(c) == pinned} - {model})
        variants = sorted({c.id for c in cards} - set(exact) - {model}) if pinned is not None else []
        return (model, *exact, *(variants if self.serve_variants else ()))

    def _local_holders(self, ids: tuple[str, ...]) -> list[tuple[Backend, Model]]:
        """This node's engines holding any of ``ids``, each once, in the registry's order for the first id."""
        if len(ids) == 1:
            return list(self.registry.holders(ids[0]))
        seen: set[str] = set()
        out: list[tuple[Backend, Model]] = []
        for name in ids:
            for b, m in self.registry.holders(name):
                if b.name not in seen:
                    seen.add(b.name)
                    out.append((b, m))
        return out

    def speaks(self, model: str, op: Op) -> bool:
        """Whether an engine of this machine that holds ``model`` serves ``op`` natively (worth a native form)."""
        holders = self._local_holders(self._holder_ids(model))
        return any(b.supports(op) and b.state is not BackendState.DOWN for b, _ in holders)

    def _may_retry(self, now: float) -> bool:
        """Spend one retry from the budgets, or say no (spending nothing)."""
        if not self.budget.can_retry(now):
            return False
        if self.retry_gate is not None and not self.retry_gate():
            return False
        return self.budget.on_retry(now)

    async def open(
        self,
        op: Op,
        model: str,
        body: dict[str, Any],
        *,
        stream: bool,
        want_usage: bool,
        forwarded: bool,
        caller: Caller | None = None,
        native: tuple[Op, dict[str, Any]] | None = None,
        visible: CatalogView | None = None,
    ) -> Opened:
        """Open the request on the first holder that serves it.

        An ``ApiError`` raised from here carries ``attempts``: how many holders were tried.
        ``native``: the request in the client's own API, for the holders that speak it; one that
        turns out not to (its engine answered 404) is tried again with ``body``, next.

        Holders that answer ``EngineFailed`` (alive, but refused this request) are
        counted as failing only if a later holder serves it; if none does, the
        client gets the engine's error, not retryable. ``NodeBusy`` (no room on
        this node for the answer) is a 503 at once, and no holder's fault.
        """
        try:
            targets = self.plan(model, op, forwarded=forwarded, visible=visible)
        except ApiError as e:
            raise _tally(e, 0) from None
        started = time.perf_counter()  # its time to first token counts what it waits for a turn
        ticket: Ticket | None = None
        if self.admission is not None:
            ticket = await self._admit(self.admission, model, targets, caller)
        try:
            return await self._open(op, model, body, targets, ticket, started, stream, want_usage, caller, native)
        finally:
            if ticket is not None:
                ticket.release()  # not claimed: no holder took it, and the slot it was promised is passed on

    def _by_affinity(self, key: str, targets: list[Target], bound: float) -> list[Target]:
        """``targets`` in the order ``key``'s conversation tries them: its node by rendezvous hashing (the same
        from every node); where that is this one, the engine it was placed on first (``affinity.py``)."""
        slots = [t.slot() for t in targets]
        ranked = [targets[i] for i in rank(key, slots)]
        if not isinstance(ranked[0], LocalTarget):
            return ranked  # a peer's: it places the conversation among its own engines
        local = [t for t in ranked if isinstance(t, LocalTarget) and t.backend.state is BackendState.READY]
        if len(local) < 2:
            return ranked
        chosen = self.assignments.place(key, [t.holder for t in local], bound, time.monotonic())
        return sorted(ranked, key=lambda t: not (isinstance(t, LocalTarget) and t.holder == chosen))

    async def _admit(self, admission: Admission, model: str, targets: list[Target], caller: Caller | None) -> Ticket:
        """Wait, where every holder of ``model`` is at capacity, for a turn (fair across keys: ``admission.py``)."""

        def room() -> int:
            free = 0
            for t in targets:
                more = t.slot().room()
                if more is None:
                    return _UNBOUNDED  # a holder that sets no limit: it always has room
                free += more
            return free

        try:
            return await admission.admit(model, (caller.key_id if caller is not None else None) or "", room)
        except ApiError as e:
            raise _tally(e, 0) from None

    async def _open(
        self,
        op: Op,
        model: str,
        body: dict[str, Any],
        targets: list[Target],
        ticket: Ticket | None,
        started: float,
        stream: bool,
        want_usage: bool,
        caller: Caller | None,
        native: tuple[Op, dict[str, Any]] | None,
    ) -> Opened:
        if self.affinity_bound is not None and caller is not None and caller.affinity and len(targets) > 1:
            targets = self._by_affinity(caller.affinity, targets, self.affinity_bound)
        admission = self.admission
        freed = (lambda: admission.wake(model)) if admission is not None else None
        self.budget.on_request(time.monotonic())
        last: EngineUnavailable | None = None
        refused: EngineFailed | None = None
        pending: list[Target] = []  # answered EngineFailed: no verdict until we know whether another did better
        attempt = 0
        queue = list(targets)
        try:
            while queue:
                target = queue.pop(0)
                if attempt >= self.max_attempts:
                    break
                if attempt > 0 and not self._may_retry(time.monotonic()):
                    log.warning("retry_budget_exhausted", model=model)
                    break
                if target.begin() is False:
                    continue
                if ticket is not None:
                    ticket.claim()  # it runs on a holder now: the slot is the holder's
                attempt += 1
                form = native if native is not None and target.speaks(*native) else (op, body)
                try:
                    reply = await target.open(form[0], form[1], stream=stream, want_usage=want_usage, caller=caller)
                    first: list[bytes] | None = None
                    if isinstance(reply, StreamReply):
                        try:
                            first = await anext(aiter(reply))
                        except StopAsyncIteration:
                            first = []
                        except BaseException:
                            await reply.aclose()
                            raise
                    ttft = time.perf_counter() - started
                    for t in pending:  # they failed what this one could do
                        t.end(False, None)
                    pending.clear()
                    queued = ticket.waited_s if ticket is not None else 0.0
                    opened = Opened(target, reply, first, ttft, attempt, form[0], queued_s=queued, freed=freed)
                    freed = None  # the answer's ``finish`` frees its slot
                    return opened
                except EngineFailed as e:
                    pending.append(target)
                    refused = e
                    log.warning(
                        "attempt_refused", engine=target.engine, node=target.node, attempt=attempt, error=e.message
                    )
                except EngineUnavailable as e:
                    target.end(None if e.status == 429 else False, None)  # full is not broken: no verdict
                    if form[0] != op and not target.speaks(*form):  # no such API there after all
                        queue.insert(0, target)
                    last = e
                    log.warning(
                        "attempt_failed", engine=target.engine, node=target.node, attempt=attempt, error=e.message
                    )
                except EngineRejected as e:
                    target.end(True, None)
                    raise _tally(e.error, attempt) from None
                except NodeBusy as e:
                    target.end(None, None)
                    raise _tally(Unavailable(e.message, code="node_busy", retry_after_s=1), attempt) from None
                except asyncio.CancelledError:  # the client went away: not the target's fault
                    target.end(None, None)
                    raise
                except BaseException:
                    target.end(False, None)
                    raise
        finally:
            for t in pending:  # nobody did better: the request's fault, not theirs
                t.end(None, None)
            if freed is not None:  # no answer: whatever slot it held is free
                freed()
        raise _tally(self._exhausted(model, last, refused), attempt)

    @staticmethod
    def _exhausted(model: str, last: EngineUnavailable | None, refused: EngineFailed | None) -> ApiError:
        """What the client gets when no holder served the request."""
        if refused is not None:  # some holder answered the request itself: that answer is the one to give
            return refused.error
        if last is None:
            return Unavailable(
                f"Every holder of `{model}` is failing right now; try again shortly", code="holders_unavailable"
            )
        if last.status == 429:
            return ApiError(
                last.message,
                status=429,
                type_="rate_limit_error",
                code="engine_overloaded",
                headers={"Retry-After": str(max(1, math.ceil(last.retry_after_s or 1)))},
            )
        if last.status == 504:
            return ApiError(last.message, status=504, type_="timeout_error", code="engine_timeout")
        if last.status == 502:  # it answered, with something that is no answer (malformed, a redirect)
            return ApiError(last.message, status=502, type_="server_error", code="bad_gateway")
        return Unavailable(last.message, retry_after_s=max(1, math.ceil(last.retry_after_s or 1)))
