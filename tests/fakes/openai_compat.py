"""The OpenAI-compatible surface shared by every fake: chat, completions, embeddings, models.

`OpenAICompatEngine` speaks the clean OpenAI wire format (it *is* the "openai"
kind).  Each engine subclass changes class attributes and overrides the small
hooks below to reproduce its own quirks; the streaming loop itself is written
once, here, so every engine honours the knobs the same way, faults included
(`fail_mode`, `endless`; see `FAIL_MODES` in `base.py`).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import (
    CONTINUING_FAIL_MODES,
    INJECTED_FAIL_MODES,
    EngineError,
    FakeEngine,
    Plan,
    StreamTracker,
    count_words,
    drop_connection,
    fin_connection,
    forever,
    now_s,
    random_id,
    reset_connection,
)

__all__ = ["NO_ROLE_CHUNK", "OpenAICompatEngine", "StreamCtx"]

#: `role_chunk_content` value for engines whose first content delta carries the role.
NO_ROLE_CHUNK = object()


@dataclass
class StreamCtx:
    id: str
    created: int
    model: str
    body: dict
    plan: Plan
    include_usage: bool
    object: str  # "chat.completion.chunk" | "text_completion"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class OpenAICompatEngine(FakeEngine):
    """The OpenAI API itself, and the base of every engine's `/v1` surface."""

    kind = "openai"
    default_models = ("gpt-4o-mini", "text-embedding-3-small")
    loading_mode = "503"

    # ---- stream quirks (overridden per engine)
    sse_prefix: ClassVar[bytes] = b"data: "  # TGI: b"data:"
    role_chunk_content: ClassVar[Any] = ""  # first chunk {"role","content":X}; NO_ROLE_CHUNK: none
    role_every_delta: ClassVar[bool] = False  # TGI, MLX
    finish_on_last_content: ClassVar[bool] = False  # TGI, MLX: no separate finish chunk
    usage_null_on_chunks: ClassVar[bool] = True  # `"usage": null` on chunks when include_usage
    usage_chunk_object: ClassVar[str] = "chat.completion.chunk"  # MLX: "chat.completion"
    done_after_error: ClassVar[bool] = False  # vLLM sends [DONE] after a mid-stream error
    stream_comments: ClassVar[tuple[bytes, ...]] = ()  # SSE comments sent before content
    # ---- request handling quirks
    honours_max_completion_tokens: ClassVar[bool] = True  # Ollama ignores it
    validates_model: ClassVar[bool] = True
    has_embeddings: ClassVar[bool] = True
    embeddings_base64: ClassVar[bool] = True
    # ---- a knob: an engine that gives no usage (none on whole answers, no usage chunk in streams)
    omit_usage: bool = False
    normalise_embeddings: ClassVar[bool] = False
    system_fingerprint: ClassVar[str | None] = "fp_fake"
    chat_paths: ClassVar[tuple[str, ...]] = ("/v1/chat/completions",)
    completion_paths: ClassVar[tuple[str, ...]] = ("/v1/completions",)
    embedding_paths: ClassVar[tuple[str, ...]] = ("/v1/embeddings",)
    models_paths: ClassVar[tuple[str, ...]] = ("/v1/models",)

    def routes(self) -> list[tuple[str, str, Any]]:
        r: list[tuple[str, str, Any]] = []
        r += [("GET", p, self.handle_models) for p in self.models_paths]
        r += [("POST", p, self.handle_chat) for p in self.chat_paths]
        r += [("POST", p, self.handle_completions) for p in self.completion_paths]
        if self.has_embeddings:
            r += [("POST", p, self.handle_embeddings) for p in self.embedding_paths]
        return r

    # ------------------------------------------------------------ engine hooks

    def models_body(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 1686935002, "owned_by": "system"} for m in self.models],
        }

    def auth_required(self, request: web.Request) -> bool:
        return True

    def auth_failure(self, request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.json_response(
            {
                "error": {
                    "message": f"Incorrect API key provided: {given}.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
            status=401,
        )

    def loading_response(self, request: web.Request) -> web.StreamResponse | None:
        return self.error_response(
            request, EngineError(503, "The engine is currently overloaded, please try again later")
        )

    def error_response(self, request: web.Request, exc: EngineError) -> web.StreamResponse:
        etype = "invalid_request_error" if exc.status < 500 else "server_error"
        return web.json_response(
            {"error": {"message": exc.message, "type": etype, "param": exc.param, "code": exc.code}}, status=exc.status
        )

    def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "error": {
                    "message": f"Invalid URL ({request.method} {request.path})",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            status=404,
        )

    def stream_error_payload(self, message: str) -> dict:
        return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}

    def model_not_found(self, model: str) -> EngineError:
        return EngineError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            param=None,
            code="model_not_found",
        )

    def chat_id(self) -> str:
        return "chatcmpl-" + random_id(29)

    def completion_id(self) -> str:
        return "cmpl-" + random_id(29)

    def response_model(self, body: dict) -> str:
        return str(body.get("model", ""))

    def finish_reason(self, plan: Plan, body: dict) -> str:
        return plan.finish

    def choice_extras(self, ctx_body: dict, plan: Plan, finish: str | None) -> dict:
        """Extra per-choice fields (vLLM `stop_reason`, SGLang `matched_stop`)."""
        return {}

    def response_extras(self, plan: Plan) -> dict:
        """Extra top-level fields on non-streamed answers (vLLM, llama.cpp `timings`)."""
        return {}

    def usage(self, plan: Plan) -> dict:
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.completion_tokens,
            "total_tokens": plan.prompt_tokens + plan.completion_tokens,
        }

    def max_tokens(self, body: dict) -> int | None:
        value = body.get("max_tokens")
        if value is None and self.honours_max_completion_tokens:
            value = body.get("max_completion_tokens")
        return value if isinstance(value, int) else None

    def validate_request(self, body: dict, *, chat: bool) -> None:
        if chat and not isinstance(body.get("messages"), list):
            raise EngineError(400, "'messages' is a required property")

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if self.validates_model and model not in self.models:
            raise self.model_not_found(str(model))

    # ------------------------------------------------------------------ models

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.models_body())

    # -------------------------------------------------------------------- chat

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        await self.before_generation(request, body)
        self.validate_request(body, chat=True)
        self.check_model(body)
        self.mark_loaded(str(body.get("model", "")))
        plan = self.make_plan(
            body,
            max_tokens=self.max_tokens(body),
            prompt_tokens=max(1, count_words(body.get("messages"))),
            tool_deltas=self.tool_call_deltas,
        )
        if body.get("stream"):
            return await self.stream(request, self.new_ctx(body, plan, "chat.completion.chunk"))
        async with self.track(stream=False) as tracker:
            await self.endless_sleep()
            await self.generation_sleep(plan.completion_tokens)
            if plan.fail_at is not None:
                fault = await self.answer_fault(request, tracker)
                if fault is not None:
                    return fault
                raise EngineError(500, "generation failed (injected by fake)")
        return web.json_response(self.chat_response(body, plan))

    def chat_response(self, body: dict, plan: Plan) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": plan.text if plan.tool_calls is None else None}
        if plan.tool_calls is not None:
            message["tool_calls"] = plan.tool_calls
        finish = self.finish_reason(plan, body)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish,
            **self.choice_extras(body, plan, finish),
        }
        out: dict[str, Any] = {
            "id": self.chat_id(),
            "object": "chat.completion",
            "created": now_s(),
            "model": self.response_model(body),
        }
        if self.system_fingerprint is not None:
            out["system_fingerprint"] = self.system_fingerprint
        out["choices"] = [choice]
        if not self.omit_usage:
            out["usage"] = self.usage(plan)
        out.update(self.response_extras(plan))
        return out

    # ------------------------------------------------------------- completions

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        await self.before_generation(request, body)
        self.validate_request(body, chat=False)
        self.check_model(body)
        self.mark_loaded(str(body.get("model", "")))
        plan = self.make_plan(
            {}, max_tokens=self.max_tokens(body), prompt_tokens=max(1, count_words(body.get("prompt")))
        )
        if body.get("stream"):
            return await self.stream(request, self.new_ctx(body, plan, "text_completion"))
        async with self.track(stream=False) as tracker:
            await self.endless_sleep()
            await self.generation_sleep(plan.completion_tokens)
            if plan.fail_at is not None:
                fault = await self.answer_fault(request, tracker)
                if fault is not None:
                    return fault
                raise EngineError(500, "generation failed (injected by fake)")
        finish = self.finish_reason(plan, body)
        out: dict[str, Any] = {
            "id": self.completion_id(),
            "object": "text_completion",
            "created": now_s(),
            "model": self.response_model(body),
            "choices": [
                {
                    "index": 0,
                    "text": plan.text,
                    "logprobs": None,
                    "finish_reason": finish,
                    **self.choice_extras(body, plan, finish),
                }
            ],
            **({} if self.omit_usage else {"usage": self.usage(plan)}),
        }
        if self.system_fingerprint is not None:
            out["system_fingerprint"] = self.system_fingerprint
        return web.json_response(out)

    # --------------------------------------------------------------- streaming

    def new_ctx(self, body: dict, plan: Plan, obj: str) -> StreamCtx:
        opts = body.get("stream_options") or {}
        return StreamCtx(
            id=self.chat_id() if obj == "chat.completion.chunk" else self.completion_id(),
            created=now_s(),
            model=self.response_model(body),
            body=body,
            plan=plan,
            include_usage=bool(opts.get("include_usage")),
            object=obj,
        )

    def chunk(self, ctx: StreamCtx, delta: dict | None, finish: str | None, *, text: str = "") -> dict:
        if ctx.object == "text_completion":
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice.update(self.choice_extras(ctx.body, ctx.plan, finish))
        out: dict[str, Any] = {"id": ctx.id, "object": ctx.object, "created": ctx.created, "model": ctx.model}
        if self.system_fingerprint is not None:
            out["system_fingerprint"] = self.system_fingerprint
        out["choices"] = [choice]
        if ctx.include_usage and self.usage_null_on_chunks:
            out["usage"] = None
        return out

    def usage_chunk(self, ctx: StreamCtx) -> dict:
        out: dict[str, Any] = {
            "id": ctx.id,
            "object": self.usage_chunk_object if ctx.object == "chat.completion.chunk" else ctx.object,
            "created": ctx.created,
            "model": ctx.model,
        }
        if self.system_fingerprint is not None:
            out["system_fingerprint"] = self.system_fingerprint
        out["choices"] = []
        out["usage"] = self.usage(ctx.plan)
        return out

    def shape_delta(self, delta: dict, index: int) -> dict:
        """Add the role where this engine puts it."""
        if self.role_every_delta or (index == 0 and self.role_chunk_content is NO_ROLE_CHUNK):
            return {"role": "assistant", **delta}
        return delta

    def event(self, payload: dict | str) -> bytes:
        data = payload.encode() if isinstance(payload, str) else dumps(payload)
        return self.sse_prefix + data + b"\n\n"

    async def prepare_stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    async def stream(self, request: web.Request, ctx: StreamCtx) -> web.StreamResponse:
        """The one SSE loop: knobs are honoured here, shapes come from the hooks."""
        plan = ctx.plan
        finish = self.finish_reason(plan, ctx.body)
        is_chat = ctx.object == "chat.completion.chunk"
        legacy = self.fail_mode not in INJECTED_FAIL_MODES  # "error", "drop": `fail_stream`
        # Does the stream end at the fault (rather than carry on after a bad event)?
        ends = plan.fail_at is not None and self.fail_mode not in CONTINUING_FAIL_MODES
        resp = await self.prepare_stream(request)
        async with self.track(stream=True) as tracker:
            # the very first bytes after the headers
            if not legacy and plan.fail_at == 0 and await self.inject_fault(request, resp, tracker):
                return resp
            for comment in self.stream_comments:
                await resp.write(comment)
            if self.first_token_delay_s > 0:
                await asyncio.sleep(self.first_token_delay_s)
            if is_chat and self.role_chunk_content is not NO_ROLE_CHUNK:
                await resp.write(
                    self.event(self.chunk(ctx, {"role": "assistant", "content": self.role_chunk_content}, None))
                )
            n = len(plan.deltas)
            deltas = itertools.cycle(plan.deltas) if self.endless and n else plan.deltas
            for i, delta in enumerate(deltas):
                if plan.fail_at is not None and i == plan.fail_at:
                    if legacy:
                        return await self.fail_stream(request, resp, tracker)
                    if i > 0 and await self.inject_fault(request, resp, tracker):
                        return resp
                if i > 0 and self.token_delay_s > 0:
                    await asyncio.sleep(self.token_delay_s)
                elif i > 0 and self.endless:
                    await asyncio.sleep(0)  # never a busy loop that starves the client
                last = self.finish_on_last_content and i == n - 1 and not ends and not self.endless
                if is_chat:
                    chunk = self.chunk(ctx, self.shape_delta(delta, i), finish if last else None)
                else:
                    chunk = self.chunk(ctx, None, finish if last else None, text=delta.get("content", ""))
                await resp.write(self.event(chunk))
            if self.endless:  # no deltas at all: nothing to repeat, but still never finish
                await forever()
            if plan.fail_at is not None and plan.fail_at == n:
                if legacy:
                    return await self.fail_stream(request, resp, tracker)
                if n > 0 and await self.inject_fault(request, resp, tracker):
                    return resp
            ending = b""  # with tail_in_one_write, the finish, usage and [DONE] leave in one write
            if not (self.finish_on_last_content and n > 0):
                ending += self.event(self.final_chunk(ctx, finish))
                if not self.tail_in_one_write:
                    await resp.write(ending)
                    ending = b""
            if ctx.include_usage and not self.omit_usage:
                ending += self.event(self.usage_chunk(ctx))
                if not self.tail_in_one_write:
                    await resp.write(ending)
                    ending = b""
            await resp.write(ending + self.event("[DONE]"))
            if self.eof_delay_s:
                await asyncio.sleep(self.eof_delay_s)
            await resp.write_eof()
        return resp

    def final_chunk(self, ctx: StreamCtx, finish: str) -> dict:
        if ctx.object == "chat.completion.chunk":
            return self.chunk(ctx, self.shape_delta({}, 1), finish)
        return self.chunk(ctx, None, finish)

    async def inject_fault(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        tracker: StreamTracker,
        frame: Callable[[str], bytes] | None = None,
    ) -> bool:
        """Apply an `INJECTED_FAIL_MODES` fault mid-stream; True: the response is over.

        `frame` wraps a malformed payload for the wire (default: an SSE event).
        """
        mode = self.fail_mode
        if mode == "rst":
            await reset_connection(request, tracker)
        if mode == "fin":
            fin_connection(request, tracker)
        if mode == "eof":
            await resp.write_eof()
            return True
        if mode == "stall":
            await forever()
        for data in self.malformed_events(request, shape=mode == "malformed_shape"):
            await resp.write((frame or self.event)(data))
        return False

    async def fail_stream(
        self, request: web.Request, resp: web.StreamResponse, tracker: StreamTracker
    ) -> web.StreamResponse:
        if self.fail_mode == "drop":
            drop_connection(request, tracker)
        await resp.write(self.event(self.stream_error_payload("generation failed (injected by fake)")))
        if self.done_after_error:
            await resp.write(self.event("[DONE]"))
        await resp.write_eof()
        return resp

    # -------------------------------------------------------------- embeddings

    async def handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        await self.before_generation(request, body)
        self.check_model(body)
        raw = body.get("input")
        if raw is None:
            raise EngineError(400, "'input' is a required property")
        inputs = self.embedding_inputs(raw)
        fmt = body.get("encoding_format") or "float"
        self.check_encoding_format(fmt)
        async with self.track(stream=False):
            await self.generation_sleep(1)
        data = []
        for i, text in enumerate(inputs):
            vec = self.embed_vector(text, normalise=self.normalise_embeddings)
            emb: Any = vec
            if fmt == "base64" and self.embeddings_base64:
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = max(1, count_words(raw))
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": self.response_model(body),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def embedding_inputs(self, raw: Any) -> list[str]:
        if isinstance(raw, str):
            return [raw]
        if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            return [" ".join(map(str, raw))]
        if isinstance(raw, list):
            return [x if isinstance(x, str) else " ".join(map(str, x)) for x in raw]
        raise EngineError(400, "'input' must be a string or an array")

    def check_encoding_format(self, fmt: str) -> None:
        if fmt not in ("float", "base64"):
            raise EngineError(400, f"invalid encoding_format {fmt!r}")
