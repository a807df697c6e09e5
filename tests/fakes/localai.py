"""Fake LocalAI (engines.md §10).

Quirks kept: `/healthz` always 200; `/readyz` 503 `{"status":"starting",…}`
while loading (and generation routes 503 with `Retry-After`, `code:"model_loading"`);
`/.well-known/localai.json`, `/version`; the Ollama imitation's `/api/version`
= `0.9.0` and `/api/tags` with `sha256:` digests and `size: 0`; `/v1/models`
entries with only `id` and `object`; nested errors with an int `code`; auth by
Bearer, `x-api-key` or `xi-api-key`, 401 with `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from tests.fakes.base import EngineError
from tests.fakes.openai_compat import OpenAICompatEngine

__all__ = ["LocalAIEngine"]

VERSION = "v4.9.0"
_PUBLIC = frozenset({"/healthz", "/readyz", "/.well-known/localai.json"})


def _error(
    status: int, message: str, code: int | str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": status if code is None else code, "message": message, "type": ""}},
        status=status,
        headers=headers,
    )


class LocalAIEngine(OpenAICompatEngine):
    kind = "localai"
    default_models = ("gpt-4",)
    loading_mode = "503"

    usage_null_on_chunks = False
    embeddings_base64 = False  # encoding_format is ignored: floats come back
    system_fingerprint = None
    chat_paths = ("/v1/chat/completions", "/chat/completions")
    completion_paths = ("/v1/completions", "/completions")
    embedding_paths = ("/v1/embeddings", "/embeddings")
    models_paths = ("/v1/models", "/models")

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            *super().routes(),
            ("GET", "/healthz", self.handle_healthz),
            ("GET", "/readyz", self.handle_readyz),
            ("GET", "/version", self.handle_version),
            ("GET", "/.well-known/localai.json", self.handle_discovery),
            ("GET", "/api/version", self.handle_ollama_version),
            ("GET", "/api/tags", self.handle_ollama_tags),
        ]

    # ------------------------------------------------------------------ hooks

    def loading_response(self, request: web.Request) -> web.StreamResponse | None:
        if request.path == "/healthz":
            return None  # liveness stays green
        if request.path == "/readyz":
            return web.json_response({"status": "starting", "reason": "startup preload in progress"}, status=503)
        return _error(503, "model is loading, retry later", code="model_loading", headers={"Retry-After": "5"})

    def auth_required(self, request: web.Request) -> bool:
        return request.path not in _PUBLIC

    def auth_ok(self, request: web.Request) -> bool:
        key = self.api_key
        return (
            request.headers.get("Authorization") == f"Bearer {key}"
            or request.headers.get("x-api-key") == key
            or request.headers.get("xi-api-key") == key
        )

    def auth_failure(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": {"code": 401, "message": "An authentication key is required", "type": "invalid_request_error"}},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    def error_response(self, request: web.Request, exc: EngineError) -> web.StreamResponse:
        return _error(exc.status, exc.message)

    def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"message": "Not Found"}, status=404)

    def stream_error_payload(self, message: str) -> dict:
        return {"error": {"code": 500, "message": message, "type": ""}}

    def model_not_found(self, model: str) -> EngineError:
        return EngineError(500, f"could not load model: model {model!r} not found in any backend")

    def chat_id(self) -> str:
        return str(uuid.uuid4())

    def completion_id(self) -> str:
        return str(uuid.uuid4())

    # ----------------------------------------------------------------- routes

    def models_body(self) -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}

    async def handle_healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def handle_readyz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def handle_version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": f"{VERSION} (fake)"})

    async def handle_discovery(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "name": "LocalAI",
                "version": VERSION,
                "endpoints": {
                    "chat": "/v1/chat/completions",
                    "completions": "/v1/completions",
                    "embeddings": "/v1/embeddings",
                    "models": "/v1/models",
                },
            }
        )

    async def handle_ollama_version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": "0.9.0"})

    async def handle_ollama_tags(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "models": [
                    {
                        "name": m,
                        "model": m,
                        "modified_at": "2026-01-01T00:00:00Z",
                        "size": 0,
                        "digest": "sha256:" + uuid.uuid5(uuid.NAMESPACE_URL, m).hex * 2,
                        "details": {
                            "format": "gguf",
                            "family": "",
                            "families": None,
                            "parameter_size": "",
                            "quantization_level": "",
                        },
                    }
                    for m in self.models
                ]
            }
        )
