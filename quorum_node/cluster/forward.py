"""Forwarding a request to a peer that holds its model: ``PeerTarget``, one holder the router may try.

The request is sent as Chat Completions (or the op's own OpenAI route), one
hop, over one of the peer's links (``links.py``); what comes back is read as
an engine's answer is: the stream by ``backends/stream.py``, a whole answer
by ``upstream.read_whole`` and checked, an error answer mapped by
``backends/errors.map_error_answer`` with its peer differences. Nothing here
knows which transport carried the request.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import msgspec
import structlog

from ..affinity import Slot, holder_id
from ..backends.answer import RequestHead
from ..backends.base import PATHS, Caller, JsonReply, Op, Reply, StreamReply, StreamStats, Timeouts
from ..backends.errors import check_answer, map_error_answer
from ..backends.sse import StreamNormalizer
from ..backends.stream import stream_events
from ..backends.upstream import deadline_for, read_error_body, read_whole
from ..errors import EngineUnavailable
from ..names import safe_name
from .links import PeerLink
from .messages import AFFINITY_HEADER
from .peers import Outcome, Peer, PeerTable

__all__ = ["ForwardingNode", "PeerTarget"]

_encode = msgspec.json.Encoder().encode
log = structlog.get_logger(__name__)


class ForwardingNode(Protocol):
    """What forwarding needs of this node (``ClusterService`` is one)."""

    @property
    def node_id(self) -> str: ...

    @property
    def timeouts(self) -> Timeouts: ...

    @property
    def table(self) -> PeerTable: ...

    def peer_headers(self, *, hop: str = "", origin: str = "", key_id: str = "") -> dict[str, str]:
        """The peer protocol's headers of a forwarded request."""
        ...


class PeerTarget:
    """A model held by a peer; the request is forwarded, signed, one hop, over one of its links."""

    def __init__(
        self, service: ForwardingNode, peer: Peer, link: PeerLink, *, model: str = "", engines: tuple[str, ...] = ()
    ) -> None:
        self.service = service
        self.peer = peer
        self.link = link
        self.model = model  # the model asked for: its (peer, model) breaker (none: the peer's alone)
        self.answered = False  # the peer answered (its link works): a failure is its engine's, for this model
        self.engines = engines  # its engines that hold the model, as its catalog names them (none: not said)
        self.route = link.route
        self.node = peer.info.name or peer.node_id
        self.engine = f"peer:{self.node}"
        self.helpers: tuple[str, ...] = ()  # a sharded engine's are in the record of the peer that serves it
        self._t0 = 0.0

    def speaks(self, op: Op, body: dict[str, Any]) -> bool:
        return False  # a peer is sent Chat Completions (api/passthrough.py)

    def slot(self) -> Slot:
        """The peer, as one place holding every engine it has the model on: what we have sent it now, their load
        and capacity as its health answer said them, their ids as its catalog names them."""
        peer = self.peer
        ids = tuple(holder_id(peer.node_id, e) for e in self.engines) or (holder_id(peer.node_id, ""),)
        said = [e for e in peer.load.engines if e.name in self.engines] if peer.load is not None else []
        caps = [e.capacity for e in said]
        known = bool(caps) and len(caps) == len(self.engines) and all(c is not None for c in caps)
        capacity = sum(c for c in caps if c is not None) if known else None
        return Slot(ids, peer.in_flight, capacity, reported=sum(e.load for e in said))

    def begin(self) -> bool:
        self._t0 = time.monotonic()
        self.answered = False
        return self.service.table.begin_request(self.peer.node_id, self._t0, self.model or None)

    def end(self, ok: bool | None, ttft_s: float | None) -> None:
        outcome = Outcome.ABANDONED if ok is None else (Outcome.SUCCESS if ok else Outcome.FAILURE)
        table = self.service.table
        model = self.model or None
        if table.end_request(self.peer.node_id, time.monotonic(), outcome, model=model, answered=self.answered):
            breaker = table.model_breakers.get((self.peer.node_id, self.model))
            log.warning(
                "holder_ejected",
                peer=self.node,
                model=self.model,
                for_s=breaker.reset_after_s,
                failures=breaker.failures,
            )

    async def open(
        self, op: Op, body: dict[str, Any], *, stream: bool, want_usage: bool, caller: Caller | None = None
    ) -> Reply:
        svc = self.service
        if self.model and body.get("model") != self.model:
            body = {**body, "model": self.model}  # the peer's own name for it (one catalog entry, many names)
        if stream:  # as from an engine: always ask for usage (the record counts it), strip it if unwanted
            opts = body.get("stream_options")
            body = {**body, "stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}
        headers = svc.peer_headers(
            hop="1", origin=svc.node_id, key_id=(caller.key_id or "") if caller is not None else ""
        )
        headers["Content-Type"] = "application/json"
        if caller is not None:
            headers["X-Request-Id"] = caller.request_id  # the serving node's record links to ours
            if caller.affinity:
                headers[AFFINITY_HEADER] = caller.affinity  # it picks the engine we ranked it by
        head = RequestHead(method="POST", path=PATHS[op], headers=headers, body=_encode(body))
        t = svc.timeouts
        deadline = deadline_for(t, stream=stream)  # one for the head and the first event, as for an engine
        answer = await self.link.open(head, t, deadline=deadline, stream=stream, who=self.engine)
        self.answered = True
        self.node = safe_name(answer.headers.get("X-Quorum-Node", ""), self.node)
        if answer.status >= 300:
            raw = await read_error_body(answer, deadline=deadline)
            raise map_error_answer(answer.status, raw, answer.headers, engine=self.engine, peer=True)
        now = time.monotonic()
        svc.table.on_first_token(self.peer.node_id, now - self._t0, now)
        is_sse = "text/event-stream" in answer.headers.get("Content-Type", "")
        if stream and is_sse:
            stats = StreamStats()
            norm = StreamNormalizer(clean=True, want_usage=want_usage, op=op, stats=stats)
            return StreamReply(stream_events(answer.body, norm, t, self.engine, deadline=deadline), stats)
        if stream or is_sse:
            answer.body.abort()
            raise EngineUnavailable(
                f"{self.engine} answered a {'stream' if stream else 'whole'} request with "
                f"{'no stream' if stream else 'a stream'}",
                status=502,
                engine=self.engine,
            )
        raw = await read_whole(answer, t, self.engine, deadline=deadline)
        payload = check_answer(op, raw, engine=self.engine)
        return JsonReply(payload, payload.get("usage"))
