"""The Responses API's requests, read and translated to Chat Completions (``responses.py`` serves them).

``parse_request`` decodes a ``POST /v1/responses`` body into a ``ResponsesRequest``,
refusing with a 400 what Quorum does not do (see ``responses.py``);
``to_chat`` turns it, with the stored conversation it continues, into one Chat
Completions body and the Responses items it adds to that conversation.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..errors import BadRequest
from .validate import decode_typed

__all__ = ["ResponsesRequest", "input_items", "input_messages", "parse_request", "to_chat"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """The fields of ``POST /v1/responses`` the node reads; unknown ones are ignored."""

    model: str
    input: str | list[Any] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = None
    stream: bool | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None


_request = msgspec.json.Decoder(ResponsesRequest).decode


def parse_request(raw: bytes) -> ResponsesRequest:
    req = decode_typed(_request, raw)
    if not req.model:
        raise BadRequest("Invalid 'model': expected a non-empty string", param="model", code="invalid_value")
    for name in ("background", "conversation", "prompt"):
        if getattr(req, name) not in (None, False):
            raise _unsupported(name, f"'{name}' is not supported by quorum-node")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise BadRequest(
            "Invalid 'max_output_tokens': must be at least 1", param="max_output_tokens", code="invalid_value"
        )
    if req.input is None or req.input == [] or req.input == "":
        raise BadRequest("Missing required parameter: 'input'", param="input", code="missing_required_parameter")
    return req


def _unsupported(param: str, message: str) -> BadRequest:
    return BadRequest(message, param=param, code="unsupported_parameter")


def _text_of(parts: Any, param: str) -> str:
    """A tool output or a text-only content list as one string."""
    if isinstance(parts, str):
        return parts
    if isinstance(parts, list):
        out = []
        for i, p in enumerate(parts):
            if not isinstance(p, dict) or not isinstance(p.get("text"), str):
                raise BadRequest(
                    f"Invalid '{param}[{i}]': expected a text part", param=f"{param}[{i}]", code="invalid_type"
                )
            out.append(p["text"])
        return "".join(out)
    raise BadRequest(f"Invalid '{param}': expected a string or an array of parts", param=param, code="invalid_type")


def _content(content: Any, param: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"Invalid '{param}': expected a string or an array", param=param, code="invalid_type")
    parts: list[dict[str, Any]] = []
    images = False
    for i, p in enumerate(content):
        where = f"{param}[{i}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = p.get("text") if kind != "refusal" else p.get("refusal")
            if not isinstance(text, str):
                raise BadRequest(f"Invalid '{where}.text': expected a string", param=where, code="invalid_type")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = p.get("image_url")
            if not isinstance(url, str) or not url:
                raise _unsupported(
                    where,
                    f"'{where}': images by file_id are not supported by quorum-node; "
                    "send image_url (a data: URL or an http URL the engine can fetch)",
                )
            image: dict[str, Any] = {"url": url}
            if isinstance(p.get("detail"), str) and p["detail"] != "auto":
                image["detail"] = p["detail"]
            parts.append({"type": "image_url", "image_url": image})
            images = True
        elif kind == "input_file":
            raise _unsupported(where, f"'{where}': input_file is not supported by quorum-node")
        else:
            raise BadRequest(
                f"Invalid '{where}': unknown content part type {kind!r}", param=where, code="invalid_value"
            )
    if images:
        return parts
    return "".join(p["text"] for p in parts)  # text only: a plain string suits every chat template


_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def input_messages(inp: str | list[Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as Chat Completions messages."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(inp):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"Invalid '{where}': expected an object", param=where, code="invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            role = _ROLES.get(role) if isinstance(role, str) else None
            if role is None:
                raise BadRequest(
                    f"Invalid '{where}.role': expected user, assistant, system or developer",
                    param=f"{where}.role",
                    code="invalid_value",
                )
            out.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
            if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(args, str)):
                raise BadRequest(
                    f"Invalid '{where}': a function_call needs call_id, name and arguments (strings)",
                    param=where,
                    code="invalid_type",
                )
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise BadRequest(
                    f"Invalid '{where}.call_id': expected a string", param=f"{where}.call_id", code="invalid_type"
                )
            out.append(
                {"role": "tool", "tool_call_id": call_id, "content": _text_of(item.get("output"), f"{where}.output")}
            )
        elif kind == "reasoning":
            continue  # the engine's own thoughts from an earlier turn: not sent back
        else:
            raise _unsupported(where, f"'{where}': input items of type {kind!r} are not supported by quorum-node")
    return out


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if t.get("type") != "function":
            raise _unsupported(
                where,
                f"'{where}': tools of type {t.get('type')!r} are not supported by quorum-node; only function tools are",
            )
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(
                f"Invalid '{where}.name': expected a non-empty string", param=f"{where}.name", code="invalid_type"
            )
        fn: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if t.get(key) is not None:
                fn[key] = t[key]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice in ("auto", "none", "required"):
            return choice
    elif choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _unsupported("tool_choice", "'tool_choice': expected auto, none, required or a function")


def _response_format(text: dict[str, Any]) -> dict[str, Any] | None:
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema, name = fmt.get("schema"), fmt.get("name")
        if not isinstance(schema, dict) or not isinstance(name, str):
            raise BadRequest(
                "Invalid 'text.format': json_schema needs a name and a schema",
                param="text.format",
                code="invalid_value",
            )
        spec: dict[str, Any] = {"name": name, "schema": schema}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                spec[key] = fmt[key]
        return {"type": "json_schema", "json_schema": spec}
    raise _unsupported("text.format", f"'text.format': type {kind!r} is not supported")


def input_items(inp: str | list[Any]) -> list[Any]:
    """The request's ``input`` as a list of items (a string is one user message)."""
    return [{"type": "message", "role": "user", "content": inp}] if isinstance(inp, str) else list(inp)


def to_chat(req: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Chat Completions body for ``req``; and the conversation so far (``history``, then
    the request's input, as Responses items; its instructions are not part of it)."""
    assert req.input is not None
    convo = input_messages(history) + input_messages(req.input)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + convo
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.tools:
        body["tools"] = _tools(req.tools)
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    if req.parallel_tool_calls is not None and req.tools:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.text is not None:
        fmt = _response_format(req.text)
        if fmt is not None:
            body["response_format"] = fmt
    if req.stream:
        body["stream"] = True
    return body, history + input_items(req.input)


# ----------------------------------------------------------------- the answer
