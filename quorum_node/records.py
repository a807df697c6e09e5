"""One record per request (DESIGN.md, Seams): the facts of a request, computed once.

Every request that reaches the node ends as one ``Record``. The request log
line, the usage ledger and the metrics are *sinks* of that record; none of
them computes a fact of its own. The outermost middleware opens a ``Draft``
for every request (``request[DRAFT]``); the auth layer fills in who called,
the surface handler what was asked, the request path where it was served and
what it cost; the draft is sealed exactly once, either by the request path just
before the answer's last byte (so a durable sink has the record before the
client has the answer) or by the middleware when the request ended otherwise.

Which requests are recorded: every request to an API surface (``surface`` set
by its handler), and every request of any kind that was refused or failed
(status >= 400). A 200 on ``/health`` or a dashboard asset is not a record.
Nor is a request refused as unauthenticated (401: no key, a wrong key or
admin token, not a member): anyone who reaches the port can send those as fast
as they like, and a ledger row and a log line each would fill the disk. They
are counted (``refuse``: the refusal sinks, the metrics) and sampled into the
log (``RefusalLog``: at most one line a second, with the number passed over).

Pure: the types and the sampling rule, with time passed in. Where records go
(the sinks, sealing) is ``control/recorder.py``.
"""

from __future__ import annotations

import msgspec

__all__ = ["Draft", "Record", "RefusalLog", "outcome_for"]


class _Facts(msgspec.Struct, kw_only=True):
    """The facts of a request: filled in as it runs (``Draft``), then sealed (``Record``)."""

    time: float = 0.0  # wall-clock seconds when it arrived
    request_id: str = ""  # the same on the entry node and on the node that served it
    node: str = ""  # this node's name (where the record was made)
    method: str = ""
    path: str = ""
    surface: str | None = None  # "openai", "ollama", "responses", "anthropic", "peer"; None: not an API request
    operation: str | None = None  # "chat", "completions", "embeddings", "generate", "messages", "models", ...
    model: str | None = None
    stream: bool = False
    key_id: str | None = None  # the API key that authorised it (its id, never the key)
    key_name: str | None = None
    peer: str | None = None  # node id of the peer that forwarded it here (None: this node is the entry node)
    remote: str | None = None
    serving_node: str | None = None  # the node whose engine generated the answer
    route: str | None = None  # "local" | "lan" | "relay"
    engine: str | None = None
    helpers: tuple[str, ...] = ()  # a sharded engine's: the nodes whose memory held its layers (cluster/sharding.py)
    status: int = 0  # HTTP status; 499 client went away; a broken stream's status is its error's
    outcome: str = "ok"  # "ok" | "rejected" (4xx) | "failed" (5xx, broken stream) | "cancelled" (client left)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_estimated: bool = False  # the engine gave no usage: completion tokens are counted chunks
    ttft_ms: float | None = None  # from its arrival: a wait for a turn (queue_ms) is part of it
    queue_ms: float | None = None  # how long it waited for a holder with room (admission.py); None: it did not
    duration_ms: float = 0.0
    attempts: int = 0
    error: str | None = None


_FACTS = _Facts.__struct_fields__


# msgspec lets a frozen Struct derive from a mutable one (the reverse of dataclasses' rule, which mypy applies
# to every dataclass_transform class, PEP 681); mypy still reads Record as frozen (assigning a field is an error).
class Record(_Facts, frozen=True, kw_only=True):  # type: ignore[misc]  # msgspec allows it: see above
    """What one request was, where it was served and what it cost."""

    @property
    def entry(self) -> bool:
        """Whether this is the entry node's record (a cluster counts each request once, by these)."""
        return self.peer is None


def outcome_for(status: int) -> str:
    if status == 499:
        return "cancelled"
    if status >= 500:
        return "failed"
    if status >= 400:
        return "rejected"
    return "ok"


class Draft(_Facts, kw_only=True, eq=False):
    """A record being filled in while its request runs (mutable, one per request): its fields are the
    record's, set by name (``draft.model = …``), so a misspelt one is an error where it is set."""

    t0: float = 0.0  # ``time.perf_counter()`` when it arrived (its duration is measured from it)
    sealed: Record | None = None

    def asked(self, surface: str, operation: str, model: str | None = None) -> None:
        """What the request asks: the surface that took it, the operation, the model it names."""
        self.surface = surface
        self.operation = operation
        self.model = model

    def build(self, status: int, now: float) -> Record:
        """The record, sealed at ``now`` (``time.perf_counter()``) with ``status`` unless one was set."""
        if not self.status:
            self.status = status
        return Record(
            **{name: getattr(self, name) for name in _FACTS if name not in _SEALED},
            status=self.status,
            outcome=outcome_for(self.status),
            duration_ms=round((now - self.t0) * 1000, 3),
        )


_SEALED = frozenset({"status", "outcome", "duration_ms"})


class RefusalLog:
    """Which unauthenticated refusals get a log line: at most one every ``interval_s``, carrying how many
    were passed over since the last one. Pure logic, constant memory whoever sends them."""

    __slots__ = ("interval_s", "_next", "_passed")

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._next = float("-inf")
        self._passed = 0

    def take(self, now: float) -> int | None:
        """None: no line for this refusal; else log it, with this many passed over before it."""
        if now < self._next:
            self._passed += 1
            return None
        self._next = now + self.interval_s
        passed, self._passed = self._passed, 0
        return passed
