"""Nodes with no route between them, joined through a real quorum-relay on loopback (issue 8, node side)."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from quorum_node.cluster.identity import IDENTITY_FILE, NodeIdentity
from quorum_node.cluster.messages import HOP_HEADER, ORIGIN_HEADER
from quorum_node.cluster.noise import Handshake, NumberedReceiver, NumberedSender
from quorum_node.node import Node
from quorum_relay import wire
from quorum_relay.server import Relay
from tests.fakes.engines import FakeEngine
from tests.faults import FaultProxy
from tests.members_support import enrol
from tests.relay.wan import TOKEN, RelayHandle, Tap
from tests.support import eventually

StartNode = Callable[..., Awaitable[Node]]
StartFake = Callable[..., Awaitable[FakeEngine]]

CLUSTER = {"cluster": "wan", "cluster_secret": "w" * 32}
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MSGS = [{"role": "user", "content": "hi"}]
SECRET_PROMPT = "the password is xylophone-42"


@pytest.fixture
async def relay() -> AsyncIterator[RelayHandle]:
    h = RelayHandle()
    await h.start()
    yield h
    await h.stop()


# What a node of the relay protocol's first version decodes: no Batch (nor anything added since).
_OLD_FRAMES = msgspec.msgpack.Decoder(
    wire.Welcome
    | wire.Joined
    | wire.Left
    | wire.Unreachable
    | wire.Hello
    | wire.HelloReply
    | wire.Open
    | wire.Data
    | wire.Window
    | wire.Close
    | wire.Reset
)


async def relay_connect(relay_url: str, identity: NodeIdentity, token: str = TOKEN, **kw: Any) -> ClientConnection:
    """A raw WebSocket to the relay as ``identity``'s node: its id, its key, the challenge signed."""
    ws = await connect(
        relay_url + wire.CONNECT_PATH,
        compression=None,
        max_size=None,
        additional_headers={
            "Authorization": f"Bearer {token}",
            wire.NODE_ID_HEADER: identity.node_id,
            wire.NODE_KEY_HEADER: base64.b64encode(identity.sign_key).decode(),
        },
        **kw,
    )
    challenge = wire.decode(await ws.recv())
    assert isinstance(challenge, wire.Challenge)
    await ws.send(
        wire.encode(
            wire.Proof(
                signature=identity.sign(wire.proof_message(challenge.nonce, identity.node_id, identity.sign_key))
            )
        )
    )
    return ws


class Refused(Exception):
    """The peer answered a handshake with a refusal (an empty ``HelloReply``)."""


def old_peer_dir(tmp: Path) -> Path:
    """A data dir whose identity's id sorts first (as ``0-old-peer`` did): its handshake wins a tie with
    any node's (this test peer answers no handshake of theirs), and it opens odd streams."""
    while not (identity := NodeIdentity.generate()).node_id.startswith("00"):
        pass
    d = tmp / "old-peer"
    d.mkdir(mode=0o700)
    (d / IDENTITY_FILE).write_bytes(identity.to_file())
    (d / IDENTITY_FILE).chmod(0o600)
    return d


class OldPeer:
    """A member node of an older version, on a raw WebSocket to the relay.

    Its handshake says nothing of what it reads (no payload, as that version
    sent), and it decodes what it receives with that version's frames: a
    ``Batch`` sent to it fails to decode, as it would there. It asks a peer for
    chats (as the member its session authenticates) and refuses what it is asked itself.
    """

    def __init__(self, ws: ClientConnection, session: str, identity: NodeIdentity) -> None:
        self.ws = ws
        self.session = session
        self.identity = identity
        self.NODE_ID = identity.node_id
        self.seen: set[str] = set()  # the kinds of frame it received
        self._hs: Handshake | None = None
        self._send: NumberedSender | None = None
        self._recv: NumberedReceiver | None = None
        self._ready = asyncio.get_running_loop().create_future()
        self._answers: dict[int, tuple[list[bytes], asyncio.Future[None]]] = {}
        self._next_sid = 1  # set by ``handshake`` to its parity (the lower id of a pair opens odd streams)
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def join(cls, relay_url: str, identity: NodeIdentity) -> OldPeer:
        ws = await relay_connect(relay_url, identity)
        welcome = _OLD_FRAMES.decode(await ws.recv())
        assert isinstance(welcome, wire.Welcome)
        return cls(ws, welcome.session, identity)

    async def handshake(self, peer: str, peer_key: bytes) -> None:
        prologue = b"\x00".join((b"quorum-relay-noise-v1", self.NODE_ID.encode(), peer.encode(), self.session.encode()))
        self._hs = Handshake(initiator=True, static=self.identity.dh_private, remote_static=peer_key, prologue=prologue)
        self._next_sid = 1 if peer > self.NODE_ID else 2
        await self._out(wire.Hello(peer=peer, payload=self.session.encode() + b"\x00" + self._hs.write_message()))
        await asyncio.wait_for(asyncio.shield(self._ready), 5)

    async def _out(self, frame: wire.Frame) -> None:
        await self.ws.send(wire.encode(frame))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                assert isinstance(raw, bytes)
                frame = _OLD_FRAMES.decode(raw)  # a Batch raises here: that version could not read it
                self.seen.add(type(frame).__name__)
                match frame:
                    case wire.HelloReply(payload=b"") if self._hs is not None and not self._ready.done():
                        self._ready.set_exception(Refused("the peer refused the handshake"))
                    case wire.HelloReply(payload=payload) if self._hs is not None and self._recv is None:
                        self._hs.read_message(payload)  # whatever the peer says of itself, this version ignores
                        send, recv = self._hs.split()
                        self._send, self._recv = NumberedSender(send), NumberedReceiver(recv)
                        self._ready.set_result(None)
                    case wire.Open(peer=peer, stream=sid):  # its health checks: this test peer serves nothing
                        try:
                            await self._out(wire.Reset(peer=peer, stream=sid, code="serve_failed"))
                        except ConnectionClosed:  # a health check that came as the test closed the connection
                            return
                    case wire.Data(stream=sid, payload=payload) if sid in self._answers:
                        assert self._recv is not None
                        self._answers[sid][0].append(self._recv.open(payload))
                    case wire.Close(stream=sid) if sid in self._answers:
                        self._answers[sid][1].set_result(None)
                    case wire.Reset(stream=sid, code=code) if sid in self._answers:
                        self._answers[sid][1].set_exception(AssertionError(f"stream {sid} reset: {code}"))
        finally:
            for _, done in self._answers.values():
                if not done.done():
                    done.set_exception(AssertionError("the old peer stopped reading"))

    async def chat(self, peer: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """One request to ``peer`` on a stream of its own: the answer's status and body."""
        assert self._send is not None
        sid, self._next_sid = self._next_sid, self._next_sid + 2
        path, data = "/v1/chat/completions", json.dumps(body).encode()
        headers = {"X-Quorum-Node-Id": self.NODE_ID, HOP_HEADER: "1", ORIGIN_HEADER: self.NODE_ID}
        head = msgspec.msgpack.encode(["POST", path, [*headers.items(), ("Content-Type", "application/json")], b""])
        parts: list[bytes] = []
        self._answers[sid] = (parts, asyncio.get_running_loop().create_future())
        await self._out(wire.Open(peer=peer, stream=sid, payload=self._send.seal(head)))
        await self._out(wire.Data(peer=peer, stream=sid, payload=self._send.seal(data)))
        await self._out(wire.Close(peer=peer, stream=sid, payload=self._send.seal(b"")))
        await asyncio.wait_for(self._answers[sid][1], 30)
        status, _ = msgspec.msgpack.decode(parts[0])  # the answer's head, then its body
        return status, b"".join(parts[1:])

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def read_sse(http: aiohttp.ClientSession, node: Node, **body: Any) -> dict[str, Any]:
    """A streamed chat read as raw SSE: status, the route and node it came from, its text, [DONE], an error event."""
    out: dict[str, Any] = {"text": "", "done": False, "error": None}
    async with http.post(
        node.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "stream": True, **body}
    ) as resp:
        out.update(status=resp.status, node=resp.headers.get("X-Quorum-Node"), route=resp.headers.get("X-Quorum-Route"))
        async for line in resp.content:
            data = line.decode().strip().removeprefix("data:").strip()
            if data == "[DONE]":
                out["done"] = True
            elif data.startswith("{"):
                event = json.loads(data)
                out["error"] = event.get("error", out["error"])
                for choice in event.get("choices") or ():
                    out["text"] += (choice.get("delta") or {}).get("content") or ""
    return out


async def models_of(http: aiohttp.ClientSession, node: Node) -> dict[str, list[str]]:
    async with http.get(node.url + "/v1/models") as resp:
        return {m["id"]: m["nodes"] for m in (await resp.json())["data"]}


async def wan_pair(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession, relay_url: str, **engine_knobs: Any
) -> tuple[Node, Node, FakeEngine]:
    eng = await fake("vllm", **engine_knobs)
    b = await start_node(backends=[{"kind": "vllm", "url": eng.url}], relay=relay_url, relay_token=TOKEN, **CLUSTER)
    a = await start_node(relay=relay_url, relay_token=TOKEN, **CLUSTER)

    async def sees() -> bool:
        return MODEL in await models_of(http, a)

    await eventually(sees, timeout_s=10, what="A sees B's model through the relay")
    return a, b, eng


async def test_chat_stream_and_embeddings_through_the_relay(start_node, fake, http, client_for, relay) -> None:
    a, b, eng = await wan_pair(start_node, fake, http, relay.url)
    client = client_for(a)
    raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
    assert raw.headers["X-Quorum-Route"] == "relay" and raw.headers["X-Quorum-Node"] == b.name
    assert raw.parse().choices[0].message.content == "Hello, world!"

    stream = await client.chat.completions.create(
        model=MODEL, messages=MSGS, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == "Hello, world!" and usage is not None and usage.completion_tokens == 4

    emb = await client.embeddings.create(model=MODEL, input=["one", "two"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == eng.embedding_dim

    async with http.get(a.url + "/quorum/v1/peers") as resp:
        view = await resp.json()
    assert view["relay"]["state"] == "up"
    [peer] = view["peers"]
    assert peer["routes"] == ["relay"] and peer["state"] == "up"
    proc = await asyncio.create_subprocess_exec(  # what a person sees
        str(Path(sys.executable).parent / "quorum-node"),
        "peers",
        "--url",
        a.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    row = lines[1].split()
    assert row[0] == b.name and row[2] == "-" and row[3] == "relay" and row[4] == "up"
    assert lines[-1].startswith(f"relay {relay.url}: up")


async def test_a_client_that_goes_away_stops_the_remote_engine(start_node, fake, http, client_for, relay) -> None:
    a, _, eng = await wan_pair(start_node, fake, http, relay.url, tokens=["t "] * 200, token_delay_s=0.02)
    stream = await client_for(a).chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    async for _ in stream:
        break
    await stream.close()
    await eng.wait_until(lambda e: e.cancelled == 1)


async def test_the_relay_reads_no_prompt_and_no_answer(start_node, fake, http, client_for, relay) -> None:
    tap = Tap(relay.port)
    await tap.start()
    try:
        answer = "a-very-recognisable-answer"
        a, _, eng = await wan_pair(start_node, fake, http, f"ws://127.0.0.1:{tap.port}", tokens=[answer])
        got = await client_for(a).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": SECRET_PROMPT}]
        )
        assert got.choices[0].message.content == answer
        assert any(SECRET_PROMPT in json.dumps(r) for r in eng.requests)  # it did travel
        wire = bytes(tap.seen)
        assert len(wire) > 1000
        for plain in (SECRET_PROMPT, answer, MODEL, "chat/completions"):
            assert plain.encode() not in wire, plain
    finally:
        await tap.close()


async def test_a_node_with_a_wrong_token_never_appears(start_node, fake, http, relay) -> None:
    eng = await fake("vllm")
    await start_node(backends=[{"kind": "vllm", "url": eng.url}], relay=relay.url, relay_token="wrong", **CLUSTER)
    a = await start_node(relay=relay.url, relay_token=TOKEN, **CLUSTER)
    assert a.cluster is not None and a.cluster.relay is not None
    assert await a.cluster.relay.wait_up(5)
    await asyncio.sleep(0.5)
    assert await models_of(http, a) == {}
    assert a.cluster.relay.online == {}


async def test_relay_restart_and_a_cut_mid_stream(start_node, fake, http, client_for, relay) -> None:
    a, _, _eng = await wan_pair(start_node, fake, http, relay.url, tokens=["t "] * 500, token_delay_s=0.01)
    client = client_for(a)
    stream = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    with pytest.raises(openai.APIError):
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                await relay.stop()  # the relay dies mid-stream: the SDK raises, nothing silently truncated
    port = relay.port
    await relay.start(port)

    async def works() -> bool:
        try:
            got = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
            return bool(got.choices[0].message.content)
        except openai.APIStatusError:
            return False

    await eventually(works, timeout_s=8, what="requests work again after the relay returns")


async def test_one_slow_reader_does_not_hold_back_99_other_streams(start_node, fake, http, client_for, relay) -> None:
    a, _, _eng = await wan_pair(start_node, fake, http, relay.url, tokens=["x" * 1000] * 3000)
    # the slow reader: asks for ~3 MB (far more than a stream's window) and then reads nothing for a while
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", a.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps({"model": MODEL, "messages": MSGS, "stream": True}).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    try:
        await reader.readuntil(b"\r\n\r\n")
        client = client_for(a)

        async def fast() -> str:
            stream = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True, max_tokens=20)
            text = ""
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            return text

        texts = await asyncio.gather(*(fast() for _ in range(99)))
        assert all(t == "x" * 1000 * 20 for t in texts)  # all 99 done while the slow one still waits
        data = b""
        async with asyncio.timeout(30):
            while not data.endswith(b"\r\n0\r\n\r\n"):
                chunk = await reader.read(1 << 20)
                if not chunk:
                    break
                data += chunk
        assert b"data: [DONE]" in data and data.count(b"x" * 1000) == 3000  # held back, never dropped
    finally:
        writer.close()
        await writer.wait_closed()


async def test_the_lan_route_wins_and_the_relay_is_the_fallback(start_node, fake, http, client_for, relay) -> None:
    eng = await fake("vllm")
    b = await start_node(backends=[{"kind": "vllm", "url": eng.url}], relay=relay.url, relay_token=TOKEN, **CLUSTER)
    proxy = FaultProxy("127.0.0.1", b.peer_port)  # the LAN route: its peer port (mutual TLS)
    await proxy.start()
    try:
        a = await start_node(relay=relay.url, relay_token=TOKEN, peers=[f"127.0.0.1:{proxy.port}"], **CLUSTER)

        async def both() -> bool:
            async with http.get(a.url + "/quorum/v1/peers") as resp:
                peers = (await resp.json())["peers"]
            return len(peers) == 1 and peers[0]["routes"] == ["lan", "relay"] and peers[0]["state"] == "up"

        await eventually(both, timeout_s=10, what="A reaches B both ways")
        client = client_for(a)
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
        assert raw.headers["X-Quorum-Route"] == "lan"
        proxy.refuse = True  # the LAN route breaks: before the first byte, the relay carries the request
        proxy.reset_all()
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
        assert raw.headers["X-Quorum-Route"] == "relay"
        assert raw.parse().choices[0].message.content == "Hello, world!"
    finally:
        await proxy.close()


async def test_busy_streams_share_batches_and_every_byte_arrives(start_node, fake, http, client_for, relay) -> None:
    a, b, _ = await wan_pair(start_node, fake, http, relay.url, tokens=[f"t{i} " for i in range(200)])
    client = client_for(a)

    async def one() -> str:
        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one() for _ in range(64)))
    assert texts == ["".join(f"t{i} " for i in range(200))] * 64  # nothing lost, reordered or doubled
    served = b.cluster.relay  # type: ignore[union-attr]
    assert served is not None and served.batching
    assert served.batches_sent > 0 and served.batched_items > 2 * served.batches_sent  # several streams per message


async def test_the_in_memory_pipe_refuses_a_head_that_would_break_its_lines(start_node) -> None:
    from quorum_node.cluster.pipe import PipeError, serve_in_memory

    node = await start_node()
    ok = await serve_in_memory(node.http_server, "GET", "/health", [("Accept", "application/json")], b"", peer="0" * 24)
    body = b""
    while chunk := await ok.content.readany():
        body += chunk
    assert ok.status == 200 and json.loads(body)["status"] == "ok"
    for method, path, headers in (
        ("GET", "/health", [("X-A", "1\r\nX-Injected: yes")]),
        ("GET", "/health HTTP/1.1\r\nX-Injected: yes", []),
        ("GET\r\n", "/health", []),
        ("GET", "/health", [("Bad Name", "1")]),
    ):
        with pytest.raises(PipeError):
            await serve_in_memory(node.http_server, method, path, headers, b"", peer="0" * 24)


async def test_the_in_memory_pipe_holds_back_a_big_answer_for_a_slow_reader(start_node, fake) -> None:
    from quorum_node.cluster import pipe

    eng = await fake("vllm", tokens=["x" * 1000] * 3000)  # ~3 MB of answer
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}], **CLUSTER)
    body = json.dumps({"model": MODEL, "messages": MSGS, "stream": True}).encode()
    svc = node.cluster
    assert svc is not None
    # as a member's request through the relay would come (the member: the only one this test has)
    headers = svc.peer_headers(hop="1", origin=svc.node_id)
    resp = await pipe.serve_in_memory(
        node.http_server,
        "POST",
        "/v1/chat/completions",
        [("Content-Type", "application/json"), *headers.items()],
        body,
        peer=svc.node_id,
    )
    assert resp.status == 200
    await asyncio.sleep(0.5)  # read nothing: the server must wait for us, not buffer the answer
    held = resp._t.get_write_buffer_size()
    await asyncio.sleep(0.5)
    # what waits is a bounded few batches (paused at HIGH; aiohttp drains every 64 KiB), not the 3 MB answer
    assert resp._t.get_write_buffer_size() == held < 1024 * 1024
    data = b""
    while chunk := await resp.content.readany():
        data += chunk
    assert data.count(b"x" * 1000) == 3000 and data.endswith(b"data: [DONE]\n\n")


async def test_what_a_node_has_in_flight_stays_within_the_relays_queue(
    start_node, fake, http, client_for, relay
) -> None:
    await relay.stop()
    await relay.start(send_queue_bytes=1024 * 1024)  # small, so 16 big answers press against the budget
    a, b, _ = await wan_pair(start_node, fake, http, relay.url, tokens=["y" * 1000] * 2000)
    served = b.cluster.relay  # type: ignore[union-attr]
    assert served is not None
    assert served.send_budget == 512 * 1024  # half the relay's queue towards a peer
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, served.unacked_bytes)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    client = client_for(a)

    async def one() -> int:
        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
        return sum([len(c.choices[0].delta.content or "") async for c in stream if c.choices])

    try:
        sizes = await asyncio.gather(*(one() for _ in range(16)))
    finally:
        watcher.cancel()
    assert sizes == [2_000_000] * 16
    assert 0 < peak <= 512 * 1024 + 16 * 1024  # the budget, plus at most one chunk

    async def settled() -> bool:
        return served.unacked_bytes == 0

    await eventually(settled, what="everything acknowledged once the answers ended")


async def test_many_short_answers_together_past_the_budget_all_finish(
    start_node, fake, http, client_for, relay
) -> None:
    # Each answer stays below half a window (so no stream earns credit back on its own), all of them
    # together well past the sender's budget: what the receiver has read must still be granted back.
    # paced, so the answers interleave: none ends (and releases its share) before the budget is full
    await relay.stop()
    await relay.start(send_queue_bytes=256 * 1024)  # the same relay: both ends know the same budget
    a, b, _ = await wan_pair(start_node, fake, http, relay.url, tokens=["z" * 1000] * 40, token_delay_s=0.002)
    for node in (a, b):
        assert node.cluster.relay.send_budget == 128 * 1024  # type: ignore[union-attr]
    client = client_for(a)

    async def one() -> int:
        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
        return sum([len(c.choices[0].delta.content or "") async for c in stream if c.choices])

    async with asyncio.timeout(20):
        sizes = await asyncio.gather(*(one() for _ in range(16)))
    assert sizes == [40_000] * 16


async def test_through_the_pipe_a_members_request_is_served_and_anyone_elses_is_401(start_node, fake) -> None:
    from quorum_node.cluster.pipe import serve_in_memory

    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}], **CLUSTER)
    svc = node.cluster
    assert svc is not None
    body = json.dumps({"model": MODEL, "messages": MSGS}).encode()
    stranger = NodeIdentity.generate().node_id
    for peer in (stranger, "0" * 24):  # a relay session's peer that is no member: no loopback trust either
        resp = await serve_in_memory(
            node.http_server,
            "POST",
            "/v1/chat/completions",
            [("Content-Type", "application/json"), *svc.peer_headers(hop="1").items()],
            body,
            peer=peer,
        )
        assert resp.status == 401
        resp.close()
    assert eng.requests == []
    resp = await serve_in_memory(
        node.http_server,
        "POST",
        "/v1/chat/completions",
        [("Content-Type", "application/json"), *svc.peer_headers(hop="1", origin=svc.node_id).items()],
        body,
        peer=svc.node_id,
    )
    data = b""
    while chunk := await resp.content.readany():
        data += chunk
    assert resp.status == 200 and json.loads(data)["choices"][0]["message"]["content"] == "Hello, world!"
    assert len(eng.requests) == 1


async def _draining(
    start_node: StartNode,
    fake: StartFake,
    http: aiohttp.ClientSession,
    relay_url: str,
) -> tuple[Node, Node, FakeEngine, asyncio.Task[dict[str, Any]]]:
    """B holds the model, C reaches it through the relay only; a two-second stream from B to C is under way."""
    eng = await fake("vllm", tokens=[f"t{i} " for i in range(40)], token_delay_s=0.05)
    b = await start_node(
        backends=[{"kind": "vllm", "url": eng.url}], relay=relay_url, relay_token=TOKEN, drain_timeout_s=10, **CLUSTER
    )
    c = await start_node(relay=relay_url, relay_token=TOKEN, **CLUSTER)

    async def sees() -> bool:
        return MODEL in await models_of(http, c)

    await eventually(sees, timeout_s=10, what="C sees B's model through the relay")
    stream = asyncio.create_task(read_sse(http, c))
    await eng.wait_until(lambda e: len(e.requests) == 1)
    return b, c, eng, stream


async def test_a_draining_node_finishes_its_stream_and_new_requests_go_to_another_holder(
    start_node, fake, http, client_for, relay
) -> None:
    b, c, eng_b, stream = await _draining(start_node, fake, http, relay.url)
    eng_d = await fake("vllm")
    d = await start_node(backends=[{"kind": "vllm", "url": eng_d.url}], relay=relay.url, relay_token=TOKEN, **CLUSTER)

    async def both() -> bool:
        return (await models_of(http, c)).get(MODEL) == sorted([b.name, d.name])

    await eventually(both, timeout_s=10, what="C sees D hold the model too")
    client = client_for(c)
    stopping = asyncio.create_task(b.stop())  # what SIGTERM does
    await asyncio.sleep(0)  # B has begun: it told the relay, and refuses new streams
    t0 = time.monotonic()
    for _ in range(4):  # sent at once, before C may have heard, and after: every one is D's
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
        assert (raw.headers["X-Quorum-Node"], raw.headers["X-Quorum-Route"]) == (d.name, "relay")
        assert raw.parse().choices[0].message.content == "Hello, world!"
    assert time.monotonic() - t0 < 2.0
    assert b.cluster is not None and c.cluster is not None
    peer_b = c.cluster.table.get(b.cluster.node_id)
    assert peer_b is not None and peer_b.draining  # C heard it from the relay (or from B's refusal)
    assert (await models_of(http, c))[MODEL] == [d.name]
    got = await stream  # the stream in flight when B began to stop ends whole, over the open connection
    assert got == {
        "status": 200,
        "node": b.name,
        "route": "relay",
        "text": "".join(f"t{i} " for i in range(40)),
        "done": True,
        "error": None,
    }
    await stopping
    assert len(eng_b.requests) == 1  # nothing new reached the draining node's engine

    async def gone() -> bool:
        return c.cluster.table.get(b.cluster.node_id) is None  # type: ignore[union-attr]

    await eventually(gone, what="B left the relay once its drain was over")


async def test_while_the_only_holder_drains_a_new_request_gets_503_at_once(
    start_node, fake, http, client_for, relay
) -> None:
    b, c, eng, stream = await _draining(start_node, fake, http, relay.url)
    client = client_for(c)
    stopping = asyncio.create_task(b.stop())
    await asyncio.sleep(0)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:  # not hanging on B, not cut half-way
        await client.chat.completions.create(model=MODEL, messages=MSGS)
    assert err.value.status_code == 503 and int(err.value.response.headers["Retry-After"]) >= 1
    assert time.monotonic() - t0 < 1.0
    got = await stream
    assert (got["status"], got["done"], got["error"], got["node"]) == (200, True, None, b.name)
    await stopping
    assert len(eng.requests) == 1


async def test_a_peer_of_an_older_version_gets_plain_frames_and_is_served(
    start_node, fake, http, client_for, relay, tmp_path
) -> None:
    tokens = [f"t{i} " for i in range(200)]
    old_identity = enrol(tmp_path, CLUSTER["cluster"], CLUSTER["cluster_secret"], old_peer_dir(tmp_path), "old-peer")
    a, b, _ = await wan_pair(start_node, fake, http, relay.url, tokens=tokens)
    assert b.cluster is not None and b.cluster.relay is not None
    b_id = b.cluster.node_id
    old = await OldPeer.join(relay.url, old_identity)
    try:
        await old.handshake(b_id, b.cluster.identity.dh_key)
        body = {"model": MODEL, "messages": MSGS, "stream": True}
        answers = await asyncio.gather(*(old.chat(b_id, body) for _ in range(64)))  # a load that B batches
        for status, raw in answers:
            assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
            events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == "".join(
                tokens
            )
        assert "Data" in old.seen and "Batch" not in old.seen  # (one would not even have decoded)
    finally:
        await old.close()
    # the same load from a node of this version does go in batches: the peer's version decided
    before = b.cluster.relay.batches_sent
    client = client_for(a)

    async def one() -> str:
        s = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

    assert await asyncio.gather(*(one() for _ in range(64))) == ["".join(tokens)] * 64
    assert b.cluster.relay.batches_sent > before


class FrameLog:
    """What each node sends through the relay, decoded as the relay decodes it (the hub's entry, wrapped).

    Made before the nodes connect (each connection's handler takes the hub's entry as it starts).
    """

    def __init__(self, relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
        self.frames: list[tuple[str, wire.Frame]] = []
        hub = relay.hub
        handle = hub.handle

        def recording(src: Any, raw: bytes | str) -> None:
            if isinstance(raw, bytes):
                with contextlib.suppress(ValueError):
                    self.frames.append((src.node_id, wire.decode(raw)))
            handle(src, raw)

        monkeypatch.setattr(hub, "handle", recording)

    def clear(self) -> None:
        self.frames.clear()

    def of(self, node_id: str, kind: type[Any]) -> list[Any]:
        return [f for src, f in self.frames if src == node_id and isinstance(f, kind)]


def table_empties(relay: Relay) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(relay.hub.streams) == 0

    return check


async def burst(client: openai.AsyncOpenAI, n: int) -> list[str]:
    """``n`` chats at once; their answers."""

    async def one() -> str:
        out = await client.chat.completions.create(model=MODEL, messages=MSGS)
        return out.choices[0].message.content or ""

    return await asyncio.gather(*(one() for _ in range(n)))


async def logged_pair(
    start_node: StartNode,
    fake: StartFake,
    http: aiohttp.ClientSession,
    relay: RelayHandle,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Node, Node, FrameLog]:
    """``wan_pair`` through ``relay`` with its frames logged (from the nodes' connections on)."""
    assert relay.relay is not None
    log = FrameLog(relay.relay, monkeypatch)
    a, b, _ = await wan_pair(start_node, fake, http, relay.url)
    assert a.cluster is not None and b.cluster is not None and a.cluster.relay is not None
    return a, b, log


async def test_a_burst_opens_and_ends_its_streams_inside_batches(
    start_node, fake, http, client_for, relay, monkeypatch
) -> None:
    a, b, log = await logged_pair(start_node, fake, http, relay, monkeypatch)
    assert a.cluster is not None and b.cluster is not None and relay.relay is not None
    log.clear()
    assert await burst(client_for(a), 64) == ["Hello, world!"] * 64
    a_id, b_id = a.cluster.node_id, b.cluster.node_id
    opened_in_batches = sum(len(f.opens) for f in log.of(a_id, wire.Batch))
    plain_opens = len(log.of(a_id, wire.Open))
    assert opened_in_batches + plain_opens >= 64 and opened_in_batches > plain_opens
    # fewer messages than requests, each way: a request is an item, not three frames
    assert len([f for src, f in log.frames if src == a_id]) < 64
    assert sum(len(f.closes) for f in log.of(b_id, wire.Batch)) > len(log.of(b_id, wire.Close))
    # the relay counted each of them open and closed: nothing is left in its table
    await eventually(table_empties(relay.relay), what="the relay's stream table empties")


async def test_a_relay_that_does_not_count_batched_streams_gets_open_frames(
    start_node, fake, http, client_for, relay, monkeypatch
) -> None:
    import quorum_relay.hub as hub_module

    welcome = hub_module.Welcome
    monkeypatch.setattr(hub_module, "Welcome", lambda **kw: welcome(**{**kw, "batch_streams": False}))
    await relay.stop()  # the nodes join a relay of the version before
    await relay.start()
    a, _b, log = await logged_pair(start_node, fake, http, relay, monkeypatch)
    assert a.cluster is not None and a.cluster.relay is not None and relay.relay is not None
    assert not a.cluster.relay.batch_streams and a.cluster.relay.batching
    log.clear()
    assert await burst(client_for(a), 64) == ["Hello, world!"] * 64
    batches = [f for _, f in log.frames if isinstance(f, wire.Batch)]
    assert len(log.of(a.cluster.node_id, wire.Open)) >= 64 and batches  # data still goes in batches
    assert not any(f.opens or f.closes for f in batches)
    await eventually(table_empties(relay.relay), what="the relay's stream table empties")


async def test_a_batch_opening_streams_in_a_session_the_peer_lost_is_retried_in_a_new_one(
    start_node, fake, http, client_for, relay
) -> None:
    a, b, eng = await wan_pair(start_node, fake, http, relay.url)
    assert a.cluster is not None and b.cluster is not None
    client = client_for(a)
    assert await burst(client, 1) == ["Hello, world!"]
    served = b.cluster.relay
    assert served is not None
    served.protocol.sessions.pop(a.cluster.node_id)  # B forgets the session (as after a restart of its link state)
    before = len(eng.requests)
    assert await burst(client, 8) == ["Hello, world!"] * 8  # B resets them no_session; A asks again, handshaking
    assert len(eng.requests) - before == 8  # served once each


# -- who may be who: node ids bound to keys at the relay, sessions only between members (issue 19) ----------


async def chats_all_served(client: openai.AsyncOpenAI, seconds: float, node: str) -> collections.Counter[Any]:
    """Chats one after another for ``seconds``: how many were served by ``node`` through the relay, and the
    status of every other outcome (the client never retries: every failure counts)."""
    client = client.with_options(max_retries=0)
    outcomes: collections.Counter[Any] = collections.Counter()
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        try:
            raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
            outcomes[
                "ok"
                if (raw.headers["X-Quorum-Node"], raw.headers["X-Quorum-Route"]) == (node, "relay")
                else raw.headers["X-Quorum-Node"]
            ] += 1
        except openai.APIStatusError as e:
            outcomes[e.status_code] += 1
        await asyncio.sleep(0.02)
    return outcomes


async def test_another_key_claiming_a_members_id_is_refused_and_the_member_stays_served(
    start_node, fake, http, client_for, relay
) -> None:
    a, b, _ = await wan_pair(start_node, fake, http, relay.url)
    assert b.cluster is not None and b.cluster.relay is not None
    victim = b.cluster.relay
    connected_at = victim.connected_at
    impostor = NodeIdentity.generate()
    # its own key, the member's id: refused at the handshake, HTTP 401
    with pytest.raises(InvalidStatus) as e:
        await connect(
            relay.url + wire.CONNECT_PATH,
            additional_headers={
                "Authorization": f"Bearer {TOKEN}",
                wire.NODE_ID_HEADER: b.cluster.node_id,
                wire.NODE_KEY_HEADER: base64.b64encode(impostor.sign_key).decode(),
            },
        )
    assert e.value.response.status_code == 401
    # the member's id and public key, signed with its own key: closed before it is anyone
    ws = await connect(
        relay.url + wire.CONNECT_PATH,
        additional_headers={
            "Authorization": f"Bearer {TOKEN}",
            wire.NODE_ID_HEADER: b.cluster.node_id,
            wire.NODE_KEY_HEADER: base64.b64encode(b.cluster.identity.sign_key).decode(),
        },
    )
    challenge = wire.decode(await ws.recv())
    assert isinstance(challenge, wire.Challenge)
    await ws.send(
        wire.encode(
            wire.Proof(
                signature=impostor.sign(
                    wire.proof_message(challenge.nonce, b.cluster.node_id, b.cluster.identity.sign_key)
                )
            )
        )
    )
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == wire.CLOSE_UNAUTHORIZED
    # the member never left: same connection, still served
    assert victim.state == "up" and victim.connected_at == connected_at
    raw = await client_for(a).chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
    assert (raw.headers["X-Quorum-Node"], raw.headers["X-Quorum-Route"]) == (b.name, "relay")


async def test_reconnecting_with_a_victims_id_every_half_second_no_longer_evicts_it(
    start_node, fake, http, client_for, relay
) -> None:
    a, b, _ = await wan_pair(start_node, fake, http, relay.url)
    assert b.cluster is not None and b.cluster.relay is not None
    victim = b.cluster.relay
    connected_at = victim.connected_at
    attacker = NodeIdentity.generate()
    attempts = 0

    async def attack() -> None:  # the old attack, with a valid token: the victim's id, again and again
        nonlocal attempts
        while True:
            attempts += 1
            with contextlib.suppress(InvalidStatus, ConnectionClosed, OSError):
                async with connect(
                    relay.url + wire.CONNECT_PATH,
                    additional_headers={
                        "Authorization": f"Bearer {TOKEN}",
                        wire.NODE_ID_HEADER: b.cluster.node_id,  # type: ignore[union-attr]
                        wire.NODE_KEY_HEADER: base64.b64encode(attacker.sign_key).decode(),
                    },
                ) as ws:
                    await ws.recv()
            await asyncio.sleep(0.5)

    attacking = asyncio.create_task(attack())
    try:
        outcomes = await chats_all_served(client_for(a), 3.0, b.name)
    finally:
        attacking.cancel()
        await asyncio.gather(attacking, return_exceptions=True)
    assert attempts >= 5
    assert set(outcomes) == {"ok"} and outcomes["ok"] > 10, outcomes  # every one served by B, none 404 or 503
    assert victim.connected_at == connected_at  # never evicted


async def test_a_non_member_with_a_valid_token_gets_no_session_and_nothing_served(
    start_node, fake, http, client_for, relay
) -> None:
    a, b, eng = await wan_pair(start_node, fake, http, relay.url)
    assert b.cluster is not None and b.cluster.relay is not None
    served_before = len(eng.requests)
    stranger = await OldPeer.join(relay.url, NodeIdentity.generate())  # a key of its own, in no membership
    try:
        with pytest.raises(Refused):  # it knows B's key (the relay would not tell it, but say it does)
            await stranger.handshake(b.cluster.node_id, b.cluster.identity.dh_key)
        # frames of a session B never accepted: reset, nothing served
        head = msgspec.msgpack.encode(["POST", "/v1/chat/completions", [], b""])
        sid = 1 if b.cluster.node_id > stranger.NODE_ID else 2
        await stranger._out(wire.Open(peer=b.cluster.node_id, stream=sid, payload=b"\x00" * 8 + head + b"\x00" * 16))
        await eventually(lambda: "Reset" in stranger.seen, "B resets the stranger's stream")
    finally:
        await stranger.close()
    assert len(eng.requests) == served_before
    assert stranger.NODE_ID not in b.cluster.relay.online and b.cluster.relay.refused_hellos >= 1
    assert b.cluster.table.get(stranger.NODE_ID) is None
    # and a real node of another cluster, with a valid relay token, never sees B's model (nor B it)
    eng_c = await fake("vllm", models=["other-model"])
    c = await start_node(
        backends=[{"kind": "vllm", "url": eng_c.url}],
        relay=relay.url,
        relay_token=TOKEN,
        cluster="elsewhere",
        cluster_secret="e" * 32,
    )
    assert c.cluster is not None and c.cluster.relay is not None and await c.cluster.relay.wait_up(5)
    await asyncio.sleep(1.0)  # several probe rounds
    assert MODEL not in await models_of(http, c) and "other-model" not in await models_of(http, a)
    assert c.cluster.relay.online == {} and c.cluster.node_id not in b.cluster.relay.online
    assert len(eng.requests) == served_before and eng_c.requests == []


async def test_a_request_in_flight_to_a_peer_that_vanishes_is_a_retryable_503(
    start_node, fake, http, client_for, relay
) -> None:
    a, b, eng = await wan_pair(start_node, fake, http, relay.url, tokens=["slow"], first_token_delay_s=2.0)
    assert b.cluster is not None and b.cluster.relay is not None and relay.relay is not None
    client = client_for(a).with_options(max_retries=0)
    pending = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=MSGS))
    await eng.wait_until(lambda e: len(e.requests) == 1)
    conn = next(c for c in relay.relay._conns if c.node_id == b.cluster.node_id)
    relay.relay.hub.evict(conn, 1011, "gone", "protocol")  # B vanishes from the relay, mid-request
    with pytest.raises(openai.APIStatusError) as err:
        await pending
    assert err.value.status_code == 503 and int(err.value.response.headers["Retry-After"]) >= 1
