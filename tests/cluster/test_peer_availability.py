"""A model that is there but out for now is 503, never 404; a slow client is not an idle engine."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp

from quorum_node.node import Node
from tests.support import eventually

CLUSTER = {"cluster": "avail", "cluster_secret": "a" * 32}
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


async def chat_status(http: aiohttp.ClientSession, node: Node) -> tuple[int, dict]:
    async with http.post(node.url + "/v1/chat/completions", json=CHAT) as resp:
        return resp.status, {"body": await resp.json(), "retry_after": resp.headers.get("Retry-After")}


async def test_a_peer_whose_engine_is_down_makes_its_model_unavailable_not_unknown(start_node, fake, http) -> None:
    eng = await fake("vllm")
    b = await start_node(backends=[{"kind": "vllm", "url": eng.url}], **CLUSTER)
    a = await start_node(peers=[f"127.0.0.1:{b.peer_port}"], **CLUSTER)

    async def served() -> bool:
        return (await chat_status(http, a))[0] == 200

    await eventually(served, what="A serves B's model")
    await eng.stop_listening()  # B's engine goes away; B keeps running

    async def b_knows() -> bool:
        return (await chat_status(http, b))[0] == 503

    await eventually(b_knows, what="B sees its engine down")
    assert a.cluster is not None

    async def a_knows() -> bool:  # A has fetched B's new catalog: the model rests there
        peer = a.cluster.table.get(b.cluster.node_id)  # type: ignore[union-attr]
        return peer is not None and MODEL in peer.resting

    await eventually(a_knows, what="A learns the model rests on B")
    for _ in range(5):  # and it stays unavailable, not unknown, for as long as the engine is down
        status, info = await chat_status(http, a)
        assert status == 503, info
        assert int(info["retry_after"]) >= 1
        assert info["body"]["error"]["code"] != "model_not_found"
        await asyncio.sleep(0.1)
    await eng.resume_listening()
    await eventually(served, what="A serves the model again once B's engine is back")


async def test_a_slow_reader_is_not_mistaken_for_a_silent_engine(start_node, fake) -> None:
    eng = await fake("vllm", tokens=["x" * 1000] * 10000)  # ~10 MB of answer, as fast as it goes
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}], idle_timeout_s=0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small: the node feels the back-pressure
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", node.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        body = json.dumps({**CHAT, "stream": True}).encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.5)  # three idle timeouts long, not reading a byte
        # (whether the engine is still held back depends on how much loopback buffers: not asserted)
        data = b""
        async with asyncio.timeout(20):
            while not data.endswith(b"\r\n0\r\n\r\n"):  # the end of the chunked body
                chunk = await reader.read(1 << 20)
                if not chunk:
                    break
                data += chunk
    finally:
        writer.close()
        await writer.wait_closed()
    assert b"data: [DONE]" in data
    assert b"idle_timeout" not in data
