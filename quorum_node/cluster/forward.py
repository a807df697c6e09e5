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

from ..backends.answer import RequestHead
from ..backends.base import PATHS, Caller, JsonReply, Op, Reply, StreamReply, StreamStats, Timeouts
from ..backends.errors import check_answer, map_error_answer
from ..backends.sse import StreamNormalizer
from ..backends.stream import stream_events
from ..backends.upstream import deadline_for, read_error_body, read_whole
from ..errors import EngineUnavailable
from ..names import safe_name
from .links import PeerLink
from .peers import Outcome, Peer, PeerTable

__all__ = ["ForwardingNode", "PeerTarget"]

_encode = msgspec.json.Encoder().encode


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

    def __init__(self, service: ForwardingNode, peer: Peer, link: PeerLink) -> None:
        self.service = service
        self.peer = peer
        self.link = link
        self.route = link.route
        self.node = peer.info.name or peer.node_id
        self.engine = f"peer:{self.node}"
        self._t0 = 0.0

    def speaks(self, op: Op, body: dict[str, Any]) -> bool:
        return False  # a peer is sent Chat Completions (api/passthrough.py)

    def begin(self) -> bool:
        self._t0 = time.monotonic()
        return self.service.table.begin_request(self.peer.node_id, self._t0)

    def end(self, ok: bool | None, ttft_s: float | None) -> None:
        outcome = Outcome.ABANDONED if ok is None else (Outcome.SUCCESS if ok else Outcome.FAILURE)
        self.service.table.end_request(self.peer.node_id, time.monotonic(), outcome)

    async def open(
        self, op: Op, body: dict[str, Any], *, stream: bool, want_usage: bool, caller: Caller | None = None
    ) -> Reply:
        svc = self.service
        if stream:  # as from an engine: always ask for usage (the record counts it), strip it if unwanted
            opts = body.get("stream_options")
            body = {**body, "stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}
        headers = svc.peer_headers(
            hop="1", origin=svc.node_id, key_id=(caller.key_id or "") if caller is not None else ""
        )
        headers["Content-Type"] = "application/json"
        if caller is not None:
            headers["X-Request-Id"] = caller.request_id  # the serving node's record links to ours
        head = RequestHead(method="POST", path=PATHS[op], headers=headers, body=_encode(body))
        t = svc.timeouts
        deadline = deadline_for(t, stream=stream)  # one for the head and the first event, as for an engine
        answer = await self.link.open(head, t, deadline=deadline, stream=stream, who=self.engine)
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
