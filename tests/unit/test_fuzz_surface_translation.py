"""Fuzz the Responses and Messages translations: any JSON body is a Chat Completions body or a 400.

Pure functions, no sockets: hypothesis feeds them arbitrary JSON shaped like
the real requests (the right top-level keys, anything inside), and the only
exception allowed out is ``BadRequest`` (answered as a 400), never a crash
that the node would answer with a 500.
"""

from __future__ import annotations

import contextlib
import os

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quorum_node.api import anthropic as messages_api
from quorum_node.api import responses as responses_api
from quorum_node.errors import BadRequest

FUZZ = settings(
    max_examples=int(os.environ.get("QUORUM_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False)
    | st.sampled_from(
        [
            "",
            "user",
            "assistant",
            "system",
            "developer",
            "tool",
            "text",
            "input_text",
            "output_text",
            "input_image",
            "function_call",
            "function_call_output",
            "message",
            "reasoning",
            "tool_use",
            "tool_result",
            "image",
            "function",
            "json_schema",
            "json_object",
            "base64",
            "url",
            "auto",
            "any",
            "none",
            "required",
            "x",
        ]
    )
)
keys = st.sampled_from(
    [
        "type",
        "role",
        "content",
        "text",
        "call_id",
        "name",
        "arguments",
        "output",
        "id",
        "input",
        "tool_use_id",
        "source",
        "media_type",
        "data",
        "image_url",
        "schema",
        "format",
        "parameters",
        "input_schema",
        "is_error",
        "refusal",
        "detail",
        "url",
    ]
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=25
)
# request-shaped: lists of objects with the keys the translations read, anything as their values
items = st.lists(st.dictionaries(keys, json_values, max_size=6), max_size=4)
blocks = st.lists(st.dictionaries(keys, json_values | items, max_size=6), max_size=4)
shaped = items | st.lists(st.dictionaries(keys, json_values | blocks, max_size=6), max_size=4) | json_values


def _only_bad_request(fn, body: dict) -> None:
    raw = msgspec.json.encode(body)
    with contextlib.suppress(BadRequest):
        fn(raw)


def _responses(raw: bytes) -> None:
    req = responses_api.parse_request(raw)
    body, _ = responses_api.to_chat(req, [])
    msgspec.json.encode(body)


def _messages(raw: bytes) -> None:
    req = messages_api.parse_request(raw)
    msgspec.json.encode(messages_api.to_chat(req))


@FUZZ
@given(inp=shaped, tools=shaped, tool_choice=json_values, text=json_values, instructions=json_values)
def test_fuzz_responses_request(inp, tools, tool_choice, text, instructions) -> None:
    _only_bad_request(
        _responses,
        {
            "model": "m",
            "input": inp,
            "tools": tools,
            "tool_choice": tool_choice,
            "text": text,
            "instructions": instructions,
        },
    )


@FUZZ
@given(msgs=shaped, system=shaped, tools=shaped, tool_choice=json_values, cfg=json_values)
def test_fuzz_messages_request(msgs, system, tools, tool_choice, cfg) -> None:
    _only_bad_request(
        _messages,
        {
            "model": "m",
            "max_tokens": 8,
            "messages": msgs,
            "system": system,
            "tools": tools,
            "tool_choice": tool_choice,
            "output_config": cfg,
        },
    )
