"""The checks on engines' own Responses and Messages answers (``backends/native.py``), fed directly.

The inputs are what llama-server b11434 wrote when asked with curl (trimmed ids), so
each test shows one quirk going in and the shape the SDKs read coming out; a fuzz
test shows that any event is either passed on or a ``StreamBroken``, never a crash.
"""

from __future__ import annotations

import json
import os

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quorum_node.backends.base import StreamStats
from quorum_node.backends.native import (
    PROBE_BODIES,
    BadShape,
    MessagesEvents,
    ResponsesEvents,
    fix_answer,
    probe_verdict,
)
from quorum_node.backends.sse import EngineErrorEvent
from quorum_node.errors import StreamBroken

MODEL = "SmolLM2-135M-Instruct.Q4_1"
PATH = "/root/.cache/quorum/models/SmolLM2-135M-Instruct.Q4_1.gguf"

# llama-server's /v1/responses stream for "Say hello." (max_output_tokens=2), event data only
LLAMA_RESPONSES = [
    {"type": "response.created", "response": {"id": "resp_A", "object": "response", "status": "in_progress"}},
    {"type": "response.in_progress", "response": {"id": "resp_A", "object": "response", "status": "in_progress"}},
    {
        "type": "response.output_item.added",
        "item": {"content": [], "id": "msg_B", "role": "assistant", "status": "in_progress", "type": "message"},
    },
    {"type": "response.content_part.added", "item_id": "msg_B", "part": {"type": "output_text", "text": ""}},
    {"type": "response.output_text.delta", "item_id": "msg_B", "delta": "Hello"},
    {"type": "response.output_text.delta", "item_id": "msg_B", "delta": "."},
    {"type": "response.output_text.done", "item_id": "msg_B", "text": "Hello."},
    {
        "type": "response.content_part.done",
        "item_id": "msg_B",
        "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": "Hello."},
    },
    {
        "type": "response.output_item.done",
        "item": {
            "type": "message",
            "status": "completed",
            "id": "msg_B",
            "role": "assistant",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": "Hello."}],
        },
    },
    {
        "type": "response.completed",
        "response": {
            "id": "resp_A",
            "object": "response",
            "created_at": 1,
            "status": "completed",
            "model": PATH,
            "output": [],
            "usage": {
                "input_tokens": 33,
                "output_tokens": 2,
                "total_tokens": 35,
                "input_tokens_details": {"cached_tokens": 32},
            },
        },
        "timings": {"cache_n": 32},
    },
]


def _feed(events, checker):
    return [json.loads(checker.feed(json.dumps(ev).encode())) for ev in events]


def test_probe_verdicts() -> None:
    assert probe_verdict(400, b'{"error":{"code":400,"message":"\'input\' is required"}}') is True
    assert probe_verdict(422, b"{}") is True
    assert probe_verdict(404, b'{"error":{"message":"File Not Found","code":404}}') is False
    assert probe_verdict(405, b"") is False and probe_verdict(501, b"") is False
    assert probe_verdict(200, b'{"error":"Unexpected endpoint or method. (POST /v1/messages)"}') is False
    for status in (200, 401, 500, 503):  # nothing to go by: asked again at the next refresh
        assert probe_verdict(status, b"") is None
    assert all(isinstance(msgspec.json.decode(b), dict) for b in PROBE_BODIES.values())


def test_a_llama_responses_stream_gets_what_the_openai_sdk_reads() -> None:
    stats = StreamStats()
    out = _feed(LLAMA_RESPONSES, ResponsesEvents(stats=stats, model=MODEL))
    assert [ev["sequence_number"] for ev in out] == list(range(len(out)))
    assert all(ev["output_index"] == 0 for ev in out[2:-1])
    assert [ev["content_index"] for ev in out if "content_index" in ev] == [0] * 5
    assert [ev["logprobs"] for ev in out if ev["type"].startswith("response.output_text")] == [[]] * 3
    done = out[-1]["response"]
    assert done["model"] == MODEL and done["output"] == [LLAMA_RESPONSES[8]["item"]]  # its own output was empty
    assert done["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}
    assert done["usage"]["input_tokens_details"] == {"cached_tokens": 32}
    assert stats.usage == {"prompt_tokens": 33, "completion_tokens": 2}
    assert stats.finished and stats.chunks == 2


def test_items_are_placed_by_id_and_numbered_in_order() -> None:
    checker = ResponsesEvents(stats=StreamStats(), model=MODEL)
    events = [
        {
            "type": "response.output_item.added",
            "item": {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": ""},
        },
        {
            "type": "response.output_item.added",
            "item": {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": ""},
        },
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "delta": "{}"},
        {
            "type": "response.output_item.done",
            "item": {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"},
        },
        {
            "type": "response.output_item.done",
            "output_index": 1,
            "item": {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
        },
    ]
    out = _feed(events, checker)
    assert [ev["output_index"] for ev in out] == [0, 1, 0, 0, 1]
    assert out[1]["item"]["id"].startswith("fc_") and out[4]["item"]["id"] == out[1]["item"]["id"]


@pytest.mark.parametrize(
    "event, message",
    [
        ({"error": {"code": 500, "message": "boom", "type": "server_error"}}, "boom"),  # llama's Responses stream
        ({"type": "error", "code": "server_error", "message": "boom", "param": None}, "boom"),  # OpenAI's
        ({"type": "response.failed", "response": {"id": "r", "error": {"code": "x", "message": "boom"}}}, "boom"),
    ],
)
def test_responses_errors_are_the_engines_error(event, message) -> None:
    with pytest.raises(EngineErrorEvent) as info:
        ResponsesEvents(stats=StreamStats(), model=MODEL).feed(json.dumps(event).encode())
    assert info.value.message == message


def test_a_llama_messages_stream_gets_what_the_anthropic_sdk_reads() -> None:
    stats = StreamStats()
    events = [
        {
            "type": "message_start",
            "message": {
                "id": "chatcmpl-F9h",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": PATH,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"cache_read_input_tokens": 32, "input_tokens": 1, "output_tokens": 0},
            },
        },
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "tool_use", "id": "2OsMW9", "name": "get_weather"},
        },
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": " "},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    ]
    out = _feed(events, MessagesEvents(stats=stats, model=MODEL))
    msg = out[0]["message"]
    assert msg["id"].startswith("msg_") and msg["model"] == MODEL
    assert msg["usage"] == {
        "cache_read_input_tokens": 32,
        "input_tokens": 1,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
    }
    assert out[1]["content_block"] == {"type": "tool_use", "id": "2OsMW9", "name": "get_weather", "input": {}}
    assert out[4]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": " "}  # llama says end_turn
    assert stats.usage == {"prompt_tokens": 33, "completion_tokens": 9}  # the cached prompt counted too
    assert stats.finished and stats.chunks == 1


@pytest.mark.parametrize(
    "event",
    [
        {"code": 500, "message": "boom", "type": "server_error"},  # llama-server's `event: error` data
        {"type": "error", "error": {"type": "overloaded_error", "message": "boom"}},  # Anthropic's
    ],
)
def test_messages_errors_are_the_engines_error(event) -> None:
    with pytest.raises(EngineErrorEvent) as info:
        MessagesEvents(stats=StreamStats(), model=MODEL).feed(json.dumps(event).encode())
    assert info.value.message == "boom"


def test_whole_answers() -> None:
    msg = {
        "id": "chatcmpl-1",
        "type": "message",
        "role": "assistant",
        "model": PATH,
        "content": [{"type": "tool_use", "id": "t", "name": "f"}],
        "stop_reason": "end_turn",
        "stop_sequence": "X",
        "usage": {"cache_read_input_tokens": 5, "input_tokens": 1, "output_tokens": 3},
    }
    assert fix_answer("messages", msg, MODEL) == {"prompt_tokens": 6, "completion_tokens": 3}
    assert msg["id"].startswith("msg_") and msg["model"] == MODEL and msg["content"][0]["input"] == {}
    assert msg["stop_reason"] == "stop_sequence"
    resp = {"id": "resp_1", "output": [], "model": PATH, "usage": {"input_tokens": 4, "output_tokens": 2}}
    assert fix_answer("responses", resp, MODEL) == {"prompt_tokens": 4, "completion_tokens": 2}
    assert resp["usage"]["total_tokens"] == 6 and resp["status"] == "completed" and resp["model"] == MODEL
    assert fix_answer("count_tokens", {"input_tokens": 7}, MODEL) == {"prompt_tokens": 7, "completion_tokens": 0}
    for op, bad in (("responses", {"output": None}), ("messages", {"content": "x"}), ("count_tokens", {})):
        with pytest.raises(BadShape):
            fix_answer(op, bad, MODEL)


FUZZ = settings(
    max_examples=int(os.environ.get("QUORUM_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 2)
    | st.text(max_size=3)
    | st.sampled_from(
        [
            "response.completed",
            "response.output_item.added",
            "response.output_item.done",
            "response.failed",
            "response.output_text.delta",
            "message_start",
            "content_block_start",
            "message_delta",
            "error",
            "server_error",
            "tool_use",
            "text",
        ]
    ),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "response",
                    "item",
                    "item_id",
                    "output_index",
                    "output",
                    "usage",
                    "message",
                    "content",
                    "content_block",
                    "error",
                    "code",
                    "id",
                    "input_tokens",
                    "output_tokens",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@FUZZ
@given(events=st.lists(json_values, max_size=6))
def test_any_event_is_passed_on_or_a_broken_stream(events) -> None:
    for checker in (
        ResponsesEvents(stats=StreamStats(), model=MODEL),
        MessagesEvents(stats=StreamStats(), model=MODEL),
    ):
        for ev in events:
            try:
                out = checker.feed(msgspec.json.encode(ev))
            except StreamBroken:  # EngineErrorEvent included
                break
            assert isinstance(msgspec.json.decode(out), dict)
