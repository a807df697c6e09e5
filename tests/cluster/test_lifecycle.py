"""Stopping in order, and requests between nodes that cannot be replayed (issue 7, items 7 and 8)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from quorum_node.api.server import close_runner
from quorum_node.cluster.identity import NodeIdentity
from quorum_node.node import Node
from tests.fakes.engines import FakeEngine
from tests.members_support import client_tls
from tests.support import eventually

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]

CLUSTER = {"cluster": "life", "cluster_secret": "k" * 32}
MODEL = "gpt-4o-mini"
MSGS = [{"role": "user", "content": "hi"}]


async def holds(http: aiohttp.ClientSession, node: Node, model: str) -> bool:
    async with http.get(node.url + "/v1/models") as resp:
        return model in {m["id"] for m in (await resp.json())["data"]}


async def pair(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession, **a_settings: Any):
    """Node A (no engine) in front of node B (the engine's node)."""
    eng = await fake("openai", tokens=[f"t{i} " for i in range(100)], token_delay_s=0.05)
    b = await start_node(backends=[{"kind": "openai", "url": eng.url}], **CLUSTER)
    a = await start_node(peers=[f"127.0.0.1:{b.peer_port}"], **CLUSTER, **a_settings)

    async def ready() -> bool:
        return await holds(http, a, MODEL)

    await eventually(ready, what="A sees B's model")
    return a, b, eng


async def test_stop_drains_streams_served_by_a_peer_and_cuts_the_rest_with_an_error(
    start_node, fake, http, client_for
) -> None:
    a, _b, eng = await pair(start_node, fake, http, drain_timeout_s=1.5)
    client = client_for(a)
    started = asyncio.Event()
    begun = 0

    async def consume(max_tokens: int | None) -> tuple[str, str | None]:
        nonlocal begun
        kw = {"max_tokens": max_tokens} if max_tokens else {}
        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True, **kw)
        text, finish = "", None
        first = True
        async for chunk in stream:
            if first:
                first = False
                begun += 1
                if begun == 5:
                    started.set()
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    # three streams that end within the drain deadline (~0.3 s), two that would take 5 s
    tasks = [asyncio.create_task(consume(n)) for n in (6, 6, 6, None, None)]
    async with asyncio.timeout(10):
        await started.wait()
    t0 = time.monotonic()
    await a.stop()  # what SIGTERM does
    took = time.monotonic() - t0
    results = await asyncio.gather(*tasks, return_exceptions=True)

    for text, finish in results[:3]:  # completed through the peer, not cut when A began to stop
        assert finish == "length" and text.split() == [f"t{i}" for i in range(6)]
    for err in results[3:]:  # cut at the deadline with an error event: the SDK raises, nothing silently truncated
        assert isinstance(err, openai.APIError), err
        assert "shutting down" in str(err)
    assert 1.5 <= took < 1.5 + 1.5
    await eng.wait_until(lambda e: e.cancelled == 2)  # only the cut streams were cancelled on B's engine


async def test_stop_without_streams_is_prompt_and_idle_connections_do_not_hold_it(start_node, fake, http) -> None:
    eng = await fake("openai")
    node = await start_node(backends=[{"kind": "openai", "url": eng.url}], drain_timeout_s=5)
    async with http.get(node.url + "/health") as resp:  # leaves an idle keep-alive connection behind
        assert resp.status == 200
    t0 = time.monotonic()
    await node.stop()
    assert time.monotonic() - t0 < 1.0


async def test_a_non_streamed_request_cut_by_the_drain_gets_a_503(start_node, fake, client_for) -> None:
    eng = await fake("openai", tokens=["x"] * 100, token_delay_s=0.05)  # 5 s to answer
    node = await start_node(backends=[{"kind": "openai", "url": eng.url}], drain_timeout_s=0.3)
    task = asyncio.create_task(client_for(node).chat.completions.create(model=MODEL, messages=MSGS))
    await eng.wait_until(lambda e: len(e.requests) == 1)
    await node.stop()
    with pytest.raises(openai.APIStatusError) as err:
        await task
    assert err.value.status_code == 503 and err.value.code == "node_stopping"


async def test_stop_closes_a_peer_connection_still_in_its_tls_handshake(start_node, fake) -> None:
    eng = await fake("openai")
    node = await start_node(backends=[{"kind": "openai", "url": eng.url}], **CLUSTER)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.peer_port)
    try:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_tls(None, node.identity.cert_der).wrap_bio(incoming, outgoing)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        writer.write(outgoing.read())  # the ClientHello; the client's Finished never follows
        async with asyncio.timeout(5):
            assert await reader.read(65536)  # the node's answer: it is in the handshake with us
        t0 = time.monotonic()
        await node.stop()
        async with asyncio.timeout(2):  # closed by the stop, not left to the handshake's 10 s timeout
            with contextlib.suppress(ConnectionResetError):
                while await reader.read(65536):
                    pass
        assert time.monotonic() - t0 < 2
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()


async def test_a_connection_accepted_as_the_server_stops_is_closed_not_left_hanging() -> None:
    """aiohttp's cleanup misses a connection set up after it looked; its client would wait forever."""
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = socket.create_connection(runner.addresses[0])  # loopback: connected at once, no loop turn taken
    try:
        # Two turns: the server accepts; the connection is set up a turn later, after the stop began.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await close_runner(runner)
        client.setblocking(False)
        async with asyncio.timeout(2):
            assert await asyncio.get_running_loop().sock_recv(client, 1) == b""  # the server closed it
    finally:
        client.close()


# -- replay ------------------------------------------------------------------------
#
# Between nodes a request is a member's because of the link it came over (the peer port's mutual TLS, pinned
# through membership), not because of anything in it: the same bytes from anyone else are nobody's.


async def test_a_members_captured_request_replayed_by_a_non_member_is_refused(start_node, fake, http) -> None:
    eng_b = await fake("openai")
    b = await start_node(backends=[{"kind": "openai", "url": eng_b.url}], **CLUSTER)
    a = await start_node(peers=[f"127.0.0.1:{b.peer_port}"], **CLUSTER)
    assert a.cluster is not None and b.cluster is not None
    await eventually(lambda: holds(http, a, MODEL), what="A and B know each other")
    path = "/v1/chat/completions"
    data = json.dumps({"model": MODEL, "messages": MSGS}).encode()
    # exactly the request A sends when it forwards one to B
    captured = {**a.cluster.peer_headers(hop="1", origin=a.cluster.node_id), "Content-Type": "application/json"}
    peer_url = f"https://127.0.0.1:{b.peer_port}{path}"

    async def send(url: str, tls: Any = None) -> int:
        """The status of the captured request sent to ``url``; 0 if no TLS session was had."""
        connector = aiohttp.TCPConnector(ssl=tls) if tls is not None else None
        async with aiohttp.ClientSession(connector=connector) as s:
            try:
                async with s.post(url, data=data, headers=captured) as resp:
                    return resp.status
            except aiohttp.ClientError:
                return 0

    # over A's own link it is served: what was captured is a working request
    assert await send(peer_url, client_tls(a.identity, b.identity.cert_der)) == 200
    assert len(eng_b.requests) == 1
    # the same bytes from anyone else: B's public port (even from loopback), its peer port without a
    # certificate, its peer port with a certificate of no member (no handshake)
    assert await send(b.url + path) == 401
    assert await send(peer_url, client_tls(None, b.identity.cert_der)) == 401
    assert await send(peer_url, client_tls(NodeIdentity.generate(), b.identity.cert_der)) == 0
    assert len(eng_b.requests) == 1
    # A removed from the cluster: its own link is refused from then on
    b.cluster.members.remove(b.cluster.identity, a.cluster.node_id, time.time())
    assert await send(peer_url, client_tls(a.identity, b.identity.cert_der)) in (0, 401)
    assert len(eng_b.requests) == 1


async def test_a_request_through_the_peer_port_without_a_certificate_is_refused_before_its_body_is_read(
    start_node, fake, http
) -> None:
    eng = await fake("openai")
    b = await start_node(backends=[{"kind": "openai", "url": eng.url}], **CLUSTER)
    a = await start_node(peers=[f"127.0.0.1:{b.peer_port}"], **CLUSTER)
    assert a.cluster is not None and b.cluster is not None
    await eventually(lambda: holds(http, a, MODEL), what="A and B know each other")
    # A's peer headers, a body of someone else's: 100 MB announced, not one byte of it sent
    headers = {
        **a.cluster.peer_headers(hop="1", origin=a.cluster.node_id),
        "Content-Type": "application/json",
        "Content-Length": "100000000",
        "Host": "127.0.0.1",
    }
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", b.peer_port, ssl=client_tls(None, b.identity.cert_der))
    try:
        writer.write(head)
        async with asyncio.timeout(5):  # the answer comes, so the body was never waited for
            status_line = await reader.readline()
            answer = await reader.readuntil(b"}}")
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line.startswith(b"HTTP/1.1 401")
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head_part.lower()
    assert json.loads(body)["error"]["code"] == "unauthorized"
    assert not eng.requests


async def test_a_start_that_fails_half_way_stops_what_had_started(tmp_path, fake) -> None:
    """The peer port is taken: the node has opened its ledger, its engines and its public port by then.
    Start raises, and all of that is undone: the public port is free again, the ledger closed, the engine
    watcher gone — the same node can be told to stop, and a new one starts on the same ports."""
    import socket

    from tests.conftest import node_settings

    eng = await fake("openai")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    peer_port = taken.getsockname()[1]
    with socket.socket() as probe:  # a public port we can name in advance
        probe.bind(("127.0.0.1", 0))
        public = probe.getsockname()[1]
    settings = node_settings(
        tmp_path, 0, port=public, peer_port=peer_port, backends=[{"kind": "openai", "url": eng.url}], **CLUSTER
    )
    node = Node(settings)
    tasks_before = {t for t in asyncio.all_tasks() if not t.done()}
    try:
        with pytest.raises(OSError):
            await node.start()
        assert node.ledger is not None and node.ledger.closed  # opened, then closed by the unwinding
        with socket.socket() as again:  # the public port was bound, and is free again
            again.bind(("127.0.0.1", public))
        left = {t for t in asyncio.all_tasks() if not t.done()} - tasks_before - {asyncio.current_task()}
        await asyncio.sleep(0)  # let cancelled tasks finish
        assert not {t for t in left if not t.done()}, f"tasks left running: {left}"
        await node.stop()  # a no-op now, and no error
    finally:
        taken.close()
    retry = Node(
        node_settings(tmp_path, 0, port=public, peer_port=peer_port, backends=[{"kind": "openai", "url": eng.url}])
    )
    await retry.start()  # the same data dir and port: nothing of the failed start holds them
    try:
        assert retry.port == public
    finally:
        await retry.stop()
