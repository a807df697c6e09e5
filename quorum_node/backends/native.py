"""Engines that speak the client's own API (OpenAI Responses, Anthropic Messages): passed through.

Pure logic, like ``sse.py``: how the adapter learns whether an engine has
these routes, and how what the engine answers on them is checked and its
quirks erased, so that every engine's answer reads like OpenAI's or
Anthropic's own, and the request's record gets its tokens.

Capability. A probe posts a body no server accepts to the route: refused as
a bad request (400 or 422), the route exists; 404, 405 or 501 (or LM
Studio's 200 "Unexpected endpoint"), it does not. Anything else (a timeout,
401, 500) tells nothing: the op is translated until a later probe tells. The
bodies are wrong by type (``"model": 0``, a message whose content is a
number), so that no engine starts a generation for one, and an engine that
looks the model up after decoding the body (Ollama) refuses it as a bad
request, not as an unknown model (a 404, which would read as "no route").

Requests. An engine's own API may drop a field the translation honours
(``declines``): llama-server's ``/v1/responses`` ignores ``text.format``,
its ``/v1/messages`` ignores ``output_config.format`` and reads
``tool_choice`` "none" as "auto". Such a request is sent translated to that
engine (its Chat Completions honour them), so passing through never loses
what translating keeps.

Whole answers are checked for the fields the SDKs read, and: the model is
named by its public id; ids are well formed (a Message's id starts with
``msg_``, a ``tool_use`` block has an id and an ``input``); usage has every
count the SDK types name (zeros where the engine gave none).

Streams are checked event by event (``ResponsesEvents``, ``MessagesEvents``;
the same driver as chat streams, ``stream.stream_events``):

- Responses: each event gets its ``sequence_number`` (numbered here), its
  ``output_index`` (from the item it is about) and ``content_index``; text
  deltas and dones their ``logprobs``; ``response.completed`` the items done
  as its ``output`` if it has none, and full usage. llama-server leaves all of
  these out, and the openai SDK's stream helper needs every one.
- Messages: ``message_start`` is fixed as a whole answer is; a ``tool_use``
  block's start gets an ``input`` (llama-server sends none), and an id if it
  has none; a stop at a stop sequence is ``stop_reason`` "stop_sequence"
  (llama-server says "end_turn" and names the sequence).
- An event whose ``type`` is not a token (``EVENT_TYPE``: lower-case letters,
  digits, ``_`` and ``.``) is a malformed event: written into the stream's
  ``event:`` line, a newline in it would forge the events after it.
- An ``error`` event, ``response.failed``, a bare ``{"error": …}``
  (llama-server's Responses stream) or an event whose ``type`` is an error
  type (llama-server's Messages stream writes ``event: error`` with
  ``{"code", "message", "type": "server_error"}``) is the engine's error
  (``EngineErrorEvent``). The stream ends at ``response.completed`` / ``response.incomplete`` or
  ``message_stop`` (read as a chat stream's ``[DONE]``: nothing after it is
  read, and the connection goes back to the pool); one that ends before is
  truncated, as a chat stream without its finish reason.

Usage goes into ``StreamStats.usage`` (and ``JsonReply.usage``) in the Chat
Completions shape the record reads: prompt tokens are Responses
``input_tokens``, or Messages ``input_tokens`` plus its cache reads and writes
(which Anthropic counts apart); completion tokens are ``output_tokens``.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import msgspec

from ..errors import StreamBroken
from .base import StreamStats
from .sse import EngineErrorEvent
from .wire import ErrorInfo, parse_error

__all__ = [
    "EVENT_TYPE",
    "PROBE_BODIES",
    "FINAL",
    "LIFECYCLE",
    "BadShape",
    "MessagesEvents",
    "ResponsesEvents",
    "declines",
    "events_for",
    "fix_answer",
    "probe_verdict",
]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

#: What a probe posts to each native route: wrong by type, refused before any work (see above).
PROBE_BODIES: dict[str, bytes] = {
    "responses": b'{"model":0,"input":0}',
    "messages": b'{"model":0,"max_tokens":1,"messages":[{"role":"user","content":0}]}',
    "count_tokens": b'{"model":0,"messages":[{"role":"user","content":0}]}',
}


def probe_verdict(status: int, raw: bytes) -> bool | None:
    """Whether a probe's answer says the route exists (True), does not (False), or tells nothing (None)."""
    if status in (400, 422):
        return True
    if status in (404, 405, 501):
        return False
    if status == 200:  # LM Studio answers an unknown path with HTTP 200 and an error
        info = parse_error(raw)
        if info is not None and "Unexpected endpoint" in info.message:
            return False
    return None


def _field(body: dict[str, Any], outer: str, inner: str) -> Any:
    v = body.get(outer)
    return v.get(inner) if isinstance(v, dict) else None


def _llamacpp_declines(op: str, body: dict[str, Any]) -> bool:
    if op == "responses":
        fmt = _field(body, "text", "format")
        return isinstance(fmt, dict) and fmt.get("type") != "text"
    if op == "messages":
        return _field(body, "output_config", "format") is not None or _field(body, "tool_choice", "type") == "none"
    return False


#: By engine kind: the requests its own API is known to get wrong (see above).
_DECLINES = {"llamacpp": _llamacpp_declines}


def declines(kind: str, op: str, body: dict[str, Any]) -> bool:
    """Whether an engine of ``kind`` should get this native request translated instead."""
    check = _DECLINES.get(kind)
    return check is not None and check(op, body)


class BadShape(ValueError):
    """A native answer without the fields the SDKs read: malformed."""


def _count(v: Any) -> int:
    return v if type(v) is int and v >= 0 else 0


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def _responses_usage(usage: Any) -> dict[str, Any]:
    u = dict(usage) if isinstance(usage, dict) else {}
    i, o = _count(u.get("input_tokens")), _count(u.get("output_tokens"))
    u["input_tokens"], u["output_tokens"] = i, o
    u["total_tokens"] = _count(u.get("total_tokens")) or i + o
    for key, default in (("input_tokens_details", "cached_tokens"), ("output_tokens_details", "reasoning_tokens")):
        details = u.get(key)
        u[key] = {default: 0, **(details if isinstance(details, dict) else {})}
    return u


def _messages_usage(usage: Any) -> dict[str, Any]:
    u = dict(usage) if isinstance(usage, dict) else {}
    for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        u[key] = _count(u.get(key))
    return u


def _prompt_tokens(u: dict[str, Any]) -> int:
    """Every prompt token of a Messages usage: Anthropic's input_tokens leaves out cache reads and writes."""
    total: int = u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"]
    return total


def _fix_block(block: dict[str, Any]) -> None:
    kind = block.get("type")
    if kind == "tool_use":
        if not isinstance(block.get("id"), str) or not block["id"]:
            block["id"] = _new_id("toolu_")
        if not isinstance(block.get("input"), dict):
            block["input"] = {}
    elif kind == "text" and not isinstance(block.get("text"), str):
        block["text"] = ""


def _fix_stop(delta: dict[str, Any]) -> None:
    """llama-server says end_turn where a stop sequence stopped it (and names the sequence)."""
    if (
        delta.get("stop_reason") == "end_turn"
        and isinstance(delta.get("stop_sequence"), str)
        and delta["stop_sequence"]
    ):
        delta["stop_reason"] = "stop_sequence"


def _fix_message(msg: dict[str, Any], model: str) -> dict[str, Any]:
    """A Message (whole, or in ``message_start``) fixed in place; its usage, normalised."""
    content = msg.get("content")
    if content is None:
        content = msg["content"] = []
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise BadShape("content")
    for block in content:
        _fix_block(block)
    mid = msg.get("id")
    if not isinstance(mid, str) or not mid.startswith("msg_"):
        msg["id"] = _new_id("msg_")  # llama-server names it chatcmpl-…
    msg["type"], msg["role"], msg["model"] = "message", "assistant", model
    msg.setdefault("stop_reason", None)
    msg.setdefault("stop_sequence", None)
    _fix_stop(msg)
    usage = msg["usage"] = _messages_usage(msg.get("usage"))
    return usage


def fix_answer(op: str, obj: dict[str, Any], model: str) -> dict[str, Any]:
    """Erase a whole native answer's quirks in place; its usage for the record (a token count's: the
    prompt it counted, nothing generated).

    Raises ``BadShape`` for an answer the SDKs could not read.
    """
    if op == "responses":
        output = obj.get("output")
        if not isinstance(output, list) or not all(isinstance(it, dict) for it in output):
            raise BadShape("output")
        obj["object"], obj["model"] = "response", model
        obj.setdefault("status", "completed")
        usage = obj["usage"] = _responses_usage(obj.get("usage"))
        return {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"]}
    if op == "messages":
        usage = _fix_message(obj, model)
        return {"prompt_tokens": _prompt_tokens(usage), "completion_tokens": usage["output_tokens"]}
    if type(obj.get("input_tokens")) is not int:  # count_tokens
        raise BadShape("input_tokens")
    return {"prompt_tokens": _count(obj["input_tokens"]), "completion_tokens": 0}


def _malformed(data: bytes) -> StreamBroken:
    return StreamBroken(f"engine sent a malformed event: {data[:200]!r}", code="malformed_event")


#: What an event's ``type`` may be: it goes into the ``event:`` line of the stream the client reads, where a
#: newline would start a forged event. Every Responses and Messages event type is such a token.
EVENT_TYPE = re.compile(r"\A[a-z0-9_.]{1,64}\Z")


def _event(data: bytes) -> tuple[dict[str, Any], str]:
    """One native event, decoded, and its type; the engine's error, or a malformed event, raised."""
    try:
        ev = _decode(data)
    except msgspec.DecodeError:
        ev = None
    if not isinstance(ev, dict):
        raise _malformed(data)
    kind = ev.get("type")
    err = _error_of(ev, kind, data)
    if err is not None:
        raise err
    if not isinstance(kind, str) or not EVENT_TYPE.match(kind):  # it is written into the SSE ``event:`` line
        raise _malformed(data)
    return ev, kind


def _error_of(ev: dict[str, Any], kind: Any, data: bytes) -> EngineErrorEvent | None:
    """The engine's error, if this event is one (see the module's docstring for the shapes)."""
    if kind == "response.failed":
        response = ev.get("response")
        err = response.get("error") if isinstance(response, dict) else None
        msg = err.get("message") if isinstance(err, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        failed = ErrorInfo(
            message=msg if isinstance(msg, str) and msg else "the engine's response failed",
            code=code if isinstance(code, str) else None,
        )
        return EngineErrorEvent(failed, data)
    is_error = (
        kind == "error"
        or (isinstance(kind, str) and kind.endswith("_error"))
        or (not isinstance(kind, str) and ev.get("error") is not None)
    )
    if not is_error:
        return None
    info = parse_error(data)  # {"error": {…}}, Anthropic's {"type": "error", "error": {…}}
    if info is None and isinstance(ev.get("message"), str) and ev["message"]:  # OpenAI's error event, llama's
        code = ev.get("code")
        info = ErrorInfo(
            message=ev["message"],
            type=kind if isinstance(kind, str) and kind != "error" else None,
            code=code if isinstance(code, str) else None,
            status=code if type(code) is int and 400 <= code < 600 else None,
        )
    return EngineErrorEvent(info, data)


#: The Responses events that carry the whole response; the last two end the stream.
LIFECYCLE = frozenset(
    {"response.created", "response.queued", "response.in_progress", "response.completed", "response.incomplete"}
)
FINAL = frozenset({"response.completed", "response.incomplete"})
_WITH_CONTENT_INDEX = frozenset(
    {
        "response.content_part.added",
        "response.content_part.done",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_text.annotation.added",
        "response.refusal.delta",
        "response.refusal.done",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
    }
)
_WITH_LOGPROBS = frozenset({"response.output_text.delta", "response.output_text.done"})
_ITEM_PREFIX = {"message": "msg_", "function_call": "fc_", "reasoning": "rs_"}


class ResponsesEvents:
    """One engine's Responses stream, event by event, as the openai SDK reads OpenAI's."""

    __slots__ = ("_done", "_ids", "_index", "_last", "_model", "_next", "_seq", "ended", "extra", "stats")

    def __init__(self, *, stats: StreamStats, model: str) -> None:
        self.stats = stats
        self.extra: list[bytes] = []  # never used: one event in, one out (the driver's interface)
        self.ended = False  # the last event came: the driver reads no further
        self._model = model
        self._seq = 0
        self._next = 0  # the output_index the next new item gets
        self._last = 0  # the output_index of the latest item
        self._index: dict[str, int] = {}  # item id -> output_index
        self._ids: dict[int, str] = {}  # output_index -> item id
        self._done: dict[int, dict[str, Any]] = {}  # output_index -> the item, done

    def feed(self, data: bytes) -> bytes | None:
        ev, kind = _event(data)
        if kind in LIFECYCLE:
            response = ev.get("response")
            if not isinstance(response, dict):
                raise _malformed(data)
            response["model"] = self._model
            if kind in FINAL:
                self._final(response)
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = ev.get("item")
            if not isinstance(item, dict):
                raise _malformed(data)
            self._place(ev, item, added=kind.endswith("added"))
        elif kind.startswith("response."):  # about one item: llama-server names it by item_id only
            idx = ev.get("output_index")
            if type(idx) is not int:
                iid = ev.get("item_id")
                ev["output_index"] = self._index.get(iid, self._last) if isinstance(iid, str) else self._last
            if kind in _WITH_CONTENT_INDEX and type(ev.get("content_index")) is not int:
                ev["content_index"] = 0
            if kind in _WITH_LOGPROBS and not isinstance(ev.get("logprobs"), list):
                ev["logprobs"] = []
            if kind.endswith(".delta"):
                self.stats.chunks += 1
        ev["sequence_number"] = self._seq
        self._seq += 1
        return _encode(ev)

    def _place(self, ev: dict[str, Any], item: dict[str, Any], *, added: bool) -> None:
        iid = item.get("id")
        idx = ev.get("output_index")
        if type(idx) is not int or idx < 0:
            idx = self._next if added else self._index.get(iid, self._last) if isinstance(iid, str) else self._last
            ev["output_index"] = idx
        if not isinstance(iid, str) or not iid:
            kind = item.get("type")  # the engine's word: checked before it is looked up (a list is unhashable)
            prefix = _ITEM_PREFIX.get(kind, "item_") if isinstance(kind, str) else "item_"
            iid = item["id"] = self._ids.get(idx) or _new_id(prefix)
        self._index[iid] = idx
        self._ids[idx] = iid
        self._last = idx
        self._next = max(self._next, idx + 1)
        if not added:
            self._done[idx] = item

    def _final(self, response: dict[str, Any]) -> None:
        output = response.get("output")
        if not isinstance(output, list) or (not output and self._done):
            response["output"] = [self._done[i] for i in sorted(self._done)]
        usage = response["usage"] = _responses_usage(response.get("usage"))
        self.stats.usage = {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"]}
        self.stats.finished = self.ended = True


class MessagesEvents:
    """One engine's Messages stream, event by event, as the anthropic SDK reads Anthropic's."""

    __slots__ = ("_model", "_prompt", "_started", "ended", "extra", "stats")

    def __init__(self, *, stats: StreamStats, model: str) -> None:
        self.stats = stats
        self.extra: list[bytes] = []
        self.ended = False
        self._model = model
        self._prompt = 0
        self._started = False

    def feed(self, data: bytes) -> bytes | None:
        ev, kind = _event(data)
        if not self._started:
            self._started = True
            if kind != "message_start":
                # llama-server now and then leaves out its stream's first event; the SDKs cannot read a
                # stream without it (the anthropic SDK's final message stays unset): it is put back.
                self.extra.append(self._fix(ev, kind, data))
                message: dict[str, Any] = {"content": [], "usage": {}}
                _fix_message(message, self._model)
                return _encode({"type": "message_start", "message": message})
        return self._fix(ev, kind, data)

    def _fix(self, ev: dict[str, Any], kind: str, data: bytes) -> bytes:
        if kind == "content_block_delta":  # the many: nothing in them to change
            self.stats.chunks += 1
            return data
        if kind == "message_start":
            msg = ev.get("message")
            if not isinstance(msg, dict):
                raise _malformed(data)
            try:
                usage = _fix_message(msg, self._model)
            except BadShape:
                raise _malformed(data) from None
            self._prompt = _prompt_tokens(usage)
            self.stats.usage = {"prompt_tokens": self._prompt, "completion_tokens": usage["output_tokens"]}
        elif kind == "content_block_start":
            block = ev.get("content_block")
            if not isinstance(block, dict):
                raise _malformed(data)
            _fix_block(block)
        elif kind == "message_delta":
            if isinstance(ev.get("delta"), dict):
                _fix_stop(ev["delta"])
            sent = ev.get("usage")
            usage = ev["usage"] = dict(sent) if isinstance(sent, dict) else {}
            if "input_tokens" in usage:  # counts in message_delta are the totals so far
                u = _messages_usage(usage)
                self._prompt = max(self._prompt, _prompt_tokens(u))
            out = usage["output_tokens"] = _count(usage.get("output_tokens")) or self.stats.chunks
            self.stats.usage = {"prompt_tokens": self._prompt, "completion_tokens": out}
        elif kind == "message_stop":
            self.stats.finished = self.ended = True
        return _encode(ev)


def events_for(op: str, *, stats: StreamStats, model: str) -> ResponsesEvents | MessagesEvents:
    """The checker for a native op's stream (``model``: the public id answers name)."""
    if op == "responses":
        return ResponsesEvents(stats=stats, model=model)
    return MessagesEvents(stats=stats, model=model)
