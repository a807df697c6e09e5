"""One driver for every engine that speaks OpenAI's ``/v1``, with a profile per engine.

A profile names what differs between engines: where health is read, what a
model list entry carries, whether the stream needs fixing, which capabilities
exist. Adding an engine that speaks ``/v1`` is adding a profile.

Where the engine serves the OpenAI Responses or Anthropic Messages API itself
(a probe at refresh tells, ``backends/native.py``), requests in those APIs
(``NATIVE_OPS``) are passed through, and the answers checked there too.
"""

from __future__ import annotations

import base64
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import PurePath
from typing import Any

import aiohttp
import msgspec
import structlog

from ..errors import EngineRejected, EngineUnavailable, NotSupported
from ..lineage import ModelMeta, details_of, identify
from ..names import is_model_id
from .answer import RequestHead
from .base import (
    NATIVE_OPS,
    PATHS,
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
from .errors import check_answer, engine_failed, map_error_answer
from .gauges import MAX_METRICS_BYTES, Gauges, capacity_of, read_gauges
from .native import (
    PROBE_BODIES,
    BadShape,
    declines,
    events_for,
    fix_answer,
    probe_verdict,
)
from .sse import FINISH_MAP, StreamNormalizer, engine_error_message
from .stream import stream_events
from .upstream import HttpAnswer, deadline_for, read_capped, read_error_body, read_whole, send
from .wire import (
    CardFacts,
    LlamaProps,
    LmsFacts,
    LmsModel,
    LmsModels,
    ModelCard,
    ModelId,
    ModelList,
    ServerLoad,
    Slot,
    TgiInfo,
    decode,
    decode_entry,
    parse_error,
)

__all__ = [
    "MAX_MODELS_PER_ENGINE",
    "MAX_PROBE_BYTES",
    "PROFILES",
    "OpenAICompatBackend",
    "Profile",
]

log = structlog.get_logger(__name__)
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


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
    gauges: Gauges | None = None  # its /metrics gauges of requests running and waiting (``gauges.py``)
    native: frozenset[str] = NATIVE_OPS  # the native APIs worth a probe (backends/native.py)


PROFILES: dict[str, Profile] = {
    p.kind: p
    for p in (
        Profile(
            kind="vllm", load_path="/load", gauges=Gauges("vllm:num_requests_running", "vllm:num_requests_waiting")
        ),
        Profile(kind="sglang", gauges=Gauges("sglang:num_running_reqs", "sglang:num_queue_reqs")),
        Profile(kind="llamacpp", path_ids=True, load_path="/slots"),
        Profile(
            kind="tgi",
            clean_stream=False,
            ops=frozenset({"chat", "completions"}),
            request_model="tgi",
            native=frozenset(),
        ),
        Profile(kind="lmstudio", health_path=None, errors_on_200=True),
        Profile(kind="localai", health_path="/readyz"),
        Profile(kind="mlx", clean_stream=False, ops=frozenset({"chat", "completions"}), native=frozenset()),
        Profile(kind="openai", health_path=None),
        Profile(kind="ollama", health_path=None, clean_stream=False),
    )
}

#: A probe answer (health, model list, load) larger than this is malformed.
MAX_PROBE_BYTES = 8 * 1024 * 1024
#: The default of ``max_models_per_engine``: an engine's model list keeps its first this many.
MAX_MODELS_PER_ENGINE = 4096


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
        max_models: int = MAX_MODELS_PER_ENGINE,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.max_models = max_models  # max_models_per_engine: more listed are dropped, with a warning
        self.url = url.rstrip("/").removesuffix("/v1")
        self.profile = PROFILES[kind]
        self.name = name or f"{kind}@{self.url.split('://', 1)[-1]}"
        self.detected = detected
        self._session = session
        self._timeouts = timeouts or Timeouts()
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._slow_probes = 0  # probes in a row that timed out
        # Native APIs (op -> served or not), learnt by a probe while the engine is up; an op not
        # in it is translated, and probed again at the next refresh.
        self.native: dict[str, bool] = {}
        self._probed = False
        self._probe_timeout = aiohttp.ClientTimeout(total=self._timeouts.probe_s, sock_connect=self._timeouts.probe_s)
        self._offered: tuple[int, int] = (0, 0)  # models listed and refused at the last refresh (logged on change)
        # llama.cpp's /props, asked again when the models listed change or the engine comes (back) up
        self._props: LlamaProps | None = None
        self._props_for: tuple[str, ...] | None = None
        self._slots: int | None = None  # llama.cpp: the slots /slots listed at the last refresh
        self._full_at: int | None = None  # vLLM, SGLang: what ran while some waited, at the last refresh

    # -- discovery -------------------------------------------------------

    async def _get(self, path: str) -> tuple[int, bytes]:
        """GET a probe route: its status and body (b"" if the body is larger than ``MAX_PROBE_BYTES``)."""
        return await self._get_capped(path, MAX_PROBE_BYTES)

    async def _get_capped(self, path: str, cap: int) -> tuple[int, bytes]:
        """GET a probe route: its status and body (b"" if the body is larger than ``cap``)."""
        async with self._session.get(
            self.url + path, headers=self._headers, timeout=self._probe_timeout, allow_redirects=False
        ) as resp:
            raw = await read_capped(HttpAnswer(resp), cap)
            return resp.status, raw if raw is not None else b""

    async def refresh(self) -> None:
        first = not self._probed
        self._probed = True
        if first:  # the first probe (the node is starting; the machine may be busy): allow it longer
            normal = self._probe_timeout
            self._probe_timeout = aiohttp.ClientTimeout(
                total=4 * self._timeouts.probe_s, sock_connect=4 * self._timeouts.probe_s
            )
            try:
                await self._refresh()
            finally:
                self._probe_timeout = normal
            return
        await self._refresh()

    async def _refresh(self) -> None:
        try:
            if self.profile.health_path:
                status, _ = await self._get(self.profile.health_path)  # the status says it all
                if status in (503, 425) or status == 429:
                    self._set(BackendState.LOADING, f"{self.profile.health_path} answered {status}")
                    return
                if status != 200:
                    self._set(BackendState.DOWN, f"{self.profile.health_path} answered {status}")
                    return
            models = await self.list_models()
        except TimeoutError as e:
            # A slow probe on a busy machine is not a dead engine: a ready one is marked down only when
            # it misses two probes in a row (a refused connection, below, is down at once).
            self._slow_probes += 1
            if self.state is not BackendState.READY or self._slow_probes >= 2:
                self._set(BackendState.DOWN, f"probe timed out ({self._timeouts.probe_s:g} s): {e}")
            return
        except (aiohttp.ClientError, OSError) as e:
            self._slow_probes = 0
            self._set(BackendState.DOWN, f"{type(e).__name__}: {e}")
            return
        except EngineUnavailable as e:
            self._slow_probes = 0
            self._set(BackendState.LOADING if e.status == 503 else BackendState.DOWN, e.message)
            return
        self._slow_probes = 0
        self.engine_load = await self._engine_load()
        self.capacity = self._capacity()
        await self._probe_native()
        # The models and the ready state change together (nothing awaits between them): an engine that
        # comes back is never listed while a request for its model would still be refused as down.
        self.models = models
        self.last_models = models
        self._set(BackendState.READY, None)

    async def _probe_native(self) -> None:
        """Learn which native APIs the engine serves (``backends/native.py``), those not known yet."""
        todo = [op for op in sorted(self.profile.native) if op not in self.native]
        if not todo:
            return
        learnt = {}
        for op in todo:  # one after the other: one connection, as the other probes
            try:
                async with self._session.post(
                    self.url + PATHS[op],
                    data=PROBE_BODIES[op],
                    headers=self._headers,
                    timeout=self._probe_timeout,
                    allow_redirects=False,
                ) as resp:
                    verdict = probe_verdict(resp.status, await read_capped(HttpAnswer(resp), MAX_PROBE_BYTES) or b"")
            except (aiohttp.ClientError, OSError, TimeoutError):
                break  # slow or gone: the rest at the next refresh (a refresh waits at most one probe's time)
            if verdict is not None:
                learnt[op] = verdict
        self.native.update(learnt)
        if any(learnt.values()):
            log.info("engine_native_apis", engine=self.name, ops=sorted(op for op, v in self.native.items() if v))

    def _not_native(self, op: str) -> None:
        """The engine answered a native request as a path it does not have: translate until a probe tells."""
        if self.native.pop(op, None):
            log.warning("engine_native_api_gone", engine=self.name, op=op)

    async def _engine_load(self) -> int | None:
        """Requests the engine itself says it is working on or holding (everyone's, not only ours); None if it
        does not say. vLLM and SGLang say it in their ``/metrics`` gauges, which also tell whether they are full
        (``gauges.py``); llama.cpp in ``/slots``; vLLM without metrics in ``/load``."""
        self._slots = None
        self._full_at = None
        if self.profile.gauges is not None:
            try:
                status, raw = await self._get_capped("/metrics", MAX_METRICS_BYTES)
            except (aiohttp.ClientError, OSError, TimeoutError):
                status, raw = 0, b""
            said = read_gauges(raw, self.profile.gauges) if status == 200 else None
            if said is not None:
                self._full_at = capacity_of(said)
                return said.running + said.waiting
        if self.profile.load_path is None:
            return None
        try:
            status, raw = await self._get(self.profile.load_path)
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        if status != 200:
            return None
        load = decode(raw, ServerLoad)  # vLLM
        if load is not None:
            return load.server_load
        slots = decode(raw, list[Slot])  # llama.cpp
        if slots is not None:
            self._slots = len(slots)
            return sum(1 for slot in slots if slot.is_processing)
        return None

    def _capacity(self) -> int | None:
        """How many requests the engine serves at once, where it says: llama.cpp's slots (``/slots``, else
        ``/props`` ``total_slots``); vLLM and SGLang, which schedule as memory allows, only while they are full
        (requests wait in their own queue: what runs is all they take)."""
        if self.kind != "llamacpp":
            return self._full_at
        total = self._props.total_slots if self._props is not None else None
        return self._slots or total or None

    def _set(self, state: BackendState, reason: str | None) -> None:
        if state is not self.state:
            log.info("engine_state", engine=self.name, state=state.value, was=self.state.value, reason=reason)
        self.state = state
        self.last_error = reason
        if state is not BackendState.READY:
            self.native.clear()  # what comes up next may be another build: probed again
        if state is BackendState.DOWN:
            self.models = []
            self.capacity = None

    async def list_models(self) -> list[Model]:
        status, raw = await self._get("/v1/models")
        if status != 200:
            raise EngineUnavailable(f"/v1/models answered {status}", status=503 if status == 503 else 502)
        listing = decode(raw, ModelList)
        if listing is None:
            raise EngineUnavailable("/v1/models answered something that is not a model list", status=502)
        if self.profile.errors_on_200 and listing.error:
            raise EngineUnavailable("/v1/models answered an error", status=502)
        extra = await self._model_extras()
        entries = listing.data or ()
        cards: list[tuple[ModelCard | ModelId, CardFacts | None]] = []
        for raw_entry in entries[: self.max_models]:
            card = decode_entry(raw_entry, ModelCard, ModelId)  # one bad entry, or field, costs only itself
            if card is not None:
                cards.append((card, decode_entry(raw_entry, CardFacts)))
        path = await self._loaded_path(tuple(card.id for card, _ in cards))
        models: list[Model] = []
        for card, facts in cards:
            model = self._model_of(card, facts, extra, path)
            if model is not None:
                models.append(model)
        self._listed(len(entries), min(len(entries), self.max_models) - len(models))
        return models

    def _model_of(
        self, e: ModelCard | ModelId, facts: CardFacts | None, extra: dict[str, dict[str, Any]], path: str | None
    ) -> Model | None:
        """One ``/v1/models`` entry as a model; None if its name is unusable (counted in ``_listed``)."""
        eid = e.id
        if not eid:
            return None
        pid, aliases = public_id(eid, self.profile.path_ids)
        if not (is_model_id(pid) and is_model_id(eid)):
            return None  # a name no header, log line or label may carry
        aliases = tuple(a for a in aliases if is_model_id(a))
        ctx: int | None = None
        owned_by: str | None = None
        created = 0
        if isinstance(e, ModelCard):  # else only its id was usable
            meta = e.meta
            ctx = e.max_model_len or (meta.n_ctx or meta.n_ctx_train if meta is not None else None)
            owned_by = e.owned_by
            created = int(e.created or 0)
        info = extra.get(eid, {})
        said = self._meta(facts, info, path)
        lineage = identify(self.kind, eid, said) if said is not None else None
        family, parameter_size, quantization = details_of(said or ModelMeta(), lineage)
        return Model(
            id=pid,
            engine_id=eid,
            aliases=aliases,
            owned_by=owned_by or self.kind,
            created=created,
            context_length=info.get("context_length", ctx),
            loaded=info.get("loaded", True if self.kind in ("llamacpp", "vllm", "sglang", "tgi") else None),
            family=family,
            parameter_size=parameter_size,
            quantization=quantization,
            capabilities=tuple(info.get("capabilities", ())),
            lineage=lineage,
        )

    @staticmethod
    def _meta(facts: CardFacts | None, info: dict[str, Any], path: str | None) -> ModelMeta | None:
        """What the engine reported of one model's weights (``lineage.py``); None where it is malformed."""
        if facts is None or ("meta" in info and info["meta"] is None):
            return None
        said: ModelMeta = info.get("meta") or ModelMeta()
        card = facts.meta
        return msgspec.structs.replace(
            said,
            path=facts.root or path,
            n_params=card.n_params if card is not None else None,
            ftype=card.ftype if card is not None else None,
            adapter_of=facts.parent,
        )

    async def _loaded_path(self, ids: tuple[str, ...]) -> str | None:
        """llama.cpp serving one model: the file it loaded (``/props`` ``model_path``), which an ``--alias``
        hides from the model list. ``/props`` is asked again only when the models listed change or the
        engine comes (back) up; it also tells the slots (``_capacity``)."""
        if self.kind != "llamacpp":
            return None
        if ids != self._props_for or self.state is not BackendState.READY:
            try:
                status, raw = await self._get("/props")
            except (aiohttp.ClientError, OSError, TimeoutError):
                return None  # asked again at the next refresh
            self._props = decode(raw, LlamaProps) if status == 200 else None
            self._props_for = ids
        props = self._props
        return props.model_path if props is not None and len(ids) == 1 else None

    def _listed(self, offered: int, refused: int) -> None:
        """Warn (once per change, not every refresh) that the engine listed more models than the cap, or
        models whose names were refused (not printable, or too long: ``names.py``)."""
        if (offered, refused) == self._offered:
            return
        self._offered = (offered, refused)
        if offered > self.max_models:
            log.warning("engine_models_capped", engine=self.name, offered=offered, kept=self.max_models)
        if refused > 0:
            log.warning(
                "engine_models_refused",
                engine=self.name,
                refused=refused,
                reason="malformed, or an id with control characters or too long",
            )

    async def _model_extras(self) -> dict[str, dict[str, Any]]:
        """Facts the engine's own API adds to /v1/models (LM Studio state, TGI context); {} if it tells none."""
        try:
            if self.kind == "lmstudio":
                status, raw = await self._get("/api/v0/models")
                listing = decode(raw, LmsModels) if status == 200 else None
                if listing is not None:
                    out = (_lms_extra(r) for r in (listing.data or ())[: self.max_models])
                    return dict(e for e in out if e is not None)
            elif self.kind == "tgi":
                status, raw = await self._get("/info")
                info = decode(raw, TgiInfo) if status == 200 else None
                if info is not None and info.model_id:
                    return {info.model_id: {"context_length": info.max_total_tokens}}
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        return {}

    def supports(self, op: Op) -> bool:
        if op in NATIVE_OPS:
            return self.native.get(op, False)
        return op in self.profile.ops

    def declines(self, op: Op, body: dict[str, Any]) -> bool:
        return declines(self.kind, op, body)

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
        if op in NATIVE_OPS:
            return await self._open_native(op, model, body, stream=stream)
        payload = self.prepare(op, model, body, stream)
        t = self._timeouts
        who = f"engine {self.name}"
        deadline = deadline_for(t, stream=stream)  # one for the head and the first event
        answer = await self._send(op, payload, t, stream=stream, who=who, deadline=deadline)
        if answer.status >= 300:
            raw = await read_error_body(answer, deadline=deadline)
            raise map_error_answer(answer.status, raw, answer.headers, engine=self.name)
        ctype = answer.headers.get("Content-Type", "")
        if stream and "text/event-stream" in ctype:
            stats = StreamStats()
            norm = StreamNormalizer(
                clean=self.profile.clean_stream,
                want_usage=want_usage,
                op=op,
                stats=stats,
                rename=(model.engine_id, model.id),
            )
            return StreamReply(stream_events(answer.body, norm, t, self.name, deadline=deadline), stats)
        raw = await read_whole(answer, t, who, deadline=deadline)
        obj = check_answer(op, raw, engine=self.name)
        payload_out = self._fix_json(op, obj, body, model)
        if stream:
            # The engine ignored stream=true; replay its answer as a stream.
            stats = StreamStats()
            stats.usage = payload_out.get("usage") if isinstance(payload_out.get("usage"), dict) else None
            return StreamReply(_replay_as_stream(op, payload_out, want_usage), stats)
        return JsonReply(payload_out, payload_out.get("usage"))

    async def _send(
        self, op: Op, payload: dict[str, Any], t: Timeouts, *, stream: bool, who: str, deadline: float
    ) -> HttpAnswer:
        """POST ``payload`` to the op's route; the answer's head, by ``deadline``."""
        head = RequestHead(method="POST", path=PATHS[op], headers=self._headers, body=_encode(payload))
        return await send(self._session, self.url, head, t, stream=stream, who=who, deadline=deadline)

    async def _open_native(self, op: Op, model: Model, body: dict[str, Any], *, stream: bool) -> Reply:
        """A request in the client's own API, passed through; the answer checked (``backends/native.py``)."""
        payload = dict(body)
        payload["model"] = self.profile.request_model or model.engine_id
        t = self._timeouts
        who = f"engine {self.name}"
        deadline = deadline_for(t, stream=stream)
        answer = await self._send(op, payload, t, stream=stream, who=who, deadline=deadline)
        if answer.status >= 300:
            raw = await read_error_body(answer, deadline=deadline)
            err = map_error_answer(answer.status, raw, answer.headers, engine=self.name)
            if answer.status in (404, 405):  # no such route (any more): the router tries this engine translated
                self._not_native(op)
                err = EngineUnavailable(err.message, status=404, engine=self.name)
            raise err
        if stream:
            if "text/event-stream" not in answer.headers.get("Content-Type", ""):
                answer.body.abort()
                raise EngineUnavailable(f"{who} answered a stream request with no stream", status=502, engine=self.name)
            stats = StreamStats()
            events = events_for(op, stats=stats, model=model.id)
            return StreamReply(stream_events(answer.body, events, t, self.name, deadline=deadline), stats)
        raw = await read_whole(answer, t, who, deadline=deadline)
        try:
            obj = _decode(raw)
        except msgspec.DecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise EngineUnavailable(f"{who} sent a malformed answer", status=502, engine=self.name)
        if obj.get("type") == "error" or (obj.get("error") and obj.get("object") != "response"):
            info = parse_error(raw)  # LM Studio answers errors (an unknown path too) with HTTP 200
            unknown_path = info is not None and "Unexpected endpoint" in info.message
            if unknown_path:
                self._not_native(op)
            raise map_error_answer(404 if unknown_path else 400, raw, {}, engine=self.name)
        if obj.get("status") == "failed":  # a Response that failed: the engine's own error
            raise engine_failed(engine_error_message(obj), engine=self.name)
        try:
            usage = fix_answer(op, obj, model.id)
        except BadShape as e:
            raise EngineUnavailable(f"{who} sent an answer without its {e}", status=502, engine=self.name) from None
        return JsonReply(obj, usage)

    def _fix_json(self, op: Op, obj: dict[str, Any], body: dict[str, Any], model: Model) -> dict[str, Any]:
        """Erase the engine's quirks from a checked answer (see ``check_answer``)."""
        if obj.get("model") == model.engine_id:
            obj["model"] = model.id  # the name users know, never a host path
        if op == "embeddings":
            if body.get("encoding_format") == "base64":
                for item in obj["data"]:
                    if isinstance(item["embedding"], list):
                        try:
                            item["embedding"] = _b64_floats(item["embedding"])
                        except (struct.error, OverflowError):  # a value float32 cannot hold
                            raise EngineUnavailable(
                                f"engine {self.name} sent an embedding out of float32 range",
                                status=502,
                                engine=self.name,
                            ) from None
            return obj
        if not obj.get("id"):
            obj["id"] = ("chatcmpl-" if op == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        for ch in obj["choices"]:
            fr = ch.get("finish_reason")
            if fr in FINISH_MAP:
                ch["finish_reason"] = FINISH_MAP[fr]
        return obj


def _lms_extra(raw: msgspec.Raw) -> tuple[str, dict[str, Any]] | None:
    """An LM Studio ``/api/v0/models`` entry: its state, context, capabilities and what it says of the weights
    (``meta``: None where those facts are malformed)."""
    e = decode_entry(raw, LmsModel)
    if e is None:
        return None
    f = decode_entry(raw, LmsFacts)
    meta = (
        ModelMeta(architecture=f.arch, quantization=f.quantization, format=f.compatibility_type)
        if f is not None
        else None
    )
    return e.id, {
        "loaded": e.state == "loaded",
        "context_length": e.loaded_context_length or e.max_context_length,
        "capabilities": ("embeddings",) if e.type == "embeddings" else ("chat", "completions"),
        "meta": meta,
    }


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
