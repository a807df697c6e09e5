"""What an upstream's answer means in our error tree: one mapping for engines and peers.

An engine's error answer comes in any of a dozen envelopes (engines.md
§12.10) and is put in our words; a peer's is in the OpenAI shape already
(it is another Quorum node) and keeps its status, type and code. Both go
through ``map_error_answer``: the peer differences are its ``peer`` flag.
``check_answer`` judges a whole answer that came with HTTP 200 (LM Studio
answers errors so).

Pure logic: bytes and a status in, an exception out (returned, for the
caller to raise).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from ..errors import (
    ApiError,
    BadRequest,
    EngineError,
    EngineFailed,
    EngineRejected,
    EngineUnavailable,
    NotSupported,
)
from .base import EMBEDDED_ENGINE, Op
from .wire import Completion, EmbeddingAnswer, Malformed, decode_answer, decode_embeddings, parse_error

__all__ = ["check_answer", "engine_failed", "map_error_answer", "parse_retry_after"]

_decode = msgspec.json.Decoder().decode

#: 4xx an engine answers that another holder may do better with: its model is gone (404), it is busy
#: (408, 409, 429), or it refused quorum's credentials for it (401, 403).
_ELSEWHERE_ENGINE = frozenset({401, 403, 404, 408, 409, 429})
#: The same for a peer: its catalog changed under us (404), it is busy (408, 429), or its keys or clock
#: disagree with ours (401). A peer's 403 and 409 are its verdict on the request, passed on.
_ELSEWHERE_PEER = frozenset({401, 404, 408, 429})
#: How Ollama's 503 says its queue is full (``OLLAMA_MAX_QUEUE``): the engine is busy, not failing (a 429).
_OLLAMA_BUSY = "server busy"


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds, if it is a sane one (0 to 1 hour); dates and garbage are ignored."""
    if not value:
        return None
    try:
        hint = float(value)
    except ValueError:
        return None
    return hint if 0 <= hint <= 3600 else None  # also drops nan and inf


def engine_failed(message: str, *, engine: str | None) -> EngineFailed:
    """An engine's own well-formed error: the client gets it, marked not retryable, if no holder does better."""
    return EngineFailed(
        ApiError(message, status=500, type_="server_error", code="engine_error", retryable=False), engine=engine
    )


def map_error_answer(
    status: int, raw: bytes, headers: Mapping[str, str], *, engine: str, peer: bool = False
) -> EngineError:
    """An upstream's error answer (a status of 300 or more, its body, its head) as our exception.

    - 3xx: upstreams are never followed anywhere; a redirect is a failed upstream (retry elsewhere);
    - 500 the upstream means (an engine: with a well-formed error body; a peer: marked
      ``x-should-retry: false``, its engine's ``EngineFailed``): it is alive and refused *this*
      request (``EngineFailed``: try the next holder, but count nobody as failing);
    - other 5xx (not 501), and the 4xx another holder may do better with (``_ELSEWHERE_*``):
      ``EngineUnavailable``, with the ``Retry-After`` hint; a peer's 404 as a 503;
    - an engine's 501: the capability is missing; other 4xx: the client's fault (``EngineRejected``).

    ``engine`` names the upstream (``"peer:<name>"`` for a peer). An engine's error is put in our
    words (a ``BadRequest``); a peer's keeps its status, type, param and code, and a peer's
    ``x-should-retry: false`` is kept too.
    """
    if 300 <= status < 400:
        if peer:
            return EngineUnavailable(f"{engine} answered with a redirect (HTTP {status})", status=502, engine=engine)
        return EngineUnavailable(
            f"engine {engine} answered with a redirect (HTTP {status}); quorum does not follow engine redirects",
            status=502,
            engine=engine,
        )
    info = parse_error(raw)
    if info is not None:
        message = info.message
    elif peer:
        message = f"peer answered HTTP {status}"
    else:
        text = raw[:500].decode(errors="replace").strip() if raw else ""
        message = text or f"engine answered HTTP {status}"
    kept = info if peer else None  # a peer's words are OpenAI's already: kept; an engine's are ours
    no_retry = peer and headers.get("x-should-retry", "").strip().lower() == "false"
    if status == 500 and (no_retry if peer else info is not None):
        return EngineFailed(
            ApiError(
                message,
                status=500,
                type_=(kept.type if kept else None) or "server_error",
                param=kept.param if kept else None,
                code=(kept.code if kept else None) or "engine_error",
                retryable=False,
            ),
            engine=engine,
        )
    if status == 501 and not peer:
        return EngineRejected(NotSupported(_not_offered(engine, message), code="not_supported"), engine=engine)
    if status == 503 and not peer and message.startswith(_OLLAMA_BUSY):  # its queue is full: busy, not broken
        status = 429
    if (status >= 500 and status != 501) or status < 400 or status in (_ELSEWHERE_PEER if peer else _ELSEWHERE_ENGINE):
        if status in (401, 403) and not peer:
            message = f"engine {engine} refused quorum's credentials ({message}); check its api_key"
        if status < 400:
            status = 502
        elif status == 404 and peer:
            status = 503
        return EngineUnavailable(
            message, status=status, engine=engine, retry_after_s=parse_retry_after(headers.get("Retry-After"))
        )
    if peer:
        return EngineRejected(
            ApiError(
                message,
                status=status,
                type_=(kept.type if kept else None) or "invalid_request_error",
                param=kept.param if kept else None,
                code=kept.code if kept else None,
                retryable=False if no_retry else None,
            ),
            engine=engine,
        )
    return EngineRejected(
        BadRequest(message, param=info.param if info else None, code=info.code if info else None), engine=engine
    )


def _not_offered(engine: str, message: str) -> str:
    """A 501 in words a Quorum user can act on (not the engine's own advice about its flags)."""
    if engine == EMBEDDED_ENGINE:
        return (
            "Quorum's embedded engine (llama.cpp with SmolLM2-135M) serves chat and completions, not "
            "embeddings. Run an engine with an embedding model on any machine of the cluster (for example "
            "Ollama with nomic-embed-text, or name one with --backend) and embeddings go there."
        )
    return f"The engine {engine} does not offer this endpoint for this model (it said: {message[:200]})"


def check_answer(op: Op, raw: bytes, *, engine: str) -> dict[str, Any]:
    """A whole answer, checked against what the SDK relies on, as a dict; raises for anything else.

    Malformed → ``EngineUnavailable`` (502, another holder may do); an error
    answered with HTTP 200 (LM Studio) → whatever ``map_error_answer`` makes of it.
    """
    typed: Completion | EmbeddingAnswer
    try:
        typed = decode_embeddings(raw) if op == "embeddings" else decode_answer(raw)
    except Malformed:
        raise EngineUnavailable(f"engine {engine} sent a malformed answer", status=502, engine=engine) from None
    if typed.error or typed.object == "error":  # LM Studio's 200 errors
        info = parse_error(raw)
        unknown_path = info is not None and "Unexpected endpoint" in info.message
        raise map_error_answer(404 if unknown_path else 400, raw, {}, engine=engine)
    if isinstance(typed, EmbeddingAnswer):
        ok = typed.data is not None
    else:
        ok = typed.choices is not None and all(
            (ch.message is not None) if op == "chat" else (ch.text is not None) for ch in typed.choices
        )
    if not ok:
        what = "data" if op == "embeddings" else "choices"
        raise EngineUnavailable(f"engine {engine} sent an answer without its {what}", status=502, engine=engine)
    obj: dict[str, Any] = _decode(raw)  # a JSON object: it decoded as one above
    return obj
