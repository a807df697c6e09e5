"""One driver for every engine that speaks OpenAI's ``/v1``, with a profile per engine.

A profile names what differs between engines: where health is read, what a
model list entry carries, whether the stream needs fixing, which capabilities
exist. Adding an engine that speaks ``/v1`` is adding a profile.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import PurePath
from typing import Any

import aiohttp
import msgspec
import structlog

from ..errors import (
    BadRequest,
    EngineRejected,
    EngineUnavailable,
    NotSupported,
    StreamBroken,
)
from .base import (
    Backend,
    BackendState,
    JsonReply,
    Model,
    Op,
    Reply,
    StreamReply,
    StreamStats,
    Timeouts,
)
from .sse import FINISH_MAP, EventSplitter, StreamNormalizer, engine_error_message
from .upstream import post, read_error_body, read_whole

__all__ = ["PATHS", "PROFILES", "OpenAICompatBackend", "Profile", "Timeouts", "map_engine_error", "stream_events"]

log = structlog.get_logger(__name__)
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    """What one engine family does differently."""

    kind: str
    health_path: str | None = "/health"  # 200 ready, 503 loading; None: the model list is the health check
    clean_stream: bool = True  # its SSE is already what the SDK expects
    ops: frozenset[str] = frozenset({"chat", "completions", "embeddings"})
    errors_on_200: bool = False  # LM Studio answers errors with HTTP 200
    request_model: str | None = None  # TGI routes by nothing; "tgi" is safe
    path_ids: bool = False  # llama.cpp names models by file path
    load_path: str | None = None  # where the engine tells how busy it is


PROFILES: dict[str, Profile] = {
    p.kind: p
    for p in (
        Profile(kind="vllm", load_path="/load"),
        Profile(kind="sglang"),
        Profile(kind="llamacpp", path_ids=True, load_path="/slots"),
        Profile(kind="tgi", clean_stream=False, ops=frozenset({"chat", "completions"}), request_model="tgi"),
        Profile(kind="lmstudio", health_path=None, errors_on_200=True),
        Profile(kind="localai", health_path="/readyz"),
        Profile(kind="mlx", clean_stream=False, ops=frozenset({"chat", "completions"})),
        Profile(kind="openai", health_path=None),
        Profile(kind="ollama", health_path=None, clean_stream=False),
    )
}

_RETRYABLE = {404, 408, 409, 429}


def map_engine_error(status: int, raw: bytes, *, engine: str, retry_after: str | None = None) -> Exception:
    """Turn an engine's error answer (any envelope, §12.10) into our error tree."""
    try:
        obj: Any = _decode(raw) if raw else {}
    except msgspec.DecodeError:
        obj = raw.decode(errors="replace").strip()
    message = engine_error_message(obj) if obj else f"engine answered HTTP {status}"
    err = obj.get("error") if isinstance(obj, dict) else None
    param = err.get("param") if isinstance(err, dict) else (obj.get("param") if isinstance(obj, dict) else None)
    hint: float | None = None
    if retry_after:
        try:
            hint = float(retry_after)
        except ValueError:
            hint = None
    if status >= 500 or status in _RETRYABLE or status in (401, 403):
        if status == 501:
            return EngineRejected(NotSupported(message, code="not_supported"), engine=engine)
        if status in (401, 403):
            message = f"engine {engine} refused quorum's credentials ({message}); check its api_key"
        return EngineUnavailable(message, status=status, engine=engine, retry_after_s=hint)
    code = None
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        code = err["code"]
    return EngineRejected(BadRequest(message, param=param if isinstance(param, str) else None, code=code), engine=engine)


def _b64_floats(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def public_id(engine_id: str, path_ids: bool) -> tuple[str, tuple[str, ...]]:
    """How users know a model: llama.cpp's ``/m/SmolLM2.Q4_1.gguf`` is ``SmolLM2.Q4_1``."""
    if path_ids and ("/" in engine_id or engine_id.endswith(".gguf")):
        p = PurePath(engine_id)
        stem = p.name[: -len(".gguf")] if p.name.endswith(".gguf") else p.name
        aliases = tuple(dict.fromkeys(a for a in (p.name, engine_id) if a != stem))
        return stem, aliases
    return engine_id, ()


class OpenAICompatBackend(Backend):
    """An engine reached over its OpenAI-compatible ``/v1`` routes."""

    def __init__(
        self,
        kind: str,
        url: str,
        session: aiohttp.ClientSession,
        *,
        api_key: str | None = None,
        name: str | None = None,
        timeouts: Timeouts | None = None,
        detected: bool = False,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.url = url.rstrip("/").removesuffix("/v1")
        self.profile = PROFILES[kind]
        self.name = name or f"{kind}@{self.url.split('://', 1)[-1]}"
        self.detected = detected
        self._session = session
        self._timeouts = timeouts or Timeouts()
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._probe_timeout = aiohttp.ClientTimeout(total=self._timeouts.probe_s, sock_connect=self._timeouts.probe_s)

    # -- discovery -------------------------------------------------------

    async def _get_json(self, path: str) -> tuple[int, Any]:
        async with self._session.get(
            self.url + path, headers=self._headers, timeout=self._probe_timeout, allow_redirects=False
        ) as resp:
            raw = await resp.read()
            try:
                return resp.status, _decode(raw) if raw else None
            except msgspec.DecodeError:
                return resp.status, raw.decode(errors="replace")

    async def refresh(self) -> None:
        try:
            if self.profile.health_path:
                status, body = await self._get_json(self.profile.health_path)
                if status in (503, 425) or status == 429:
                    self._set(BackendState.LOADING, f"{self.profile.health_path} answered {status}")
                    return
                if status != 200:
                    self._set(BackendState.DOWN, f"{self.profile.health_path} answered {status}")
                    return
            models = await self.list_models()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self._set(BackendState.DOWN, f"{type(e).__name__}: {e}")
            return
        except EngineUnavailable as e:
            self._set(BackendState.LOADING if e.status == 503 else BackendState.DOWN, e.message)
            return
        self.models = models
        self.last_models = models
        self.engine_load = await self._engine_load()
        self._set(BackendState.READY, None)

    async def _engine_load(self) -> int | None:
        """Requests the engine itself says it is working on (everyone's, not only ours)."""
        if self.profile.load_path is None:
            return None
        try:
            status, body = await self._get_json(self.profile.load_path)
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        if status != 200:
            return None
        if isinstance(body, dict) and isinstance(body.get("server_load"), int):  # vLLM
            return body["server_load"]
        if isinstance(body, list):  # llama.cpp slots
            return sum(1 for slot in body if isinstance(slot, dict) and slot.get("is_processing"))
        return None

    def _set(self, state: BackendState, reason: str | None) -> None:
        if state is not self.state:
            log.info("engine_state", engine=self.name, state=state.value, was=self.state.value, reason=reason)
        self.state = state
        self.last_error = reason
        if state is BackendState.DOWN:
            self.models = []

    async def list_models(self) -> list[Model]:
        status, body = await self._get_json("/v1/models")
        if status != 200 or not isinstance(body, dict) or (self.profile.errors_on_200 and "error" in body):
            raise EngineUnavailable(f"/v1/models answered {status}", status=503 if status == 503 else 502)
        entries = body.get("data") or []  # Ollama sends null when empty
        extra = await self._model_extras()
        models: list[Model] = []
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("id"), str):
                continue
            eid = e["id"]
            pid, aliases = public_id(eid, self.profile.path_ids)
            meta = e.get("meta") if isinstance(e.get("meta"), dict) else {}
            ctx = e.get("max_model_len") or meta.get("n_ctx") or meta.get("n_ctx_train")
            info = extra.get(eid, {})
            models.append(
                Model(
                    id=pid,
                    engine_id=eid,
                    aliases=aliases,
                    owned_by=str(e.get("owned_by") or self.kind),
                    created=int(e.get("created") or 0),
                    context_length=info.get("context_length", ctx if isinstance(ctx, int) else None),
                    loaded=info.get("loaded", True if self.kind in ("llamacpp", "vllm", "sglang", "tgi") else None),
                    capabilities=tuple(info.get("capabilities", ())),
                )
            )
        return models

    async def _model_extras(self) -> dict[str, dict[str, Any]]:
        """Facts the engine's own API adds to /v1/models (LM Studio state, TGI context)."""
        try:
            if self.kind == "lmstudio":
                status, body = await self._get_json("/api/v0/models")
                if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
                    return {
                        e["id"]: {
                            "loaded": e.get("state") == "loaded",
                            "context_length": e.get("loaded_context_length") or e.get("max_context_length"),
                            "capabilities": ("embeddings",) if e.get("type") == "embeddings" else ("chat", "completions"),
                        }
                        for e in body["data"]
                        if isinstance(e, dict) and "id" in e
                    }
            elif self.kind == "tgi":
                status, body = await self._get_json("/info")
                if status == 200 and isinstance(body, dict) and body.get("model_id"):
                    return {body["model_id"]: {"context_length": body.get("max_total_tokens")}}
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        return {}

    def supports(self, op: Op) -> bool:
        return op in self.profile.ops

    # -- requests --------------------------------------------------------

    def prepare(self, op: Op, model: Model, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        """The body the engine should get."""
        payload = dict(body)
        payload["model"] = self.profile.request_model or model.engine_id
        if stream:
            opts = payload.get("stream_options")
            opts = dict(opts) if isinstance(opts, dict) else {}
            opts["include_usage"] = True  # we count tokens; dropped again if the client did not ask
            payload["stream_options"] = opts
        if op == "embeddings":
            payload["encoding_format"] = "float"
        return payload

    async def open(self, op: Op, model: Model, body: dict[str, Any], *, stream: bool, want_usage: bool) -> Reply:
        if not self.supports(op):
            raise EngineRejected(NotSupported(f"{self.kind} engines do not offer {PATHS[op]}", code="not_supported"))
        payload = self.prepare(op, model, body, stream)
        t = self._timeouts
        resp = await post(self._session, self.url + PATHS[op], _encode(payload), self._headers, t,
                          stream=stream, who=f"engine {self.name}")
        if resp.status >= 300:
            raw = await read_error_body(resp)
            raise map_engine_error(resp.status, raw, engine=self.name, retry_after=resp.headers.get("Retry-After"))
        ctype = resp.headers.get("Content-Type", "")
        if stream and "text/event-stream" in ctype:
            stats = StreamStats()
            norm = StreamNormalizer(
                clean=self.profile.clean_stream, want_usage=want_usage, op=op, stats=stats,
                rename=(model.engine_id, model.id),
            )
            return StreamReply(stream_events(resp, norm, t, self.name), stats)
        raw = await read_whole(resp, t, f"engine {self.name}")
        try:
            obj = _decode(raw)
        except msgspec.DecodeError:
            raise EngineUnavailable(f"engine {self.name} sent malformed JSON", status=502, engine=self.name) from None
        if not isinstance(obj, dict):
            raise EngineUnavailable(f"engine {self.name} sent malformed JSON", status=502, engine=self.name)
        if obj.get("error") or obj.get("object") == "error":  # LM Studio's 200 errors
            raise map_engine_error(400 if "Unexpected endpoint" not in str(obj) else 404, raw, engine=self.name)
        payload_out = self._fix_json(op, obj, body, model)
        if stream:
            # The engine ignored stream=true; replay its answer as a stream.
            return StreamReply(_replay_as_stream(op, payload_out, want_usage), StreamStats())
        return JsonReply(payload_out, payload_out.get("usage"))

    def _fix_json(self, op: Op, obj: dict[str, Any], body: dict[str, Any], model: Model) -> dict[str, Any]:
        if obj.get("model") == model.engine_id:
            obj["model"] = model.id  # the name users know, never a host path
        if op == "embeddings":
            if body.get("encoding_format") == "base64":
                for item in obj.get("data") or ():
                    if isinstance(item, dict) and isinstance(item.get("embedding"), list):
                        item["embedding"] = _b64_floats(item["embedding"])
            return obj
        if not obj.get("id"):
            obj["id"] = ("chatcmpl-" if op == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        for ch in obj.get("choices") or ():
            fr = ch.get("finish_reason") if isinstance(ch, dict) else None
            if fr in FINISH_MAP:
                ch["finish_reason"] = FINISH_MAP[fr]
        return obj

async def stream_events(
    resp: aiohttp.ClientResponse, norm: StreamNormalizer, t: Timeouts, name: str
) -> AsyncIterator[list[bytes]]:
    """Read an SSE response event by event; see ``StreamReply`` for the contract."""
    splitter = EventSplitter()
    first = True
    clean_end = False
    content = resp.content
    read = content.readany
    # One cheap watchdog per stream instead of a timer per read: it wakes four
    # times per allowed gap and fails the read if the engine sent no byte since.
    watch = _Watchdog(content, t.first_token_s, t.idle_s)
    try:
        while True:
            try:
                chunk = await read()
            except _Silent:
                if first:
                    raise EngineUnavailable(
                        f"engine {name} sent no token in {t.first_token_s:g} s", status=504, engine=name
                    ) from None
                raise StreamBroken(f"engine {name} went silent for {t.idle_s:g} s", code="idle_timeout") from None
            events = splitter.feed(chunk) if chunk else []
            if not chunk:
                last = splitter.tail()
                if last is not None:
                    events.append(last)
            batch: list[bytes] = []
            for data in events:
                if data.startswith(b"[DONE]"):
                    clean_end = True
                    break
                try:
                    out = norm.feed(data)
                except StreamBroken as e:
                    if first and not batch:  # nothing sent yet: another engine may still serve it
                        raise EngineUnavailable(e.message, status=502, engine=name) from None
                    if batch:
                        yield batch
                    raise
                if out is not None:
                    batch.append(out)
                if norm.extra:
                    batch.extend(norm.extra)
                    norm.extra.clear()
            if batch:
                first = False
                yield batch
            if clean_end or not chunk:
                break
        if not clean_end and not norm.stats.finished:
            if first:
                raise EngineUnavailable(f"engine {name} closed the stream without a token", engine=name)
            raise StreamBroken(f"engine {name} closed the stream before it finished", code="stream_truncated")
        norm.stats.finished = True
    except (aiohttp.ClientError, OSError) as e:
        if first:
            raise EngineUnavailable(f"engine {name} failed: {e}", engine=name) from None
        raise StreamBroken(f"engine {name} connection lost: {e}", code="engine_disconnected") from None
    finally:
        watch.cancel()
        if clean_end:
            resp.release()
        else:
            resp.close()  # the engine sees the disconnect and stops generating


class _Silent(Exception):
    """The engine sent nothing for longer than allowed."""


class _Watchdog:
    __slots__ = ("_seen", "_content", "_first_s", "_idle_s", "_handle", "_loop", "_quiet_since")

    def __init__(self, content: aiohttp.StreamReader, first_s: float, idle_s: float) -> None:
        self._seen = content.total_bytes
        self._content = content
        self._first_s = first_s
        self._idle_s = idle_s
        self._loop = asyncio.get_running_loop()
        self._quiet_since = self._loop.time()
        self._handle = self._loop.call_later(min(first_s, idle_s) / 4, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        received = self._content.total_bytes
        if received != self._seen:
            self._seen = received
            self._quiet_since = now
        limit = self._first_s if received == 0 else self._idle_s
        if now - self._quiet_since >= limit:
            self._content.set_exception(_Silent())
            return
        self._handle = self._loop.call_later(limit / 4, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


async def _replay_as_stream(op: Op, obj: dict[str, Any], want_usage: bool) -> AsyncIterator[list[bytes]]:
    """Turn a whole answer into the chunks a stream would have had."""
    base = {"id": obj.get("id"), "created": obj.get("created"), "model": obj.get("model")}
    obj_name = "chat.completion.chunk" if op == "chat" else "text_completion"
    events: list[bytes] = []
    for ch in obj.get("choices") or ():
        if op == "chat":
            msg = dict(ch.get("message") or {})
            msg.setdefault("role", "assistant")
            choice = {"index": ch.get("index", 0), "delta": msg, "finish_reason": ch.get("finish_reason")}
        else:
            choice = {"index": ch.get("index", 0), "text": ch.get("text", ""), "finish_reason": ch.get("finish_reason")}
        events.append(_encode({**base, "object": obj_name, "choices": [choice]}))
    if want_usage and obj.get("usage"):
        events.append(_encode({**base, "object": obj_name, "choices": [], "usage": obj["usage"]}))
    yield events

