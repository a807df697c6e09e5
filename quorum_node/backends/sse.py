"""Reading engine SSE streams and erasing their quirks, event by event.

Pure logic: fed bytes, returns bytes. The adapters drive it from the socket.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from ..errors import StreamBroken
from .base import StreamStats

__all__ = ["EventSplitter", "StreamNormalizer", "engine_error_message", "FINISH_MAP"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

# Finish reasons some engines send that the OpenAI SDK does not know.
FINISH_MAP = {"stop_sequence": "stop", "eos_token": "stop", "eos": "stop", "max_tokens": "length"}


class EventSplitter:
    """Splits an SSE byte stream into the data of its events (spec-conform).

    Comment lines (``:``) are dropped, one optional space after ``data:`` is
    stripped (TGI writes ``data:{…}``), multi-line data is joined with
    ``\\n``. Old llama.cpp's non-standard ``error:`` field is turned into an
    error event so it is not lost.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r\n" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        out: list[bytes] = []
        for ev in parts:
            if ev.startswith(b"data: ") and b"\n" not in ev:  # the common case
                out.append(ev[6:])
                continue
            data = _parse_event(ev)
            if data is not None:
                out.append(data)
        return out

    def tail(self) -> bytes | None:
        """An event left without its blank line when the stream closed."""
        rest, self._buf = self._buf.strip(b"\n"), b""
        return _parse_event(rest) if rest else None


def _parse_event(ev: bytes) -> bytes | None:
    lines: list[bytes] = []
    for line in ev.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            lines.append(value)
        elif field == b"error":  # llama.cpp before PR #16109
            return b'{"error":' + (value if value.startswith(b"{") else _encode(value.decode(errors="replace"))) + b"}"
    if not lines:
        return None
    return b"\n".join(lines)


def engine_error_message(obj: Any) -> str:
    """The human message inside any of the engines' error envelopes."""
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("msg") or err.get("detail")
            if msg:
                return str(msg)
            return str(err)
        if err is not None:
            return str(err)
        if "message" in obj:
            return str(obj["message"])
    return str(obj)


class StreamNormalizer:
    """Erases one engine's stream quirks so every stream reads like OpenAI's.

    ``clean`` engines (their streams are already standard) take a fast path
    that decodes only the events that need it: errors and usage.
    """

    __slots__ = ("_clean", "_id", "_created", "_role_sent", "_want_usage", "_object", "stats", "extra", "_rename")

    def __init__(
        self, *, clean: bool, want_usage: bool, op: str, stats: StreamStats, rename: tuple[str, str] | None = None
    ) -> None:
        self._clean = clean
        # (engine id, public id): llama.cpp names the model by its file path in every
        # chunk; clients should see the name they know, and peers no host paths.
        self._rename: tuple[bytes, bytes] | None = None
        if rename is not None and rename[0] != rename[1]:
            self._rename = (_encode(rename[0]), _encode(rename[1]))
        self._want_usage = want_usage
        self._id: str | None = None
        self._created: int | None = None
        self._role_sent = False
        self._object = "chat.completion.chunk" if op == "chat" else "text_completion"
        self.stats = stats
        # Events to send right after the one ``feed`` returned; the caller drains it.
        self.extra: list[bytes] = []

    def feed(self, data: bytes) -> bytes | None:
        """One event's data in, the event to send out (or None to drop it).

        Rarely one event becomes two; the second is left in :attr:`extra`.
        """
        if self._rename is not None and self._rename[0] in data:
            old, new = self._rename
            data = data.replace(b'"model":' + old, b'"model":' + new).replace(b'"model": ' + old, b'"model": ' + new)
        if self._clean:
            if b'"error"' not in data and b'"usage":{' not in data and b'"usage": {' not in data:
                self.stats.chunks += 1
                if not self.stats.finished and (b'"finish_reason":"' in data or b'"finish_reason": "' in data):
                    self.stats.finished = True
                return data
        try:
            obj = _decode(data)
        except msgspec.DecodeError:
            raise StreamBroken(f"engine sent a malformed event: {data[:200]!r}") from None
        if not isinstance(obj, dict):
            raise StreamBroken(f"engine sent a malformed event: {data[:200]!r}")
        if "error" in obj and obj["error"] or obj.get("object") == "error":
            raise StreamBroken(engine_error_message(obj), code="engine_error")
        choices = obj.get("choices")
        usage = obj.get("usage")
        if usage:
            self.stats.usage = usage
        split = False
        if not choices:
            if usage and not self._want_usage:
                return None  # asked for by us, not by the client
            if usage:
                obj["object"] = self._object  # MLX says "chat.completion"
        else:
            self.stats.chunks += 1
            for ch in choices:
                fr = ch.get("finish_reason")
                if fr:
                    self.stats.finished = True
                    # llama.cpp's /v1/completions stream puts usage on its finish chunk;
                    # OpenAI sends it in a chunk of its own, with no choices, where clients look.
                    split = bool(usage and self._want_usage)
                    if fr in FINISH_MAP:
                        ch["finish_reason"] = FINISH_MAP[fr]
                delta = ch.get("delta")
                if isinstance(delta, dict) and "role" in delta:
                    if self._role_sent:
                        del delta["role"]  # TGI, MLX, old Ollama repeat it
                    else:
                        self._role_sent = True
            if usage and (split or not self._want_usage):
                obj["usage"] = None
        if self._clean and not split:
            return data if self._want_usage or not usage else _encode(obj)
        if not obj.get("id"):  # TGI sends ""
            if self._id is None:
                self._id = ("chatcmpl-" if self._object.startswith("chat") else "cmpl-") + uuid.uuid4().hex[:24]
            obj["id"] = self._id
        if not obj.get("created"):
            if self._created is None:
                self._created = int(time.time())
            obj["created"] = self._created
        if choices and obj.get("object") != self._object:
            obj["object"] = self._object
        if split:
            self.extra.append(_encode({**obj, "choices": [], "usage": usage}))
        return _encode(obj)
