"""Property-based fuzzing of every parser of untrusted bytes: engine answers, SSE streams, peer and relay messages.

Whatever an engine, a peer or the relay sends, each parser either returns its
typed result or raises the one documented failure of its layer — never
anything else (an AttributeError, a TypeError, a KeyError is a crash waiting
to reach a client).
"""

from __future__ import annotations

import contextlib
import json
import os

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from quorum_node.backends.base import StreamStats
from quorum_node.backends.errors import check_answer, map_error_answer
from quorum_node.backends.sse import EventSplitter, StreamNormalizer
from quorum_node.backends.wire import parse_error
from quorum_node.cluster.messages import decode_catalog, decode_identity
from quorum_node.cluster.noise import NoiseError, NumberedReceiver
from quorum_node.errors import EngineError, StreamBroken
from quorum_relay import wire

FUZZ = settings(max_examples=int(os.environ.get("QUORUM_FUZZ_EXAMPLES", "300")), deadline=None)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)
# shapes close to real engine output, with every field allowed to be wrong
chunk_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "object": json_values,
        "created": json_values,
        "model": json_values,
        "choices": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "index": json_values,
                    "delta": st.dictionaries(
                        st.sampled_from(["role", "content", "tool_calls"]), json_values, max_size=3
                    )
                    | json_values,
                    "text": json_values,
                    "finish_reason": st.sampled_from(["stop", "length", "stop_sequence"]) | json_values,
                    "message": json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values,
        "usage": st.fixed_dictionaries({}, optional={"prompt_tokens": json_values, "completion_tokens": json_values})
        | json_values,
        "error": json_values,
        "data": json_values,
    },
)
payloads = (
    chunk_like.map(lambda v: json.dumps(v).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
)


@FUZZ
@given(raw=payloads, status=st.integers(100, 599))
def test_engine_error_answers_map_into_the_error_tree(raw: bytes, status: int) -> None:
    parse_error(raw)
    assert isinstance(map_error_answer(status, raw, {}, engine="e"), EngineError)
    assert isinstance(
        map_error_answer(status, raw, {"x-should-retry": "false", "Retry-After": "1"}, engine="peer:e", peer=True),
        EngineError,
    )


@FUZZ
@given(raw=payloads, op=st.sampled_from(["chat", "completions", "embeddings"]))
def test_whole_answers_are_checked_or_refused(raw: bytes, op: str) -> None:
    try:
        out = check_answer(op, raw, engine="e")  # type: ignore[arg-type]
    except EngineError:
        return
    assert isinstance(out, dict)


@FUZZ
@given(
    events=st.lists(payloads, min_size=1, max_size=6),
    clean=st.booleans(),
    want_usage=st.booleans(),
    op=st.sampled_from(["chat", "completions"]),
    cuts=st.lists(st.integers(0, 400), max_size=5),
)
def test_streams_are_normalised_or_broken_never_crashed(
    events: list[bytes], clean: bool, want_usage: bool, op: str, cuts: list[int]
) -> None:
    stream = b"".join(b"data: " + e.replace(b"\n", b" ") + b"\n\n" for e in events)
    pieces, last = [], 0
    for c in sorted(cuts):  # the same bytes, sliced anywhere
        pieces.append(stream[last:c])
        last = max(last, c)
    pieces.append(stream[last:])
    splitter = EventSplitter()
    norm = StreamNormalizer(clean=clean, want_usage=want_usage, op=op, stats=StreamStats())
    try:
        for piece in pieces:
            for data in splitter.feed(piece):
                out = norm.feed(data)
                if out is not None:
                    json.loads(out)  # whatever goes on to the client is JSON
                for extra in norm.extra:
                    json.loads(extra)
                norm.extra.clear()
    except StreamBroken:
        pass


@FUZZ
@given(raw=payloads)
def test_peer_messages_decode_or_fail_as_value_errors(raw: bytes) -> None:
    for decode in (decode_identity, decode_catalog):
        with contextlib.suppress(ValueError):  # msgspec's DecodeError and ValidationError both are
            decode(raw)


@FUZZ
@given(raw=st.binary(max_size=300) | json_values.map(lambda v: msgspec.msgpack.encode(v)))
def test_relay_frames_decode_or_fail_as_value_errors(raw: bytes) -> None:
    try:
        frame = wire.decode(raw)
    except ValueError:
        return
    assert wire.decode(wire.encode(frame)) == frame


@FUZZ
@given(messages=st.lists(st.binary(max_size=80), max_size=8))
def test_forged_relay_payloads_are_rejected_as_noise_errors(messages: list[bytes]) -> None:
    from quorum_node.cluster.noise import CipherState

    recv = NumberedReceiver(CipherState(b"\x07" * 32))
    for m in messages:
        try:
            recv.open(m)
        except NoiseError:
            continue
        raise AssertionError("a forged message opened")
