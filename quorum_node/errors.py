"""The one error tree of quorum-node.

Branches follow who handles them::

    QuorumError
    ├── ConfigError            bad settings → the CLI prints one line, exits 2
    ├── ApiError               answered to the client in the OpenAI error shape
    │   ├── BadRequest         400 invalid_request_error (with ``param``)
    │   ├── Unauthorized       401 (no key, a wrong, expired or revoked key)
    │   ├── Forbidden          403 (a key scoped to other models; not an admin key)
    │   ├── NotFound           404 (unknown model, unknown path)
    │   ├── PayloadTooLarge    413
    │   ├── UnsupportedMedia   415 (a Content-Encoding the node does not inflate)
    │   ├── RateLimited        429 + Retry-After (a key over its rate)
    │   ├── QueueFull          429 + Retry-After: every holder busy, no place left to wait
    │   ├── QueueTimeout       429 + Retry-After: every holder stayed busy past the wait's deadline
    │   ├── NotSupported       501 (the engine lacks the capability)
    │   └── Unavailable        503 + Retry-After (engine down or loading)
    └── EngineError            an engine (or peer) failed us
        ├── EngineUnavailable  before the first byte: try the next holder
        ├── EngineRejected     the engine refused the request (4xx): the
        │                      client's fault, passed on, never retried
        ├── EngineFailed       the engine answered a well-formed 5xx error: maybe
        │                      the request's fault. The next holder is tried; if
        │                      every holder answers so, the client gets the error
        │                      (not retryable) and no holder counts as failing
        ├── NodeBusy           this node has no room to hold the answer (its budget
        │                      for whole answers is spent): 503 at once, no other
        │                      holder tried, none counted as failing
        └── StreamBroken       after the first byte: SSE error event, no [DONE]

Foreign exceptions (aiohttp, OSError, msgspec) are mapped once, where they
enter: in the backend adapters and the peer client.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "ApiError",
    "BadRequest",
    "ConfigError",
    "EngineError",
    "EngineRejected",
    "EngineFailed",
    "EngineUnavailable",
    "Forbidden",
    "NodeBusy",
    "NotFound",
    "NotSupported",
    "PayloadTooLarge",
    "QueueFull",
    "QueueTimeout",
    "QuorumError",
    "RateLimited",
    "StreamBroken",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMedia",
    "error_body",
]

_encode = msgspec.json.Encoder().encode


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """Encode the OpenAI error envelope."""
    return _encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


class QuorumError(Exception):
    """Root of every error quorum-node raises on purpose."""


class ConfigError(QuorumError):
    """The settings are wrong; the process cannot start."""


class ApiError(QuorumError):
    """An error answered to the API client in the OpenAI shape."""

    status = 500
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        if type_ is not None:
            self.type = type_
        self.headers = headers or {}
        self._retryable = retryable

    @property
    def retryable(self) -> bool:
        """Whether a client may send the same request again and hope for another answer.

        By default what the OpenAI SDK assumes from the status (408, 409, 429, 5xx);
        where that is wrong (501, a request an engine cannot serve) it is False,
        and the answer carries ``x-should-retry: false``.
        """
        if self._retryable is not None:
            return self._retryable
        return self.status in (408, 409, 429) or (self.status >= 500 and self.status != 501)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"


class UnsupportedMedia(ApiError):
    status = 415
    type = "invalid_request_error"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = "rate_limit_exceeded") -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, retry_after_s))})


def _seconds(s: float) -> str:
    return f"{s:.1f}".removesuffix(".0")


class QueueFull(ApiError):
    """Every holder of the model is busy and the admission queue has no place (``admission.py``).

    ``waited_s``: how long it had waited (0 when refused on arrival; more when a
    key that waited for fewer places pushed it out).
    """

    status = 429
    type = "rate_limit_error"

    def __init__(self, model: str, *, waiting: int, retry_after_s: int, waited_s: float = 0.0) -> None:
        retry_after_s = max(1, retry_after_s)
        if waiting:
            why = f"Every holder of `{model}` is busy and {waiting} requests are waiting already"
        else:
            why = f"Every holder of `{model}` is busy (this node keeps no requests waiting)"
        super().__init__(
            f"{why}; try again in {retry_after_s} s",
            code="queue_full",
            headers={"Retry-After": str(retry_after_s)},
        )
        self.model = model
        self.waiting = waiting
        self.waited_s = waited_s


class QueueTimeout(ApiError):
    """A request waited in the admission queue for its whole deadline, and no holder of the model had room."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, model: str, *, waited_s: float, retry_after_s: int) -> None:
        retry_after_s = max(1, retry_after_s)
        super().__init__(
            f"Every holder of `{model}` stayed busy for the {_seconds(waited_s)} s this request waited its turn; "
            f"try again in {retry_after_s} s",
            code="queue_timeout",
            headers={"Retry-After": str(retry_after_s)},
        )
        self.model = model
        self.waited_s = waited_s


class NotSupported(ApiError):
    status = 501
    type = "not_supported_error"


class Unavailable(ApiError):
    status = 503
    type = "unavailable_error"

    def __init__(self, message: str, *, retry_after_s: int = 2, code: str | None = "engine_unavailable") -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class EngineError(QuorumError):
    """An engine or a peer failed to serve a request."""

    def __init__(self, message: str, *, status: int = 502, engine: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.engine = engine


class EngineUnavailable(EngineError):
    """The engine could not take the request (down, loading, overloaded).

    Nothing reached the client yet, so another holder may be tried.
    ``retry_after_s`` is the engine's own hint, if it gave one.
    """

    def __init__(
        self, message: str, *, status: int = 503, engine: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status=status, engine=engine)
        self.retry_after_s = retry_after_s


class EngineRejected(EngineError):
    """The engine refused the request itself (4xx); retrying elsewhere will not help."""

    def __init__(self, error: ApiError, *, engine: str | None = None) -> None:
        super().__init__(error.message, status=error.status, engine=engine)
        self.error = error


class EngineFailed(EngineError):
    """The engine answered with a well-formed 5xx error of its own.

    It is alive and said no to *this* request; another holder may still serve
    it. ``error`` is what the client gets if none does (marked not retryable).
    """

    def __init__(self, error: ApiError, *, engine: str | None = None) -> None:
        super().__init__(error.message, status=error.status, engine=engine)
        self.error = error


class NodeBusy(EngineError):
    """This node cannot hold one more whole answer now (``max_buffered_answers_bytes`` is spent).

    Not the holder's fault, and no other holder would fare better on this node:
    the client gets a retryable 503 (``node_busy``) at once.
    """

    def __init__(self, message: str, *, engine: str | None = None) -> None:
        super().__init__(message, status=503, engine=engine)


class StreamBroken(EngineError):
    """A stream failed after its first byte reached the client."""

    def __init__(self, message: str, *, code: str | None = "stream_error", engine: str | None = None) -> None:
        super().__init__(message, engine=engine)
        self.code = code
