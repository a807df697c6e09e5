"""Which engine is listening on a port? Decided by signatures, never by status alone.

Follows reference/engines.md §2: several engines imitate each other (LM Studio
answers 200 to anything, LocalAI imitates Ollama, llama.cpp's model list
carries an Ollama-style array), so each verdict rests on a body or header that
only that engine produces.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from .upstream import HttpAnswer, read_capped

__all__ = ["identify", "probe"]

_decode = msgspec.json.Decoder().decode

#: A probe answer larger than this says nothing (whatever listens there is no engine we know).
MAX_DETECT_BYTES = 1024 * 1024


async def _get(session: aiohttp.ClientSession, url: str, timeout: aiohttp.ClientTimeout) -> tuple[int, Any, Any]:
    """Status, body (decoded JSON, else text; None if empty or too large) and headers.

    Whatever answers is untrusted: the callers check every shape they rely on.
    """
    async with session.get(url, timeout=timeout, allow_redirects=False) as resp:
        raw = await read_capped(HttpAnswer(resp), MAX_DETECT_BYTES) or b""
        try:
            body: Any = _decode(raw) if raw else None
        except msgspec.DecodeError:
            body = raw.decode(errors="replace")
        return resp.status, body, resp.headers


def _is_lmstudio_catchall(body: Any, headers: Any) -> bool:
    return headers.get("X-Powered-By") == "Express" or (
        isinstance(body, dict) and isinstance(body.get("error"), str) and "Unexpected endpoint" in body["error"]
    )


async def identify(session: aiohttp.ClientSession, base: str, *, timeout_s: float = 0.5) -> str | None:
    """Return the engine kind answering at ``base`` (``http://host:port``), or None.

    Raises nothing for "nobody there"; connection errors mean None.
    """
    return (await probe(session, base, timeout_s=timeout_s))[0]


async def probe(session: aiohttp.ClientSession, base: str, *, timeout_s: float = 0.5) -> tuple[str | None, bool]:
    """The engine kind answering at ``base`` (or None), and whether anything answered HTTP there at all:
    ``(None, True)`` is a server that is no engine we know (a web app on 8080), to be asked again rarely."""
    t = aiohttp.ClientTimeout(total=timeout_s * 2, sock_connect=timeout_s)
    try:
        status, models, headers = await _get(session, base + "/v1/models", t)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None, False
    return await _identify(session, base, t, status, models, headers), True


async def _identify(
    session: aiohttp.ClientSession, base: str, t: aiohttp.ClientTimeout, status: int, models: Any, headers: Any
) -> str | None:
    if headers.get("Server", "").startswith("llama.cpp"):
        return "llamacpp"  # every llama.cpp answer carries it, even 503 while loading
    if _is_lmstudio_catchall(models, headers):
        return "lmstudio" if await _confirm_lmstudio(session, base, t) else None
    owned = None
    entries: list[dict[str, Any]] = []
    data = models.get("data") if status == 200 and isinstance(models, dict) else None
    if isinstance(data, list):
        entries = [e for e in data if isinstance(e, dict)]
        if entries:
            owned = entries[0].get("owned_by")
    if owned == "vllm":
        return "vllm" if await _has_json_key(session, base + "/version", "version", t) else None
    if owned == "sglang":
        return "sglang"
    if owned == "llamacpp":
        return "llamacpp"
    if owned == "organization_owner":
        return "lmstudio"
    # Confirm with each engine's unique endpoint (order matters: LocalAI imitates Ollama).
    try:
        st, body, _ = await _get(session, base + "/props", t)
        if st == 200 and isinstance(body, dict) and "default_generation_settings" in body:
            return "llamacpp"
        st, body, _ = await _get(session, base + "/info", t)
        if st == 200 and isinstance(body, dict) and body.get("router") == "text-generation-router":
            return "tgi"
        st, body, _ = await _get(session, base + "/get_model_info", t)
        if st == 200 and isinstance(body, dict) and "model_path" in body and "tokenizer_path" in body:
            return "sglang"
        st, body, _ = await _get(session, base + "/api/version", t)
        versioned = st == 200 and isinstance(body, dict) and isinstance(body.get("version"), str)
        if versioned and body["version"] != "0.9.0":
            st2, root, _ = await _get(session, base + "/", t)
            if st2 == 200 and isinstance(root, str) and "Ollama is running" in root:
                return "ollama"
        # What follows rests on status codes and generic shapes; a server that answers
        # 200 to any path (a catch-all proxy or web app) would pass, so rule it out first.
        st, _, _ = await _get(session, base + "/.quorum-detect-canary", t)
        if st == 200:
            return None
        st, body, h = await _get(session, base + "/.well-known/localai.json", t)
        if st == 200 and not _is_lmstudio_catchall(body, h):
            return "localai"
        st, body, h = await _get(session, base + "/readyz", t)
        if (
            st in (200, 503)
            and not _is_lmstudio_catchall(body, h)
            and (not body or (isinstance(body, dict) and body.get("status") == "starting"))
        ):
            return "localai"
        if entries and all("owned_by" not in e for e in entries):
            if all("created" not in e for e in entries):
                return "localai"
            st, body, _ = await _get(session, base + "/health", t)
            if st == 200 and isinstance(body, dict) and body.get("status") == "ok":
                return "mlx"
        if entries and owned == entries[0].get("id") and entries[0].get("created") == 0:
            return "tgi"
        if not entries and status == 200 and isinstance(models, dict) and models.get("object") == "list":
            st, body, _ = await _get(session, base + "/health", t)
            if st == 200 and isinstance(body, dict) and body.get("status") == "ok":
                return "mlx"
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
    return None


async def _has_json_key(session: aiohttp.ClientSession, url: str, key: str, t: aiohttp.ClientTimeout) -> bool:
    try:
        st, body, _ = await _get(session, url, t)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False
    return st == 200 and isinstance(body, dict) and key in body


async def _confirm_lmstudio(session: aiohttp.ClientSession, base: str, t: aiohttp.ClientTimeout) -> bool:
    try:
        st, body, _ = await _get(session, base + "/api/v0/models", t)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False
    return st == 200 and isinstance(body, dict) and isinstance(body.get("data"), list)
