"""The Ollama surface: Ollama's native ``/api/*`` over the whole cluster.

A second surface over the one request path (``surface.serve``): the same
router (local engine, LAN peer, relay peer), failure contract, trust rule,
record and provenance headers as the OpenAI surface, with Ollama's own wire
format — NDJSON streams, single objects with ``"stream": false``, durations in
nanoseconds, errors as ``{"error": "…"}`` (``reference/engines.md`` §4). An
Ollama client can chat with a model that vLLM serves on another machine:
nothing below this module knows which API the client spoke.

Model names: a model appears under its catalog id (``llama3.2:latest`` from
an Ollama engine, ``meta-llama/Llama-3.1-8B-Instruct`` from vLLM);
``name:latest`` also finds a model whose id has no tag, as ``llama3.2`` finds
``llama3.2:latest``. ``/api/tags`` lists each model once, whatever number of
machines hold it.

Quorum serves models, it does not manage weights: ``/api/pull``, ``push``,
``create``, ``copy``, ``delete`` and blob uploads are refused (403) with a
message that says which engine does that.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any, ClassVar

import msgspec
from aiohttp import web

from ..backends.base import StreamStats
from ..catalog import CatalogView, ModelCard
from ..errors import ApiError, BadRequest, NotFound
from .auth import check_scope
from .body import read_body
from .ollama_wire import (
    ChatRequest,
    ChatStream,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ShowRequest,
    chat_body,
    decode_request,
    embed_body,
    generate_body,
    metrics,
    normalise,
    now_rfc3339,
    whole_chat,
    whole_generate,
)
from .state import CATALOG, DRAFT, REGISTRY, visible_catalog
from .surface import PREFIXES, Call, StreamEncoder, Surface, serve

__all__ = ["OLLAMA", "OLLAMA_VERSION", "OllamaCall", "OllamaSurface", "routes"]

#: The Ollama version this surface answers as (clients gate features on it).
OLLAMA_VERSION = "0.12.3"

_encode = msgspec.json.Encoder().encode
_STARTED = time.time()  # "modified_at" of models whose engine gives no date

# Engines whose models are GGUF files; vLLM, SGLang and TGI load safetensors; MLX its own.
_FORMATS = {
    "ollama": "gguf",
    "llamacpp": "gguf",
    "lmstudio": "gguf",
    "localai": "gguf",
    "vllm": "safetensors",
    "sglang": "safetensors",
    "tgi": "safetensors",
    "mlx": "mlx",
}
_MANAGEMENT = {
    "/api/pull": "pull",
    "/api/push": "push",
    "/api/create": "create",
    "/api/copy": "copy",
    "/api/delete": "delete",
}


class OllamaCall(Call, kw_only=True):
    """A call from an Ollama client: what it asked for, in its own terms."""

    name: str  # the model as the client named it (echoed back, as Ollama does)
    kind: str  # "chat" | "generate" | "embed" | "embeddings"
    t0: float  # perf_counter when the request arrived (total_duration)
    think: bool | str | None = None


class NDJSONEncoder(StreamEncoder):
    """One ``/api/chat`` or ``/api/generate`` stream as NDJSON lines."""

    headers: ClassVar[dict[str, str]] = {
        "Content-Type": "application/x-ndjson",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    }

    __slots__ = ("_call", "_stream", "_first")

    def __init__(self, call: OllamaCall) -> None:
        self._call = call
        self._stream = ChatStream(call.name, key="message" if call.kind == "chat" else "response", think=call.think)
        self._first = call.t0

    def start(self) -> bytes:
        self._first = time.perf_counter()  # the router hands over once the first tokens are in
        return b""

    def batch(self, events: list[bytes]) -> bytes:
        return self._stream.feed(events)

    def done(self, stats: StreamStats) -> bytes:
        now = time.perf_counter()
        return self._stream.final(
            stats.usage,
            stats.chunks,
            total_s=now - self._call.t0,
            prompt_s=self._first - self._call.t0,
            eval_s=now - self._first,
        )

    def error(self, message: str, code: str | None, type_: str) -> bytes:
        return _encode({"error": message}) + b"\n"  # the ollama clients raise on this line


class OllamaSurface(Surface):
    name = "ollama"

    def error_body(self, e: ApiError) -> bytes:
        return _encode({"error": e.message})

    def answer(self, call: Call, payload: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        assert isinstance(call, OllamaCall)
        total_s = time.perf_counter() - call.t0
        if call.kind == "chat":
            out = whole_chat(payload, call.name, total_s, think=call.think)
        elif call.kind == "generate":
            out = whole_generate(payload, call.name, total_s, think=call.think)
        else:
            out = _embedding_answer(call, payload, total_s)
        return web.Response(body=_encode(out), content_type="application/json", headers=headers)

    def encoder(self, call: Call) -> StreamEncoder:
        assert isinstance(call, OllamaCall)
        return NDJSONEncoder(call)


OLLAMA = OllamaSurface()
PREFIXES.append(("/api/", OLLAMA))  # an unknown /api/... path is answered the way Ollama would


def _index_of(item: dict[str, Any]) -> int:
    index = item.get("index")
    return index if isinstance(index, int) else 0


def _embedding_answer(call: OllamaCall, payload: dict[str, Any], total_s: float) -> dict[str, Any]:
    data = sorted((d for d in payload.get("data") or () if isinstance(d, dict)), key=_index_of)
    vectors = [v for v in (d.get("embedding") for d in data) if isinstance(v, list)]
    if call.kind == "embeddings":  # legacy: one vector, as the engine gave it
        return {"embedding": vectors[0] if vectors else []}
    embeddings = []
    for v in vectors:
        norm = math.hypot(*v) if v else 0.0
        embeddings.append(v if abs(norm - 1.0) < 1e-4 else normalise(v))  # /api/embed is L2-normalised
    usage = payload.get("usage")
    out: dict[str, Any] = {
        "model": call.name,
        "embeddings": embeddings,
        **metrics(usage, total_s=total_s, prompt_s=None, eval_s=None),
    }
    return out


# ------------------------------------------------------------------ the catalog


def _merge(view: CatalogView) -> dict[str, list[ModelCard]]:
    """The cluster's models by id, each listed once.

    Ids that name each other (``llama3.2`` on one engine, ``llama3.2:latest``
    with the alias ``llama3.2`` on another) are one model, listed under the
    first of its ids.
    """
    by_id = view.by_id
    parent = {mid: mid for mid in by_id}

    def root(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    for mid, entries in by_id.items():
        for e in entries:
            for a in e.aliases:
                if a in parent:
                    ra, rb = root(a), root(mid)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
    out: dict[str, list[ModelCard]] = {}
    for mid in by_id:  # sorted
        out.setdefault(root(mid), []).extend(by_id[mid])
    return out


def _catalog(view: CatalogView) -> dict[str, list[ModelCard]]:
    """``_merge`` of the view, made once per catalog change."""
    return view.memo("ollama.catalog", _merge)


def _index(view: CatalogView) -> dict[str, str]:
    """Every name of a listed model (its ids and aliases) -> the id it is listed under."""
    out: dict[str, str] = {}
    for mid, entries in _catalog(view).items():
        for e in entries:
            for n in (*e.aliases, e.id):
                out.setdefault(n, mid)
        out[mid] = mid
    return out


def _find(view: CatalogView, name: str) -> str | None:
    mid = view.memo("ollama.index", _index).get(name)
    if mid is None and name.endswith(":latest"):
        return _find(view, name.removesuffix(":latest"))
    return mid


def _exists(app: web.Application, name: str) -> bool:
    return bool(app[REGISTRY].holders(name)) or _find(app[CATALOG].view(), name) is not None


def resolve(app: web.Application, name: str) -> str:
    """The name the router knows for what an Ollama client asked.

    Names go through as they are (the router matches ids and aliases), except
    ``name:latest`` for a model whose id has no tag, which Ollama clients add.
    """
    if not name.endswith(":latest") or app[REGISTRY].holders(name):
        return name
    view = app[CATALOG].view()
    if name in view.memo("ollama.index", _index):
        return name
    return _find(view, name) or name


def _details(entries: list[ModelCard]) -> dict[str, Any]:
    family = next((e.family for e in entries if e.family), None)
    return {
        "parent_model": "",
        "format": next((_FORMATS[e.engine] for e in entries if e.engine in _FORMATS), ""),
        "family": family or "",
        "families": [family] if family else None,
        "parameter_size": next((e.parameter_size for e in entries if e.parameter_size), ""),
        "quantization_level": next((e.quantization for e in entries if e.quantization), ""),
    }


def _modified_at(entries: list[ModelCard]) -> str:
    created = max((e.created or 0 for e in entries), default=0)
    t = created if isinstance(created, int) and created > 0 else _STARTED
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _digest(mid: str) -> str:
    # Not a weights digest (Quorum never sees the files): a stable id of the catalog entry.
    return hashlib.sha256(mid.encode()).hexdigest()


def _tag(mid: str, entries: list[ModelCard]) -> dict[str, Any]:
    return {
        "name": mid,
        "model": mid,
        "modified_at": _modified_at(entries),
        "size": 0,
        "digest": _digest(mid),
        "details": _details(entries),
    }


def _context_length(entries: list[ModelCard]) -> int | None:
    return max((e.context_length for e in entries if e.context_length), default=None)


def _capabilities(app: web.Application, mid: str) -> list[str]:
    caps: set[str] = set()
    for _, m in app[REGISTRY].holders(mid):
        caps.update(m.capabilities)
    if caps:
        return sorted(caps)
    return ["embedding"] if "embed" in mid.lower() else ["completion"]


def _tags_body(view: CatalogView) -> bytes:
    return _encode({"models": [_tag(mid, es) for mid, es in _catalog(view).items()]})


def _ps_body(view: CatalogView) -> bytes:
    models = []
    for mid, entries in _catalog(view).items():
        # loaded: True; None is an engine that has no other state (vLLM, llama.cpp): loaded while it is up
        if not any(e.loaded is not False for e in entries):
            continue
        entry = {**_tag(mid, entries), "size_vram": 0}
        del entry["modified_at"]
        ctx = _context_length(entries)
        if ctx:
            entry["context_length"] = ctx
        models.append(entry)
    return _encode({"models": models})


async def tags(request: web.Request) -> web.Response:
    """Encoded once per catalog change (and per scope set: a scoped key sees its own models)."""
    request[DRAFT].asked(OLLAMA.name, "tags")
    body = visible_catalog(request).memo("ollama.tags", _tags_body)
    return web.Response(body=body, content_type="application/json")


async def ps(request: web.Request) -> web.Response:
    request[DRAFT].asked(OLLAMA.name, "ps")
    body = visible_catalog(request).memo("ollama.ps", _ps_body)
    return web.Response(body=body, content_type="application/json")


async def show(request: web.Request) -> web.Response:
    req = decode_request(await read_body(request), ShowRequest)
    name = req.model or req.name or ""
    request[DRAFT].asked(OLLAMA.name, "show", name)
    view = visible_catalog(request)  # a model a scoped key may not use: as if it did not exist
    mid = _find(view, name)
    if mid is None:
        raise NotFound(f"model '{name}' not found", param="model", code="model_not_found")
    entries = _catalog(view)[mid]
    details = _details(entries)
    arch = details["family"] or "unknown"
    info: dict[str, Any] = {"general.architecture": arch, "general.basename": mid}
    ctx = _context_length(entries)
    if ctx:
        info[f"{arch}.context_length"] = ctx
    out = {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details,
        "model_info": info,
        "capabilities": _capabilities(request.app, mid),
        "modified_at": _modified_at(entries),
    }
    return web.Response(body=_encode(out), content_type="application/json")


async def version(request: web.Request) -> web.Response:
    return web.Response(body=_encode({"version": OLLAMA_VERSION}), content_type="application/json")


async def root(request: web.Request) -> web.StreamResponse:
    """``GET /`` as Ollama answers it; a browser asking for HTML goes to the dashboard where there is one."""
    browser = request.method == "GET" and "text/html" in request.headers.get("Accept", "")
    if browser and any(r.canonical == "/dashboard" for r in request.app.router.resources()):
        raise web.HTTPFound("/dashboard")
    return web.Response(text="Ollama is running", content_type="text/plain")


async def refuse(request: web.Request) -> web.Response:
    """Management endpoints: Quorum never changes what a machine holds."""
    what = _MANAGEMENT.get(request.path, "create")  # /api/blobs/... belongs to create
    request[DRAFT].asked(OLLAMA.name, what)
    ollamas = [b.url for b in request.app[REGISTRY].backends.values() if b.kind == "ollama"]
    where = (
        f"this machine's Ollama is at {ollamas[0]} (e.g. `OLLAMA_HOST={ollamas[0]} ollama {what} …`)"
        if ollamas
        else "on the machine that should hold the model, use its engine (`ollama "
        + what
        + "` against Ollama's own port 11434; for llama.cpp, vLLM and the others, download the weights "
        "and start the engine with them)"
    )
    raise ApiError(
        f"Quorum does not manage model weights, so /api/{what} is not available through quorum-node: "
        f"{where}. Quorum serves what the engines hold and lists new models within seconds.",
        status=403,
        type_="permission_error",
        code="weights_not_managed",
        retryable=False,
    )


# ---------------------------------------------------------------- generation


def _call(
    request: web.Request,
    *,
    op: Any,
    model: str,
    body: dict[str, Any],
    stream: bool,
    name: str,
    kind: str,
    think: bool | str | None = None,
) -> OllamaCall:
    return OllamaCall(
        op=op,
        model=model,
        body=body,
        stream=stream,
        want_usage=False,
        operation=kind,
        name=name,
        kind=kind,
        t0=request[DRAFT].t0,
        think=think,
    )


async def _serve(request: web.Request, call: OllamaCall) -> web.StreamResponse:
    """``serve``, with the router's refusals in Ollama's words."""
    try:
        return await serve(request, OLLAMA, call)
    except ApiError as e:
        if e.code == "model_not_found":
            raise NotFound(f"model '{call.name}' not found", param="model", code="model_not_found") from None
        if e.code == "not_supported":
            what = {"embed": "embeddings", "embeddings": "embeddings"}.get(call.kind, "generate")
            raise BadRequest(f'"{call.name}" does not support {what}', param="model", code="not_supported") from None
        raise


def _loaded(request: web.Request, name: str, model: str, kind: str, *, stream: bool, keep_alive: Any) -> web.Response:
    """An empty chat or prompt: Ollama's way to load (or, with keep_alive 0, unload) a model."""
    request[DRAFT].asked(OLLAMA.name, kind, model)
    check_scope(request, model)  # loading a model is using it
    if not _exists(request.app, model):
        raise NotFound(f"model '{name}' not found", param="model", code="model_not_found")
    out: dict[str, Any] = {"model": name, "created_at": now_rfc3339()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason="unload" if keep_alive in (0, "0", "0s") else "load")
    if stream:
        return web.Response(body=_encode(out) + b"\n", content_type="application/x-ndjson")
    return web.Response(body=_encode(out), content_type="application/json")


async def chat(request: web.Request) -> web.StreamResponse:
    req = decode_request(await read_body(request), ChatRequest)
    model = resolve(request.app, req.model)
    if not req.messages:
        return _loaded(request, req.model, model, "chat", stream=req.stream, keep_alive=req.keep_alive)
    return await _serve(
        request,
        _call(
            request,
            op="chat",
            model=model,
            body=chat_body(req, model),
            stream=req.stream,
            name=req.model,
            kind="chat",
            think=req.think,
        ),
    )


async def generate(request: web.Request) -> web.StreamResponse:
    req = decode_request(await read_body(request), GenerateRequest)
    model = resolve(request.app, req.model)
    if not req.prompt and not req.images and not req.suffix:
        return _loaded(request, req.model, model, "generate", stream=req.stream, keep_alive=req.keep_alive)
    op, body = generate_body(req, model)
    return await _serve(
        request,
        _call(
            request, op=op, model=model, body=body, stream=req.stream, name=req.model, kind="generate", think=req.think
        ),
    )


async def embed(request: web.Request) -> web.StreamResponse:
    req = decode_request(await read_body(request), EmbedRequest)
    if isinstance(req.input, list) and not req.input:
        raise BadRequest(
            "invalid input: expected a string or a non-empty array of strings", param="input", code="invalid_value"
        )
    if req.dimensions is not None and req.dimensions < 1:
        raise BadRequest("invalid dimensions: must be at least 1", param="dimensions", code="invalid_value")
    model = resolve(request.app, req.model)
    return await _serve(
        request,
        _call(
            request,
            op="embeddings",
            model=model,
            body=embed_body(model, req.input, req.dimensions),
            stream=False,
            name=req.model,
            kind="embed",
        ),
    )


async def embeddings(request: web.Request) -> web.StreamResponse:
    req = decode_request(await read_body(request), EmbeddingsRequest)
    model = resolve(request.app, req.model)
    if not req.prompt:  # Ollama answers an empty prompt with an empty vector
        request[DRAFT].asked(OLLAMA.name, "embeddings", model)
        check_scope(request, model)
        if not _exists(request.app, model):
            raise NotFound(f"model '{req.model}' not found", param="model", code="model_not_found")
        return web.Response(body=b'{"embedding":[]}', content_type="application/json")
    return await _serve(
        request,
        _call(
            request,
            op="embeddings",
            model=model,
            body=embed_body(model, req.prompt),
            stream=False,
            name=req.model,
            kind="embeddings",
        ),
    )


def routes() -> list[web.RouteDef]:
    r = OLLAMA.route
    return [
        r("GET", "/", root),  # GET routes answer HEAD too
        r("GET", "/api/version", version),
        r("GET", "/api/tags", tags),
        r("GET", "/api/ps", ps),
        r("POST", "/api/show", show),
        r("POST", "/api/chat", chat),
        r("POST", "/api/generate", generate),
        r("POST", "/api/embed", embed),
        r("POST", "/api/embeddings", embeddings),
        *(r("POST", path, refuse) for path in ("/api/pull", "/api/push", "/api/create", "/api/copy")),
        r("DELETE", "/api/delete", refuse),
        r("POST", "/api/blobs/{digest}", refuse),
        r("HEAD", "/api/blobs/{digest}", refuse),
    ]
