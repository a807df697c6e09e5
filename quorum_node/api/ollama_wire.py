"""Ollama's native API as typed messages, and its translation to and from the OpenAI shape.

Pure logic (no I/O): the surface in ``ollama.py`` decodes a client's body with
the decoders here, turns it into the OpenAI-shaped body the request path
carries (``chat_body``, ``generate_body``, ``embed_body``), and writes what the
engine said back in Ollama's words (``ChatStream`` for NDJSON, ``whole_*``
for single objects). Formats: ``reference/engines.md`` §4.

What maps (Ollama → OpenAI):

- ``options``: ``num_predict`` → ``max_tokens`` (negative: no limit),
  ``temperature``, ``top_p``, ``stop``, ``seed``, ``presence_penalty``,
  ``frequency_penalty``; ``top_k`` and ``min_p`` as the extension fields that
  vLLM, SGLang, llama.cpp and LM Studio honour. Everything else in
  ``options`` (``num_ctx``, ``num_gpu``, ``repeat_penalty`` …) is ignored, as
  Ollama ignores what a runner cannot do: no OpenAI-compatible engine takes a
  per-request context size.
- ``format``: ``"json"`` → ``response_format: json_object``; a JSON schema →
  ``response_format: json_schema``.
- messages: ``images`` (base64) → ``image_url`` parts with a data URI;
  ``tool_calls`` with object ``arguments`` → OpenAI tool calls with JSON-string
  arguments (ids made up where Ollama sent none, and matched to the ``tool``
  messages that answer them, by ``tool_call_id``, else ``tool_name``, else order).
"""

from __future__ import annotations

import math
import time
from typing import Any, TypeGuard, TypeVar

import msgspec

from ..backends.wire import ToolCall as ChunkToolCall
from ..backends.wire import decode_chunk
from ..errors import BadRequest

__all__ = [
    "ChatRequest",
    "ChatStream",
    "EmbedRequest",
    "EmbeddingsRequest",
    "GenerateRequest",
    "ShowRequest",
    "chat_body",
    "decode_request",
    "embed_body",
    "generate_body",
    "normalise",
    "now_rfc3339",
    "whole_chat",
    "whole_generate",
]

_encode = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode

T = TypeVar("T")

MAX_TOOL_CALLS = 128  # per answer: what one stream may make the node hold while it assembles them


# ------------------------------------------------------------------ requests


class ToolFunction(msgspec.Struct, kw_only=True):
    name: str = ""
    arguments: dict[str, Any] | str | None = None
    index: int | None = None


class ToolCall(msgspec.Struct, kw_only=True):
    id: str | None = None
    function: ToolFunction


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str | None = None
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class Options(msgspec.Struct, kw_only=True):
    # Integers may come as JSON floats (Ollama converts them): ``_whole`` makes them ints again.
    num_predict: int | float | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | float | None = None
    min_p: float | None = None
    stop: list[str] | str | None = None
    seed: int | float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


Format = str | dict[str, Any] | None


class ChatRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[Message] = []
    tools: list[dict[str, Any]] | None = None
    format: Format = None
    options: Options | None = None
    stream: bool = True
    keep_alive: str | float | None = None
    think: bool | str | None = None


class GenerateRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    format: Format = None
    options: Options | None = None
    stream: bool = True
    keep_alive: str | float | None = None
    think: bool | str | None = None


class EmbedRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str]
    truncate: bool | None = None
    dimensions: int | None = None
    keep_alive: str | float | None = None


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: str = ""
    keep_alive: str | float | None = None


class ShowRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # deprecated, still accepted
    verbose: bool = False


_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t) for t in (ChatRequest, GenerateRequest, EmbedRequest, EmbeddingsRequest, ShowRequest)
}


def decode_request(raw: bytes, kind: type[T]) -> T:
    """The client's body as ``kind``; anything malformed is a 400 in Ollama's words."""
    if not raw.strip():
        raise BadRequest("missing request body", code="invalid_json")
    try:
        req: T = _DECODERS[kind].decode(raw)  # the decoder of ``kind``
    except msgspec.ValidationError as e:
        raise BadRequest(f"invalid request: {e}", code="invalid_request") from None
    except msgspec.DecodeError as e:
        raise BadRequest(f"invalid JSON: {e}", code="invalid_json") from None
    except UnicodeDecodeError as e:
        raise BadRequest(f"invalid request: not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("invalid request: nested too deeply", code="invalid_json") from None
    model = getattr(req, "model", None)
    if isinstance(req, ShowRequest):
        model = req.model or req.name
    if not model:
        raise BadRequest("model is required", param="model", code="missing_required_parameter")
    return req


# ---------------------------------------------------------- to the OpenAI body


def _image_url(b64: str) -> dict[str, Any]:
    """A base64 image as an OpenAI image part (engines want a data URI with its type)."""
    if b64.startswith("data:"):
        url = b64
    else:
        head = b64[:8]
        mime = (
            "image/png"
            if head.startswith("iVBOR")
            else "image/jpeg"
            if head.startswith("/9j/")
            else "image/gif"
            if head.startswith("R0lGOD")
            else "image/webp"
            if head.startswith("UklGR")
            else "image/png"
        )
        url = f"data:{mime};base64,{b64}"
    return {"type": "image_url", "image_url": {"url": url}}


def _content(text: str | None, images: list[str] | None) -> Any:
    if not images:
        return text or ""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts.extend(_image_url(i) for i in images)
    return parts


def _arguments_text(arguments: dict[str, Any] | str | None) -> str:
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):  # some clients send OpenAI's string form; pass it on
        return arguments
    return _encode(arguments).decode()


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, name) of tool calls not answered yet
    made = 0
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = []
            pending = []
            for tc in m.tool_calls:
                made += 1
                cid = tc.id or f"call_{made}"
                pending.append((cid, tc.function.name))
                calls.append(
                    {
                        "id": cid,
                        "type": "function",
                        "function": {"name": tc.function.name, "arguments": _arguments_text(tc.function.arguments)},
                    }
                )
            msg: dict[str, Any] = {"role": "assistant", "content": m.content or None, "tool_calls": calls}
        elif m.role == "tool":
            if m.tool_call_id is not None:
                cid = m.tool_call_id
            else:
                match = next((p for p in pending if m.tool_name and p[1] == m.tool_name), None)
                match = match or (pending[0] if pending else None)
                if match is not None:
                    cid = match[0]
                else:
                    made += 1
                    cid = f"call_{made}"
            pending = [p for p in pending if p[0] != cid]
            msg = {"role": "tool", "content": m.content or "", "tool_call_id": cid}
            if m.tool_name:
                msg["name"] = m.tool_name
        else:
            msg = {"role": m.role, "content": _content(m.content, m.images)}
        out.append(msg)
    return out


def _response_format(fmt: Format) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    raise BadRequest(f'invalid format: {fmt!r}: expected "json" or a JSON schema', param="format", code="invalid_value")


def _sampling(body: dict[str, Any], options: Options | None, fmt: Format) -> None:
    rf = _response_format(fmt)
    if rf is not None:
        body["response_format"] = rf
    if options is None:
        return
    o = options
    num_predict = _whole(o.num_predict, "num_predict")
    if num_predict is not None and num_predict > 0:  # -1: no limit, -2: fill the context
        body["max_tokens"] = num_predict
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p"):
        v = getattr(o, key)
        if v is not None:
            if not math.isfinite(v):
                raise BadRequest(f"invalid option {key}: {v}", param=f"options.{key}", code="invalid_value")
            body[key] = v
    for key in ("seed", "top_k"):
        v = _whole(getattr(o, key), key)
        if v is not None:
            body[key] = v
    if o.stop:
        body["stop"] = [o.stop] if isinstance(o.stop, str) else o.stop


def _whole(v: int | float | None, key: str) -> int | None:
    if v is None or isinstance(v, int):
        return v
    if not math.isfinite(v) or v != int(v):
        raise BadRequest(
            f"invalid option {key}: {v} is not a whole number", param=f"options.{key}", code="invalid_value"
        )
    return int(v)


def _stream_fields(body: dict[str, Any], stream: bool) -> None:
    body["stream"] = stream
    if stream:  # the final object counts tokens: ask for usage, across peers too
        body["stream_options"] = {"include_usage": True}


def chat_body(req: ChatRequest, model: str) -> dict[str, Any]:
    """``/api/chat`` as an OpenAI Chat Completions body."""
    body: dict[str, Any] = {"model": model, "messages": _messages(req.messages)}
    if req.tools:
        body["tools"] = req.tools
    _sampling(body, req.options, req.format)
    _stream_fields(body, req.stream)
    return body


def generate_body(req: GenerateRequest, model: str) -> tuple[str, dict[str, Any]]:
    """``/api/generate`` as (op, OpenAI body).

    As Ollama does, the prompt goes through the model's chat template (a chat
    request with ``system`` and the prompt as the user's message) unless
    ``raw`` is set or a ``suffix`` asks for infill: then it is a plain completion.
    """
    if req.raw or req.suffix:
        body: dict[str, Any] = {"model": model, "prompt": req.prompt}
        if req.suffix:
            body["suffix"] = req.suffix
        op = "completions"
    else:
        messages: list[dict[str, Any]] = []
        if req.system:
            messages.append({"role": "system", "content": req.system})
        messages.append({"role": "user", "content": _content(req.prompt, req.images)})
        body = {"model": model, "messages": messages}
        op = "chat"
    _sampling(body, req.options, req.format)
    _stream_fields(body, req.stream)
    return op, body


def embed_body(model: str, inputs: str | list[str], dimensions: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "input": inputs}
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


# ------------------------------------------------------------- to Ollama's words


_second: list[Any] = [-1, ""]  # the last whole second formatted (streams ask many times a second)


def now_rfc3339() -> str:
    t = time.time()
    whole = int(t)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((t - whole) * 1e9):09d}Z"


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _count(usage: Any, key: str) -> int | None:
    v = usage.get(key) if isinstance(usage, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def metrics(
    usage: Any, *, total_s: float, prompt_s: float | None, eval_s: float | None, chunks: int | None = None
) -> dict[str, Any]:
    """The final object's counts and durations (integer nanoseconds), omitted where unknown."""
    out: dict[str, Any] = {"total_duration": _ns(total_s), "load_duration": 0}
    p = _count(usage, "prompt_tokens")
    if p is not None:
        out["prompt_eval_count"] = p
    if prompt_s is not None:
        out["prompt_eval_duration"] = _ns(prompt_s)
    c = _count(usage, "completion_tokens")
    if c is None:
        c = chunks
    if c is not None:
        out["eval_count"] = c
    if eval_s is not None:
        out["eval_duration"] = _ns(eval_s)
    return out


def done_reason(finish: str | None) -> str:
    return "length" if finish == "length" else "stop"


def _arguments_object(text: str | None) -> dict[str, Any]:
    """OpenAI's JSON-string arguments as the object Ollama clients expect."""
    if not text:
        return {}
    try:
        v = _decode_json(text)
    except (msgspec.DecodeError, RecursionError):
        v = None
    # Not a JSON object (a model that wrote broken JSON): keep its text, never drop it.
    return v if isinstance(v, dict) else {"arguments": text}


def tool_calls_out(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tc in enumerate(calls):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            continue
        name = fn.get("name")
        args = fn.get("arguments")
        item: dict[str, Any] = {
            "function": {
                "index": i,
                "name": name if isinstance(name, str) else "",
                "arguments": _arguments_object(args if isinstance(args, str) else None)
                if not isinstance(args, dict)
                else args,
            }
        }
        if isinstance(tc.get("id"), str):
            item["id"] = tc["id"]
        out.append(item)
    return out


def _timings(payload: dict[str, Any]) -> tuple[float | None, float | None]:
    """llama.cpp's own ``timings`` (ms), where the engine gave them."""
    t = payload.get("timings")
    if not isinstance(t, dict):
        return None, None
    p, e = t.get("prompt_ms"), t.get("predicted_ms")

    def ok(v: object) -> TypeGuard[int | float]:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    return (p / 1000 if ok(p) else None), (e / 1000 if ok(e) else None)


def _first_choice(payload: dict[str, Any]) -> dict[str, Any]:
    choices = payload.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def whole_chat(payload: dict[str, Any], model: str, total_s: float, *, think: bool | str | None) -> dict[str, Any]:
    """A non-streamed Chat Completion as Ollama's single ``/api/chat`` object."""
    choice = _first_choice(payload)
    msg = choice.get("message")
    if not isinstance(msg, dict):
        msg = {}
    content = msg.get("content")
    message: dict[str, Any] = {"role": "assistant", "content": content if isinstance(content, str) else ""}
    thinking = msg.get("reasoning_content") or msg.get("reasoning")
    if isinstance(thinking, str) and thinking and think is not False:
        message["thinking"] = thinking
    calls = msg.get("tool_calls")
    if isinstance(calls, list) and calls:
        message["tool_calls"] = tool_calls_out(calls)
    prompt_s, eval_s = _timings(payload)
    return {
        "model": model,
        "created_at": now_rfc3339(),
        "message": message,
        "done": True,
        "done_reason": done_reason(choice.get("finish_reason")),
        **metrics(
            payload.get("usage"), total_s=total_s, prompt_s=prompt_s, eval_s=eval_s if eval_s is not None else total_s
        ),
    }


def whole_generate(payload: dict[str, Any], model: str, total_s: float, *, think: bool | str | None) -> dict[str, Any]:
    """A non-streamed Chat Completion or Completion as Ollama's single ``/api/generate`` object."""
    choice = _first_choice(payload)
    msg = choice.get("message")
    thinking: Any = None
    if isinstance(msg, dict):
        text = msg.get("content")
        thinking = msg.get("reasoning_content") or msg.get("reasoning")
    else:
        text = choice.get("text")
    out: dict[str, Any] = {
        "model": model,
        "created_at": now_rfc3339(),
        "response": text if isinstance(text, str) else "",
    }
    if isinstance(thinking, str) and thinking and think is not False:
        out["thinking"] = thinking
    prompt_s, eval_s = _timings(payload)
    out.update(
        done=True,
        done_reason=done_reason(choice.get("finish_reason")),
        **metrics(
            payload.get("usage"), total_s=total_s, prompt_s=prompt_s, eval_s=eval_s if eval_s is not None else total_s
        ),
    )
    return out


def normalise(vec: list[Any]) -> list[float]:
    """L2-normalised, as ``/api/embed`` answers (a zero vector stays zero)."""
    norm = math.sqrt(math.fsum(x * x for x in vec))
    return [x / norm for x in vec] if norm > 0 else [float(x) for x in vec]


# ------------------------------------------------------------------ streaming


def _text(v: Any) -> str | None:
    """A chunk's reasoning, where it is text (``wire.Delta`` passes it unchecked)."""
    return v if isinstance(v, str) else None


class ChatStream:
    """OpenAI chunk events in, Ollama NDJSON lines out, for one ``/api/chat`` or ``/api/generate`` stream.

    Text goes out as it comes, one line per chunk; tool calls (which OpenAI
    streams in fragments) are assembled and sent whole, in one line, as Ollama
    does, with their arguments as objects.
    """

    __slots__ = ("_model", "_head", "_key", "_think", "_calls", "finish")

    def __init__(self, model: str, *, key: str, think: bool | str | None) -> None:
        self._model = model
        self._head = b'{"model":' + _encode(model) + b',"created_at":"'
        self._key = key  # "message" (chat) or "response" (generate)
        self._think = think is not False
        self._calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None

    def _line(self, created: bytes, body: bytes) -> bytes:
        return self._head + created + b'",' + body + b',"done":false}\n'

    def _piece(self, content: str, thinking: str | None) -> bytes:
        if self._key == "message":
            out = b'"message":{"role":"assistant","content":' + _encode(content)
            if thinking:
                out += b',"thinking":' + _encode(thinking)
            return out + b"}"
        out = b'"response":' + _encode(content)
        if thinking:
            out += b',"thinking":' + _encode(thinking)
        return out

    def feed(self, events: list[bytes]) -> bytes:
        created = now_rfc3339().encode()
        out: list[bytes] = []
        for ev in events:
            chunk = decode_chunk(ev)
            for ch in chunk.choices or ():
                if ch.index != 0:
                    continue
                d = ch.delta
                if d is not None:
                    thinking = (_text(d.reasoning_content) or _text(d.reasoning)) if self._think else None
                    if d.content or thinking:
                        out.append(self._line(created, self._piece(d.content or "", thinking)))
                    if d.tool_calls:
                        self._add_calls(d.tool_calls)
                elif ch.text:
                    out.append(self._line(created, self._piece(ch.text, None)))
                if ch.finish_reason is not None:
                    self.finish = ch.finish_reason
                    out.append(self._flush_calls(created))
        return b"".join(out)

    def _add_calls(self, calls: list[ChunkToolCall]) -> None:
        for tc in calls:
            cur = self._calls.get(tc.index)
            if cur is None:
                if len(self._calls) >= MAX_TOOL_CALLS:
                    continue
                cur = self._calls[tc.index] = {"id": None, "name": "", "arguments": []}
            if tc.id:
                cur["id"] = tc.id
            if tc.function is not None:
                if tc.function.name:
                    cur["name"] = tc.function.name
                if tc.function.arguments:
                    cur["arguments"].append(tc.function.arguments)

    def _flush_calls(self, created: bytes) -> bytes:
        if not self._calls or self._key != "message":
            self._calls.clear()
            return b""
        calls = []
        for i, (_, c) in enumerate(sorted(self._calls.items())):
            item: dict[str, Any] = {
                "function": {"index": i, "name": c["name"], "arguments": _arguments_object("".join(c["arguments"]))}
            }
            if c["id"]:
                item["id"] = c["id"]
            calls.append(item)
        self._calls.clear()
        msg = {"role": "assistant", "content": "", "tool_calls": calls}
        return self._line(created, b'"message":' + _encode(msg))

    def final(self, usage: Any, chunks: int, *, total_s: float, prompt_s: float | None, eval_s: float | None) -> bytes:
        """The last line: ``done: true`` with the reason, counts and durations."""
        created = now_rfc3339()
        tail = self._flush_calls(created.encode())
        obj: dict[str, Any] = {"model": self._model, "created_at": created}
        if self._key == "message":
            obj["message"] = {"role": "assistant", "content": ""}
        else:
            obj["response"] = ""
        obj.update(
            done=True,
            done_reason=done_reason(self.finish),
            **metrics(usage, total_s=total_s, prompt_s=prompt_s, eval_s=eval_s, chunks=chunks),
        )
        return tail + _encode(obj) + b"\n"
