"""Ollama: models and their facts from the native API, generation over its ``/v1``.

``/api/tags`` lists what is installed (family, parameter size, quantisation,
digest), ``/api/ps`` what is loaded (with the runtime context length),
``/api/show`` the trained context length and the GGUF ``general.*`` keys that
say which model it is (``lineage.py``): asked once per model digest, and
kept while the model is installed. Generation uses Ollama's OpenAI-compatible
routes, whose quirks the shared stream normaliser erases.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import structlog
from msgspec import Raw

from ..errors import EngineUnavailable
from ..lineage import ModelMeta, details_of, identify
from ..names import is_model_id
from .base import Model, Op
from .openai_compat import MAX_PROBE_BYTES, OpenAICompatBackend
from .upstream import HttpAnswer, read_capped
from .wire import (
    GgufGeneral,
    OllamaList,
    OllamaName,
    OllamaShow,
    OllamaTag,
    OllamaTagFacts,
    decode,
    decode_entries,
    decode_entry,
    gguf_general,
)

__all__ = ["OllamaBackend"]

log = structlog.get_logger(__name__)

#: At most this many ``/api/show`` asked per refresh (the rest at the next ones): a first refresh of an
#: Ollama with thousands of models stays short.
SHOWS_PER_REFRESH = 16


class OllamaBackend(OpenAICompatBackend):
    def __init__(self, url: str, session: aiohttp.ClientSession, **kw: Any) -> None:
        super().__init__("ollama", url, session, **kw)
        # digest (or name) -> what /api/show said of it (None: nothing usable); kept while it is installed
        self._shown: dict[str, GgufGeneral | None] = {}
        self._shows_left = 0  # /api/show this refresh may still ask

    async def list_models(self) -> list[Model]:
        status, raw = await self._get("/api/tags")
        tags = decode(raw, OllamaList) if status == 200 else None
        if tags is None:
            raise EngineUnavailable(
                f"/api/tags answered {status}" + (" with no model list" if status == 200 else ""), status=502
            )
        ps_status, ps_raw = await self._get("/api/ps")
        ps = decode(ps_raw, OllamaList) if ps_status == 200 else None  # unusable: nothing known to be loaded
        loaded: dict[str, OllamaTag] = {}
        for m in decode_entries((ps.models or () if ps is not None else ())[: self.max_models], OllamaTag):
            name = m.name or m.model
            if name:
                loaded[name] = m
        models: list[Model] = []
        entries = tags.models or ()
        shown: dict[str, GgufGeneral | None] = {}
        self._shows_left = SHOWS_PER_REFRESH
        for entry in entries[: self.max_models]:
            model = await self._model(entry, loaded, shown)
            if model is not None:
                models.append(model)
        self._shown = shown  # what is no longer installed is forgotten
        self._listed(len(entries), min(len(entries), self.max_models) - len(models))
        return models

    async def _model(
        self, entry: Raw, loaded: dict[str, OllamaTag], shown: dict[str, GgufGeneral | None]
    ) -> Model | None:
        """One ``/api/tags`` entry as a model; None if its name is unusable (counted in ``_listed``)."""
        m = decode_entry(entry, OllamaTag, OllamaName)
        name = (m.name or m.model) if m is not None else None
        if not name or not is_model_id(name):
            return None  # a name no header, log line or label may carry
        tag = m if isinstance(m, OllamaTag) else None  # else only its name was usable
        details = tag.details if tag is not None else None
        key = (tag.digest if tag is not None else None) or name
        general = await self._general(name, key, shown)
        running = loaded.get(name)
        ctx = (running.context_length if running is not None else None) or (
            details.context_length if details is not None else None
        )
        facts = decode_entry(entry, OllamaTagFacts)
        meta = _meta(tag, facts, general)
        lineage = identify(self.kind, name, meta) if tag is not None and facts is not None else None
        family, parameter_size, quantization = details_of(meta, lineage)
        caps = tag.capabilities if tag is not None else None
        return Model(
            id=name,
            engine_id=name,
            aliases=(name.removesuffix(":latest"),) if name.endswith(":latest") else (),
            owned_by=name.split("/", 1)[0] if "/" in name else "library",
            context_length=ctx or (general.context_length if general is not None else None),
            loaded=running is not None,
            family=family,
            parameter_size=parameter_size,
            quantization=quantization,
            capabilities=tuple(caps) if caps else (),
            lineage=lineage,
        )

    async def _general(self, name: str, key: str, shown: dict[str, GgufGeneral | None]) -> GgufGeneral | None:
        """What ``/api/show`` says of ``name`` (asked once per digest ``key``); None if it says nothing or was
        not asked yet (this refresh's budget spent, or the engine did not answer: asked at the next)."""
        if key in shown:
            return shown[key]
        if key in self._shown:
            shown[key] = self._shown[key]
            return shown[key]
        if self._shows_left <= 0:
            return None
        self._shows_left -= 1
        try:
            async with self._session.post(
                self.url + "/api/show", json={"model": name}, timeout=self._probe_timeout, allow_redirects=False
            ) as resp:
                raw = await read_capped(HttpAnswer(resp), MAX_PROBE_BYTES) if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None  # try again next refresh
        show = decode(raw, OllamaShow) if raw is not None else None
        general = gguf_general(show.model_info) if show is not None and show.model_info else None
        shown[key] = general
        return general

    def prepare(self, op: Op, model: Model, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        payload = super().prepare(op, model, body, stream)
        # Ollama's /v1 drops max_completion_tokens silently (engines.md §4).
        if "max_completion_tokens" in payload and "max_tokens" not in payload:
            payload["max_tokens"] = payload.pop("max_completion_tokens")
        return payload


def _meta(tag: OllamaTag | None, facts: OllamaTagFacts | None, general: GgufGeneral | None) -> ModelMeta:
    """What Ollama said of one model: ``/api/tags`` details and digest, ``/api/show``'s GGUF keys."""
    details = tag.details if tag is not None else None
    more = facts.details if facts is not None else None
    g = general or GgufGeneral()
    return ModelMeta(
        architecture=(details.family if details is not None else None) or g.architecture,
        families=tuple(more.families or ()) if more is not None else (),
        basename=g.basename,
        size_label=g.size_label,
        finetune=g.finetune,
        general_name=g.name,
        n_params=g.parameter_count,
        ftype=g.file_type,
        parameter_size=details.parameter_size if details is not None else None,
        quantization=details.quantization_level if details is not None else None,
        format=more.format if more is not None else None,
        digest=tag.digest if tag is not None else None,
    )
