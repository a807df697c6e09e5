"""The node holds against hostile and slow clients (issue 7, items 1, 2, 5, 13, 14).

Each test is one of the attacks the node was probed with, sent over a real
socket, and asserts what the attacker (or the innocent client next to it)
gets: an OpenAI error body with the right status, a connection closed in
time, a node that keeps answering everyone else.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import sys
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import psutil
import pytest

from quorum_node.node import Node
from tests.fakes.engines import FakeEngine
from tests.members_support import client_tls
from tests.netns import other_namespace
from tests.support import eventually

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


async def vllm_node(start_node: StartNode, fake: StartFake, **settings: Any) -> Node:
    eng = await fake("vllm")
    return await start_node(backends=[{"kind": "vllm", "url": eng.url}], **settings)


async def raw_exchange(node: Node, data: bytes, *, read_timeout_s: float = 5.0) -> bytes:
    """Send raw bytes, read until the node closes the connection (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(read_timeout_s):
            while chunk := await reader.read(65536):
                out += chunk
        return out
    finally:
        writer.close()
        await writer.wait_closed()


def split_response(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body) if body else {}


def assert_openai_error(body: dict[str, Any], code: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err


# -- 1. compressed uploads ---------------------------------------------------------


def _bomb(inflated: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    return b"".join(c.compress(zeros) for _ in range(inflated >> 20)) + c.flush()


BOMB = _bomb(512 << 20)  # ~0.5 MiB on the wire, 512 MiB inflated


async def test_a_compressed_body_that_inflates_past_the_limit_is_refused_without_inflating_it(
    start_node, fake, http
) -> None:
    node = await vllm_node(start_node, fake, max_body_bytes=1 << 20)
    proc = psutil.Process(os.getpid())
    rss_before = proc.memory_info().rss

    async def bomb() -> tuple[int, dict[str, Any]]:
        async with http.post(
            node.url + "/v1/chat/completions",
            data=BOMB,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        ) as resp:
            return resp.status, await resp.json()

    async def health() -> int:
        async with http.get(node.url + "/health") as resp:
            return resp.status

    results = await asyncio.gather(*(bomb() for _ in range(8)), health())
    for status, body in results[:-1]:
        assert status == 413
        assert_openai_error(body, "body_too_large")
    assert results[-1] == 200
    # eight bombs of 512 MiB each: the node inflated at most its limit of each
    assert proc.memory_info().rss - rss_before < 64 << 20


async def test_gzip_and_deflate_bodies_are_accepted(start_node, fake, client_for, http) -> None:
    node = await vllm_node(start_node, fake)
    for encoding, data in (
        ("gzip", gzip.compress(CHAT)),
        ("deflate", zlib.compress(CHAT)),
        ("deflate", zlib.compress(CHAT)[2:-4]),
    ):  # raw deflate, as some clients send it
        async with http.post(
            node.url + "/v1/chat/completions",
            data=data,
            headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["choices"][0]["message"]["content"] == "Hello, world!"


@pytest.mark.parametrize(
    "data",
    [b"\x1f\x8b\x08\x00garbage-after-a-gzip-header", gzip.compress(CHAT)[:-12], gzip.compress(CHAT) + b"trailing"],
    ids=["garbage", "truncated", "trailing"],
)
async def test_a_broken_compressed_body_is_a_400(start_node, fake, http, data) -> None:
    node = await vllm_node(start_node, fake)
    async with http.post(node.url + "/v1/chat/completions", data=data, headers={"Content-Encoding": "gzip"}) as resp:
        assert resp.status == 400
        assert_openai_error(await resp.json(), "invalid_encoding")
        assert resp.headers["X-Request-Id"]


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
async def test_an_encoding_the_node_does_not_inflate_is_a_415(start_node, fake, http, encoding) -> None:
    node = await vllm_node(start_node, fake)
    async with http.post(node.url + "/v1/chat/completions", data=CHAT, headers={"Content-Encoding": encoding}) as resp:
        assert resp.status == 415
        body = await resp.json()
    assert_openai_error(body, "unsupported_encoding")
    assert "Brotli" not in body["error"]["message"]


async def _refusal_before_body(port: int, head: bytes, *, ssl: Any = None) -> bytes:
    """Send ``head`` (a request announcing 100 MB of body, not one byte of it sent) and read the answer: it
    can only come if the node never waited for the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl)
    try:
        writer.write(head)
        async with asyncio.timeout(5):
            return await reader.readuntil(b"}}")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_an_unauthenticated_peer_claim_is_refused_before_its_body_is_read(start_node, fake) -> None:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}], cluster="home", cluster_secret="s" * 32)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"%b\r\nContent-Length: 100000000\r\n\r\n"
    )
    # the public port, claiming to be a peer: a peer proves itself by its link, never by a header
    for claim in (b"X-Quorum-Hop: 1", b"X-Quorum-Node-Id: 0123456789abcdef01234567"):
        status, headers, body = split_response(await _refusal_before_body(node.port, head % claim))
        assert status == 401 and headers["connection"] == "close", claim
        assert_openai_error(body, "unauthorized")
    # the peer port, over TLS but without a member's certificate
    anonymous = client_tls(None, node.identity.cert_der)
    status, headers, body = split_response(
        await _refusal_before_body(node.peer_port, head % b"X-Quorum-Hop: 1", ssl=anonymous)
    )
    assert status == 401 and headers["connection"] == "close"
    assert_openai_error(body, "unauthorized")
    assert not eng.requests


# -- 2. slow clients ---------------------------------------------------------------


async def test_headers_that_trickle_in_get_a_408_and_the_connection_is_closed(start_node, fake) -> None:
    node = await vllm_node(start_node, fake, header_timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        async with asyncio.timeout(5):
            for _ in range(100):  # one header line every 0.1 s: never complete
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                if reader.at_eof():
                    break
                try:
                    async with asyncio.timeout(0.1):
                        raw = await reader.read()
                        break
                except TimeoutError:
                    continue
    finally:
        writer.close()
        await writer.wait_closed()
    status, _, body = split_response(raw)
    assert status == 408
    assert_openai_error(body, "header_timeout")


async def test_a_body_that_never_completes_gets_a_408(start_node, fake) -> None:
    node = await vllm_node(start_node, fake, body_timeout_s=0.5)
    for head in (
        b"Content-Length: 1000\r\n\r\n" + CHAT[:10],  # a Content-Length never fulfilled
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n',
    ):  # a chunked body that never ends
        raw = await raw_exchange(node, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + head)
        status, headers, body = split_response(raw)
        assert status == 408 and headers["connection"] == "close"
        assert_openai_error(body, "body_timeout")


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(start_node, fake) -> None:
    node = await vllm_node(start_node, fake, keepalive_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await reader.readuntil(b"}")
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the node, with nothing more said
    finally:
        writer.close()
        await writer.wait_closed()


async def test_loopback_is_not_capped(start_node, fake, http) -> None:
    # this machine's own apps (and the node itself, serving what came through the relay) are trusted
    node = await vllm_node(start_node, fake, max_connections_per_address=4)
    held = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(8)]
    try:
        async with http.get(node.url + "/health") as resp:
            assert resp.status == 200
    finally:
        for _, w in held:
            w.close()
            await w.wait_closed()


_CAP_CLIENT = """
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = [socket.create_connection((host, port), timeout=5) for _ in range(n)]
print("held", flush=True)
sys.stdin.readline()  # the test says go once the node counts all n
extra = socket.create_connection((host, port), timeout=5)  # refused at once: it need not even ask
data = b""
while chunk := extra.recv(65536):
    data += chunk
print(json.dumps({"answer": data.decode(errors="replace")}))
"""


@pytest.mark.netns
async def test_connections_per_address_are_capped(start_node, fake) -> None:
    with other_namespace("cap", "10.79.0") as (ns, host):
        node = await vllm_node(start_node, fake, host=host, max_connections_per_address=4)
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-c",
            _CAP_CLIENT,
            host,
            str(node.port),
            "4",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"held\n"
        await eventually(lambda: node.limits.open_connections() == 4, "the node holds the client's 4 connections")
        out, err = await asyncio.wait_for(proc.communicate(b"go\n"), 30)
        assert proc.returncode == 0, err.decode()
        raw = json.loads(out)["answer"].encode()
        status, headers, body = split_response(raw)
        assert status == 429 and headers["retry-after"] == "1"
        assert_openai_error(body, "too_many_connections")
        assert node.limits.open_connections() == 0  # every one released once the client went away


# -- 5, 13, 14. malformed input: always the OpenAI shape, always an id ---------------


@pytest.mark.parametrize("path", PATHS)
async def test_invalid_utf8_inside_a_json_string_is_a_400(start_node, fake, http, path) -> None:
    node = await vllm_node(start_node, fake)
    async with http.post(node.url + path, data=b'{"model":"\xc3\x28","messages":[]}') as resp:
        assert resp.status == 400
        assert_openai_error(await resp.json(), "invalid_json")
        assert resp.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    "raw,status",
    [
        (b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n", 400),
        (
            b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
            400,
        ),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
    ],
    ids=["oversized-header", "too-many-headers", "bad-chunk-size", "not-http"],
)
async def test_errors_of_the_http_parser_are_in_the_openai_shape(start_node, fake, raw, status) -> None:
    node = await vllm_node(start_node, fake)
    got, headers, body = split_response(await raw_exchange(node, raw))
    assert got == status and headers["content-type"].startswith("application/json")
    assert_openai_error(body, "bad_http")


async def test_every_error_answer_carries_a_request_id(start_node, fake, http) -> None:
    node = await vllm_node(start_node, fake)
    cases = [
        ("POST", "/v1/chat/completions", b"{", 400),
        ("POST", "/v1/chat/completions", json.dumps({"model": "nope", "messages": [{"role": "user"}]}).encode(), 404),
        ("GET", "/v1/chat/completions", b"", 405),
        ("GET", "/nowhere", b"", 404),
    ]
    for method, path, data, status in cases:
        async with http.request(method, node.url + path, data=data or None) as resp:
            assert resp.status == status
            assert len(resp.headers["X-Request-Id"]) >= 8
    async with http.post(node.url + "/v1/chat/completions", data=b"{", headers={"X-Request-Id": "mine-42"}) as resp:
        assert resp.headers["X-Request-Id"] == "mine-42"
    async with http.post(node.url + "/v1/chat/completions", data=b"{", headers={"X-Request-Id": "bad id\t"}) as resp:
        assert resp.headers["X-Request-Id"] != "bad id\t"


async def test_the_sdk_does_not_retry_a_request_that_cannot_succeed(start_node, fake, client_for) -> None:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    client = client_for(node, max_retries=3)
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.response.headers["x-should-retry"] == "false"
    assert err.value.response.headers["X-Request-Id"]


async def test_a_crowd_of_slow_clients_does_not_stop_others_being_served(start_node, fake, client_for) -> None:
    node = await vllm_node(start_node, fake, header_timeout_s=1.0, max_connections_per_address=1024)
    slow = []
    for _ in range(300):
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-Half")
        slow.append((r, w))
    try:
        answer = await client_for(node).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "Hello, world!"

        async with asyncio.timeout(5):  # every slow connection answered 408 and closed by the header deadline
            answers = await asyncio.gather(*(r.read() for r, _ in slow))
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers)
    finally:
        for _, w in slow:
            w.close()
        await asyncio.gather(*(w.wait_closed() for _, w in slow), return_exceptions=True)


async def test_a_body_of_the_right_size_but_wrong_content_length_is_refused(start_node, fake) -> None:
    node = await vllm_node(start_node, fake, max_body_bytes=1000)
    raw = await raw_exchange(
        node, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n\r\n"
    )
    status, _, body = split_response(raw)
    assert status == 413
    assert_openai_error(body, "body_too_large")


@pytest.mark.parametrize(
    ("host", "trusted"),
    [
        ("127.0.0.1:{port}", True),
        ("localhost:{port}", True),
        ("[::1]:{port}", True),
        ("app.localhost", True),
        (socket.gethostname() + ":{port}", True),
        (socket.gethostname().upper(), True),
        ("evil.example:{port}", False),
        ("rebind.attacker.test", False),
        ("localhost.evil.example", False),
        # issue 19, 9: a name of one label is answered by LLMNR, mDNS or NetBIOS, and anyone on the LAN can answer
        ("anyname:{port}", False),
        ("wpad", False),
        ("printer.:{port}", False),
    ],
)
async def test_loopback_trust_needs_a_local_host_name(start_node, fake, http, host, trusted) -> None:
    """DNS rebinding: a page whose name now points at 127.0.0.1 calls from loopback, with its own name in Host.

    Only an IP address, ``localhost`` (``*.localhost``) and this machine's own names are local; the admin
    endpoints (keys, recent requests) are what such a page would read."""
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    async with http.get(node.url + "/v1/models", headers={"Host": host.format(port=node.port)}) as resp:
        assert resp.status == (200 if trusted else 401), await resp.text()
        if not trusted:
            assert (await resp.json())["error"]["code"] == "missing_api_key"
    async with http.get(node.url + "/quorum/admin/keys", headers={"Host": host.format(port=node.port)}) as resp:
        assert resp.status == (200 if trusted else 401)
