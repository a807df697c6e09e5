"""What the translating surfaces read from the OpenAI answers they re-encode.

The Responses and Messages surfaces get Chat Completions answers from the
request path (a whole answer as a dict, or a stream as batches of chunk JSON
bytes) and write them in their own wire format. The chunks are decoded with
the one declaration of an OpenAI chunk (``backends/wire.py``), which the
request path has already checked each of them against; an event that does
not fit is skipped.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from ..backends.wire import Chunk, Malformed, ToolCall
from ..backends.wire import decode_chunk as _decode_chunk

__all__ = ["Chunk", "ToolCall", "decode_chunk", "new_id", "sse", "tool_calls_of", "usage_counts"]


def decode_chunk(raw: bytes) -> Chunk | None:
    """One OpenAI stream chunk, or None where it is not one (skipped, never fatal)."""
    try:
        return _decode_chunk(raw)
    except Malformed:
        return None


_encode = msgspec.json.Encoder().encode


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with a name (both Responses and Messages name theirs)."""
    return b"event: " + event.encode() + b"\ndata: " + _encode(data) + b"\n\n"


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def usage_counts(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens from an OpenAI usage dict; 0 where it says nothing usable."""
    if not isinstance(usage, dict):
        return 0, 0
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (p if type(p) is int and p >= 0 else 0), (c if type(c) is int and c >= 0 else 0)


def tool_calls_of(message: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of each well-formed tool call in a Chat Completions message."""
    out: list[tuple[str, str, str]] = []
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return out
    for call in calls:
        if not isinstance(call, dict):
            continue
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        args = fn.get("arguments")
        if not isinstance(args, str):
            args = _encode(args).decode() if args is not None else "{}"
        cid = call.get("id")
        out.append((cid if isinstance(cid, str) and cid else new_id("call_"), fn["name"], args))
    return out
