"""llama.cpp's /v1/completions stream carries usage on its finish chunk; clients expect it alone.

The events are the ones llama-server (b11434) sent, trimmed of ``timings`` and the model path.
"""

from __future__ import annotations

import msgspec

from quorum_node.backends.base import StreamStats
from quorum_node.backends.sse import StreamNormalizer

TEXT = (
    b'{"choices":[{"text":" we","index":0,"logprobs":null,"finish_reason":null}],"created":1795318786,'
    b'"object":"text_completion","id":"chatcmpl-fs8"}'
)
FINISH_WITH_USAGE = (
    b'{"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"created":1795318786,'
    b'"object":"text_completion","usage":{"completion_tokens":5,"prompt_tokens":4,"total_tokens":9},'
    b'"id":"chatcmpl-fs8"}'
)
USAGE = {"completion_tokens": 5, "prompt_tokens": 4, "total_tokens": 9}


def run(want_usage: bool) -> tuple[list[dict], StreamStats]:
    stats = StreamStats()
    norm = StreamNormalizer(clean=True, want_usage=want_usage, op="completions", stats=stats)
    out: list[bytes] = []
    for data in (TEXT, FINISH_WITH_USAGE):
        ev = norm.feed(data)
        if ev is not None:
            out.append(ev)
        out.extend(norm.extra)
        norm.extra.clear()
    return [msgspec.json.decode(e) for e in out], stats


def test_usage_on_the_finish_chunk_becomes_a_chunk_of_its_own() -> None:
    events, stats = run(want_usage=True)

    assert [e["choices"][0]["finish_reason"] if e["choices"] else "usage" for e in events] == [None, "length", "usage"]
    assert events[1]["usage"] is None
    assert events[2] == {**events[1], "choices": [], "usage": USAGE}
    assert stats.usage == USAGE and stats.finished


def test_usage_the_client_did_not_ask_for_is_dropped() -> None:
    events, stats = run(want_usage=False)

    assert len(events) == 2
    assert all(e.get("usage") is None for e in events)
    assert stats.usage == USAGE  # the node still counts the tokens
