"""llama-server's own Responses and Messages APIs, as build b11434 writes them (for the llama.cpp fake).

Seen with curl against the real build (and in its `server-task.cpp`,
`server-context.cpp`, `server-chat.cpp`); the quirks are kept, because the
node must erase them:

- Responses: no `sequence_number`, `output_index` or `content_index` on any
  event, no `logprobs` on text deltas; `response.created` / `.in_progress`
  carry only `id`, `object`, `status`; `response.completed` has `timings`; no
  `[DONE]`; `model` is the file path; `status` is "completed" even where
  `max_output_tokens` cut the answer. A mid-stream error is
  `data: {"error": {…}}` with no event name. `previous_response_id` is a 400
  (llama-server keeps no responses).
- Messages: the id is `chatcmpl-…`; `usage.input_tokens` leaves out the
  cached prompt (`cache_read_input_tokens`); a `tool_use` block starts without
  `input`; the `content_block_stop`s all come at the end. A mid-stream error is
  `event: error` with `{"code", "message", "type": "server_error"}`.
- Errors in llama's envelope: no `input` is a 400; no `messages` is a 500
  (sic: a runtime_error in the converter); a message `content` of the wrong
  type is a 400; so the node's probes (`backends/native.py`) see 400s.

`native_apis=False` (a knob) is a build from before these routes: they 404.
`messages_start=False` (a knob, any time) leaves out a Messages stream's
`message_start`, as the real llama-server now and then does.
`forged_event_type` (a knob, any time; a hostile build, not llama-server): appended to the
`type` (in the JSON, not the SSE `event:` line) of every Responses text delta after the first,
e.g. a newline and a whole forged `response.completed` event.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from tests.fakes.base import EngineError, Plan, count_words, drop_connection, now_s, random_id

__all__ = ["LlamaNativeApis"]

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _sse(event: str | None, data: dict) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class LlamaNativeApis:
    """Mixed into the llama.cpp fake (an `OpenAICompatEngine`): `/v1/responses`, `/v1/messages`, count_tokens."""

    native_apis: bool = True
    messages_start: bool = True
    forged_event_type: str | None = None

    def native_routes(self) -> list[tuple[str, str, Any]]:
        if not self.native_apis:
            return []
        return [
            ("POST", "/v1/responses", self.handle_responses),
            ("POST", "/responses", self.handle_responses),
            ("POST", "/v1/messages", self.handle_messages),
            ("POST", "/v1/messages/count_tokens", self.handle_count_tokens),
        ]

    # ------------------------------------------------------------ requests

    def _plan(self: Any, body: dict, *, answered: bool, max_tokens: Any, prompt: Any) -> Plan:
        chatish = {"tools": body.get("tools") or [], "messages": [{"role": "tool" if answered else "user"}]}
        return self.make_plan(
            chatish,
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            prompt_tokens=max(1, count_words(prompt)),
        )

    @staticmethod
    def _check_messages(body: dict) -> list:
        if "messages" not in body:
            raise EngineError(500, "'messages' is required")
        messages = body["messages"]
        for m in messages if isinstance(messages, list) else ():
            if isinstance(m, dict) and not isinstance(m.get("content"), (str, list)):
                raise EngineError(400, "Expected 'content' to be a string or an array")
        return messages if isinstance(messages, list) else []

    async def handle_responses(self: Any, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        if "input" not in body:
            raise EngineError(400, "'input' is required")
        if body.get("previous_response_id"):
            raise EngineError(400, "llama.cpp does not support 'previous_response_id'.")
        inp = body["input"]
        if not isinstance(inp, (str, list)):
            raise EngineError(400, "'input' must be a string or array of objects")
        await self.before_generation(request, body)
        last = inp[-1] if isinstance(inp, list) and inp else {}
        answered = isinstance(last, dict) and last.get("type") == "function_call_output"
        plan = self._plan(body, answered=answered, max_tokens=body.get("max_output_tokens"), prompt=inp)
        if body.get("stream"):
            return await self._stream(request, body, plan, self._responses_events)
        await self._generate(plan)
        return web.json_response(self._response(body, plan, "resp_" + random_id(32), now_s()))

    async def handle_messages(self: Any, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        messages = self._check_messages(body)
        await self.before_generation(request, body)
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        content = last.get("content")
        answered = isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content
        )
        plan = self._plan(body, answered=answered, max_tokens=body.get("max_tokens"), prompt=messages)
        if body.get("stream"):
            return await self._stream(request, body, plan, self._messages_events)
        await self._generate(plan)
        return web.json_response(
            {
                "id": "chatcmpl-" + random_id(32),
                "type": "message",
                "role": "assistant",
                "content": [
                    *([{"type": "text", "text": plan.text}] if plan.text else []),
                    *(
                        {
                            "type": "tool_use",
                            "id": c["id"].removeprefix("call_"),
                            "name": c["function"]["name"],
                            "input": json.loads(c["function"]["arguments"]),
                        }
                        for c in plan.tool_calls or ()
                    ),
                ],
                "model": self.response_model(body),
                "stop_reason": _STOP[plan.finish],
                "stop_sequence": None,
                "usage": {
                    "cache_read_input_tokens": 0,
                    "input_tokens": plan.prompt_tokens,
                    "output_tokens": plan.completion_tokens,
                },
            }
        )

    async def handle_count_tokens(self: Any, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        messages = self._check_messages(body)
        self.record(request, body)
        return web.json_response({"input_tokens": max(1, count_words(messages))})

    async def _generate(self: Any, plan: Plan) -> None:
        async with self.track(stream=False):
            await self.generation_sleep(plan.completion_tokens)
            if plan.fail_at is not None:
                raise EngineError(500, "generation failed (injected by fake)")

    # -------------------------------------------------------------- answers

    def _response(self: Any, body: dict, plan: Plan, rid: str, created: int) -> dict:
        output: list[dict] = []
        if plan.text:
            output.append(
                {
                    "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": plan.text}],
                    "id": "msg_" + random_id(32),
                    "role": "assistant",
                    "status": "completed",
                    "type": "message",
                }
            )
        for c in plan.tool_calls or ():
            tid = c["id"].removeprefix("call_")
            output.append(
                {
                    "id": "fc_" + tid,
                    "type": "function_call",
                    "status": "completed",
                    "arguments": c["function"]["arguments"],
                    "call_id": "call_" + tid,
                    "name": c["function"]["name"],
                }
            )
        return {
            "completed_at": created,
            "created_at": created,
            "id": rid,
            "model": self.response_model(body),
            "object": "response",
            "output": output,
            "status": "completed",
            "usage": {
                "input_tokens": plan.prompt_tokens,
                "output_tokens": plan.completion_tokens,
                "total_tokens": plan.prompt_tokens + plan.completion_tokens,
                "input_tokens_details": {"cached_tokens": 0},
            },
        }

    async def _stream(self: Any, request: web.Request, body: dict, plan: Plan, events: Any) -> web.StreamResponse:
        if plan.fail_at == 0 and self.fail_mode != "drop":
            # llama-server answers an error that comes before the first token as a whole answer
            raise EngineError(500, "generation failed (injected by fake)")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        gen = events(body, plan)
        head = next(gen)  # sent with the first token, as llama-server does
        async with self.track(stream=True) as tracker:
            for i, delta in enumerate(plan.deltas):
                if plan.fail_at is not None and i == plan.fail_at:
                    return await self._fail(request, resp, tracker, gen)
                if i > 0 and self.token_delay_s > 0:
                    await asyncio.sleep(self.token_delay_s)
                await resp.write(head + gen.send(delta))
                head = b""
            if plan.fail_at is not None:
                return await self._fail(request, resp, tracker, gen)
            await resp.write(head + gen.send(None))
            await resp.write_eof()
        return resp

    async def _fail(self: Any, request: web.Request, resp: web.StreamResponse, tracker: Any, gen: Any) -> Any:
        if self.fail_mode == "drop":
            drop_connection(request, tracker)
        await resp.write(gen.throw(EngineError(500, "generation failed (injected by fake)")))
        await resp.write_eof()
        return resp

    # Each generator yields the stream's head first; then it is sent the plan's deltas one by one
    # (bytes back for each), then None (the end), or thrown an EngineError (the mid-stream error back).

    def _responses_events(self: Any, body: dict, plan: Plan) -> Any:
        rid, mid = "resp_" + random_id(32), "msg_" + random_id(32)
        skeleton = {"id": rid, "object": "response", "status": "in_progress"}
        out = _sse("response.created", {"type": "response.created", "response": skeleton}) + _sse(
            "response.in_progress", {"type": "response.in_progress", "response": skeleton}
        )
        text_open = False
        fc = ""
        deltas = 0
        try:
            while (delta := (yield out)) is not None:
                out = b""
                if "content" in delta:
                    deltas += 1
                    if not text_open:
                        text_open = True
                        out += _sse(
                            "response.output_item.added",
                            {
                                "type": "response.output_item.added",
                                "item": {
                                    "content": [],
                                    "id": mid,
                                    "role": "assistant",
                                    "status": "in_progress",
                                    "type": "message",
                                },
                            },
                        )
                        out += _sse(
                            "response.content_part.added",
                            {
                                "type": "response.content_part.added",
                                "item_id": mid,
                                "part": {"type": "output_text", "text": ""},
                            },
                        )
                    kind = "response.output_text.delta"
                    if self.forged_event_type is not None and deltas > 1:
                        kind += self.forged_event_type
                    out += _sse("response.output_text.delta", {"type": kind, "item_id": mid, "delta": delta["content"]})
                for tc in delta.get("tool_calls", ()):
                    fn = tc.get("function", {})
                    if tc.get("id"):
                        fc = tc["id"].removeprefix("call_")
                        out += _sse(
                            "response.output_item.added",
                            {
                                "type": "response.output_item.added",
                                "item": {
                                    "id": "fc_" + fc,
                                    "arguments": "",
                                    "call_id": "call_" + fc,
                                    "name": fn.get("name"),
                                    "type": "function_call",
                                    "status": "in_progress",
                                },
                            },
                        )
                    if fn.get("arguments"):
                        out += _sse(
                            "response.function_call_arguments.delta",
                            {
                                "type": "response.function_call_arguments.delta",
                                "delta": fn["arguments"],
                                "item_id": "fc_" + fc,
                            },
                        )
        except EngineError as e:
            yield _sse(None, {"error": {"code": e.status, "message": e.message, "type": "server_error"}})
            return
        final = self._response(body, plan, rid, now_s())
        out = b""
        for item in final["output"]:
            if item["type"] == "message":
                item["id"] = mid
                part = item["content"][0]
                out += _sse(
                    "response.output_text.done",
                    {"type": "response.output_text.done", "item_id": mid, "text": part["text"]},
                )
                out += _sse(
                    "response.content_part.done", {"type": "response.content_part.done", "item_id": mid, "part": part}
                )
            out += _sse("response.output_item.done", {"type": "response.output_item.done", "item": item})
        response = {k: final[k] for k in ("id", "object", "created_at", "status", "model", "output", "usage")}
        yield out + _sse(
            "response.completed",
            {
                "type": "response.completed",
                "response": response,
                "timings": {"prompt_n": plan.prompt_tokens, "predicted_n": plan.completion_tokens},
            },
        )

    def _messages_events(self: Any, body: dict, plan: Plan) -> Any:
        start = {
            "type": "message_start",
            "message": {
                "id": "chatcmpl-" + random_id(32),
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": self.response_model(body),
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"cache_read_input_tokens": 0, "input_tokens": plan.prompt_tokens, "output_tokens": 0},
            },
        }
        out = _sse("message_start", start) if self.messages_start else b""
        blocks = 0
        kind = None
        try:
            while (delta := (yield out)) is not None:
                out = b""
                if "content" in delta:
                    if kind != "text":
                        kind, blocks = "text", blocks + 1
                        out += _sse(
                            "content_block_start",
                            {
                                "type": "content_block_start",
                                "index": blocks - 1,
                                "content_block": {"type": "text", "text": ""},
                            },
                        )
                    out += _sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": blocks - 1,
                            "delta": {"type": "text_delta", "text": delta["content"]},
                        },
                    )
                for tc in delta.get("tool_calls", ()):
                    fn = tc.get("function", {})
                    if tc.get("id"):
                        kind, blocks = "tool_use", blocks + 1
                        out += _sse(
                            "content_block_start",
                            {
                                "type": "content_block_start",
                                "index": blocks - 1,
                                "content_block": {
                                    "type": "tool_use",
                                    "id": tc["id"].removeprefix("call_"),
                                    "name": fn.get("name"),
                                },
                            },
                        )
                    if fn.get("arguments"):
                        out += _sse(
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": blocks - 1,
                                "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]},
                            },
                        )
        except EngineError as e:
            yield _sse("error", {"code": e.status, "message": e.message, "type": "server_error"})
            return
        out = b"".join(_sse("content_block_stop", {"type": "content_block_stop", "index": i}) for i in range(blocks))
        out += _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _STOP[plan.finish], "stop_sequence": None},
                "usage": {"output_tokens": plan.completion_tokens},
            },
        )
        yield out + _sse("message_stop", {"type": "message_stop"})
