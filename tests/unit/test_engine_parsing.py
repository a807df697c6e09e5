"""The parsers of what engines (and peers) send, fed bytes directly.

Everything an engine sends is untrusted: each parser either returns typed,
checked data or raises the documented failure; nothing else escapes.
"""

from __future__ import annotations

import json

import msgspec
import pytest
from multidict import CIMultiDict

from quorum_node.backends.base import StreamStats
from quorum_node.backends.errors import check_answer, map_error_answer, parse_retry_after
from quorum_node.backends.sse import EngineErrorEvent, EventSplitter, StreamNormalizer
from quorum_node.backends.wire import ModelCard, ModelId, decode, decode_entries, parse_error
from quorum_node.breaker import CircuitBreaker
from quorum_node.cluster.peers import Outcome, PeerInfo, PeerTable
from quorum_node.errors import (
    BadRequest,
    EngineError,
    EngineFailed,
    EngineRejected,
    EngineUnavailable,
    NotSupported,
    StreamBroken,
)

CHUNK = (
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}'
)


def norm(*, clean: bool = True, want_usage: bool = False, op: str = "chat") -> StreamNormalizer:
    return StreamNormalizer(clean=clean, want_usage=want_usage, op=op, stats=StreamStats())


# -- SSE framing --------------------------------------------------------------


def test_splitter_joins_events_across_reads_and_crlf() -> None:
    s = EventSplitter()
    assert s.feed(b'data: {"a"') == []
    assert s.feed(b":1}\r") == []
    assert s.feed(b'\n\r\n: ping\n\ndata:{"b":2}\n') == [b'{"a":1}']
    assert s.feed(b"\ndata: x\ndata: y\n\n") == [b'{"b":2}', b"x\ny"]
    assert s.feed(b'error: {"message":"boom"}\n\n') == [b'{"error":{"message":"boom"}}']
    assert s.feed(b"data: tail") == []
    assert s.tail() == b"tail"


def test_an_event_longer_than_the_limit_is_malformed() -> None:
    s = EventSplitter(max_event_bytes=1000)
    assert s.feed(b"data: " + b"x" * 500) == []
    with pytest.raises(StreamBroken) as info:
        s.feed(b"x" * 600)  # still no blank line: 1106 bytes waiting
    assert info.value.code == "event_too_large"
    with pytest.raises(StreamBroken):  # a whole event over the limit, in one read
        EventSplitter(max_event_bytes=1000).feed(b"data: " + b"y" * 2000 + b"\n\ndata: ok\n\n")
    s = EventSplitter(max_event_bytes=1000)
    assert s.feed((b"data: " + b"z" * 900 + b"\n\n") * 50) == [b"z" * 900] * 50  # many under it: fine


# -- stream events --------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"choices":[1],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}',
        b'{"choices":5}',
        b'{"choices":[{"index":"0","delta":{}}]}',
        b'{"choices":[{"index":0,"delta":[]}]}',
        b'{"choices":[{"index":0,"delta":{"role":1}}]}',
        b'{"choices":[{"index":0,"finish_reason":5}]}',
        b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":{}}}]}}]}',
        b'{"choices":[],"usage":{"completion_tokens":-3}}',
        b'{"choices":[],"usage":7}',
        b"[1]",
        b"5",
        b"null",
        b'"text"',
        b"",
        b"{",
        b'{"choices":[]} trailing',
    ],
)
def test_malformed_events_raise_stream_broken(data: bytes) -> None:
    with pytest.raises(StreamBroken) as info:
        norm().feed(data)
    assert info.value.code == "malformed_event" and not isinstance(info.value, EngineErrorEvent)


def test_a_clean_event_goes_out_as_the_bytes_the_engine_sent() -> None:
    n = norm()
    assert n.feed(CHUNK) is CHUNK
    assert n.stats.chunks == 1 and not n.stats.finished
    extra_fields = CHUNK[:-1] + b',"timings":{"x":[1,2]},"system_fingerprint":"fp"}'
    assert n.feed(extra_fields) is extra_fields  # fields we do not read are allowed, and kept


def test_error_events_carry_the_engines_error() -> None:
    with pytest.raises(EngineErrorEvent) as info:
        norm().feed(b'{"error":{"message":"out of memory","type":"server_error","code":500}}')
    assert info.value.message == "out of memory" and info.value.info is not None
    assert info.value.info.status == 500 and info.value.code == "engine_error"
    with pytest.raises(EngineErrorEvent) as info:
        norm().feed(b'{"object":"error","message":"flat","code":400}')  # vLLM before 0.10.1
    assert info.value.message == "flat" and info.value.info is not None and info.value.info.status == 400
    with pytest.raises(EngineErrorEvent) as info:
        norm().feed(b'{"error":{"message":"upstream gone","code":"idle_timeout"}}')  # a peer's error event
    assert info.value.code == "idle_timeout"
    assert norm().feed(b'{"error":null,"choices":[]}') is not None  # no error after all


def test_quirks_are_rewritten_only_where_needed() -> None:
    n = norm(clean=False)  # TGI: no ids, role on every delta, its own finish reason
    first = json.loads(
        n.feed(
            b'{"id":"","created":5,"object":"chat.completion.chunk","choices":'
            b'[{"index":0,"delta":{"role":"assistant","content":"a"}}]}'
        )
        or b""
    )
    second = json.loads(
        n.feed(
            b'{"id":"","created":5,"object":"chat.completion.chunk","choices":'
            b'[{"index":0,"delta":{"role":"assistant","content":"b"},'
            b'"finish_reason":"stop_sequence"}]}'
        )
        or b""
    )
    assert first["id"] == second["id"] and first["id"].startswith("chatcmpl-")
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert "role" not in second["choices"][0]["delta"]
    assert second["choices"][0]["finish_reason"] == "stop" and n.stats.finished

    n = norm(want_usage=False)
    assert n.feed(b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}') is None
    assert n.stats.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


# -- whole answers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "raw"),
    [
        ("chat", b'{"choices": 5}'),
        ("chat", b'{"choices": [1]}'),
        ("chat", b'{"choices": [{"index": 0}]}'),
        ("chat", b'{"choices": [{"message": {"content": 1}}]}'),
        ("chat", b'{"choices": [{"message": {}}], "usage": {"total_tokens": "x"}}'),
        ("chat", b"{}"),
        ("completions", b'{"choices": [{"message": {"content": "chat, not text"}}]}'),
        ("embeddings", b'{"data": [{"embedding": ["a"]}]}'),
        ("embeddings", b'{"data": {"embedding": [1.0]}}'),
        ("embeddings", b'{"object": "list"}'),
        ("chat", b"[]"),
        ("chat", b""),
        ("chat", b"\xff\xfe"),
    ],
)
def test_malformed_answers_are_502_for_another_holder(op: str, raw: bytes) -> None:
    with pytest.raises(EngineUnavailable) as info:
        check_answer(op, raw, engine="e")  # type: ignore[arg-type]
    assert info.value.status == 502


def test_well_formed_answers_come_back_as_dicts() -> None:
    raw = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"hi","extra":1}}],"usage":null}'
    assert check_answer("chat", raw, engine="e")["choices"][0]["message"]["extra"] == 1
    assert check_answer("embeddings", b'{"data":[{"embedding":[1, 2.5]},{"embedding":"AAAA"}]}', engine="e")
    with pytest.raises(EngineRejected) as info:  # LM Studio's errors on HTTP 200
        check_answer("chat", b'{"error": "Invalid model identifier \\"x\\""}', engine="e")
    assert isinstance(info.value.error, BadRequest)


# -- error answers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"error":{"message":"m1","type":"t","param":"p","code":"c"}}', "m1"),
        (b'{"error":"m2"}', "m2"),
        (b'{"error":"m3","error_type":"validation"}', "m3"),
        (b'{"object":"error","message":"m4","type":"BadRequestError","param":null,"code":400}', "m4"),
        (b'{"error":{"code":500,"message":"m5","type":"server_error"}}', "m5"),
        (b'{"detail":"m6"}', "m6"),
    ],
)
def test_every_engine_error_envelope_is_read(raw: bytes, message: str) -> None:
    info = parse_error(raw)
    assert info is not None and info.message == message


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"<html>500</html>",
        b"[]",
        b'{"error":{}}',
        b'{"error":5}',
        b'{"error":""}',
        b'{"status":"failed"}',
        b'{"detail":[{"loc":1}]}',
        b"{",
    ],
)
def test_no_error_body_is_none(raw: bytes) -> None:
    assert parse_error(raw) is None


def test_engine_error_answers_map_onto_the_error_tree() -> None:
    body = b'{"error":{"code":500,"message":"image input is not supported","type":"server_error"}}'
    failed = map_error_answer(500, body, {}, engine="e")
    assert isinstance(failed, EngineFailed)
    assert failed.error.status == 500 and failed.error.code == "engine_error" and not failed.error.retryable
    assert failed.error.message == "image input is not supported"
    for status, raw in ((500, b""), (500, b"<html>"), (502, body), (503, body), (504, b"")):
        err = map_error_answer(status, raw, {}, engine="e")
        assert type(err) is EngineUnavailable and err.status == status
    for status in (301, 302, 303, 307, 308):
        err = map_error_answer(status, b'{"moved": true}', {}, engine="e")
        assert type(err) is EngineUnavailable and err.status == 502 and "redirect" in err.message
    rejected = map_error_answer(400, b'{"error":{"message":"bad","param":"messages","code":"x"}}', {}, engine="e")
    assert isinstance(rejected, EngineRejected) and rejected.error.param == "messages"
    assert isinstance(map_error_answer(501, b"", {}, engine="e").error, NotSupported)  # type: ignore[attr-defined]
    busy = map_error_answer(503, b"", {"Retry-After": "inf"}, engine="e")
    assert isinstance(busy, EngineUnavailable) and busy.retry_after_s is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        ("0.5", 0.5),
        (None, None),
        ("", None),
        ("inf", None),
        ("nan", None),
        ("-1", None),
        ("1e9", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_retry_after_is_read_only_when_sane(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


def _peer_error(status: int, raw: bytes, headers: CIMultiDict[str]) -> EngineError:
    return map_error_answer(status, raw, headers, engine="peer:b", peer=True)


def test_peer_errors_keep_the_peers_verdict() -> None:
    body = b'{"error":{"message":"no images","type":"server_error","param":null,"code":"engine_error"}}'
    refused = _peer_error(500, body, CIMultiDict({"x-should-retry": "false"}))
    assert isinstance(refused, EngineFailed) and refused.error.code == "engine_error"
    assert not refused.error.retryable and refused.error.message == "no images"
    crashed = _peer_error(500, body, CIMultiDict())
    assert type(crashed) is EngineUnavailable
    busy = _peer_error(
        503, b'{"error":{"message":"x","code":"holders_unavailable"}}', CIMultiDict({"Retry-After": "3"})
    )
    assert type(busy) is EngineUnavailable and busy.retry_after_s == 3.0
    moved = _peer_error(302, b"", CIMultiDict({"Location": "http://elsewhere/"}))
    assert type(moved) is EngineUnavailable and moved.status == 502
    bad = _peer_error(
        400, b'{"error":{"message":"m","type":"invalid_request_error","param":"p","code":"c"}}', CIMultiDict()
    )
    assert isinstance(bad, EngineRejected) and (bad.error.status, bad.error.param) == (400, "p")


@pytest.mark.parametrize(
    ("status", "engine_verdict", "peer_verdict"),
    [
        # (status) -> what an engine's answer becomes, what a peer's becomes (the peer differences, all of them)
        (403, EngineUnavailable, EngineRejected),  # an engine refusing our credentials; a peer refusing the request
        (409, EngineUnavailable, EngineRejected),
        (501, EngineRejected, EngineRejected),
        (404, EngineUnavailable, EngineUnavailable),
        (401, EngineUnavailable, EngineUnavailable),
        (422, EngineRejected, EngineRejected),
    ],
)
def test_engine_and_peer_answers_differ_only_where_meant(status: int, engine_verdict: type, peer_verdict: type) -> None:
    raw = b'{"error":{"message":"m","type":"some_error","code":"c"}}'
    engine = map_error_answer(status, raw, {}, engine="e")
    peer = map_error_answer(status, raw, {}, engine="peer:b", peer=True)
    assert type(engine) is engine_verdict and type(peer) is peer_verdict
    if isinstance(peer, EngineRejected):  # a peer's verdict is passed on as it was given
        assert (peer.error.status, peer.error.type, peer.error.code) == (status, "some_error", "c")
    if isinstance(engine, EngineRejected) and status != 501:  # an engine's is put in our words
        assert isinstance(engine.error, BadRequest) and engine.error.status == 400
    if status == 404:  # the peer's catalog changed under us: unavailable, not "no such model"
        assert isinstance(peer, EngineUnavailable) and peer.status == 503
        assert isinstance(engine, EngineUnavailable) and engine.status == 404
    engine_500 = map_error_answer(500, raw, {"x-should-retry": "false"}, engine="e")
    assert isinstance(engine_500, EngineFailed) and engine_500.error.code == "engine_error"  # ours, not its "c"
    assert type(map_error_answer(500, b"", {"x-should-retry": "false"}, engine="e")) is EngineUnavailable


# -- model lists -------------------------------------------------------------------------


def test_a_bad_model_entry_costs_only_itself() -> None:
    raws = [
        msgspec.Raw(b) for b in (b'{"id":"a","created":3}', b'{"id":5}', b'"x"', b'{"id":"b","created":"yesterday"}')
    ]
    entries = decode_entries(raws, ModelCard, ModelId)
    assert [(type(e).__name__, e.id) for e in entries] == [("ModelCard", "a"), ("ModelId", "b")]
    assert decode(b'{"id": 1}', ModelCard) is None


# -- when an out-of-service holder comes back ----------------------------------------------------


def test_breaker_and_peer_table_say_when_a_holder_may_be_tried_again() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_after_s=5.0)
    assert b.retry_in_s(0.0) == 0.0
    b.on_failure(10.0)
    assert b.retry_in_s(11.0) == pytest.approx(4.0)
    assert b.retry_in_s(15.0) == 0.0  # half-open: a probe may go
    assert b.allow(15.0) and b.retry_in_s(15.5) == 1.0  # the probe is out

    table = PeerTable(self_id="me", is_member=lambda node_id: node_id == "p", breaker_threshold=1, breaker_reset_s=5.0)
    table.on_discovered(PeerInfo(node_id="p", address="10.0.0.1:1"), 0.0)
    assert table.unavailable_for_s("m", 0.0) is None  # never confirmed: not a holder at all
    table.on_health_ok("p", 0.001, 0.0)
    table.on_catalog("p", ["m"], "d", 0.0)
    assert table.begin_request("p", 1.0)
    table.end_request("p", 1.0, outcome=Outcome.FAILURE)
    assert table.holders("m", 2.0) == []
    assert table.unavailable_for_s("m", 2.0) == pytest.approx(4.0)
    assert table.unavailable_for_s("other", 2.0) is None
