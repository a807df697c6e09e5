"""Fake Hugging Face TGI (engines.md §8).

Quirks kept: `data:{…}` with no space and `data:[DONE]`; `id: ""` everywhere;
`role` repeated in every delta; finish reason on the last content chunk;
`stop_sequence` (not an OpenAI value) when the request had `stop`; an axum
keep-alive comment; `usage: null` on every chunk; one model listed with
`created: 0` and `owned_by == id`; `model: "tgi"` answered as the model id;
no embeddings (404, empty body, as for any unknown route); errors as
`{"error":"…","error_type":"…"}`; auth only on generation routes, 401 empty.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.fakes.base import EngineError, Plan
from tests.fakes.openai_compat import NO_ROLE_CHUNK, OpenAICompatEngine, StreamCtx

__all__ = ["TGIEngine"]

VERSION = "3.3.6"
_ERROR_TYPES = {
    400: "validation",
    422: "validation",
    424: "generation",
    429: "overloaded",
    500: "incomplete_generation",
    503: "unhealthy",
}
_PROTECTED = frozenset({"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/tokenize"})


class TGIEngine(OpenAICompatEngine):
    kind = "tgi"
    default_models = ("meta-llama/Llama-3.1-8B-Instruct",)
    loading_mode = "refuse"  # the router only starts once the shards are warm

    sse_prefix = b"data:"
    role_chunk_content = NO_ROLE_CHUNK
    role_every_delta = True
    finish_on_last_content = True
    stream_comments = (b":\n\n",)  # axum KeepAlive's default (empty) comment
    validates_model = False  # a non-"tgi" model is a LoRA adapter id; unknown ones fall back
    has_embeddings = False
    system_fingerprint = f"{VERSION}-native"

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            *super().routes(),
            ("GET", "/health", self.handle_health),
            ("GET", "/", self.handle_health),
            ("GET", "/ping", self.handle_health),
            ("GET", "/info", self.handle_info),
        ]

    # ------------------------------------------------------------------ hooks

    def auth_required(self, request: web.Request) -> bool:
        return request.method == "POST" and request.path in _PROTECTED

    def auth_ok(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "").lower() == f"bearer {self.api_key}".lower()

    def auth_failure(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=401)

    def error_response(self, request: web.Request, exc: EngineError) -> web.StreamResponse:
        return web.json_response(
            {"error": exc.message, "error_type": _ERROR_TYPES.get(exc.status, "generation")}, status=exc.status
        )

    def unknown_route(self, request: web.Request) -> web.StreamResponse:
        status = (
            405
            if request.match_info.http_exception is not None and request.match_info.http_exception.status == 405
            else 404
        )
        return web.Response(status=status)

    def validate_request(self, body: dict, *, chat: bool) -> None:
        if chat and not isinstance(body.get("messages"), list):
            raise EngineError(422, "Failed to deserialize the JSON body into the target type: missing field `messages`")

    def stream_error_payload(self, message: str) -> dict:
        return {"error": {"message": message, "http_status_code": 424}}

    def chat_id(self) -> str:
        return ""

    def completion_id(self) -> str:
        return ""

    def tool_call_id(self) -> str:
        return "0"

    def response_model(self, body: dict) -> str:
        model = body.get("model")
        if model in (None, "", "tgi"):
            return self.models[0] if self.models else ""
        return str(model)

    def finish_reason(self, plan: Plan, body: dict) -> str:
        if plan.finish == "stop" and body.get("stop"):
            return "stop_sequence"  # passed through unchanged by the Messages API
        return plan.finish

    def chunk(self, ctx: StreamCtx, delta: dict | None, finish: str | None, *, text: str = "") -> dict:
        out = super().chunk(ctx, delta, finish, text=text)
        out["usage"] = None  # Option<Usage> always serialised
        return out

    def models_body(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": m} for m in self.models],
        }

    # ----------------------------------------------------------------- routes

    async def handle_health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def handle_info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "model_id": self.models[0] if self.models else "",
                "model_sha": "0e9e39f249a16976918f6564b8830bc894c89659",
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": 128,
                "max_best_of": 2,
                "max_stop_sequences": 4,
                "max_input_tokens": self.context_length - 1,
                "max_total_tokens": self.context_length,
                "validation_workers": 2,
                "max_client_batch_size": 4,
                "router": "text-generation-router",
                "version": VERSION,
                "sha": None,
                "docker_label": None,
            }
        )
