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
from .base import Model, Op
from .openai_compat import OpenAICompatBackend

__all__ = ["OllamaBackend"]

log = structlog.get_logger(__name__)


class OllamaBackend(OpenAICompatBackend):
    def __init__(self, url: str, session: aiohttp.ClientSession, **kw: Any) -> None:
        super().__init__("ollama", url, session, **kw)
        self._ctx_cache: dict[str, int | None] = {}  # digest -> trained context length

    async def list_models(self) -> list[Model]:
        status, tags = await self._get_json("/api/tags")
        if status != 200 or not isinstance(tags, dict):
            raise EngineUnavailable(f"/api/tags answered {status}", status=502)
        ps_status, ps = await self._get_json("/api/ps")
        loaded: dict[str, dict[str, Any]] = {}
        if ps_status == 200 and isinstance(ps, dict):
            loaded = {m.get("name") or m.get("model"): m for m in ps.get("models") or () if isinstance(m, dict)}
        models: list[Model] = []
        for m in tags.get("models") or ():
            if not isinstance(m, dict):
                continue
            name = m.get("name") or m.get("model")
            if not isinstance(name, str):
                continue
            details = m.get("details") if isinstance(m.get("details"), dict) else {}
            running = loaded.get(name)
            ctx = (running or {}).get("context_length") or details.get("context_length")
            if not ctx:
                ctx = await self._trained_context(name, str(m.get("digest", "")))
            caps = m.get("capabilities")
            aliases = (name.removesuffix(":latest"),) if name.endswith(":latest") else ()
            models.append(
                Model(
                    id=name,
                    engine_id=name,
                    aliases=aliases,
                    owned_by=name.split("/", 1)[0] if "/" in name else "library",
                    context_length=ctx if isinstance(ctx, int) else None,
                    loaded=running is not None,
                    family=details.get("family") or None,
                    parameter_size=details.get("parameter_size") or None,
                    quantization=details.get("quantization_level") or None,
                    capabilities=tuple(caps) if isinstance(caps, list) else (),
                )
            )
        return models

    async def _trained_context(self, name: str, digest: str) -> int | None:
        if digest in self._ctx_cache:
            return self._ctx_cache[digest]
        ctx: int | None = None
        try:
            async with self._session.post(
                self.url + "/api/show", json={"model": name}, timeout=self._probe_timeout, allow_redirects=False
            ) as resp:
                if resp.status == 200:
                    info = (await resp.json(content_type=None)).get("model_info") or {}
                    ctx = next((v for k, v in info.items() if k.endswith(".context_length") and isinstance(v, int)), None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None  # try again next refresh
        self._ctx_cache[digest] = ctx
        return ctx

    def prepare(self, op: Op, model: Model, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        payload = super().prepare(op, model, body, stream)
        # Ollama's /v1 drops max_completion_tokens silently (engines.md §4).
        if "max_completion_tokens" in payload and "max_tokens" not in payload:
            payload["max_tokens"] = payload.pop("max_completion_tokens")
        return payload
