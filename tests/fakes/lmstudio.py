"""Fake LM Studio (engines.md §9; closed source, so partly from observation).

Quirks kept: `X-Powered-By: Express` on every response; HTTP **200** with
`{"error":"Unexpected endpoint or method. (GET /x)"}` for unknown paths, and
200 with `{"error":"…"}` for every error this fake injects; `/v1/models` with
`owned_by:"organization_owner"` and no `created`, listing every downloaded
model (JIT); `/api/v0/models` with `state`/`compatibility_type`/`max_context_length`;
requests wait while `loading` (JIT load). Auth (0.4+): Bearer on every route;
the 401 body is unverified.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import EngineError, random_id
from tests.fakes.openai_compat import OpenAICompatEngine

__all__ = ["LMStudioEngine"]


def _is_embedding(model: str) -> bool:
    return "embed" in model


# What LM Studio reports of a downloaded model (`/api/v0/models`: arch, quantization, format; the 0.4
# `/api/v1/models` the same words), by key. A key not listed reports what every model of this fake always
# did (a Qwen2 GGUF at Q4_K_M); the `model_facts` knob (key -> these keys) adds or overrides entries.
CATALOG: dict[str, dict[str, Any]] = {
    "qwen2.5-7b-instruct": {
        "arch": "qwen2",
        "quantization": "Q4_K_M",
        "compatibility_type": "gguf",
        "params_string": "7B",
        "size_bytes": 4683073888,
    },
    "llama-3.2-3b-instruct": {
        "arch": "llama",
        "quantization": "Q4_K_M",
        "compatibility_type": "gguf",
        "params_string": "3B",
        "size_bytes": 2019373888,
    },
    "text-embedding-nomic-embed-text-v1.5": {
        "arch": "nomic-bert",
        "quantization": "Q4_K_M",
        "compatibility_type": "gguf",
        "params_string": None,
        "size_bytes": 84106624,
    },
}


class LMStudioEngine(OpenAICompatEngine):
    kind = "lmstudio"
    default_models = ("qwen2.5-7b-instruct", "text-embedding-nomic-embed-text-v1.5")
    loading_mode = "wait"  # JIT: the first request to an unloaded model loads it
    extra_headers: ClassVar[dict[str, str]] = {"X-Powered-By": "Express"}

    usage_null_on_chunks = False
    embeddings_base64 = False  # unverified; floats are what the SDK tolerates either way
    system_fingerprint = None

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.model_facts: dict[str, dict[str, Any]] = {}  # key -> what to report of it (see CATALOG)

    def facts(self, model: str) -> dict[str, Any]:
        return self.model_facts.get(model) or CATALOG.get(model) or CATALOG["qwen2.5-7b-instruct"]

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            *super().routes(),
            ("GET", "/api/v0/models", self.handle_v0_models),
            ("GET", "/api/v0/models/{model:.+}", self.handle_v0_model),
            ("GET", "/api/v1/models", self.handle_v1_native_models),
        ]

    # ------------------------------------------------------------------ hooks

    def auth_required(self, request: web.Request) -> bool:
        return True

    def auth_failure(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "Invalid or missing API token"}, status=401)

    def error_response(self, request: web.Request, exc: EngineError) -> web.StreamResponse:
        return web.json_response({"error": exc.message}, status=200)

    def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": f"Unexpected endpoint or method. ({request.method} {request.path})"}, status=200
        )

    def stream_error_payload(self, message: str) -> dict:
        return {"error": {"message": message}}

    def model_not_found(self, model: str) -> EngineError:
        return EngineError(404, f'Invalid model identifier "{model}". Please specify a valid downloaded model.')

    def chat_id(self) -> str:
        return "chatcmpl-" + random_id(20, "abcdefghijklmnopqrstuvwxyz0123456789")

    def completion_id(self) -> str:
        return "cmpl-" + random_id(20, "abcdefghijklmnopqrstuvwxyz0123456789")

    # ----------------------------------------------------------------- routes

    def models_body(self) -> dict:
        return {
            "data": [{"id": m, "object": "model", "owned_by": "organization_owner"} for m in self.models],
            "object": "list",
        }

    def v0_entry(self, model: str) -> dict:
        loaded = model in self.loaded_models
        facts = self.facts(model)
        entry: dict[str, Any] = {
            "id": model,
            "object": "model",
            "type": "embeddings" if _is_embedding(model) else "llm",
            "publisher": "lmstudio-community",
            "arch": facts["arch"],
            "compatibility_type": facts["compatibility_type"],
            "quantization": facts["quantization"],
            "state": "loaded" if loaded else "not-loaded",
            "max_context_length": self.train_context_length,
        }
        if loaded:
            entry["loaded_context_length"] = self.context_length
        return entry

    async def handle_v0_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [self.v0_entry(m) for m in self.models]})

    async def handle_v0_model(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        if model not in self.models:
            raise EngineError(404, f'Model "{model}" not found')
        return web.json_response(self.v0_entry(model))

    async def handle_v1_native_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "models": [
                    {
                        "type": "embedding" if _is_embedding(m) else "llm",
                        "publisher": "lmstudio-community",
                        "key": m,
                        "display_name": m,
                        "architecture": self.facts(m)["arch"],
                        "quantization": {"name": self.facts(m)["quantization"], "bits_per_weight": 4.8},
                        "size_bytes": self.facts(m)["size_bytes"],
                        "params_string": self.facts(m)["params_string"],
                        "loaded_instances": [{"id": m, "config": {"context_length": self.context_length}}]
                        if m in self.loaded_models
                        else [],
                        "max_context_length": self.train_context_length,
                        "format": self.facts(m)["compatibility_type"],
                        "capabilities": {"vision": False, "trained_for_tool_use": True},
                    }
                    for m in self.models
                ]
            }
        )
