"""The one interface every engine adapter satisfies, and the shapes it returns."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from ..lineage import Lineage

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "Backend",
    "BackendState",
    "Caller",
    "EMBEDDED_ENGINE",
    "JsonReply",
    "Model",
    "NATIVE_OPS",
    "Op",
    "PATHS",
    "Reply",
    "StreamReply",
    "Timeouts",
]

Op = Literal["chat", "completions", "embeddings", "responses", "messages", "count_tokens"]

#: The ops an engine may serve in the client's own API, passed through: OpenAI Responses
#: (``/v1/responses``), Anthropic Messages (``/v1/messages``) and its token count. Which an
#: engine has is learnt by a probe (``backends/native.py``); the surfaces translate for the rest.
NATIVE_OPS: frozenset[str] = frozenset({"responses", "messages", "count_tokens"})

#: Where each op is sent, on an engine's OpenAI-compatible API and on a peer's.
PATHS: dict[str, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
    "count_tokens": "/v1/messages/count_tokens",
}

#: The name the node gives the llama-server it starts itself (``node.py``).
EMBEDDED_ENGINE = "embedded-llamacpp"


class Timeouts(msgspec.Struct, frozen=True, kw_only=True):
    """How long an upstream (an engine or a peer) may take, at each stage of an attempt."""

    connect_s: float = 3.0
    first_token_s: float = 120.0
    idle_s: float = 60.0
    request_s: float = 600.0
    probe_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Timeouts:
        """The node's timeouts, as the settings give them (the one place that reads them)."""
        return cls(
            connect_s=settings.connect_timeout_s,
            first_token_s=settings.first_token_timeout_s,
            idle_s=settings.idle_timeout_s,
            request_s=settings.request_timeout_s,
            probe_s=max(settings.probe_timeout_s, 0.2),
        )


class BackendState(enum.Enum):
    READY = "ready"
    LOADING = "loading"  # the engine answers, but is not ready yet (retry later)
    DOWN = "down"  # nothing answers


class Model(msgspec.Struct, frozen=True, kw_only=True):
    """A model as one engine holds it, normalised across engines."""

    id: str  # the public id users see and send
    engine_id: str  # the exact id this engine wants in requests
    aliases: tuple[str, ...] = ()  # other names that also select it
    owned_by: str = "quorum"
    created: int = 0
    context_length: int | None = None
    loaded: bool | None = None  # None: the engine does not say
    family: str | None = None  # the architecture, as Ollama's details name it ("llama", "qwen2")
    parameter_size: str | None = None  # "3.2B", "134.52M"
    quantization: str | None = None  # "Q4_K_M", "AWQ"
    capabilities: tuple[str, ...] = ()  # empty: whatever the engine offers
    # Which model it is, whatever the engine calls it (``lineage.py``); None: only its own names select it.
    lineage: Lineage | None = None

    def names(self) -> tuple[str, ...]:
        return (self.id, self.engine_id, *self.aliases)


class Caller(msgspec.Struct, frozen=True, kw_only=True):
    """Who a request is for, as it travels to the node that serves it."""

    request_id: str  # the entry node's id for it: the serving node's record uses the same
    key_id: str | None = None  # the API key that authorised it at the entry node
    affinity: str | None = None  # its conversation's key (``affinity.py``): the serving node picks the same engine


class JsonReply(msgspec.Struct, frozen=True):
    """A whole (non-streamed) answer, already in the OpenAI shape (a native op's: in its own API's).

    ``usage`` is always in the Chat Completions shape (``prompt_tokens``, ``completion_tokens``):
    the request's record reads it, whichever API the answer is in.
    """

    payload: dict[str, Any]
    usage: dict[str, Any] | None = None


class StreamReply:
    """An open stream of OpenAI SSE event payloads (JSON bytes, no ``data:``); for a native op,
    of that API's event payloads (each names its event in its ``type``).

    Iterating yields batches: the events that arrived together, so the writer
    can send them in one write. It raises ``EngineUnavailable`` if it fails
    before its first batch and ``StreamBroken`` after. ``usage`` and
    ``chunks`` are filled in as the stream goes.
    """

    def __init__(self, events: AsyncIterator[list[bytes]], stats: StreamStats) -> None:
        self._events = events
        self.stats = stats

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        return self._events

    async def aclose(self) -> None:
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


class StreamStats:
    """What the stream taught us, for the request log line."""

    __slots__ = ("chunks", "finished", "usage", "tail")

    def __init__(self) -> None:
        self.chunks = 0  # chunks that carried generated text (or tool calls): about one token each
        self.finished = False
        self.usage: dict[str, Any] | None = None
        # The last events, when they came together with the stream's end: not yielded, so the writer can
        # send them with its own last bytes in one write (one syscall and one packet less per stream).
        self.tail: list[bytes] | None = None


Reply = JsonReply | StreamReply


class Backend(ABC):
    """One engine on this machine."""

    kind: str
    name: str  # unique label, e.g. "llamacpp@127.0.0.1:8080"
    url: str
    detected: bool  # found by auto-detection (vanishes when it stops answering)

    def __init__(self) -> None:
        self.state = BackendState.DOWN
        self.models: list[Model] = []
        # What it held when last up: a configured engine that goes down loses its
        # models, but a request for one of them is "unavailable", not "unknown".
        self.last_models: list[Model] = []
        self.in_flight = 0  # our requests on it right now
        self.engine_load: int | None = None  # what the engine reports, where it does
        # How many requests the engine serves at once, where it says (llama.cpp's slots); None: it does not.
        self.capacity: int | None = None
        self.last_error: str | None = None
        # A sharded model's engine (cluster/sharding.py): the members whose memory holds its layers
        self.helpers: tuple[str, ...] = ()

    @abstractmethod
    async def refresh(self) -> None:
        """Re-read health and the model list; never raises, sets ``state``."""

    @property
    def load(self) -> int:
        """How busy the engine is: our in-flight requests, or its own count if higher."""
        return max(self.in_flight, self.engine_load or 0)

    @abstractmethod
    def supports(self, op: Op) -> bool:
        """Whether the engine can do ``op`` at all (embeddings on TGI: no); for a ``NATIVE_OPS`` op,
        whether it serves that API itself (else the surface translates it to ``chat``)."""

    def declines(self, op: Op, body: dict[str, Any]) -> bool:
        """Whether this request, in a native op it supports, is one the engine's own API gets wrong
        (a field it drops): it is sent translated instead."""
        return False

    @abstractmethod
    async def open(self, op: Op, model: Model, body: dict[str, Any], *, stream: bool, want_usage: bool) -> Reply:
        """Send a request. Raises EngineUnavailable / EngineRejected before the first byte."""

    async def close(self) -> None:  # noqa: B027  (most adapters hold nothing: a no-op, not abstract)
        """Release what the backend holds (sessions are owned by the registry)."""
