"""Presence, namespaces, forwarding and streams through a real relay, with real websockets clients."""

from __future__ import annotations

import asyncio
import os
import time

import msgspec
import pytest
from websockets.asyncio.client import connect

from quorum_relay.server import Relay
from quorum_relay.wire import (
    CLOSE_IDLE,
    CLOSE_PROTOCOL,
    CLOSE_REPLACED,
    CLOSE_TOO_SLOW,
    Batch,
    Close,
    Data,
    Draining,
    Hello,
    HelloReply,
    Joined,
    Left,
    Open,
    Presence,
    Reset,
    Unreachable,
    Welcome,
    Window,
    encode,
)

from .conftest import TOKEN_A, TOKEN_B, WAIT_S, Connect, StartRelay, headers, joined, nid


async def test_presence_welcome_joined_left_and_since(relay: Relay, join: Connect) -> None:
    t0 = time.time()
    a = await join(relay, "a")
    b = await join(relay, "b")
    j = await a.expect(Joined)
    assert j.peer.node_id == nid("b")
    assert [p.node_id for p in b.welcome.peers] == [nid("a")]
    a_since = b.welcome.peers[0].since
    assert t0 - 1 <= a_since <= j.peer.since <= time.time() + 1
    c = await join(relay, "c")
    assert [p.node_id for p in c.welcome.peers] == [nid("a"), nid("b")]
    assert c.welcome.peers[0] == Presence(node_id=nid("a"), since=a_since)
    await joined(a, "c")
    await joined(b, "c")
    await b.close()
    assert await a.expect(Left) == Left(node_id=nid("b"))
    assert await c.expect(Left) == Left(node_id=nid("b"))


async def test_a_draining_node_is_announced_to_its_namespace_and_keeps_forwarding(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    assert a.welcome.drain is True and a.welcome.batch is True
    b = await join(relay, "b")
    await joined(a, "b")
    x = await join(relay, "x", TOKEN_B)  # another namespace hears nothing of it
    since = b.welcome.peers[0].since
    await a.send(Open(peer=nid("b"), stream=1, payload=b"in flight"))
    assert await b.expect(Open) == Open(peer=nid("a"), stream=1, payload=b"in flight")
    await a.send(Draining())
    assert await b.expect(Joined) == Joined(peer=Presence(node_id=nid("a"), since=since, draining=True))
    await a.send(Draining())  # said twice: told once
    c = await join(relay, "c")  # a node joining later learns it from its Welcome
    assert c.welcome.peers[0] == Presence(node_id=nid("a"), since=since, draining=True)
    assert c.welcome.peers[1].node_id == nid("b") and not c.welcome.peers[1].draining
    await joined(b, "c")  # the next frame b reads: c joining, not a second notice
    await joined(a, "c")
    # its streams still flow both ways
    await b.send(Data(peer=nid("a"), stream=1, payload=b"answer"))
    assert await a.expect(Data) == Data(peer=nid("b"), stream=1, payload=b"answer")
    await b.send(Close(peer=nid("a"), stream=1))
    assert await a.expect(Close) == Close(peer=nid("b"), stream=1)
    await a.send(Close(peer=nid("b"), stream=1))
    assert await b.expect(Close) == Close(peer=nid("a"), stream=1)
    await a.close()  # it closes when its drain is over
    assert await b.expect(Left) == Left(node_id=nid("a"))
    await x.send(Hello(peer=nid("a"), payload=b""))  # the first frame x reads: it was told nothing of a
    assert await x.expect(Unreachable) == Unreachable(peer=nid("a"), stream=0)


async def test_namespaces_never_see_each_other(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a", TOKEN_A)
    x = await join(relay, "x", TOKEN_B)
    assert x.welcome.peers == ()
    twin = await join(relay, "a", TOKEN_B)  # the same id in another namespace is another node
    assert [p.node_id for p in twin.welcome.peers] == [nid("x")]
    await joined(x, "a")
    # frames do not cross: a → x is unreachable; a → a of the other namespace is a's own id
    await a.send(Hello(peer=nid("x"), payload=b"hi"))
    assert await a.expect(Unreachable) == Unreachable(peer=nid("x"), stream=0)
    await x.send(Open(peer=nid("a"), stream=2, payload=b"to my namespace's a"))
    got = await twin.expect(Open)
    assert got == Open(peer=nid("x"), stream=2, payload=b"to my namespace's a")
    b = await join(relay, "b", TOKEN_A)
    await joined(a, "b")  # the only Joined a ever got: not x, not twin
    await b.send(Hello(peer=nid("a"), payload=b"1"))
    assert await a.expect(Hello) == Hello(peer=nid("b"), payload=b"1")
    await twin.close()
    assert await x.expect(Reset) == Reset(peer=nid("a"), stream=2, code="peer_gone")
    assert await x.expect(Left) == Left(node_id=nid("a"))
    await b.send(Hello(peer=nid("a"), payload=b"2"))
    assert await a.expect(Hello) == Hello(peer=nid("b"), payload=b"2")  # no Left for the other namespace's a


@pytest.mark.parametrize("size", [0, 1, 1000, 200_000])
async def test_forwarding_is_byte_exact_with_peer_rewritten(start_relay: StartRelay, join: Connect, size: int) -> None:
    relay = await start_relay()
    src = "a-rather-long-node-id.with.dots_" + "x" * 30
    a = await join(relay, src)
    b = await join(relay, "b")
    payload = os.urandom(size)
    frames = [
        Hello(peer=nid("b"), payload=payload),
        Open(peer=nid("b"), stream=1, payload=payload),
        Data(peer=nid("b"), stream=1, payload=payload),
        Window(peer=nid("b"), stream=1, credit=2**40),
        Close(peer=nid("b"), stream=1, payload=payload),
    ]
    for f in frames:
        await a.send(f)
    for f in frames:
        raw = await b.recv_raw()
        assert raw == encode(msgspec.structs.replace(f, peer=nid(src)))
    await joined(a, "b")
    await b.send(HelloReply(peer=nid(src), payload=payload[::-1]))
    assert await a.expect(HelloReply) == HelloReply(peer=nid("b"), payload=payload[::-1])


async def test_forwarding_keeps_fields_this_relay_does_not_know(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    b = await join(relay, "b")
    await a.send_raw(msgspec.msgpack.encode(["Hello", nid("b"), b"noise", {"added": "later"}]))
    assert msgspec.msgpack.decode(await b.recv_raw()) == ["Hello", nid("a"), b"noise", {"added": "later"}]


async def test_frames_to_offline_peers_are_unreachable(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    for f, stream in (
        (Open(peer=nid("zz"), stream=1, payload=b""), 1),
        (Data(peer=nid("zz"), stream=9, payload=b"x"), 9),
        (Hello(peer=nid("zz"), payload=b""), 0),
    ):
        await a.send(f)
        assert await a.expect(Unreachable) == Unreachable(peer=nid("zz"), stream=stream)


async def test_stream_limit_resets_too_many_streams(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay(max_streams_per_node=2)
    a = await join(relay, "a")
    b = await join(relay, "b")
    await joined(a, "b")
    await a.send(Open(peer=nid("b"), stream=1, payload=b"1"))
    await b.send(Open(peer=nid("a"), stream=2, payload=b"2"))  # b's own stream counts for both
    assert (await b.expect(Open)).stream == 1
    assert (await a.expect(Open)).stream == 2
    await a.send(Open(peer=nid("b"), stream=3, payload=b"3"))
    assert await a.expect(Reset) == Reset(peer=nid("b"), stream=3, code="too_many_streams")
    await a.send(Data(peer=nid("b"), stream=3, payload=b"late"))  # for the refused stream: dropped
    # both Close: stream 1 is done and its slot free
    await a.send(Close(peer=nid("b"), stream=1))
    await b.send(Close(peer=nid("a"), stream=1))
    assert await b.expect(Close) == Close(peer=nid("a"), stream=1)
    assert await a.expect(Close) == Close(peer=nid("b"), stream=1)
    await a.send(Open(peer=nid("b"), stream=5, payload=b"5"))
    assert await b.expect(Open) == Open(peer=nid("a"), stream=5, payload=b"5")  # not the dropped Data
    # one Reset is enough to free a slot
    await a.send(Reset(peer=nid("b"), stream=2, code="cancelled"))
    assert await b.expect(Reset) == Reset(peer=nid("a"), stream=2, code="cancelled")
    await b.send(Open(peer=nid("a"), stream=4, payload=b"4"))
    assert await a.expect(Open) == Open(peer=nid("b"), stream=4, payload=b"4")
    await b.send(Open(peer=nid("a"), stream=6, payload=b"6"))
    assert await b.expect(Reset) == Reset(peer=nid("a"), stream=6, code="too_many_streams")


async def test_batches_open_and_end_streams_as_open_and_close_frames_do(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay(max_streams_per_node=3)
    a = await join(relay, "a")
    b = await join(relay, "b")
    await joined(a, "b")
    assert a.welcome.batch_streams and a.welcome.batch
    await a.send(Batch(peer=nid("b"), payload=b"sealed 1 3", opens=(1, 3)))
    assert await b.expect(Batch) == Batch(peer=nid("a"), payload=b"sealed 1 3", opens=(1, 3))  # forwarded whole
    assert len(relay.hub.streams) == 2
    await a.send(Data(peer=nid("b"), stream=3, payload=b"plain data on a batch-opened stream"))
    assert (await b.expect(Data)).stream == 3
    # a's half of 1 ends in a batch, b's in one; b resets 3 with a frame: the table is empty again
    await a.send(Batch(peer=nid("b"), payload=b"fin 1", closes=(1,)))
    await b.send(Batch(peer=nid("a"), payload=b"fin 1", closes=(1,)))
    assert (await b.expect(Batch)).closes == (1,) and (await a.expect(Batch)).closes == (1,)
    assert len(relay.hub.streams) == 1
    await b.send(Reset(peer=nid("a"), stream=3, code="cancel"))
    assert await a.expect(Reset) == Reset(peer=nid("b"), stream=3, code="cancel")
    assert len(relay.hub.streams) == 0
    # past the limit (3): the batch still reaches b (its items are sealed together), and the refused
    # stream is reset to both sides
    await a.send(Open(peer=nid("b"), stream=5, payload=b"5"))
    assert (await b.expect(Open)).stream == 5
    await a.send(Batch(peer=nid("b"), payload=b"7 9 11", opens=(7, 9, 11)))
    assert (await b.expect(Batch)).opens == (7, 9, 11)
    assert await b.expect(Reset) == Reset(peer=nid("a"), stream=11, code="too_many_streams")
    assert await a.expect(Reset) == Reset(peer=nid("b"), stream=11, code="too_many_streams")
    assert len(relay.hub.streams) == 3 and relay.stats.rejections["too_many_streams"] == 1
    # a goes away: b hears each of its batch-opened streams reset
    await a.close()
    got = {await b.expect(Reset) for _ in range(3)}
    assert got == {Reset(peer=nid("a"), stream=s, code="peer_gone") for s in (5, 7, 9)}
    assert await b.expect(Left) == Left(node_id=nid("a"))
    assert len(relay.hub.streams) == 0


@pytest.mark.parametrize(
    ("opens", "closes", "why"),
    [
        ((2,), (), "wrong parity"),
        ((0,), (), "stream 0"),
        ((1, 1), (), "duplicate"),
        (tuple(range(1, 2 * 1024 + 3, 2)), (), "more opens than a node may have"),  # 1025: one frame, 1025 Resets
        ((), tuple(range(1, 2 * 1024 + 3, 2)), "more closes than a node may have"),
    ],
)
async def test_a_batch_opening_a_bad_stream_id_is_a_violation(
    relay: Relay, join: Connect, opens: tuple[int, ...], closes: tuple[int, ...], why: str
) -> None:
    a = await join(relay, "a")
    b = await join(relay, "b")
    await a.send(Batch(peer=nid("b"), payload=b"x", opens=opens, closes=closes))
    assert await a.closed_with() == CLOSE_PROTOCOL, why
    while not isinstance(frame := await b.recv(), Left):  # nothing of it was forwarded
        assert frame == Reset(peer=nid("a"), stream=1, code="peer_gone")  # (the first of a duplicate was opened)
    assert len(relay.hub.streams) == 0


async def test_a_batch_to_an_offline_peer_opens_nothing(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    await a.send(Batch(peer=nid("zz"), payload=b"x", opens=(1,), closes=(1,)))
    assert await a.expect(Unreachable) == Unreachable(peer=nid("zz"), stream=0)
    assert len(relay.hub.streams) == 0


async def test_frames_on_streams_not_open_are_dropped(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    b = await join(relay, "b")
    await a.send(Data(peer=nid("b"), stream=7, payload=b"never opened"))
    await a.send(Window(peer=nid("b"), stream=7, credit=1))
    await a.send(Close(peer=nid("b"), stream=7))
    await a.send(Reset(peer=nid("b"), stream=7, code="x"))
    await a.send(Hello(peer=nid("b"), payload=b"next"))
    assert await b.expect(Hello) == Hello(peer=nid("a"), payload=b"next")
    assert relay.stats.dropped == 4


async def test_peer_gone_resets_each_open_stream_then_left(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    b = await join(relay, "b")
    c = await join(relay, "c")
    await joined(a, "b", "c")
    await joined(b, "c")
    await a.send(Open(peer=nid("b"), stream=1, payload=b""))
    await b.send(Open(peer=nid("a"), stream=2, payload=b""))
    await c.send(Open(peer=nid("b"), stream=2, payload=b""))
    await a.send(Open(peer=nid("c"), stream=1, payload=b""))  # not b's: survives
    for _ in range(2):
        await b.expect(Open)
    await a.expect(Open)
    await c.expect(Open)
    await b.close()
    got = {await a.expect(Reset), await a.expect(Reset)}
    assert got == {Reset(peer=nid("b"), stream=1, code="peer_gone"), Reset(peer=nid("b"), stream=2, code="peer_gone")}
    assert await a.expect(Left) == Left(node_id=nid("b"))
    assert await c.expect(Reset) == Reset(peer=nid("b"), stream=2, code="peer_gone")
    assert await c.expect(Left) == Left(node_id=nid("b"))
    assert len(relay.hub.streams) == 1
    await a.send(Data(peer=nid("c"), stream=1, payload=b"still open"))
    assert await c.expect(Data) == Data(peer=nid("a"), stream=1, payload=b"still open")


async def test_replaced_connection(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    b1 = await join(relay, "b")
    j1 = await a.expect(Joined)
    await a.send(Open(peer=nid("b"), stream=1, payload=b""))
    await b1.expect(Open)
    b2 = await join(relay, "b")
    assert [p.node_id for p in b2.welcome.peers] == [nid("a")]
    assert await b1.closed_with() == CLOSE_REPLACED
    # a learns that session went (its stream too) and a new one came
    assert await a.expect(Reset) == Reset(peer=nid("b"), stream=1, code="peer_gone")
    assert await a.expect(Left) == Left(node_id=nid("b"))
    j2 = await a.expect(Joined)
    assert j2.peer.node_id == nid("b") and j2.peer.since >= j1.peer.since
    assert b2.welcome.session != b1.welcome.session
    await a.send(Hello(peer=nid("b"), payload=b"new"))
    assert await b2.expect(Hello) == Hello(peer=nid("a"), payload=b"new")
    assert relay.connections == 2


@pytest.mark.parametrize(
    "message",
    [
        b"\xc1garbage",
        b"",
        "a text message",
        msgspec.msgpack.encode(["Data", "b", "not-an-int", b""]),
        msgspec.msgpack.encode(["Nope", "b"]),
        encode(Welcome(session="s", node_id=nid("a"))),
        encode(Joined(peer=Presence(node_id=nid("b"), since=0))),
        encode(Left(node_id=nid("b"))),
        encode(Unreachable(peer=nid("b"))),
        encode(Hello(peer=nid("a"), payload=b"to myself")),
        encode(Open(peer=nid("b"), stream=2, payload=b"")),  # "a" < "b": a's ids are odd
        encode(Open(peer=nid("b"), stream=0, payload=b"")),
    ],
    ids=[
        "garbage",
        "empty",
        "text",
        "bad-field",
        "unknown-tag",
        "welcome",
        "joined",
        "left",
        "unreachable",
        "to-self",
        "wrong-parity",
        "stream-0",
    ],
)
async def test_protocol_violations_close_with_close_protocol(relay: Relay, join: Connect, message: bytes | str) -> None:
    a = await join(relay, "a")
    b = await join(relay, "b")
    await a.send_raw(message)
    assert await a.closed_with() == CLOSE_PROTOCOL
    assert await b.expect(Left) == Left(node_id=nid("a"))


async def test_duplicate_open_is_a_violation(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    b = await join(relay, "b")
    await a.send(Open(peer=nid("b"), stream=1, payload=b""))
    await b.expect(Open)
    await a.send(Open(peer=nid("b"), stream=1, payload=b""))
    assert await a.closed_with() == CLOSE_PROTOCOL


async def test_oversized_frame_is_1009(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay(max_frame_bytes=4096)
    a = await join(relay, "a")
    b = await join(relay, "b")
    await a.send(Hello(peer=nid("b"), payload=b"x" * 4000))
    assert len((await b.expect(Hello)).payload) == 4000
    await a.send(Hello(peer=nid("b"), payload=b"x" * 4096))
    assert await a.closed_with() == 1009
    assert await b.expect(Left) == Left(node_id=nid("a"))
    assert relay.stats.closes["frame_too_large"] == 1


async def test_slow_destination_is_closed_while_a_fast_one_keeps_flowing(
    start_relay: StartRelay, join: Connect
) -> None:
    limit = 256 * 1024
    relay = await start_relay(send_queue_bytes=limit, max_frame_bytes=64 * 1024, close_timeout_s=5.0)
    a = await join(relay, "a")
    slow = await join(relay, "slow")
    fast = await join(relay, "fast")
    await joined(a, "slow", "fast")
    await joined(slow, "fast")
    slow.ws.transport.pause_reading()  # the slow node stops reading: its frames pile up at the relay
    await a.send(Open(peer=nid("slow"), stream=1, payload=b""))
    await a.send(Open(peer=nid("fast"), stream=1, payload=b""))
    assert await fast.expect(Open) == Open(peer=nid("a"), stream=1, payload=b"")

    received: list[bytes] = []

    async def read_fast() -> None:
        while True:
            frame = await fast.recv()
            if isinstance(frame, Data):
                if frame.payload == b"end":
                    return
                received.append(frame.payload)

    a_events: list[object] = []

    async def read_a() -> None:
        while True:
            a_events.append(await a.recv())

    big = os.urandom(60 * 1024)
    sent_fast: list[bytes] = []
    peak = 0
    async with asyncio.TaskGroup() as tg:
        fast_reader, a_reader = tg.create_task(read_fast()), tg.create_task(read_a())
        async with asyncio.timeout(WAIT_S * 2):
            for i in range(2000):  # ≤ 120 MiB; the slow node is cut off long before
                if Left(node_id=nid("slow")) in a_events:
                    break
                await a.send(Data(peer=nid("slow"), stream=1, payload=big))
                chunk = i.to_bytes(4, "big") * 64
                sent_fast.append(chunk)
                await a.send(Data(peer=nid("fast"), stream=1, payload=chunk))
                peak = max(peak, relay.queued_bytes())
            else:
                raise AssertionError("the slow node was never closed")
            # the fast node got everything sent to it, in order, while the slow one was stuck
            await a.send(Data(peer=nid("fast"), stream=1, payload=b"end"))
            await fast_reader
        a_reader.cancel()
    assert received == sent_fast
    assert Reset(peer=nid("slow"), stream=1, code="peer_gone") in a_events
    assert peak <= limit + len(big) + 1024  # bounded: one queue's limit (plus the frame that crossed it)
    slow.ws.transport.resume_reading()
    assert await slow.closed_with(timeout=WAIT_S * 2) == CLOSE_TOO_SLOW
    assert relay.stats.closes["too_slow"] == 1
    await a.send(Data(peer=nid("fast"), stream=1, payload=b"after"))
    assert await fast.expect(Data) == Data(peer=nid("a"), stream=1, payload=b"after")


async def test_idle_node_closed_with_close_idle_while_a_ponging_one_stays(
    start_relay: StartRelay, join: Connect
) -> None:
    relay = await start_relay(ping_interval_s=0.1, idle_timeout_s=0.5, close_timeout_s=5.0)
    a = await join(relay, "a")  # sends nothing, but its websockets answers pings
    quiet = await join(relay, "quiet")
    await joined(a, "quiet")
    t0 = time.monotonic()
    quiet.ws.transport.pause_reading()  # no pongs from here on
    assert await a.expect(Left, timeout=WAIT_S) == Left(node_id=nid("quiet"))
    assert time.monotonic() - t0 >= 0.4
    quiet.ws.transport.resume_reading()
    assert await quiet.closed_with() == CLOSE_IDLE
    await asyncio.sleep(0.6)  # more than the idle timeout with only pongs from a: it must stay
    await join(relay, "b")
    await joined(a, "b")
    assert relay.connections == 2


async def test_ping_from_the_node_side_is_answered(relay: Relay) -> None:
    async with connect(relay.connect_url, additional_headers=headers("a", TOKEN_A)) as ws:
        await ws.recv()
        latency = await asyncio.wait_for(await ws.ping(), WAIT_S)
        assert latency >= 0


async def test_many_streams_interleave_through_one_relay(relay: Relay, join: Connect) -> None:
    """256 streams between two nodes, a few frames each, all delivered in per-stream order."""
    a = await join(relay, "a")
    b = await join(relay, "b")
    n, per = 256, 8
    for s in range(1, 2 * n, 2):
        await a.send(Open(peer=nid("b"), stream=s, payload=b""))
    for k in range(per):
        for s in range(1, 2 * n, 2):
            await a.send(Data(peer=nid("b"), stream=s, payload=k.to_bytes(2, "big")))
    seen: dict[int, list[int]] = {}
    for _ in range(n):
        assert isinstance(await b.recv(), Open)
    for _ in range(n * per):
        f = await b.expect(Data)
        seen.setdefault(f.stream, []).append(int.from_bytes(f.payload, "big"))
    assert len(seen) == n and all(v == list(range(per)) for v in seen.values())
    assert len(relay.hub.streams) == n
