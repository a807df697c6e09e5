"""Ollama: models and their facts from the native API, generation over its ``/v1``.

``/api/tags`` lists what is installed (family, parameter size, quantisation),
``/api/ps`` what is loaded (with the runtime context length), ``/api/show``
the trained context length. Generation uses Ollama's OpenAI-compatible routes,
whose quirks the shared stream normaliser erases.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import structlog

from ..errors import EngineUnavailable
from ..names import is_model_id
from .base import Model, Op
from .openai_compat import MAX_PROBE_BYTES, OpenAICompatBackend
from .upstream import HttpAnswer, read_capped
from .wire import Count, OllamaList, OllamaName, OllamaShow, OllamaTag, decode, decode_entries

__all__ = ["OllamaBackend"]

log = structlog.get_logger(__name__)


class OllamaBackend(OpenAICompatBackend):
    def __init__(self, url: str, session: aiohttp.ClientSession, **kw: Any) -> None:
        super().__init__("ollama", url, session, **kw)
        self._ctx_cache: dict[str, int | None] = {}  # digest -> trained context length

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
        for m in decode_entries(entries[: self.max_models], OllamaTag, OllamaName):
            name = m.name or m.model
            if not name:
                continue
            if not is_model_id(name):
                continue  # a name no header, log line or label may carry (counted in ``_listed``)
            tag = m if isinstance(m, OllamaTag) else None  # else only its name was usable
            details = tag.details if tag is not None else None
            running = loaded.get(name)
            ctx = (running.context_length if running is not None else None) or (
                details.context_length if details is not None else None
            )
            if not ctx:
                ctx = await self._trained_context(name, (tag.digest if tag is not None else None) or name)
            caps = tag.capabilities if tag is not None else None
            aliases = (name.removesuffix(":latest"),) if name.endswith(":latest") else ()
            models.append(
                Model(
                    id=name,
                    engine_id=name,
                    aliases=aliases,
                    owned_by=name.split("/", 1)[0] if "/" in name else "library",
                    context_length=ctx,
                    loaded=running is not None,
                    family=(details.family or None) if details is not None else None,
                    parameter_size=(details.parameter_size or None) if details is not None else None,
                    quantization=(details.quantization_level or None) if details is not None else None,
                    capabilities=tuple(caps) if caps else (),
                )
            )
        self._listed(len(entries), min(len(entries), self.max_models) - len(models))
        return models

    async def _trained_context(self, name: str, digest: str) -> int | None:
        """The trained context length from ``/api/show`` (cached per digest); None if it does not say."""
        if digest in self._ctx_cache:
            return self._ctx_cache[digest]
        try:
            async with self._session.post(
                self.url + "/api/show", json={"model": name}, timeout=self._probe_timeout, allow_redirects=False
            ) as resp:
                raw = await read_capped(HttpAnswer(resp), MAX_PROBE_BYTES) if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None  # try again next refresh
        show = decode(raw, OllamaShow) if raw is not None else None
        ctx: int | None = None
        if show is not None and show.model_info:
            for key, value in show.model_info.items():
                if key.endswith(".context_length"):
                    ctx = decode(value, Count)
                    if ctx is not None:
                        break
        self._ctx_cache[digest] = ctx
        return ctx

    def prepare(self, op: Op, model: Model, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        payload = super().prepare(op, model, body, stream)
        # Ollama's /v1 drops max_completion_tokens silently (engines.md §4).
        if "max_completion_tokens" in payload and "max_tokens" not in payload:
            payload["max_tokens"] = payload.pop("max_completion_tokens")
        return payload
