"""Fake Ollama: the native `/api/*` surface (NDJSON) and its OpenAI-compatible `/v1` (engines.md §4).

Quirks kept: `GET /` text, `/v1/models` with `data: null` when empty, `owned_by`
as the name's namespace, `chatcmpl-<0..998>` ids, role only in the first delta,
finish reason in its own empty-delta chunk, tool calls whole in one chunk,
`max_completion_tokens` ignored, `{"error":"…"}` natively and a nested error
with `code: null` on `/v1`, lazy loading (requests wait while `loading`).

The native NDJSON streams honour the same faults as `/v1` (`fail_mode`, `endless`),
with NDJSON lines in place of SSE events.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
from typing import Any

from aiohttp import web

from tests.fakes.base import (
    INJECTED_FAIL_MODES,
    EngineError,
    Plan,
    StreamTracker,
    count_words,
    drop_connection,
    forever,
)
from tests.fakes.openai_compat import NO_ROLE_CHUNK, OpenAICompatEngine

__all__ = ["OllamaEngine"]

MODIFIED_AT = "2025-05-04T17:37:44.706015396-07:00"
MODIFIED_EPOCH = 1746403064
DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"  # llama3.2:latest's
CREATED_AT = "2025-05-05T10:00:00.000000000Z"

# What Ollama reports of the models it pulls from its library, as the real one does: `/api/tags`
# details, digest and size, and the GGUF `general.*` keys of `/api/show`. A name not listed gets what
# every model of this fake always got (llama3.2's details, no `general.basename`), with a digest of its
# own; the `facts` knob (model -> an entry shaped as below) adds or overrides entries.
LIBRARY: dict[str, dict[str, Any]] = {
    "llama3.2": {
        "family": "llama",
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M",
        "digest": DIGEST,
        "size": 2019393189,
        "model_info": {
            "general.architecture": "llama",
            "general.basename": "Llama 3.2",
            "general.finetune": "Instruct",
            "general.size_label": "3B",
            "general.name": "Llama 3.2 3B Instruct",
            "general.file_type": 15,
            "general.parameter_count": 3212749888,
            "general.quantization_version": 2,
            "general.type": "model",
        },
    },
    "smollm2:135m": {
        "family": "llama",
        "parameter_size": "134.52M",
        "quantization_level": "F16",
        "size": 270898672,  # about what the real one weighs; its digest: made up below
        "model_info": {
            "general.architecture": "llama",
            "general.basename": "SmolLM2",
            "general.finetune": "Instruct",
            "general.size_label": "135M",
            "general.name": "SmolLM2 135M Instruct",
            "general.file_type": 1,
            "general.parameter_count": 134515008,
            "general.quantization_version": 2,
            "general.type": "model",
        },
    },
    "nomic-embed-text": {
        "family": "nomic-bert",
        "parameter_size": "137M",
        "quantization_level": "F16",
        "digest": "0a109f422b47e3a30ba2b10eca18548e944e8a23073ee3f3e947efcf3c45e59f",
        "size": 274302450,
        "model_info": {
            "general.architecture": "nomic-bert",
            "general.file_type": 1,
            "general.parameter_count": 136727040,
            "general.quantization_version": 2,
        },
    },
}


def _is_embedding(model: str) -> bool:
    return "embed" in model


class OllamaEngine(OpenAICompatEngine):
    kind = "ollama"
    default_models = ("llama3.2:latest", "nomic-embed-text:latest")
    loading_mode = "wait"  # models load lazily; the first request simply waits

    role_chunk_content = NO_ROLE_CHUNK
    usage_null_on_chunks = False
    honours_max_completion_tokens = False
    normalise_embeddings = True
    system_fingerprint = "fp_ollama"

    version = "0.12.3"

    def injected_error_message(self, status: int) -> str:
        if status == 503:  # its only 503: the queue (OLLAMA_MAX_QUEUE) is full
            return "server busy, please try again.  maximum pending requests exceeded"
        return super().injected_error_message(status)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.facts: dict[str, dict[str, Any]] = {}  # model -> what to report of it (see LIBRARY)
        self.show_requests = 0  # bookkeeping: POST /api/show answered

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            *super().routes(),
            ("GET", "/v1/models/{model:.+}", self.handle_model),
            ("GET", "/", self.handle_root),
            ("HEAD", "/", self.handle_root),
            ("GET", "/api/version", self.handle_version),
            ("GET", "/api/tags", self.handle_tags),
            ("HEAD", "/api/tags", self.handle_tags),
            ("GET", "/api/ps", self.handle_ps),
            ("POST", "/api/show", self.handle_show),
            ("POST", "/api/chat", self.handle_native_chat),
            ("POST", "/api/generate", self.handle_native_generate),
            ("POST", "/api/embed", self.handle_embed),
            ("POST", "/api/embeddings", self.handle_legacy_embeddings),
        ]

    # ------------------------------------------------------------------ hooks

    def resolve(self, model: Any) -> str | None:
        """Ollama names are `name:tag` with `:latest` implied."""
        if not isinstance(model, str) or not model:
            return None
        for candidate in (model, f"{model}:latest"):
            if candidate in self.models:
                return candidate
        return None

    def check_model(self, body: dict) -> None:
        if self.resolve(body.get("model")) is None:
            raise self.model_not_found(str(body.get("model", "")))

    def model_not_found(self, model: str) -> EngineError:
        return EngineError(404, f"model '{model}' not found")

    def auth_required(self, request: web.Request) -> bool:
        return False  # no auth locally; Authorization is accepted and ignored

    def error_response(self, request: web.Request, exc: EngineError) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return web.json_response({"error": exc.message}, status=exc.status)
        etype = {400: "invalid_request_error", 404: "not_found_error"}.get(exc.status, "api_error")
        return web.json_response(
            {"error": {"message": exc.message, "type": etype, "param": None, "code": None}}, status=exc.status
        )

    def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="404 page not found", content_type="text/plain")

    def stream_error_payload(self, message: str) -> dict:
        return {"error": {"message": message, "type": "api_error", "param": None, "code": None}}

    def chat_id(self) -> str:
        return f"chatcmpl-{random.randint(0, 998)}"

    def completion_id(self) -> str:
        return f"cmpl-{random.randint(0, 998)}"

    def tool_call_deltas(self, call_id: str, name: str, arguments: str) -> list[dict]:
        # Ollama produces tool calls whole, so /v1 streams them in one delta.
        return [
            {
                "content": "",
                "tool_calls": [
                    {"id": call_id, "index": 0, "type": "function", "function": {"name": name, "arguments": arguments}}
                ],
            }
        ]

    def validate_request(self, body: dict, *, chat: bool) -> None:
        super().validate_request(body, chat=chat)
        model = self.resolve(body.get("model"))
        if chat and model is not None and _is_embedding(model):
            raise EngineError(400, f'"{body.get("model")}" does not support chat')
        if not chat and not isinstance(body.get("prompt"), str):
            raise EngineError(400, "invalid prompt: only a string prompt is supported")

    def check_encoding_format(self, fmt: str) -> None:
        if fmt not in ("float", "base64"):
            raise EngineError(400, f"invalid encoding format: {fmt}")

    def mark_loaded(self, model: str) -> None:
        super().mark_loaded(self.resolve(model) or model)

    def malformed_answer(self, request: web.Request, *, shape: bool) -> str:
        if not request.path.startswith("/api/"):
            return super().malformed_answer(request, shape=shape)
        return '{"message": 5, "done": true}' if shape else '{"model": "x", "message": {'

    def malformed_events(self, request: web.Request, *, shape: bool) -> list[str]:
        if self.malformed_payload is not None or not request.path.startswith("/api/"):
            return super().malformed_events(request, shape=shape)
        return ['{"message": 5, "done": false}'] if shape else ['{"message": {"content": ']

    # ------------------------------------------------------------- model info

    def fact(self, model: str) -> dict[str, Any]:
        """What this fake reports of `model`: the `facts` knob, else the library's (by `name:tag`, then name)."""
        name = model.removesuffix(":latest")
        for key in (model, name, name.split(":", 1)[0]):
            if key in self.facts:
                return self.facts[key]
            if key in LIBRARY:
                return LIBRARY[key]
        info = {"general.architecture": "llama", "general.parameter_count": 3212749888}
        return {**LIBRARY["llama3.2"], "digest": None, "model_info": info}

    def digest(self, model: str) -> str:
        """The model's digest: bare hex, as Ollama writes it (made up from the name where not known)."""
        return str(self.fact(model).get("digest") or hashlib.sha256(model.encode()).hexdigest())

    def details(self, model: str) -> dict:
        fact = self.fact(model)
        return {
            "parent_model": "",
            "format": "gguf",
            "family": fact["family"],
            "families": [fact["family"]],
            "parameter_size": fact["parameter_size"],
            "quantization_level": fact["quantization_level"],
        }

    def size(self, model: str) -> int:
        return int(self.fact(model)["size"])

    def models_body(self) -> dict:
        data = [
            {
                "id": m,
                "object": "model",
                "created": MODIFIED_EPOCH,
                "owned_by": m.split("/", 1)[0] if "/" in m else "library",
            }
            for m in self.models
        ]
        return {"object": "list", "data": data or None}  # a nil Go slice marshals to null

    async def handle_model(self, request: web.Request) -> web.StreamResponse:
        name = self.resolve(request.match_info["model"])
        if name is None:
            raise self.model_not_found(request.match_info["model"])
        return web.json_response({"id": name, "object": "model", "created": MODIFIED_EPOCH, "owned_by": "library"})

    async def handle_root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running", content_type="text/plain")

    async def handle_version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": self.version})

    async def handle_tags(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "models": [
                    {
                        "name": m,
                        "model": m,
                        "modified_at": MODIFIED_AT,
                        "size": self.size(m),
                        "digest": self.digest(m),
                        "details": self.details(m),
                    }
                    for m in self.models
                ]
            }
        )

    async def handle_ps(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "models": [
                    {
                        "name": m,
                        "model": m,
                        "size": self.size(m),
                        "digest": self.digest(m),
                        "details": self.details(m),
                        "expires_at": "2099-01-01T00:05:00.000000000Z",
                        "size_vram": self.size(m),
                        "context_length": self.context_length,
                    }
                    for m in self.loaded_models
                    if m in self.models
                ]
            }
        )

    async def handle_show(self, request: web.Request) -> web.StreamResponse:
        self.show_requests += 1
        body = await self.read_json(request)
        asked = body.get("model") or body.get("name")
        model = self.resolve(asked)
        if model is None:
            raise self.model_not_found(str(asked))
        info = dict(self.fact(model)["model_info"])
        arch = info["general.architecture"]
        ctx = 2048 if _is_embedding(model) else self.train_context_length
        caps = ["embedding"] if _is_embedding(model) else ["completion", "tools"]
        info.update({f"{arch}.context_length": ctx, f"{arch}.embedding_length": 768 if arch == "nomic-bert" else 3072})
        return web.json_response(
            {
                "modelfile": f"FROM {model}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": self.details(model),
                "model_info": info,
                "capabilities": caps,
                "modified_at": MODIFIED_AT,
            }
        )

    # ------------------------------------------------------------- native API

    def metrics(self, plan: Plan) -> dict:
        return {
            "total_duration": 4883583458,
            "load_duration": 1334875,
            "prompt_eval_count": plan.prompt_tokens,
            "prompt_eval_duration": 342546000,
            "eval_count": plan.completion_tokens,
            "eval_duration": 4535599000,
        }

    def native_tool_delta(self, call_id: str, name: str, arguments: str) -> list[dict]:
        return [
            {
                "content": "",
                "tool_calls": [
                    {"id": call_id, "function": {"index": 0, "name": name, "arguments": json.loads(arguments)}}
                ],
            }
        ]

    async def handle_native_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        await self.before_generation(request, body)
        model = self.resolve(body.get("model"))
        if model is None:
            raise self.model_not_found(str(body.get("model", "")))
        if _is_embedding(model) and body.get("messages"):
            raise EngineError(400, f'"{body.get("model")}" does not support chat')
        self.mark_loaded(model)
        opts = body.get("options") or {}
        plan = self.make_plan(
            body,
            max_tokens=opts.get("num_predict"),
            prompt_tokens=max(1, count_words(body.get("messages"))),
            tool_deltas=self.native_tool_delta,
        )
        return await self.native(request, body, plan, key="message")

    async def handle_native_generate(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        await self.before_generation(request, body)
        model = self.resolve(body.get("model"))
        if model is None:
            raise self.model_not_found(str(body.get("model", "")))
        self.mark_loaded(model)
        opts = body.get("options") or {}
        plan = self.make_plan(
            {}, max_tokens=opts.get("num_predict"), prompt_tokens=max(1, count_words(body.get("prompt")))
        )
        return await self.native(request, body, plan, key="response")

    def native_piece(self, body: dict, key: str, delta: dict, *, done: bool) -> dict:
        out: dict[str, Any] = {"model": body.get("model"), "created_at": CREATED_AT}
        if key == "message":
            msg: dict[str, Any] = {"role": "assistant", "content": delta.get("content", "")}
            if "tool_calls" in delta:
                msg["tool_calls"] = delta["tool_calls"]
            out["message"] = msg
        else:
            out["response"] = delta.get("content", "")
        out["done"] = done
        return out

    async def native(self, request: web.Request, body: dict, plan: Plan, *, key: str) -> web.StreamResponse:
        done_reason = "length" if plan.finish == "length" else "stop"
        legacy = self.fail_mode not in INJECTED_FAIL_MODES
        if body.get("stream", True) is False:
            async with self.track(stream=False) as tracker:
                await self.endless_sleep()
                await self.generation_sleep(plan.completion_tokens)
                if plan.fail_at is not None and not legacy:
                    fault = await self.answer_fault(request, tracker)
                    if fault is not None:
                        return fault
            if plan.fail_at is not None:
                raise EngineError(500, "generation failed (injected by fake)")
            whole: dict[str, Any] = {"content": plan.text}
            if plan.tool_calls is not None:
                whole = plan.deltas[0]
            out = self.native_piece(body, key, whole, done=True)
            out.update(done_reason=done_reason, **self.metrics(plan))
            return web.json_response(out)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        async with self.track(stream=True) as tracker:
            # the very first bytes after the headers
            if not legacy and plan.fail_at == 0 and await self.native_fault(request, resp, tracker):
                return resp
            if self.first_token_delay_s > 0:
                await asyncio.sleep(self.first_token_delay_s)
            n = len(plan.deltas)
            deltas = itertools.cycle(plan.deltas) if self.endless and n else plan.deltas
            for i, delta in enumerate(deltas):
                if plan.fail_at is not None and i == plan.fail_at:
                    if legacy:
                        break
                    if i > 0 and await self.native_fault(request, resp, tracker):
                        return resp
                if i > 0 and self.token_delay_s > 0:
                    await asyncio.sleep(self.token_delay_s)
                elif i > 0 and self.endless:
                    await asyncio.sleep(0)
                await resp.write(_line(self.native_piece(body, key, delta, done=False)))
            if self.endless:
                await forever()
            at_end = not legacy and plan.fail_at is not None and plan.fail_at == n and n > 0
            if at_end and await self.native_fault(request, resp, tracker):
                return resp
            if plan.fail_at is not None and legacy:
                if self.fail_mode == "drop":
                    drop_connection(request, tracker)
                await resp.write(_line({"error": "generation failed (injected by fake)"}))
            else:  # no fault, or a malformed line was injected and the stream carried on
                final = self.native_piece(body, key, {"content": ""}, done=True)
                final.update(done_reason=done_reason, **self.metrics(plan))
                await resp.write(_line(final))
            await resp.write_eof()
        return resp

    async def native_fault(self, request: web.Request, resp: web.StreamResponse, tracker: StreamTracker) -> bool:
        """`inject_fault` for NDJSON: the same modes, lines instead of events."""
        return await self.inject_fault(request, resp, tracker, frame=lambda data: data.encode() + b"\n")

    async def handle_embed(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        await self.before_generation(request, body)
        model = self.resolve(body.get("model"))
        if model is None:
            raise self.model_not_found(str(body.get("model", "")))
        raw = body.get("input", "")
        inputs = [raw] if isinstance(raw, str) else list(raw)
        async with self.track(stream=False):
            await self.generation_sleep(1)
        return web.json_response(
            {
                "model": body.get("model"),
                "embeddings": [self.embed_vector(t, normalise=True) for t in inputs],
                "total_duration": 14143917,
                "load_duration": 1019500,
                "prompt_eval_count": max(1, count_words(raw)),
            }
        )

    async def handle_legacy_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        await self.before_generation(request, body)
        if self.resolve(body.get("model")) is None:
            raise self.model_not_found(str(body.get("model", "")))
        prompt = body.get("prompt") or ""
        return web.json_response({"embedding": self.embed_vector(prompt) if prompt else []})


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
