"""The OpenAI Responses API (``/v1/responses``): passed through, or translated to Chat Completions.

Every engine answers: a Responses request becomes one Chat Completions call
(``Call(op="chat")``) that goes through the one request path (router, retries,
failure contract, record), and the answer is written back as a Response
object, or as the Responses stream (``response.created`` …
``response.output_text.delta`` … ``response.completed``).

Where an engine of this machine that holds the model serves
``/v1/responses`` itself, the call also carries the client's own request
(``api/passthrough.py``), and that engine gets it as sent, except for what
the node keeps itself: the model is the engine's id, ``previous_response_id``
is replaced by the conversation it names (the stored items, in front of
``input``), and ``store`` is false (the node stores, engines need not). Its
answer comes back in its own words (reasoning items, its usage), with the
node's response id and the request's echo where the engine leaves fields
out, and is stored like a translated one. The request is checked, and
refused, as below either way.

Translated: ``input`` (a string, or items: messages with ``input_text`` /
``output_text`` / ``input_image`` parts, ``function_call``,
``function_call_output``; ``reasoning`` items are dropped), ``instructions``
(a system message, not carried over by ``previous_response_id``, as OpenAI
does), function ``tools``, ``tool_choice``, ``parallel_tool_calls``,
``max_output_tokens``, ``temperature``, ``top_p``, ``text.format``
(``text``, ``json_object``, ``json_schema``), ``stream``, ``store``,
``previous_response_id``, ``metadata`` (echoed). Accepted and ignored: ``user``,
``safety_identifier``, ``prompt_cache_key``, ``service_tier``, ``truncation``,
``include``, ``reasoning``, ``stream_options``. Refused with a 400 naming
the field: built-in tools (web search, file search, computer use, MCP …),
``background``, ``conversation``, ``prompt``, ``input_file`` and
``item_reference`` inputs, images by ``file_id``.

Stored responses (``store`` is true by default) live in memory on the node
that answered, in a ``ResponseStore`` bounded by count, bytes and age (see
``Settings.responses_store_*``); they serve ``GET``/``DELETE
/v1/responses/{id}`` and ``previous_response_id``, and are visible only to
the API key that created them. A stored conversation is Responses items
(the inputs, then the outputs), so it continues on either path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import msgspec
from aiohttp import web

from ..backends.native import FINAL, LIFECYCLE
from ..errors import BadRequest, NotFound
from .body import read_body
from .chunks import decode_chunk, new_id, sse, tool_calls_of, usage_counts
from .passthrough import NativeStream, frame, native_form
from .responses_wire import ResponsesRequest, parse_request, to_chat
from .state import DRAFT, SETTINGS
from .surface import Call, StreamEncoder, Surface, serve

__all__ = ["RESPONSES", "ResponseStore", "ResponsesSurface", "STORE", "routes", "to_chat"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode


# ------------------------------------------------------------------ the store


class Stored(msgspec.Struct, frozen=True, kw_only=True):
    response: bytes  # the Response object, as GET answers it
    history: bytes  # the conversation so far, as Responses items (JSON): what previous_response_id continues
    owner: str | None  # the API key that created it; None: no key (loopback, cluster)
    at: float


class ResponseStore:
    """Stored responses, bounded: at most ``max_entries``, ``max_bytes`` in all, ``ttl_s`` old.

    Pure logic (no I/O, time passed in): the least recently stored go first.
    """

    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, rid: str, stored: Stored, now: float) -> None:
        size = len(stored.response) + len(stored.history)
        if size > self.max_bytes or self.max_entries < 1:
            return  # larger than the whole store: not kept (GET and previous_response_id say not found)
        self.pop(rid)
        self._items[rid] = stored
        self.bytes += size
        self._expire(now)
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self._drop_oldest()

    def get(self, rid: str, owner: str | None, now: float) -> Stored | None:
        self._expire(now)
        s = self._items.get(rid)
        if s is None or s.owner != owner:
            return None
        return s

    def pop(self, rid: str) -> Stored | None:
        s = self._items.pop(rid, None)
        if s is not None:
            self.bytes -= len(s.response) + len(s.history)
        return s

    def _drop_oldest(self) -> None:
        _, s = self._items.popitem(last=False)
        self.bytes -= len(s.response) + len(s.history)

    def _expire(self, now: float) -> None:
        limit = now - self.ttl_s
        while self._items:
            first = next(iter(self._items.values()))
            if first.at > limit:
                break
            self._drop_oldest()


STORE: web.AppKey[ResponseStore] = web.AppKey("responses_store", ResponseStore)


# ---------------------------------------------------------------- the request


class Exchange(msgspec.Struct, kw_only=True):
    """One Responses request in flight: what its answer echoes and what is stored after."""

    id: str
    created_at: int
    req: ResponsesRequest
    items: list[dict[str, Any]]  # the conversation so far, this request's input included (Responses items)
    store: ResponseStore | None  # None: store=false
    owner: str | None


class ResponsesCall(Call, kw_only=True):
    exchange: Exchange | None = None


def _usage(usage: Any) -> dict[str, Any]:
    p, c = usage_counts(usage)
    return {
        "input_tokens": p,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": c,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": p + c,
    }


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [_text_part(text)] if status == "completed" else [],
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, args: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": args,
        "status": status,
    }


def _response(
    ex: Exchange,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    finish: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    req = ex.req
    incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
    if incomplete is not None and status == "completed":
        status = "incomplete"
    return {
        "id": ex.id,
        "object": "response",
        "created_at": ex.created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": req.model,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "store": ex.store is not None,
        "temperature": req.temperature,
        "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [],
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": usage,
        "metadata": req.metadata or {},
    }


def _keep(ex: Exchange, response: dict[str, Any], output: list[dict[str, Any]]) -> None:
    if ex.store is None:
        return
    history = ex.items + [it for it in output if isinstance(it, dict)]
    ex.store.put(
        ex.id,
        Stored(response=_encode(response), history=_encode(history), owner=ex.owner, at=time.monotonic()),
        time.monotonic(),
    )


#: Fields of an engine's Response the node answers in its own words: its id, and what the engine was
#: not told (the node keeps the conversation and the store).
_NODE_FIELDS = frozenset({"id", "created_at", "store", "previous_response_id"})


def _from_engine(ex: Exchange, engine: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """An engine's Response as the node answers it: the node's id, the engine's facts, the request's
    echo where the engine leaves a field out (llama-server gives little more than output and usage)."""
    output = engine.get("output")
    out = _response(ex, status=status, output=output if isinstance(output, list) else [], usage=None)
    out.update((k, v) for k, v in engine.items() if v is not None and k not in _NODE_FIELDS)
    # llama-server calls an answer cut by max_output_tokens "completed"; a translated one is "incomplete", as
    # OpenAI's is: one answer everywhere (an agent's run that raises on one must raise on every node)
    limit, usage = ex.req.max_output_tokens, out.get("usage")
    spent = usage.get("output_tokens") if isinstance(usage, dict) else None
    if out.get("status") == "completed" and limit is not None and type(spent) is int and spent >= limit:
        out["status"] = "incomplete"
        out["incomplete_details"] = {"reason": "max_output_tokens"}
    return out


class ResponsesSurface(Surface):
    """Errors in the OpenAI envelope (the base); answers as Response objects and Responses events."""

    name = "responses"

    def answer(self, call: Call, payload: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        ex = call.exchange  # type: ignore[attr-defined]
        choices = payload.get("choices")
        first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        message = first.get("message")
        if not isinstance(message, dict):
            message = {}
        output: list[dict[str, Any]] = []
        text = message.get("content")
        if isinstance(text, str) and text:
            output.append(_message_item(new_id("msg_"), text))
        for call_id, name, args in tool_calls_of(message):
            output.append(_call_item(new_id("fc_"), call_id, name, args))
        finish = first.get("finish_reason")
        response = _response(
            ex,
            status="completed",
            output=output,
            usage=_usage(payload.get("usage")),
            finish=finish if isinstance(finish, str) else None,
        )
        _keep(ex, response, output)
        return web.Response(body=_encode(response), content_type="application/json", headers=headers)

    def encoder(self, call: Call) -> StreamEncoder:
        return ResponsesStream(call.exchange)  # type: ignore[attr-defined]

    def native_answer(self, call: Call, payload: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        ex = call.exchange  # type: ignore[attr-defined]
        response = _from_engine(ex, payload)
        _keep(ex, response, response["output"])
        return web.Response(body=_encode(response), content_type="application/json", headers=headers)

    def native_encoder(self, call: Call) -> StreamEncoder:
        return NativeResponsesStream(call.exchange)  # type: ignore[attr-defined]


RESPONSES = ResponsesSurface()


class _Numbered(StreamEncoder):
    """What both Responses streams share: numbered events, and the tail of a stream that broke."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.seq = 0
        self.output: list[dict[str, Any]] = []  # the items so far, in order

    def _ev(self, kind: str, data: dict[str, Any]) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return sse(kind, data)

    def error(self, message: str, code: str | None, type_: str) -> bytes:
        # The top-level "error" object is what makes the openai SDK raise on this event.
        err = self._ev(
            "error",
            {
                "code": code,
                "message": message,
                "param": None,
                "error": {"type": type_, "code": code, "message": message, "param": None},
            },
        )
        failed = _response(
            self.ex, status="failed", output=self.output, usage=None, error={"code": "server_error", "message": message}
        )
        return err + self._ev("response.failed", {"response": failed})


class ResponsesStream(_Numbered):
    """Chat Completions chunks as Responses events, one output item at a time."""

    def __init__(self, ex: Exchange) -> None:
        super().__init__(ex)
        self.text: list[str] | None = None  # the open message item's text so far
        self.tools: dict[int, dict[str, Any]] = {}  # chat tool index -> its function_call item
        self.open_tool: int | None = None
        self.finish: str | None = None

    def start(self) -> bytes:
        skeleton = _response(self.ex, status="in_progress", output=[], usage=None)
        return self._ev("response.created", {"response": skeleton}) + self._ev(
            "response.in_progress", {"response": skeleton}
        )

    def batch(self, events: list[bytes]) -> bytes:
        out: list[bytes] = []
        for raw in events:
            chunk = decode_chunk(raw)
            if chunk is None or not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.finish_reason:
                self.finish = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                self._text_delta(delta.content, out)
            if delta.tool_calls:
                for td in delta.tool_calls:
                    self._tool_delta(td, out)
        return b"".join(out)

    def _text_delta(self, piece: str, out: list[bytes]) -> None:
        if self.text is None:
            self._close_tool(out)
            item = _message_item(new_id("msg_"), "", status="in_progress")
            self.output.append(item)
            self.text = []
            idx = len(self.output) - 1
            out.append(self._ev("response.output_item.added", {"output_index": idx, "item": item}))
            out.append(
                self._ev(
                    "response.content_part.added",
                    {"item_id": item["id"], "output_index": idx, "content_index": 0, "part": _text_part("")},
                )
            )
        self.text.append(piece)
        out.append(
            self._ev(
                "response.output_text.delta",
                {
                    "item_id": self.output[-1]["id"],
                    "output_index": len(self.output) - 1,
                    "content_index": 0,
                    "delta": piece,
                    "logprobs": [],
                },
            )
        )

    def _close_text(self, out: list[bytes]) -> None:
        if self.text is None:
            return
        idx = max(i for i, it in enumerate(self.output) if it["type"] == "message")
        item = self.output[idx]
        text = "".join(self.text)
        self.text = None
        item["status"] = "completed"
        item["content"] = [_text_part(text)]
        common = {"item_id": item["id"], "output_index": idx, "content_index": 0}
        out.append(self._ev("response.output_text.done", {**common, "text": text, "logprobs": []}))
        out.append(self._ev("response.content_part.done", {**common, "part": _text_part(text)}))
        out.append(self._ev("response.output_item.done", {"output_index": idx, "item": item}))

    def _tool_delta(self, td: Any, out: list[bytes]) -> None:
        item = self.tools.get(td.index)
        fn = td.function
        if item is None:
            self._close_text(out)
            self._close_tool(out)
            item = _call_item(
                new_id("fc_"), td.id or new_id("call_"), (fn.name if fn else None) or "", "", status="in_progress"
            )
            self.output.append(item)
            self.tools[td.index] = item
            self.open_tool = td.index
            out.append(self._ev("response.output_item.added", {"output_index": len(self.output) - 1, "item": item}))
        elif fn is not None and fn.name and not item["name"]:
            item["name"] = fn.name
        if fn is not None and fn.arguments:
            item["arguments"] += fn.arguments
            out.append(
                self._ev(
                    "response.function_call_arguments.delta",
                    {"item_id": item["id"], "output_index": self.output.index(item), "delta": fn.arguments},
                )
            )

    def _close_tool(self, out: list[bytes]) -> None:
        if self.open_tool is None:
            return
        item = self.tools[self.open_tool]
        self.open_tool = None
        idx = self.output.index(item)
        item["status"] = "completed"
        out.append(
            self._ev(
                "response.function_call_arguments.done",
                {"item_id": item["id"], "output_index": idx, "name": item["name"], "arguments": item["arguments"]},
            )
        )
        out.append(self._ev("response.output_item.done", {"output_index": idx, "item": item}))

    def done(self, stats: Any) -> bytes:
        out: list[bytes] = []
        self._close_text(out)
        self._close_tool(out)
        response = _response(
            self.ex, status="completed", output=self.output, usage=_usage(stats.usage), finish=self.finish
        )
        _keep(self.ex, response, self.output)
        # Always response.completed, with status "incomplete" where max_output_tokens cut it (as
        # llama-server does): the openai SDK's stream helper and openai-agents wait for this event.
        out.append(self._ev("response.completed", {"response": response}))
        return b"".join(out)


class _Head(msgspec.Struct):
    type: str = ""
    sequence_number: int = -1


_head = msgspec.json.Decoder(_Head).decode


class NativeResponsesStream(_Numbered, NativeStream):
    """An engine's own Responses stream (checked by its adapter): its lifecycle events get the node's id
    and the request's echo, the finished response is stored, and a break ends as a translated one does."""

    def batch(self, events: list[bytes]) -> bytes:
        out = []
        for raw in events:
            head = _head(raw)
            self.seq = head.sequence_number + 1  # the adapter numbered them; the tail goes on from there
            if head.type in LIFECYCLE:
                ev = _decode(raw)
                final = head.type in FINAL
                response = ev["response"] = _from_engine(
                    self.ex, ev["response"], "completed" if final else "in_progress"
                )
                if final:
                    _keep(self.ex, response, response["output"])
                raw = _encode(ev)
            elif head.type == "response.output_item.done":
                self.output.append(_decode(raw)["item"])
            out.append(frame(raw, head.type))
        return b"".join(out)


# ------------------------------------------------------------------- handlers


def _owner(request: web.Request) -> str | None:
    return request[DRAFT].key_id


async def create(request: web.Request) -> web.StreamResponse:
    raw = await read_body(request)
    req = parse_request(raw)
    store = request.app[STORE]
    owner = _owner(request)
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        prev = store.get(req.previous_response_id, owner, time.monotonic())
        if prev is None:
            raise BadRequest(
                f"Previous response with id '{req.previous_response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        history = _decode(prev.history)
    body, items = to_chat(req, history)
    ex = Exchange(
        id=new_id("resp_"),
        created_at=int(time.time()),
        req=req,
        items=items,
        store=store if req.store is not False else None,
        owner=owner,
    )

    def stateless(native: dict[str, Any]) -> None:  # the node keeps the conversation and the store
        if native.pop("previous_response_id", None) is not None:
            native["input"] = items
        native["store"] = False

    call = ResponsesCall(
        op="chat",
        model=req.model,
        body=body,
        stream=bool(req.stream),
        operation="responses",
        exchange=ex,
        native=native_form(request, "responses", req.model, raw, stateless),
    )
    return await serve(request, RESPONSES, call)


async def retrieve(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    request[DRAFT].asked(RESPONSES.name, "responses.get")
    stored = request.app[STORE].get(rid, _owner(request), time.monotonic())
    if stored is None:
        raise NotFound(f"Response with id '{rid}' not found.", param="response_id", code="response_not_found")
    return web.Response(body=stored.response, content_type="application/json")


async def delete(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    request[DRAFT].asked(RESPONSES.name, "responses.delete")
    store = request.app[STORE]
    if store.get(rid, _owner(request), time.monotonic()) is None:
        raise NotFound(f"Response with id '{rid}' not found.", param="response_id", code="response_not_found")
    store.pop(rid)
    return web.Response(
        body=_encode({"id": rid, "object": "response.deleted", "deleted": True}), content_type="application/json"
    )


def routes() -> list[web.RouteDef]:
    return [
        RESPONSES.route("POST", "/v1/responses", create),
        RESPONSES.route("GET", "/v1/responses/{id}", retrieve),
        RESPONSES.route("DELETE", "/v1/responses/{id}", delete),
        # base_url set without /v1 (as for the Chat Completions paths, api/openai.py): the same answers
        RESPONSES.route("POST", "/responses", create),
        RESPONSES.route("GET", "/responses/{id}", retrieve),
        RESPONSES.route("DELETE", "/responses/{id}", delete),
    ]


def setup(app: web.Application) -> None:
    """The Responses routes and the node's store of responses, on ``app``."""
    s = app[SETTINGS]
    app[STORE] = ResponseStore(
        max_entries=s.responses_store_max_entries, max_bytes=s.responses_store_max_bytes, ttl_s=s.responses_store_ttl_s
    )
    app.router.add_routes(routes())
