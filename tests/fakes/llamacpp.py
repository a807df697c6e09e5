"""Fake llama.cpp `llama-server` (engines.md §5 and the build observed in §14).

Quirks kept: `Server: llama.cpp` on every response; 503 `Loading model` on
every route while loading (an HTML page on `/`); path-shaped model id with
`meta.n_ctx`/`n_ctx_train` and an Ollama-style `models` array in `/v1/models`;
the request's `model` is ignored; first delta `content: null`; an SSE comment
before content; `timings`; nested errors with an integer `code`; auth by
`Bearer K`, bare `K` or `X-Api-Key`, with `/health` and `/v1/models` public.
Its own `/v1/responses` and `/v1/messages` (b11434's wire formats and quirks) are
in `tests/fakes/native.py`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import EngineError, Plan
from tests.fakes.native import LlamaNativeApis
from tests.fakes.openai_compat import OpenAICompatEngine, StreamCtx

__all__ = ["LlamaCppEngine"]

BUILD = "b6497-cd08fc3e"

# What llama-server reports of the GGUF files it loads (`/v1/models` `meta`; §14 observed the first),
# by file stem. A file not listed reports the SmolLM2 numbers, as every model of this fake always did;
# the `model_meta` knob (model id -> meta keys) adds or overrides entries.
GGUF_META: dict[str, dict[str, Any]] = {
    "SmolLM2-135M-Instruct.Q4_1": {
        "vocab_type": 2,
        "n_vocab": 49152,
        "n_embd": 576,
        "n_params": 134515008,
        "size": 96576768,
        "ftype": "Q4_1",
    },
    "Llama-3.2-3B-Instruct-Q4_K_M": {
        "vocab_type": 2,
        "n_vocab": 128256,
        "n_embd": 3072,
        "n_params": 3212749888,
        "size": 2019373888,
        "ftype": "Q4_K - Medium",
    },
}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}
_PUBLIC = frozenset({"/health", "/v1/health", "/models", "/v1/models", "/"})


def _error(status: int, message: str, etype: str | None = None) -> web.Response:
    etype = etype or _TYPES.get(status, "server_error")
    return web.json_response({"error": {"code": status, "message": message, "type": etype}}, status=status)


class LlamaCppEngine(LlamaNativeApis, OpenAICompatEngine):
    kind = "llamacpp"
    default_models = ("/models/SmolLM2-135M-Instruct.Q4_1.gguf",)
    loading_mode = "503"
    extra_headers: ClassVar[dict[str, str]] = {"Server": "llama.cpp"}

    role_chunk_content = None  # mid-2025+ builds: {"role":"assistant","content":null}
    usage_null_on_chunks = False
    stream_comments = (b": ping\n\n",)  # --sse-ping-interval comment (exact text unverified)
    validates_model = False  # single-model server: the request's model is ignored
    system_fingerprint = BUILD
    chat_paths = ("/v1/chat/completions", "/chat/completions")
    models_paths = ("/v1/models", "/models")

    total_slots = 1

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.model_meta: dict[str, dict[str, Any]] = {}  # model id -> `meta` keys to report (see GGUF_META)
        # The file it loaded, as `/props` names it; None: the (first) model id, as with no `--alias`.
        # With `models=["my-alias"]` this is what `llama-server -m FILE --alias my-alias` reports.
        self.model_path: str | None = None
        self.props_requests = 0  # bookkeeping: GET /props answered

    def meta(self, model: str) -> dict[str, Any]:
        """The `meta` of `model`'s `/v1/models` entry."""
        stem = model.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".gguf")
        known = self.model_meta.get(model) or GGUF_META.get(stem) or GGUF_META["SmolLM2-135M-Instruct.Q4_1"]
        return {"n_ctx": self.context_length, "n_ctx_train": self.train_context_length, **known}

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            *super().routes(),
            *self.native_routes(),
            ("GET", "/health", self.handle_health),
            ("GET", "/v1/health", self.handle_health),
            ("GET", "/props", self.handle_props),
            ("GET", "/slots", self.handle_slots),
            ("GET", "/metrics", self.handle_metrics),
        ]

    # ------------------------------------------------------------------ hooks

    def loading_response(self, request: web.Request) -> web.StreamResponse | None:
        if request.path == "/" or request.path.endswith(".html"):
            return web.Response(status=503, content_type="text/html", text="<html><body>Loading model</body></html>")
        return _error(503, "Loading model")

    def auth_required(self, request: web.Request) -> bool:
        return request.method != "OPTIONS" and request.path not in _PUBLIC

    def auth_ok(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        key = self.api_key
        return auth in (f"Bearer {key}", key) or request.headers.get("X-Api-Key") == key

    def auth_failure(self, request: web.Request) -> web.StreamResponse:
        return _error(401, "Invalid API Key")

    def error_response(self, request: web.Request, exc: EngineError) -> web.StreamResponse:
        return _error(exc.status, exc.message)

    def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return _error(404, "File Not Found")

    def stream_error_payload(self, message: str) -> dict:
        return {"error": {"code": 500, "message": message, "type": "server_error"}}

    def response_model(self, body: dict) -> str:
        return self.models[0] if self.models else str(body.get("model", ""))

    def timings(self, plan: Plan) -> dict:
        return {
            "cache_n": 0,
            "prompt_n": plan.prompt_tokens,
            "prompt_ms": 12.5,
            "prompt_per_token_ms": 12.5 / plan.prompt_tokens,
            "prompt_per_second": plan.prompt_tokens / 0.0125,
            "predicted_n": plan.completion_tokens,
            "predicted_ms": 20.0,
            "predicted_per_token_ms": 20.0 / max(1, plan.completion_tokens),
            "predicted_per_second": plan.completion_tokens / 0.02,
        }

    def usage(self, plan: Plan) -> dict:
        return {**super().usage(plan), "prompt_tokens_details": {"cached_tokens": 0}}

    def response_extras(self, plan: Plan) -> dict:
        return {"timings": self.timings(plan)}

    def usage_chunk(self, ctx: StreamCtx) -> dict:
        return {**super().usage_chunk(ctx), "timings": self.timings(ctx.plan)}

    # ----------------------------------------------------------------- routes

    def models_body(self) -> dict:
        models, data = [], []
        for m in self.models:
            models.append(
                {
                    "name": m,
                    "model": m,
                    "modified_at": "",
                    "size": "",
                    "digest": "",
                    "type": "model",
                    "description": "",
                    "tags": [""],
                    "capabilities": ["completion"],
                    "parameters": "",
                    "details": {
                        "parent_model": "",
                        "format": "gguf",
                        "family": "",
                        "families": [""],
                        "parameter_size": "",
                        "quantization_level": "",
                    },
                }
            )
            data.append(
                {
                    "id": m,
                    "aliases": [m],
                    "tags": [],
                    "object": "model",
                    "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                    "created": 1795315701,
                    "owned_by": "llamacpp",
                    "meta": self.meta(m),
                }
            )
        return {"models": models, "object": "list", "data": data}

    async def handle_health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def handle_props(self, request: web.Request) -> web.StreamResponse:
        self.props_requests += 1
        return web.json_response(
            {
                "default_generation_settings": {
                    "id": 0,
                    "n_ctx": self.context_length,
                    "speculative": False,
                    "is_processing": False,
                    "params": {"n_predict": -1, "temperature": 0.8},
                },
                "total_slots": self.total_slots,
                "model_path": self.model_path or (self.models[0] if self.models else ""),
                "chat_template": "{% for message in messages %}{{ message.content }}{% endfor %}",
                "chat_template_caps": {"supports_tools": True},
                "modalities": {"vision": False, "audio": False},
                "build_info": BUILD,
                "is_sleeping": False,
            }
        )

    async def handle_slots(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            [
                {
                    "id": i,
                    "id_task": -1,
                    "n_ctx": self.context_length,
                    "is_processing": i < self.active_streams,
                    "params": {},
                    "next_token": {},
                }
                for i in range(self.total_slots)
            ]
        )

    async def handle_metrics(self, request: web.Request) -> web.StreamResponse:
        return _error(501, "This server does not support metrics endpoint. Start it with `--metrics`")
