"""Fake MLX `mlx_lm.server` (engines.md §11).

Quirks kept: `/health` always `{"status":"ok"}` (even while loading: requests
queue instead); no `/props`, no embeddings, no auth; 404 with the plain bytes
`Not Found` under `Content-type: application/json` for any other path; models
with `id`/`object`/`created` only; `role` in every delta and the finish reason
on the last content chunk; `: keepalive N/M` comments; the usage chunk's
`object` is `"chat.completion"`; an unknown `model` is a failed hot-swap: 404
`{"error":"…"}`.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from tests.fakes.base import EngineError
from tests.fakes.openai_compat import NO_ROLE_CHUNK, OpenAICompatEngine

__all__ = ["MLXEngine"]


class MLXEngine(OpenAICompatEngine):
    kind = "mlx"
    default_models = ("mlx-community/Qwen2.5-7B-Instruct-4bit",)
    loading_mode = "wait"  # health is green while the model loads in the background

    role_chunk_content = NO_ROLE_CHUNK
    role_every_delta = True
    finish_on_last_content = True
    usage_null_on_chunks = False
    usage_chunk_object = "chat.completion"
    stream_comments = (b": keepalive 4/4\n\n",)
    has_embeddings = False
    system_fingerprint = None
    chat_paths = ("/v1/chat/completions", "/chat/completions")

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            *super().routes(),
            ("GET", "/health", self.handle_health),
            ("GET", "/v1/models/{model:.+}", self.handle_model),
        ]

    def auth_required(self, request: web.Request) -> bool:
        return False

    def error_response(self, request: web.Request, exc: EngineError) -> web.StreamResponse:
        return web.json_response({"error": exc.message}, status=exc.status)

    def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, body=b"Not Found", headers={"Content-Type": "application/json"})

    def stream_error_payload(self, message: str) -> dict:
        return {"error": {"message": message}}

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model in (None, "", "default_model") or model in self.models:
            return
        raise EngineError(404, f"Failed to load model {model!r}: Repository Not Found")

    def response_model(self, body: dict) -> str:
        model = body.get("model")
        if model in (None, "", "default_model"):
            return self.models[0] if self.models else "default_model"
        return str(model)

    def chat_id(self) -> str:
        return f"chatcmpl-{uuid.uuid4()}"

    def completion_id(self) -> str:
        return f"cmpl-{uuid.uuid4()}"

    def models_body(self) -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 1735142223} for m in self.models]}

    async def handle_health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def handle_model(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        if model not in self.models:
            return self.unknown_route(request)
        return web.json_response({"id": model, "object": "model", "created": 1735142223})
