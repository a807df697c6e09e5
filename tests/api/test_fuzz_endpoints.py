"""Property-based fuzzing of every public and peer endpoint (issue 7).

A real node (with a fake vLLM behind it, and a cluster so the peer endpoints
exist) runs on its own event loop in a thread; hypothesis throws bodies and
headers at it over raw sockets. Whatever it sends, the node must answer
within a few seconds, never with a 500 of its own making, and every error
must be the OpenAI error shape. The node must stay healthy afterwards.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quorum_node.node import Node
from tests.conftest import node_settings
from tests.fakes.engines import FakeEngine, start_fake
from tests.support import json_values

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
POSTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
GETS = (
    "/v1/models",
    "/v1/models/" + MODEL,
    "/health",
    "/ready",
    "/quorum/v1/health",
    "/quorum/v1/catalog",
    "/quorum/v1/peers",
)
# QUORUM_FUZZ_EXAMPLES=5000 scripts/test -k fuzz: a deeper run than CI's
# Not diagnosed yet (issue 20's note): about one run in three of 600 examples, one keep-alive connection from
# the node to its engine outlives Node.stop at this module's teardown (its node runs on a thread of its own).
# aiohttp's connector closes every connection it holds, so it is likely one still being made when a fuzzed
# request was cut. Every other test runs under the leak guard.
pytestmark = pytest.mark.leaks_ok("a node-to-engine connection may outlive Node.stop here; see the comment")

FUZZ = settings(
    max_examples=int(os.environ.get("QUORUM_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class NodeThread:
    """A node and its fake engine on an event loop of their own."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tmp = tmp
        self.engine: FakeEngine | None = None
        self.node: Node | None = None

    def run(self, coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start(self) -> None:
        async def _start() -> None:
            self.engine = await start_fake("vllm", token_delay_s=0.0)
            self.node = Node(
                node_settings(
                    self.tmp,
                    0,
                    backends=[{"kind": "vllm", "url": self.engine.url}],
                    cluster="fuzz",
                    cluster_secret="f" * 32,
                    max_body_bytes=1 << 20,
                    header_timeout_s=2.0,
                    body_timeout_s=2.0,
                )
            )
            await self.node.start()

        self.run(_start())

    def stop(self) -> None:
        async def _stop() -> None:
            if self.node is not None:
                await self.node.stop()
            if self.engine is not None:
                await self.engine.close()

        try:
            self.run(_stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    @property
    def port(self) -> int:
        assert self.node is not None
        return self.node.port


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeThread]:
    t = NodeThread(tmp_path_factory.mktemp("fuzz"))
    t.start()
    yield t
    t.stop()


def exchange(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, str]:
    """One request over a fresh socket; the answer must come within 10 s."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            head += f"Content-Length: {len(body)}\r\n"
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        data = resp.read()
        return resp.status, data, resp.getheader("Content-Type") or ""
    finally:
        sock.close()


def check_answer(status: int, data: bytes, ctype: str, path: str = "") -> None:
    assert status != 500, data[:300]
    assert 200 <= status < 600
    path = path.split("#", 1)[0]  # a fragment is no part of the path the server routes ("/#" is "/")
    if path == "/" or path.startswith("/api/"):  # the Ollama surface: its own envelope (test_ollama_surface.py)
        if status >= 400:
            assert set(json.loads(data)) == {"error"}, data[:200]
        elif path == "/" and status == 200:
            assert data == b"Ollama is running"
        return
    if status >= 400:
        assert ctype.startswith("application/json"), (status, ctype, data[:200])
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    elif ctype.startswith("text/event-stream"):
        events = [e for e in data.split(b"\n\n") if e.strip()]
        assert events[-1] == b"data: [DONE]" or b'"error"' in events[-1], events[-1][:200]
    else:
        json.loads(data)


def still_healthy(port: int) -> None:
    status, data, _ = exchange(port, "GET", "/health", {}, b"")
    assert status == 200 and json.loads(data)["status"] == "ok"


# bodies that get past the first checks often: the right keys, wrong shapes inside
near_valid = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL), json_values)},
    optional={
        "messages": st.one_of(
            st.lists(
                st.dictionaries(st.sampled_from(["role", "content", "tool_calls", "name"]), json_values, max_size=3),
                max_size=3,
            ),
            json_values,
        ),
        "prompt": json_values,
        "input": json_values,
        "stream": st.one_of(st.booleans(), json_values),
        "stream_options": json_values,
        "max_tokens": st.one_of(st.integers(-5, 10), json_values),
        "temperature": json_values,
        "stop": json_values,
        "tools": json_values,
        "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), json_values),
        "n": json_values,
        "logit_bias": json_values,
    },
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False).encode()


@FUZZ
@given(path=st.sampled_from(POSTS), body=near_valid.map(_dumps) | json_values.map(_dumps) | st.binary(max_size=300))
def test_post_bodies_never_break_the_node(target: NodeThread, path: str, body: bytes) -> None:
    check_answer(*exchange(target.port, "POST", path, {"Content-Type": "application/json"}, body))


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.sampled_from(POSTS + GETS)
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(lambda p: "/" + p.lstrip("/")),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "Content-Encoding",
                "Content-Type",
                "X-Request-Id",
                "X-Quorum-Hop",
                "X-Quorum-Signature",
                "X-Quorum-Node-Id",
                "X-Quorum-To",
                "X-Quorum-Timestamp",
                "X-Quorum-Nonce",
                "X-Quorum-Content-SHA256",
                "X-Quorum-Origin",
                "Accept",
                "Authorization",
                "Expect",
            ]
        ),
        header_text,
        max_size=6,
    ),
    body=st.binary(max_size=200),
)
def test_methods_paths_and_headers_never_break_the_node(
    target: NodeThread, method: str, path: str, headers: dict[str, str], body: bytes
) -> None:
    status, data, ctype = exchange(target.port, method, path, headers, body)
    if method == "HEAD":
        assert status != 500
        return
    check_answer(status, data, ctype, path.split("?", 1)[0])


@FUZZ
@given(encoding=st.sampled_from(["gzip", "deflate", "identity", "x-gzip"]), body=st.binary(max_size=200))
def test_compressed_garbage_never_breaks_the_node(target: NodeThread, encoding: str, body: bytes) -> None:
    check_answer(*exchange(target.port, "POST", "/v1/chat/completions", {"Content-Encoding": encoding}, body))


@FUZZ
@given(chunks=st.lists(st.binary(min_size=0, max_size=30), max_size=5), size_lines=st.lists(header_text, max_size=3))
def test_chunked_bodies_of_any_shape_never_break_the_node(
    target: NodeThread, chunks: list[bytes], size_lines: list[str]
) -> None:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    body += b"".join(line.encode() + b"\r\n" for line in size_lines) + b"0\r\n\r\n"
    check_answer(*exchange(target.port, "POST", "/v1/chat/completions", {"Transfer-Encoding": "chunked"}, body))


def test_the_node_is_healthy_after_the_fuzzing(target: NodeThread) -> None:
    still_healthy(target.port)
    status, data, _ = exchange(
        target.port,
        "POST",
        "/v1/chat/completions",
        {},
        _dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    )
    assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == "Hello, world!"
