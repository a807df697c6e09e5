"""Rewriting a frame's ``peer`` without re-encoding it (pure logic; the hot path).

A frame is a msgpack array ``[tag, peer, ...]`` (``wire``: tagged, array-like
Structs put the tag first, then the fields in order, ``peer`` first of them for
every node-to-node frame). The relay replaces the bytes of that one string and
copies the rest verbatim: the payload, and any trailing fields a newer node
added that this relay does not know, reach the destination untouched.
"""

from __future__ import annotations

import msgspec

__all__ = ["encode_peer", "peer_span", "rewrite_peer"]

encode_peer = msgspec.msgpack.Encoder().encode


def _str_end(raw: bytes, i: int) -> int:
    """Index just past the msgpack str that starts at ``raw[i]``."""
    b = raw[i]
    if 0xA0 <= b <= 0xBF:  # fixstr
        return i + 1 + (b & 0x1F)
    if b == 0xD9:  # str 8
        return i + 2 + raw[i + 1]
    if b == 0xDA:  # str 16
        return i + 3 + int.from_bytes(raw[i + 1 : i + 3], "big")
    if b == 0xDB:  # str 32
        return i + 5 + int.from_bytes(raw[i + 1 : i + 5], "big")
    raise ValueError("not a msgpack str")


def peer_span(raw: bytes) -> tuple[int, int]:
    """Byte range of the ``peer`` string (the array's second element) in an encoded frame."""
    b = raw[0]
    if 0x90 <= b <= 0x9F:  # fixarray
        i = 1
    elif b == 0xDC:  # array 16
        i = 3
    elif b == 0xDD:  # array 32
        i = 5
    else:
        raise ValueError("not a msgpack array")
    start = _str_end(raw, i)  # skip the tag
    return start, _str_end(raw, start)


def rewrite_peer(raw: bytes, peer: bytes) -> bytes:
    """``raw`` with its ``peer`` replaced by ``peer`` (an already msgpack-encoded str)."""
    start, end = peer_span(raw)
    view = memoryview(raw)
    return b"".join((view[:start], peer, view[end:]))
