"""The engine-neutral half of the fake engines.

`FakeEngine` owns a real aiohttp server on a real socket, the behaviour knobs
tests turn, and the bookkeeping tests read (`requests`, `cancelled`,
`active_streams`).  Subclasses (one per engine, see `tests/fakes/engines.py`)
add routes and the exact wire shapes; they never touch sockets themselves.

The listening socket is owned here rather than by `TCPSite` so that a fake can
sit *bound but not listening* on its port.  That is exactly what vLLM and TGI
do while loading (clients get "connection refused"), and it keeps the port
reserved between `stop_listening()` and `resume_listening()`.

Faults.  `fail_after_tokens` says *where* a generation goes wrong (after that
many content chunks; None: it does not) and `fail_mode` says *how* (see
`FAIL_MODES`).  Whole-request faults have knobs of their own: `refuse`,
`status_always` (next to the one-shot `next_status`), `redirect_status` with
`redirect_location`, and `endless`.  The streaming loop that honours them is in
`openai_compat.py`; the helpers they share are here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import string
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

from aiohttp import web

from quorum_node.api.server import close_runner
from tests.faults import hard_reset

__all__ = [
    "CONTINUING_FAIL_MODES",
    "FAIL_MODES",
    "INJECTED_FAIL_MODES",
    "EngineError",
    "FakeEngine",
    "Plan",
    "RecordedRequest",
    "StreamTracker",
    "drop_connection",
    "fin_connection",
    "reset_connection",
]

DEFAULT_TOKENS = ("Hello", ",", " world", "!")
DEFAULT_TOOL_ARGUMENTS: dict[str, Any] = {"city": "Tokyo"}

#: What happens at `fail_after_tokens`, in a stream / in a non-streamed answer.  For the
#: modes after "drop", 0 means the very first bytes after the headers (before SSE comments
#: and the role chunk); "error" and "drop" keep their place after the role chunk.
FAIL_MODES: dict[str, str] = {
    "error": "an in-band error event (vLLM adds [DONE]) / the engine's 500",
    "drop": "the connection is aborted mid-body / the engine's 500",
    "rst": "an RST (SO_LINGER 0) once the bytes sent are read / an RST instead of an answer",
    "fin": "a clean TCP close (FIN) mid-body, no [DONE] / a FIN instead of an answer",
    "eof": "the body ends properly but early: no finish chunk, no [DONE] / 200, empty body",
    "stall": "nothing more, connection kept open until the client leaves / 200 headers, no body",
    "malformed_json": "one event that is not JSON, then the rest / 200 with invalid JSON",
    "malformed_shape": "one event of JSON in the wrong shape, then the rest / 200, wrong shape",
}
#: The modes `inject_fault` applies; "error", "drop" (and unknown values, as before) go
#: through `fail_stream`.
INJECTED_FAIL_MODES = frozenset(FAIL_MODES) - {"error", "drop"}
#: Modes after which the stream carries on as planned (the bad event is injected).
CONTINUING_FAIL_MODES = frozenset({"malformed_json", "malformed_shape"})
#: Before an RST, the time the peer gets to read what was sent (Linux drops unread data).
RST_SETTLE_S = 0.01


class EngineError(Exception):
    """Raised inside a handler; the middleware renders it in the engine's own envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


class Redirect(Exception):
    """Raised inside a handler: answered as `status` with `Location` and `{"moved": true}`."""

    def __init__(self, status: int, location: str) -> None:
        super().__init__(location)
        self.status = status
        self.location = location


class RecordedRequest(dict):
    """A generation request as received: the parsed JSON body, plus `.path`, `.method`, `.headers`."""

    def __init__(
        self, body: dict, *, path: str, method: str, headers: dict[str, str], peer: tuple[str, int] | None = None
    ) -> None:
        super().__init__(body)
        self.path = path
        self.method = method
        self.headers = headers
        self.peer = peer  # the (address, port) it came from: one connection, one port


@dataclass
class Plan:
    """What one generation request will produce, decided before any byte is sent."""

    deltas: list[dict]  # one entry per streamed content/tool-call chunk
    text: str  # the full content ("" for tool calls)
    tool_calls: list[dict] | None  # OpenAI-shaped, arguments as a JSON string
    finish: str  # "stop" | "length" | "tool_calls" (engine may rename, e.g. TGI)
    prompt_tokens: int
    fail_at: int | None  # fail after this many deltas (None: finish cleanly)

    @property
    def completion_tokens(self) -> int:
        return len(self.deltas)


@dataclass
class StreamTracker:
    """Per-request state for the client-disconnect bookkeeping."""

    stream: bool
    dropped: bool = False  # we cut the connection ourselves (fail_mode="drop"): not a client cancel


def random_id(n: int = 24, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(random.choices(alphabet, k=n))


def count_words(value: Any) -> int:
    """A stable stand-in for a tokenizer: whitespace-separated words in every string found."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        return sum(count_words(v) for k, v in value.items() if k in ("content", "text", "prompt"))
    if isinstance(value, int):
        return 1
    return 0


class FakeEngine:
    """A real HTTP server imitating one engine; see `tests/fakes/engines.py` for the kinds."""

    kind: ClassVar[str] = ""
    default_models: ClassVar[tuple[str, ...]] = ()
    #: how `loading=True` shows: "503" (every route answers the engine's 503), "wait"
    #: (generation waits until loaded, as lazy loaders do), "refuse" (connection refused).
    loading_mode: ClassVar[str] = "503"
    #: extra headers on every response (`Server: llama.cpp`, `X-Powered-By: Express`).
    extra_headers: ClassVar[dict[str, str]] = {}

    def __init__(self, *, host: str = "127.0.0.1", models: list[str] | None = None) -> None:
        self.host = host
        self.port = 0
        self.models: list[str] = list(self.default_models if models is None else models)
        # behaviour knobs
        self.tokens: list[str] = list(DEFAULT_TOKENS)
        self.token_delay_s: float = 0.0
        self.first_token_delay_s: float = 0.0
        # Between [DONE] and the end of the chunked body: 0 sends both at once; servers whose
        # handler returns after its last write (most) end the body a moment later.
        self.eof_delay_s: float = 0.0
        self.tail_in_one_write: bool = False  # the stream's last events and [DONE] in one write (one packet)
        self.fail_after_tokens: int | None = None
        self.fail_mode: str = "error"
        self.next_status: int | None = None
        self.status_always: int | None = None  # like next_status, on every request until cleared
        self.redirect_status: int | None = None  # e.g. 307 or 302, Location: redirect_location
        self.redirect_location: str | None = None  # None: the same path on a closed port
        self.refuse: bool = False  # start bound but not listening; see set_refuse()
        self.endless: bool = False  # streams never finish: tokens repeat until the client leaves
        self.malformed_payload: str | list[str] | None = None  # overrides the malformed_* data
        self.api_key: str | None = None
        self.tool_arguments: dict[str, Any] = dict(DEFAULT_TOOL_ARGUMENTS)
        self.context_length: int = 4096  # runtime window (n_ctx, max_model_len, /api/ps)
        self.train_context_length: int = 131072  # trained window (n_ctx_train, /api/show)
        self.embedding_dim: int = 8
        self.loaded_models: list[str] = []  # lazy loaders (Ollama, LM Studio): filled on use
        # bookkeeping
        self.requests: list[RecordedRequest] = []
        self.cancelled: int = 0  # streams the client abandoned
        self.abandoned: int = 0  # non-streamed generations the client abandoned
        self.active_streams: int = 0
        self._loading = False
        self._loaded = asyncio.Event()
        self._loaded.set()
        self._cancelled_event = asyncio.Event()
        self._stream_started_event = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._sock: socket.socket | None = None
        self._closing = False

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._site is not None

    async def start(self, *, port: int = 0, listen: bool = True) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.on_response_prepare.append(self._on_prepare)
        for method, path, handler in self.routes():
            app.router.add_route(method, path, handler)
        # handler_cancellation: a client that goes away cancels the handler at once,
        # so `cancelled` is counted even while the fake sleeps between tokens.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        self._sock = self._bind(port)
        self.port = self._sock.getsockname()[1]
        if listen and not self.refuse:
            await self.resume_listening()

    def _bind(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def stop_listening(self) -> None:
        """Refuse new connections (the port stays bound); requests in flight complete.

        Idle keep-alive connections are closed too (and waited for), so a client's
        pool cannot keep talking to an engine that is "down"; busy ones close when
        their response ends.
        """
        if self._site is None:
            return
        await self._site.stop()  # closes the listening socket
        self._site = None
        self._sock = self._bind(self.port)
        server = self._runner.server if self._runner is not None else None
        idle: list[asyncio.Task[None]] = []
        for handler in server.connections if server is not None else []:
            if getattr(handler, "_request_in_progress", False):
                handler.close()  # no keep-alive after the current response
            else:
                task = getattr(handler, "_task_handler", None)
                handler.force_close()  # closes the transport now
                if task is not None:
                    idle.append(task)
        if idle:
            await asyncio.wait(idle, timeout=1.0)
            # Let the client side of a same-loop test see the FINs before it reuses a
            # pooled connection (loopback delivers them at once; a few loop turns suffice).
            for _ in range(3):
                await asyncio.sleep(0)

    async def resume_listening(self) -> None:
        """Accept connections again, on the same port."""
        if self._site is not None or self._runner is None:
            return
        if self._sock is None:
            self._sock = self._bind(self.port)
        self._site = web.SockSite(self._runner, self._sock)
        await self._site.start()
        self._sock = None  # owned by the site's server now

    async def close(self) -> None:
        """Stop the server; idempotent.  In-flight handlers are cancelled (not counted)."""
        if self._closing:
            return
        self._closing = True
        if self._runner is not None:
            await close_runner(self._runner)
        self._site = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()

    async def __aenter__(self) -> FakeEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def set_refuse(self, value: bool) -> None:
        """Set `refuse` and stop or resume listening: connection refused, the port kept.

        Setting the plain attribute on a listening fake makes it RST each new request
        instead, which is the nearest thing it can do without awaiting.
        """
        self.refuse = bool(value)
        await (self.stop_listening() if self.refuse else self.resume_listening())

    # ------------------------------------------------------------ loading state

    @property
    def loading(self) -> bool:
        return self._loading

    @loading.setter
    def loading(self, value: bool) -> None:
        self._loading = bool(value)
        if self._loading:
            self._loaded.clear()
        else:
            self._loaded.set()

    async def set_loading(self, value: bool) -> None:
        """Set `loading`; for "refuse" engines (vLLM, TGI) also stop/resume listening."""
        self.loading = value
        if self.loading_mode == "refuse":
            await (self.stop_listening() if value else self.resume_listening())

    # -------------------------------------------------------------- bookkeeping

    def cancelled_event(self) -> asyncio.Event:
        """Set when a client abandons a stream (stays set; `.clear()` it to wait again)."""
        return self._cancelled_event

    def stream_started_event(self) -> asyncio.Event:
        """Set when a stream's headers have been sent (stays set; `.clear()` to reuse)."""
        return self._stream_started_event

    async def wait_until(self, predicate: Callable[[FakeEngine], bool]) -> None:
        """Wait, without polling, until `predicate(self)` holds (checked on each bookkeeping change)."""
        loop = asyncio.get_running_loop()
        while not predicate(self):
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    def _notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    def record(self, request: web.Request, body: dict) -> RecordedRequest:
        rec = RecordedRequest(
            body,
            path=request.path,
            method=request.method,
            headers=dict(request.headers),
            peer=request.transport.get_extra_info("peername") if request.transport is not None else None,
        )
        self.requests.append(rec)
        self._notify()
        return rec

    @contextlib.asynccontextmanager
    async def track(self, *, stream: bool) -> AsyncIterator[StreamTracker]:
        """Bracket a generation: counts active streams and client disconnects."""
        tracker = StreamTracker(stream=stream)
        if stream:
            self.active_streams += 1
            self._stream_started_event.set()
            self._notify()
        try:
            yield tracker
        except (asyncio.CancelledError, ConnectionResetError):
            if not tracker.dropped and not self._closing:
                if stream:
                    self.cancelled += 1
                    self._cancelled_event.set()
                else:
                    self.abandoned += 1
            raise
        finally:
            if stream:
                self.active_streams -= 1
            self._notify()

    # ----------------------------------------------------- generation behaviour

    async def before_generation(self, request: web.Request, body: dict) -> RecordedRequest:
        """Record the request, apply `next_status`, `status_always` and `redirect_status`,
        and wait out a lazy load."""
        rec = self.record(request, body)
        if self.next_status is not None:
            status, self.next_status = self.next_status, None
            raise EngineError(status, self.injected_error_message(status))
        if self.status_always is not None:
            raise EngineError(self.status_always, self.injected_error_message(self.status_always))
        if self.redirect_status is not None:
            raise Redirect(self.redirect_status, self.redirect_location or f"http://127.0.0.1:9{request.path_qs}")
        if self.loading and self.loading_mode == "wait":
            await self._loaded.wait()
        return rec

    def injected_error_message(self, status: int) -> str:
        return status_phrase(status)

    def make_plan(
        self,
        body: dict,
        *,
        max_tokens: int | None,
        prompt_tokens: int,
        tool_deltas: Callable[[str, str, str], list[dict]] | None = None,
    ) -> Plan:
        """Decide the output: content pieces cut at `max_tokens`, or one tool call."""
        tools = body.get("tools") or []
        messages = body.get("messages")
        answered = (
            isinstance(messages, list)
            and bool(messages)
            and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "tool"
        )  # a tool's result came back: the model answers in text
        if tools and not answered:
            fn = tools[0].get("function", tools[0])
            name = str(fn.get("name", "tool"))
            arguments = json.dumps(self.tool_arguments, separators=(",", ":"))
            call_id = self.tool_call_id()
            deltas = (tool_deltas or self.tool_call_deltas)(call_id, name, arguments)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            return Plan(
                deltas=deltas,
                text="",
                tool_calls=[call],
                finish="tool_calls",
                prompt_tokens=prompt_tokens,
                fail_at=self._fail_at(len(deltas)),
            )
        pieces = list(self.tokens)
        finish = "stop"
        if max_tokens is not None and 0 <= max_tokens < len(pieces):
            pieces, finish = pieces[:max_tokens], "length"
        return Plan(
            deltas=[{"content": p} for p in pieces],
            text="".join(pieces),
            tool_calls=None,
            finish=finish,
            prompt_tokens=prompt_tokens,
            fail_at=self._fail_at(len(pieces)),
        )

    def _fail_at(self, n: int) -> int | None:
        return None if self.fail_after_tokens is None else min(self.fail_after_tokens, n)

    def tool_call_id(self) -> str:
        return "call_" + random_id(24)

    def tool_call_deltas(self, call_id: str, name: str, arguments: str) -> list[dict]:
        """OpenAI-style incremental tool-call deltas: header, then argument fragments."""
        third = max(1, len(arguments) // 3)
        frags = [arguments[i : i + third] for i in range(0, len(arguments), third)]
        head = {
            "tool_calls": [{"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]
        }
        rest = [{"tool_calls": [{"index": 0, "function": {"arguments": f}}]} for f in frags]
        return [head, *rest]

    async def answer_fault(self, request: web.Request, tracker: StreamTracker) -> web.StreamResponse | None:
        """A non-streamed answer's fault (inside `track`); None: the legacy engine 500."""
        mode = self.fail_mode
        if mode == "rst":
            await reset_connection(request, tracker, settle=False)
        if mode == "fin":
            fin_connection(request, tracker)
        if mode == "eof":
            return web.Response(status=200, body=b"", content_type="application/json")
        if mode == "stall":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await forever()
        if mode in CONTINUING_FAIL_MODES:
            payload = self.malformed_payload
            if payload is None:
                payload = self.malformed_answer(request, shape=mode == "malformed_shape")
            elif not isinstance(payload, str):
                payload = "".join(payload)
            return web.Response(status=200, body=payload.encode(), content_type="application/json")
        return None

    def malformed_answer(self, request: web.Request, *, shape: bool) -> str:
        """The body of a malformed non-streamed answer: invalid JSON, or the wrong shape."""
        return '{"choices": 5}' if shape else '{"choices": ['

    def malformed_events(self, request: web.Request, *, shape: bool) -> list[str]:
        """The data of the events a malformed stream injects."""
        payload = self.malformed_payload
        if payload is not None:
            return [payload] if isinstance(payload, str) else list(payload)
        return ['{"choices":[1],"usage":{"prompt_tokens":1}}'] if shape else ['{"choices": [']

    async def endless_sleep(self) -> None:
        """A non-streamed generation under `endless`: it never finishes."""
        if self.endless:
            await forever()

    async def generation_sleep(self, n_chunks: int) -> None:
        """The time a non-streamed answer takes: first-token delay plus the gaps."""
        delay = self.first_token_delay_s + self.token_delay_s * max(0, n_chunks - 1)
        if delay > 0:
            await asyncio.sleep(delay)

    def mark_loaded(self, model: str) -> None:
        if model and model not in self.loaded_models:
            self.loaded_models.append(model)

    def embed_vector(self, text: str, *, normalise: bool = False) -> list[float]:
        """A deterministic vector per text, as float32-representable values."""
        rnd = random.Random(f"{self.kind}:{text}")
        vec = [round(rnd.uniform(-1.0, 1.0), 6) for _ in range(self.embedding_dim)]
        if normalise:
            norm = sum(v * v for v in vec) ** 0.5 or 1.0
            vec = [v / norm for v in vec]
        return vec

    # ------------------------------------------------------------------ server

    async def read_json(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineError(400, f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise EngineError(400, "Request body must be a JSON object")
        return body

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        for name, value in self.extra_headers.items():
            response.headers[name] = value

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.loading and self.loading_mode == "refuse":
            # Normally unreachable (set_loading stops listening); a drop is the closest thing.
            drop_connection(request, StreamTracker(stream=False))
        if self.refuse:
            # Normally unreachable (set_refuse stops listening); an RST is the closest thing.
            await reset_connection(request, StreamTracker(stream=False), settle=False)
        early = self.pre_route(request)
        if early is not None:
            return early
        try:
            return await handler(request)
        except EngineError as exc:
            return self.error_response(request, exc)
        except Redirect as exc:
            return web.json_response({"moved": True}, status=exc.status, headers={"Location": exc.location})
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return self.unknown_route(request)

    # ------------------------------------------------------------ engine hooks

    def routes(self) -> list[tuple[str, str, Any]]:
        return []

    def pre_route(self, request: web.Request) -> web.StreamResponse | None:
        """Loading and auth checks, in the order the engine does them."""
        if self.loading and self.loading_mode == "503":
            resp = self.loading_response(request)
            if resp is not None:
                return resp
        if self.api_key is not None and self.auth_required(request) and not self.auth_ok(request):
            return self.auth_failure(request)
        return None

    def loading_response(self, request: web.Request) -> web.StreamResponse | None:
        return None

    def auth_required(self, request: web.Request) -> bool:
        return False

    def auth_ok(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "") == f"Bearer {self.api_key}"

    def auth_failure(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "Unauthorized"}, status=401)

    def error_response(self, request: web.Request, exc: EngineError) -> web.StreamResponse:
        return web.json_response({"error": exc.message}, status=exc.status)

    def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="Not Found")


def now_s() -> int:
    return int(time.time())


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def drop_connection(request: web.Request, tracker: StreamTracker) -> None:
    """Cut the TCP connection mid-response, as a crashing engine would (fail_mode="drop")."""
    tracker.dropped = True
    if request.transport is not None:
        request.transport.abort()
    # The handler has nothing more to say; ending it as cancelled is what aiohttp expects
    # of a connection that is gone.
    raise asyncio.CancelledError


async def reset_connection(request: web.Request, tracker: StreamTracker, *, settle: bool = True) -> None:
    """Cut the connection with an RST (fail_mode="rst"): SO_LINGER 0, then abort.

    With `settle`, the peer first gets `RST_SETTLE_S` to read what was already sent:
    Linux throws unread data away when an RST arrives, and a test wants to see the
    chunks that came before the cut.
    """
    tracker.dropped = True
    if settle and request.transport is not None:
        await asyncio.sleep(RST_SETTLE_S)
    if request.transport is not None:
        hard_reset(request.transport)
    raise asyncio.CancelledError


def fin_connection(request: web.Request, tracker: StreamTracker) -> None:
    """Close the connection cleanly (FIN) mid-body (fail_mode="fin"): what was written is flushed."""
    tracker.dropped = True
    if request.transport is not None:
        request.transport.close()
    raise asyncio.CancelledError


async def forever() -> None:
    """Wait until cancelled: the client going away (or the fake closing) ends it."""
    await asyncio.get_running_loop().create_future()
