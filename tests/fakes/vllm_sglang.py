"""Fake vLLM and SGLang: the two FastAPI-based servers (engines.md §6, §7).

vLLM: connection refused while loading; `/health` empty 200; `/version`;
`owned_by:"vllm"`, `max_model_len`, `root`, `permission`; flat pre-0.10.1
errors (`nested_errors=True` gives the ≥0.10.1 shape); `stop_reason` on choices;
`[DONE]` after a mid-stream error; `stream_options` without `stream` is a 400;
auth only on `/v1/*`, 401 `{"error":"Unauthorized"}`.

SGLang: 503 while warming up (empty body on `/health*`, flat error elsewhere);
`/get_model_info`; `owned_by:"sglang"`; flat errors; `matched_stop`; auth on
everything but `/health*` and `/metrics`, exact `Bearer <key>`.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from tests.fakes.base import EngineError, Plan, status_phrase
from tests.fakes.openai_compat import OpenAICompatEngine

__all__ = ["SGLangEngine", "VLLMEngine"]

EOS_TOKEN_ID = 128009


def error_type(status: int) -> str:
    """FastAPI/`HTTPStatus`-derived names: 400 → BadRequestError, 500 → InternalServerError."""
    name = "".join(w.capitalize() for w in status_phrase(status).replace("-", " ").split())
    return name if name.endswith("Error") else name + "Error"


def flat_error(status: int, message: str, param: str | None = None) -> dict:
    return {"object": "error", "message": message, "type": error_type(status), "param": param, "code": status}


def _not_found(request: web.Request) -> web.StreamResponse:
    return web.json_response({"detail": "Not Found"}, status=404)


class _FastAPIEngine(OpenAICompatEngine):
    system_fingerprint = None
    done_after_error = True
    default_models = ("meta-llama/Llama-3.1-8B-Instruct",)
    gauges: tuple[int, int] | None = None  # what /metrics says runs and waits; None: the streams under way, none

    def error_response(self, request: web.Request, exc: EngineError) -> web.StreamResponse:
        return web.json_response(flat_error(exc.status, exc.message, exc.param), status=exc.status)

    def unknown_route(self, request: web.Request) -> web.StreamResponse:
        if request.match_info.http_exception is not None and request.match_info.http_exception.status == 405:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)
        return _not_found(request)

    def auth_failure(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "Unauthorized"}, status=401)

    def stream_error_payload(self, message: str) -> dict:
        return {"error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}}

    def chat_id(self) -> str:
        return "chatcmpl-" + uuid.uuid4().hex

    def completion_id(self) -> str:
        return "cmpl-" + uuid.uuid4().hex

    async def handle_empty_ok(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    @staticmethod
    def first_stop(body: dict) -> str | None:
        stop = body.get("stop")
        if isinstance(stop, str) and stop:
            return stop
        if isinstance(stop, list) and stop:
            return str(stop[0])
        return None

    def metrics_page(self, running: str, waiting: str) -> web.StreamResponse:
        """Prometheus text with the two queue gauges: the streams under way and none waiting, unless
        ``gauges`` (running, waiting) says otherwise (other clients' requests, a full engine)."""
        model = self.models[0] if self.models else ""
        ran, waited = self.gauges if self.gauges is not None else (self.active_streams, 0)
        labels = f'{{engine="0",model_name="{model}"}}'
        lines = [
            f"# TYPE {running} gauge",
            f"{running}{labels} {ran}.0",
            f"# TYPE {waiting} gauge",
            f"{waiting}{labels} {waited}.0",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{labels} 0.0",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


class VLLMEngine(_FastAPIEngine):
    kind = "vllm"
    loading_mode = "refuse"  # the socket does not listen until the engine is built

    version = "0.10.0"
    nested_errors = False  # True: the v0.10.1+ {"error":{...}} envelope

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        # `--served-model-name`: id -> the model path it serves (`root`); an id not here is its own path.
        self.roots: dict[str, str] = {}
        # LoRA adapters (`--lora-modules`): id -> the base model's name. Their cards carry it as `parent`,
        # their adapter path as `root`, and no `max_model_len`.
        self.lora_parents: dict[str, str] = {}

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            *super().routes(),
            ("GET", "/health", self.handle_empty_ok),
            ("GET", "/ping", self.handle_empty_ok),
            ("GET", "/version", self.handle_version),
            ("GET", "/load", self.handle_load),
            ("GET", "/metrics", self.handle_metrics),
        ]

    def auth_required(self, request: web.Request) -> bool:
        return request.path.startswith("/v1")

    def auth_ok(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token == self.api_key

    def error_response(self, request: web.Request, exc: EngineError) -> web.StreamResponse:
        if not self.nested_errors:
            return super().error_response(request, exc)
        return web.json_response(
            {"error": {"message": exc.message, "type": error_type(exc.status), "param": exc.param, "code": exc.status}},
            status=exc.status,
        )

    def model_not_found(self, model: str) -> EngineError:
        return EngineError(404, f"The model `{model}` does not exist.", param="model")

    def validate_request(self, body: dict, *, chat: bool) -> None:
        super().validate_request(body, chat=chat)
        if body.get("stream_options") is not None and not body.get("stream"):
            raise EngineError(400, "Stream options can only be defined when `stream=True`.")

    def choice_extras(self, body: dict, plan: Plan, finish: str | None) -> dict:
        stop = self.first_stop(body) if finish == "stop" else None
        return {"stop_reason": stop}

    def chat_response(self, body: dict, plan: Plan) -> dict:
        out = super().chat_response(body, plan)
        msg = out["choices"][0]["message"]
        msg.setdefault("tool_calls", [])
        msg["reasoning_content"] = None
        return out

    def response_extras(self, plan: Plan) -> dict:
        return {"prompt_logprobs": None, "kv_transfer_params": None}

    def models_body(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": m,
                    "object": "model",
                    "created": 1735142223,
                    "owned_by": "vllm",
                    "root": self.roots.get(m, f"/adapters/{m}" if m in self.lora_parents else m),
                    "parent": self.lora_parents.get(m),
                    "max_model_len": None if m in self.lora_parents else self.context_length,
                    "permission": [
                        {
                            "id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, m).hex}",
                            "object": "model_permission",
                            "created": 1735142223,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
                for m in self.models
            ],
        }

    async def handle_version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": self.version})

    async def handle_load(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"server_load": self.active_streams})

    async def handle_metrics(self, request: web.Request) -> web.StreamResponse:
        return self.metrics_page("vllm:num_requests_running", "vllm:num_requests_waiting")


class SGLangEngine(_FastAPIEngine):
    kind = "sglang"
    loading_mode = "503"  # warm-up phase; weight loading is "connection refused" (stop_listening)
    validates_model = False

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            *super().routes(),
            ("GET", "/health", self.handle_empty_ok),
            ("GET", "/health_generate", self.handle_empty_ok),
            ("GET", "/ping", self.handle_empty_ok),
            ("GET", "/get_model_info", self.handle_model_info),
            ("GET", "/get_server_info", self.handle_server_info),
            ("GET", "/metrics", self.handle_metrics),  # with --enable-metrics
        ]

    async def handle_metrics(self, request: web.Request) -> web.StreamResponse:
        return self.metrics_page("sglang:num_running_reqs", "sglang:num_queue_reqs")

    def loading_response(self, request: web.Request) -> web.StreamResponse | None:
        if request.path.startswith("/health"):
            return web.Response(status=503)
        return self.error_response(request, EngineError(503, "The server is starting up"))

    def auth_required(self, request: web.Request) -> bool:
        return not (request.path.startswith("/health") or request.path.startswith("/metrics"))

    def stream_error_payload(self, message: str) -> dict:
        return {"error": flat_error(500, message)}

    def choice_extras(self, body: dict, plan: Plan, finish: str | None) -> dict:
        if finish == "stop":
            return {"matched_stop": self.first_stop(body) or EOS_TOKEN_ID}
        return {"matched_stop": None}

    def models_body(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": m,
                    "object": "model",
                    "created": 1735142223,
                    "owned_by": "sglang",
                    "root": m,
                    "max_model_len": self.context_length,
                }
                for m in self.models
            ],
        }

    async def handle_model_info(self, request: web.Request) -> web.StreamResponse:
        path = self.models[0] if self.models else ""
        return web.json_response(
            {
                "model_path": path,
                "tokenizer_path": path,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
            }
        )

    async def handle_server_info(self, request: web.Request) -> web.StreamResponse:
        path = self.models[0] if self.models else ""
        return web.json_response(
            {
                "model_path": path,
                "port": self.port,
                "context_length": self.context_length,
                "internal_states": [{}],
                "version": "0.5.0",
            }
        )
