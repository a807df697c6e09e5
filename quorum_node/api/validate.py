"""Checks on request bodies: wrong types get a 400 naming the ``param``."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from ..errors import BadRequest

__all__ = ["decode_typed", "parse_body", "check_chat", "check_completions", "check_embeddings"]

_decode = msgspec.json.Decoder().decode

_NUM = (int, float)
# field -> (allowed types, description); bool is excluded from numbers below
_COMMON: dict[str, tuple[tuple[type, ...], str]] = {
    "stream": ((bool,), "a boolean"),
    "stream_options": ((dict,), "an object"),
    "max_tokens": ((int,), "an integer"),
    "max_completion_tokens": ((int,), "an integer"),
    "n": ((int,), "an integer"),
    "temperature": (_NUM, "a number"),
    "top_p": (_NUM, "a number"),
    "presence_penalty": (_NUM, "a number"),
    "frequency_penalty": (_NUM, "a number"),
    "seed": ((int,), "an integer"),
    "stop": ((str, list), "a string or an array of strings"),
    "user": ((str,), "a string"),
    "logit_bias": ((dict,), "an object"),
}
_CHAT: dict[str, tuple[tuple[type, ...], str]] = {
    **_COMMON,
    "tools": ((list,), "an array"),
    "tool_choice": ((str, dict), "a string or an object"),
    "response_format": ((dict,), "an object"),
    "logprobs": ((bool,), "a boolean"),
    "top_logprobs": ((int,), "an integer"),
}


_AT = re.compile(r"at `\$\.([A-Za-z_]+)")
T = TypeVar("T")


def decode_typed(decode: Callable[[bytes], T], raw: bytes) -> T:
    """A body decoded straight into its surface's typed request (``decode``: a msgspec decoder's
    ``decode``); wrong JSON or wrong types are a 400 naming the ``param`` where msgspec says it."""
    if not raw:
        raise BadRequest("The request body is empty; expected a JSON object", code="invalid_json")
    try:
        return decode(raw)
    except msgspec.ValidationError as e:
        m = _AT.search(str(e))
        raise BadRequest(f"Invalid request: {e}", param=m.group(1) if m else None, code="invalid_type") from None
    except msgspec.DecodeError as e:
        raise BadRequest(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    except (UnicodeDecodeError, RecursionError):
        raise BadRequest("The request body is not valid JSON", code="invalid_json") from None


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise BadRequest("The request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = _decode(raw)
    except msgspec.DecodeError as e:
        raise BadRequest(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    except UnicodeDecodeError as e:
        raise BadRequest(f"The request body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("The request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object", code="invalid_json")
    return body


def _check_fields(body: dict[str, Any], table: dict[str, tuple[tuple[type, ...], str]]) -> None:
    model = body.get("model")
    if model is None:
        raise BadRequest("Missing required parameter: 'model'", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise BadRequest("Invalid type for 'model': expected a non-empty string", param="model", code="invalid_type")
    for key, (types, what) in table.items():
        v = body.get(key)
        if v is None:
            continue
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise BadRequest(f"Invalid type for '{key}': expected {what}", param=key, code="invalid_type")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(key)
        if isinstance(v, int) and v < 1:
            raise BadRequest(f"Invalid value for '{key}': must be at least 1", param=key, code="invalid_value")
    stop = body.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise BadRequest("Invalid type for 'stop': expected strings", param="stop", code="invalid_type")


def check_chat(body: dict[str, Any]) -> None:
    _check_fields(body, _CHAT)
    msgs = body.get("messages")
    if msgs is None:
        raise BadRequest("Missing required parameter: 'messages'", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("Invalid 'messages': expected a non-empty array", param="messages", code="invalid_type")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(
                f"Invalid 'messages[{i}]': expected an object with a 'role'",
                param=f"messages[{i}]",
                code="invalid_type",
            )


def check_completions(body: dict[str, Any]) -> None:
    _check_fields(body, _COMMON)
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest("Missing required parameter: 'prompt'", param="prompt", code="missing_required_parameter")
    if not isinstance(prompt, (str, list)):
        raise BadRequest(
            "Invalid type for 'prompt': expected a string or an array", param="prompt", code="invalid_type"
        )


def check_embeddings(body: dict[str, Any]) -> None:
    _check_fields(body, {"user": ((str,), "a string"), "dimensions": ((int,), "an integer")})
    inp = body.get("input")
    if inp is None:
        raise BadRequest("Missing required parameter: 'input'", param="input", code="missing_required_parameter")
    if not isinstance(inp, (str, list)) or (isinstance(inp, list) and not inp):
        raise BadRequest("Invalid 'input': expected a string or a non-empty array", param="input", code="invalid_type")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise BadRequest(
            "Invalid 'encoding_format': expected 'float' or 'base64'", param="encoding_format", code="invalid_value"
        )
