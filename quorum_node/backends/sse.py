"""Reading engine SSE streams and erasing their quirks, event by event.

Pure logic: fed bytes, returns bytes. The adapters drive it from the socket.

Every event is checked: its data is decoded into a small Struct
(``wire.Chunk``: the choices with their index, delta, text and finish reason,
the usage counts, an error) before anything is sent on. An event that does not
fit is malformed and ends the stream (``StreamBroken``); one that fits and
needs no change is forwarded as the very bytes the engine sent.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from ..errors import StreamBroken
from .base import StreamStats
from .wire import ErrorInfo, Malformed, decode_chunk, parse_error

__all__ = [
    "FINISH_MAP",
    "MAX_EVENT_BYTES",
    "EngineErrorEvent",
    "EventSplitter",
    "StreamNormalizer",
    "engine_error_message",
]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

#: An SSE event larger than this (or that much data without a blank line) is malformed.
MAX_EVENT_BYTES = 8 * 1024 * 1024

# Finish reasons some engines send that the OpenAI SDK does not know.
FINISH_MAP = {"stop_sequence": "stop", "eos_token": "stop", "eos": "stop", "max_tokens": "length"}


class EngineErrorEvent(StreamBroken):
    """The engine reported an error inside its stream (``data: {"error": …}``).

    ``info`` is the error as parsed (None if the engine's error was not even
    well-formed), ``data`` the event as sent: before the first byte reached the
    client, the adapter classifies it like an HTTP error answer.
    """

    def __init__(self, info: ErrorInfo | None, data: bytes) -> None:
        message = info.message if info is not None else "the engine reported an error in its stream"
        super().__init__(message, code=(info.code if info is not None else None) or "engine_error")
        self.info = info
        self.data = data


class EventSplitter:
    """Splits an SSE byte stream into the data of its events (spec-conform).

    Comment lines (``:``) are dropped, one optional space after ``data:`` is
    stripped (TGI writes ``data:{…}``), multi-line data is joined with
    ``\\n``. Old llama.cpp's non-standard ``error:`` field is turned into an
    error event so it is not lost. An event larger than ``max_event_bytes``
    (or that many bytes without the blank line that ends an event) raises
    ``StreamBroken``: memory per stream stays bounded.
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buf = bytearray()  # an event still waiting for its blank line
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf
        if not buf and chunk.startswith(b"data: ") and chunk.find(b"\n") == len(chunk) - 2 and chunk.endswith(b"\n\n"):
            # The common case (a paced engine): one whole one-line event per read, nothing left over.
            self._check(len(chunk))
            return [chunk[6:-2]]
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        if not buf:
            end = chunk.rfind(b"\n\n")
            if end < 0:
                buf += chunk
                self._check(len(buf))
                return []
            done = chunk[:end]
            if end + 2 < len(chunk):
                buf += chunk[end + 2 :]
        else:
            if buf[-1] == 0x0D and chunk[:1] == b"\n":  # a CRLF split between two reads
                del buf[-1]
            scan = len(buf) - 1  # the remainder holds no blank line; a new one may start at its end
            buf += chunk
            end = buf.rfind(b"\n\n", max(0, scan))
            if end < 0:
                self._check(len(buf))
                return []
            done = bytes(buf[:end])
            del buf[: end + 2]
        self._check(len(buf))
        out: list[bytes] = []
        for ev in done.split(b"\n\n"):
            if ev.startswith(b"data: ") and b"\n" not in ev:  # the common case
                self._check(len(ev))
                out.append(ev[6:])
                continue
            self._check(len(ev))
            data = _parse_event(ev)
            if data is not None:
                out.append(data)
        return out

    def _check(self, size: int) -> None:
        if size > self._max:
            raise StreamBroken(f"engine sent an SSE event larger than {self._max} bytes", code="event_too_large")

    def tail(self) -> bytes | None:
        """An event left without its blank line when the stream closed."""
        rest = bytes(self._buf).strip(b"\r\n")
        self._buf.clear()
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
    """The human message inside any of the engines' error envelopes (already decoded)."""
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
    """Checks each event of one engine's stream and erases its quirks, so every stream reads like OpenAI's.

    An event is decoded into ``wire.Chunk`` (about a microsecond for a token
    chunk); if nothing in it needs changing, its original bytes go out. Only
    events that do (usage, a renamed finish reason, a repeated role, and for
    engines that are not ``clean`` a missing id or created or a wrong object)
    are decoded in full and re-encoded.
    """

    __slots__ = ("_clean", "_id", "_created", "_roles", "_want_usage", "_object", "stats", "extra", "_rename")
    ended = False  # a chat stream ends at [DONE] (a native one at its last event: backends/native.py)

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
        self._roles: set[int] = set()  # choice indexes whose role was sent
        self._object = "chat.completion.chunk" if op == "chat" else "text_completion"
        self.stats = stats
        # Events to send right after the one ``feed`` returned; the caller drains it.
        self.extra: list[bytes] = []

    def feed(self, data: bytes) -> bytes | None:
        """One event's data in, the event to send out (or None to drop it).

        Raises ``StreamBroken`` for a malformed event and ``EngineErrorEvent``
        for an error the engine reported. Rarely one event becomes two; the
        second is left in :attr:`extra`.
        """
        if self._rename is not None and self._rename[0] in data:
            old, new = self._rename
            data = data.replace(b'"model":' + old, b'"model":' + new).replace(b'"model": ' + old, b'"model": ' + new)
        try:
            ev = decode_chunk(data)
        except Malformed:
            raise StreamBroken(f"engine sent a malformed event: {data[:200]!r}", code="malformed_event") from None
        if ev.error or ev.object == "error":
            raise EngineErrorEvent(parse_error(data), data)
        stats = self.stats
        choices = ev.choices
        change = ev.usage is not None
        repeated: list[int] = []  # positions of choices whose role was already sent
        if choices:
            tokens = False  # a chunk that carries generated text: what the chunk count estimates tokens by
            for pos, ch in enumerate(choices):
                fr = ch.finish_reason
                if fr:
                    stats.finished = True
                    change = change or fr in FINISH_MAP
                delta = ch.delta
                if delta is not None:
                    tokens = tokens or bool(delta.content or delta.tool_calls)
                    if delta.role is not None:
                        if ch.index in self._roles:
                            repeated.append(pos)  # TGI, MLX, old Ollama repeat it
                        else:
                            self._roles.add(ch.index)
                elif ch.text:
                    tokens = True
            if tokens:  # not the opening role chunk or a bare finish chunk
                stats.chunks += 1
            change = change or bool(repeated)
        if not self._clean and not change:
            change = not ev.id or not ev.created or (bool(choices) and ev.object != self._object)
        if not change:
            return data
        return self._rewrite(_decode(data), repeated)

    def _rewrite(self, obj: dict[str, Any], repeated: list[int]) -> bytes | None:
        """The slow path: an event (already checked) that needs changing."""
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
            for pos, ch in enumerate(choices):
                fr = ch.get("finish_reason")
                if fr:
                    # llama.cpp's /v1/completions stream puts usage on its finish chunk;
                    # OpenAI sends it in a chunk of its own, with no choices, where clients look.
                    split = split or bool(usage and self._want_usage)
                    if fr in FINISH_MAP:
                        ch["finish_reason"] = FINISH_MAP[fr]
                if pos in repeated:
                    del ch["delta"]["role"]
            if usage and (split or not self._want_usage):
                obj["usage"] = None
        if not self._clean:
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
