"""The Anthropic Messages API (``/v1/messages``): passed through, or translated to Chat Completions.

Every engine answers: a Messages request becomes one Chat Completions call
through the one request path (router, retries, failure contract, record);
the answer is written back as a Message, or as Anthropic's event stream
(``message_start`` … ``content_block_delta`` … ``message_stop``). Where an
engine of this machine that holds the model serves ``/v1/messages`` (and
``/v1/messages/count_tokens``) itself, the call also carries the client's
own request, and that engine gets it as sent (model renamed to the engine's
id) and answers it in its own words (``api/passthrough.py``): ``stop_sequence``,
``thinking`` blocks and cache counts as the engine gives them. The request is
checked, and refused, as below either way. Errors on this surface, refusals
by the middleware included, are in Anthropic's envelope
``{"type": "error", "error": {"type", "message"}}``.

Translated: ``system`` (a string or text blocks), ``messages`` (content a
string or blocks: ``text``, ``image`` (base64 or url), ``tool_use``,
``tool_result``; ``thinking`` blocks are dropped), ``tools`` (custom tools:
``name``, ``description``, ``input_schema``), ``tool_choice`` (``auto``,
``any``, ``tool``, ``none``; ``disable_parallel_tool_use``), ``max_tokens``,
``stop_sequences``, ``temperature``, ``top_p``, ``top_k``, ``stream``,
``output_config.format`` (a JSON schema: ``response_format``).
Accepted and ignored: ``metadata``, ``service_tier``, ``thinking``, ``output_config.effort``,
``cache_control`` on blocks. Refused with a 400: server tools (web search,
bash, computer use …), ``document`` and other block types, images by file id.
``stop_reason`` "stop_sequence" cannot be told from "end_turn" through Chat
Completions: a stop at a stop sequence is reported as ``end_turn`` (passed
through, the engine says which).

``POST /v1/messages/count_tokens`` is passed through where the engine counts
tokens itself; elsewhere it asks the engine that holds the model for a
one-token completion of the same conversation and answers its prompt token
count (every engine counts that way; one that reports no usage gets a 501).
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from ..errors import ApiError, BadRequest, NotSupported
from .body import read_body
from .chunks import decode_chunk, new_id, sse, tool_calls_of, usage_counts
from .passthrough import NativeStream, native_form
from .surface import PREFIXES, Call, StreamEncoder, Surface, serve
from .validate import decode_typed

__all__ = ["MESSAGES", "MessagesSurface", "routes", "to_chat"]

_encode = msgspec.json.Encoder().encode
_decode_args = msgspec.json.decode

#: Anthropic's error type for each status the node answers with.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    501: "invalid_request_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


class MessagesRequest(msgspec.Struct, kw_only=True):
    """The fields of ``POST /v1/messages`` the node reads; unknown ones are ignored."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None  # required by /v1/messages, not by count_tokens
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = None
    output_config: dict[str, Any] | None = None


_request = msgspec.json.Decoder(MessagesRequest).decode


def parse_request(raw: bytes, *, need_max_tokens: bool = True) -> MessagesRequest:
    req = decode_typed(_request, raw)
    if not req.model:
        raise BadRequest("model: expected a non-empty string", param="model", code="invalid_value")
    if need_max_tokens and req.max_tokens is None:
        raise BadRequest("max_tokens: Field required", param="max_tokens", code="missing_required_parameter")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise BadRequest("max_tokens: must be at least 1", param="max_tokens", code="invalid_value")
    if not req.messages:
        raise BadRequest("messages: at least one message is required", param="messages", code="invalid_value")
    return req


def _bad(where: str, what: str) -> BadRequest:
    return BadRequest(f"{where}: {what}", param=where, code="invalid_value")


def _text_blocks(blocks: Any, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise _bad(where, "expected a string or an array of text blocks")
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise _bad(f"{where}.{i}", "expected a text block")
        out.append(b["text"])
    return "\n".join(out)


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    src = block.get("source")
    if not isinstance(src, dict):
        src = {}
    kind = src.get("type")
    if kind == "base64" and isinstance(src.get("media_type"), str) and isinstance(src.get("data"), str):
        url = f"data:{src['media_type']};base64,{src['data']}"
    elif kind == "url" and isinstance(src.get("url"), str):
        url = src["url"]
    else:
        raise _bad(f"{where}.source", "quorum-node takes images as base64 or url sources")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    tid = block.get("tool_use_id")
    if not isinstance(tid, str):
        raise _bad(f"{where}.tool_use_id", "expected a string")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for i, b in enumerate(content):
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str):
                parts.append(b["text"])
            else:
                raise _bad(f"{where}.content.{i}", "quorum-node takes text blocks in a tool_result")
        text = "\n".join(parts)
    else:
        raise _bad(f"{where}.content", "expected a string or an array of blocks")
    if block.get("is_error") is True:
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": tid, "content": text}


def _message(m: dict[str, Any], i: int) -> list[dict[str, Any]]:
    where = f"messages.{i}"
    role = m.get("role")
    if role not in ("user", "assistant"):
        raise _bad(f"{where}.role", "expected user or assistant")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content", "expected a string or an array of blocks")
    tools: list[dict[str, Any]] = []  # tool results come first: they answer the previous turn
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(content):
        at = f"{where}.content.{j}"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            if not isinstance(b.get("text"), str):
                raise _bad(f"{at}.text", "expected a string")
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image" and role == "user":
            parts.append(_image(b, at))
        elif kind == "tool_result" and role == "user":
            tools.append(_tool_result(b, at))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                raise _bad(at, "a tool_use block needs an id and a name")
            calls.append(
                {
                    "id": b["id"],
                    "type": "function",
                    "function": {"name": b["name"], "arguments": _encode(b.get("input") or {}).decode()},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise _bad(f"{at}.type", f"blocks of type {kind!r} are not supported by quorum-node here")
    out = list(tools)
    if parts or (role == "assistant" and calls):
        if any(p["type"] != "text" for p in parts):
            body: Any = parts
        else:
            body = "".join(p["text"] for p in parts) if role == "assistant" else "\n".join(p["text"] for p in parts)
        msg: dict[str, Any] = {"role": role, "content": body if body != "" or not calls else None}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(tools):
        where = f"tools.{i}"
        if t.get("type") not in (None, "custom"):
            raise _bad(
                f"{where}.type",
                f"server tools ({t.get('type')!r}) are not supported by quorum-node; only custom tools are",
            )
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise _bad(f"{where}.name", "expected a non-empty string")
        fn: dict[str, Any] = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object"}}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def to_chat(req: MessagesRequest) -> dict[str, Any]:
    """The Chat Completions body for a Messages request."""
    messages: list[dict[str, Any]] = []
    if req.system is not None:
        system = _text_blocks(req.system, "system")
        if system:
            messages.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        messages.extend(_message(m, i))
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.max_tokens is not None:
        body["max_tokens"] = req.max_tokens
    if req.tools:
        body["tools"] = _tools(req.tools)
    choice = req.tool_choice
    if choice is not None:
        kind = choice.get("type")
        if kind == "auto":
            body["tool_choice"] = "auto"
        elif kind == "any":
            body["tool_choice"] = "required"
        elif kind == "none":
            body["tool_choice"] = "none"
        elif kind == "tool" and isinstance(choice.get("name"), str):
            body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            raise _bad("tool_choice", "expected auto, any, tool (with a name) or none")
        if choice.get("disable_parallel_tool_use") is True and req.tools:
            body["parallel_tool_calls"] = False
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    for key in ("temperature", "top_p", "top_k"):
        v = getattr(req, key)
        if v is not None:
            body[key] = v
    fmt = (req.output_config or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise _bad("output_config.format", 'expected {"type": "json_schema", "schema": {...}}')
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if req.stream:
        body["stream"] = True
    return body


_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _stop_reason(finish: Any) -> str:
    return _STOP.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


def _tool_input(args: str) -> dict[str, Any]:
    try:
        v = _decode_args(args)
    except msgspec.DecodeError:
        return {}
    return v if isinstance(v, dict) else {}


def _usage(usage: Any) -> dict[str, Any]:
    p, c = usage_counts(usage)
    return {"input_tokens": p, "output_tokens": c, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


class MessagesSurface(Surface):
    """Answers as Messages and Anthropic events; errors in Anthropic's envelope."""

    name = "anthropic"

    def error_body(self, e: ApiError) -> bytes:
        return _encode({"type": "error", "error": {"type": error_type(e.status), "message": e.message}})

    def answer(self, call: Call, payload: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        choices = payload.get("choices")
        first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        message = first.get("message")
        if not isinstance(message, dict):
            message = {}
        content: list[dict[str, Any]] = []
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        for cid, name, args in tool_calls_of(message):
            content.append({"type": "tool_use", "id": cid, "name": name, "input": _tool_input(args)})
        out = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": content,
            "stop_reason": _stop_reason(first.get("finish_reason")),
            "stop_sequence": None,
            "usage": _usage(payload.get("usage")),
        }
        return web.Response(body=_encode(out), content_type="application/json", headers=headers)

    def encoder(self, call: Call) -> StreamEncoder:
        return MessagesStream(call.model)

    def native_encoder(self, call: Call) -> StreamEncoder:
        return NativeMessagesStream()


class CountTokensSurface(MessagesSurface):
    """``count_tokens``: the prompt tokens of a one-token completion."""

    def answer(self, call: Call, payload: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        usage = payload.get("usage")
        p = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if type(p) is not int:
            raise NotSupported("The engine that holds this model does not count tokens", code="no_token_count")
        return web.Response(body=_encode({"input_tokens": p}), content_type="application/json", headers=headers)


MESSAGES = MessagesSurface()
_COUNT = CountTokensSurface()


class MessagesStream(StreamEncoder):
    """Chat Completions chunks as Anthropic's events, one content block at a time."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.index = -1  # the open block's index; -1: none yet
        self.open: str | None = None  # "text" | "tool_use" | None
        self.tool_index: int | None = None  # the chat tool index of the open tool_use block
        self.finish: str | None = None

    def start(self) -> bytes:
        message: dict[str, Any] = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return sse("message_start", {"type": "message_start", "message": message})

    def _begin(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        self._end(out)
        self.index += 1
        self.open = kind
        out.append(
            sse("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block})
        )

    def _end(self, out: list[bytes]) -> None:
        if self.open is not None:
            out.append(sse("content_block_stop", {"type": "content_block_stop", "index": self.index}))
            self.open = None
            self.tool_index = None

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
                if self.open != "text":
                    self._begin("text", {"type": "text", "text": ""}, out)
                out.append(
                    sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": self.index,
                            "delta": {"type": "text_delta", "text": delta.content},
                        },
                    )
                )
            for td in delta.tool_calls or ():
                fn = td.function
                if self.open != "tool_use" or self.tool_index != td.index:
                    self._begin(
                        "tool_use",
                        {
                            "type": "tool_use",
                            "id": td.id or new_id("toolu_"),
                            "name": (fn.name if fn else None) or "",
                            "input": {},
                        },
                        out,
                    )
                    self.tool_index = td.index
                if fn is not None and fn.arguments:
                    out.append(
                        sse(
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": self.index,
                                "delta": {"type": "input_json_delta", "partial_json": fn.arguments},
                            },
                        )
                    )
        return b"".join(out)

    def done(self, stats: Any) -> bytes:
        out: list[bytes] = []
        self._end(out)
        p, c = usage_counts(stats.usage)
        if stats.usage is None:
            c = stats.chunks
        out.append(
            sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": _stop_reason(self.finish), "stop_sequence": None},
                    "usage": {"input_tokens": p, "output_tokens": c},
                },
            )
        )
        out.append(sse("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def error(self, message: str, code: str | None, type_: str) -> bytes:
        return _stream_error(message, type_)


class NativeMessagesStream(NativeStream):
    """An engine's own Messages stream; a break still ends as Anthropic's ``error`` event."""

    def error(self, message: str, code: str | None, type_: str) -> bytes:
        return _stream_error(message, type_)


def _stream_error(message: str, type_: str) -> bytes:
    """The event that makes the anthropic SDK raise: a stream that broke after its first byte."""
    kind = "overloaded_error" if type_ == "unavailable_error" else "api_error"
    return sse("error", {"type": "error", "error": {"type": kind, "message": message}})


# ------------------------------------------------------------------- handlers


async def create(request: web.Request) -> web.StreamResponse:
    raw = await read_body(request)
    req = parse_request(raw)
    call = Call(
        op="chat",
        model=req.model,
        body=to_chat(req),
        stream=bool(req.stream),
        operation="messages",
        native=native_form(request, "messages", req.model, raw),
    )
    return await serve(request, MESSAGES, call)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    raw = await read_body(request)
    req = parse_request(raw, need_max_tokens=False)
    req.max_tokens = 1
    req.stream = False
    call = Call(
        op="chat",
        model=req.model,
        body=to_chat(req),
        stream=False,
        operation="count_tokens",
        native=native_form(request, "count_tokens", req.model, raw),
    )
    return await serve(request, _COUNT, call)


def routes() -> list[web.RouteDef]:
    return [
        MESSAGES.route("POST", "/v1/messages", create),
        MESSAGES.route("POST", "/v1/messages/count_tokens", count_tokens),
        # a base_url that ends in /v1 (as an OpenAI client's does): the SDK adds /v1 again; and none at all
        MESSAGES.route("POST", "/v1/v1/messages", create),
        MESSAGES.route("POST", "/v1/v1/messages/count_tokens", count_tokens),
        MESSAGES.route("POST", "/messages", create),
        MESSAGES.route("POST", "/messages/count_tokens", count_tokens),
    ]


def setup(app: web.Application) -> None:
    """The Messages routes on ``app``; unknown ``/v1/messages…`` paths answer in Anthropic's envelope."""
    if not any(p == "/v1/messages" for p, _ in PREFIXES):
        PREFIXES.append(("/v1/messages", MESSAGES))
    app.router.add_routes(routes())
