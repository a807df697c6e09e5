"""Join with a short code through the relay (issue 23): a machine on another network, with only the code.

The founder's node is on a relay; ``invite --code`` gives a code that names it (``7-harbor-lantern@RELAY``).
``join CODE`` on the new machine reaches the inviter through the relay with no relay token, runs SPAKE2 and
gets its membership and the relay's token sealed under the exchange's key; its node then joins the cluster
through the relay with no flag given. The relay carries the exchange and can read none of it (a tap on its
wire says what it saw); wrong, used and expired codes fail there as on the LAN, and what a stranger sends on a
join channel is bounded and answered, never a crash.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from quorum_node.cluster.codes import RelayRefused, relay_of
from quorum_node.cluster.membership import load_cluster, load_relay
from quorum_relay import wire
from tests.cluster.test_join_code import decided, wrong
from tests.members_support import model_holders
from tests.relay.wan import TOKEN, RelayHandle, Tap
from tests.support import cli, eventually

CODE = re.compile(r"\A(\d{1,3})-([a-z]+)-([a-z]+)@(ws://127\.0\.0\.1:\d+)\Z")


@pytest.fixture
async def relay() -> Any:
    handle = RelayHandle()
    await handle.start()
    yield handle
    await handle.stop()


async def founded(tmp_path: Path, start_node: Any, fake: Any, relay_url: str) -> tuple[Any, Path]:
    home = tmp_path / "home"
    rc, _, err = await cli("cluster", "init", "--name", "home", "--data-dir", str(home))
    assert rc == 0, err
    eng = await fake("openai", models=["m"])
    node = await start_node(
        data_dir=str(home), backends=[{"kind": "openai", "url": eng.url}], relay=relay_url, relay_token=TOKEN
    )
    assert node.cluster is not None and node.cluster.relay is not None
    assert await node.cluster.relay.wait_up(10)
    return node, home


async def invite(node: Any, home: Path, expires: str = "10m") -> str:
    rc, out, err = await cli("invite", "--code", "--expires", expires, "--data-dir", str(home), "--url", node.url)
    assert rc == 0, err
    code = out.strip()
    assert CODE.match(code), out
    assert "through the relay" in err
    return code


async def join(code: str, data: Path) -> tuple[int, str, str]:
    return await cli("join", code, "--name", "newbie", "--data-dir", str(data))


async def test_a_machine_on_another_network_joins_through_the_relay_and_is_served(
    tmp_path: Path, start_node: Any, fake: Any, http: aiohttp.ClientSession, client_for: Any, relay: Any
) -> None:
    tap = Tap(relay.port)  # everything between the relay and the new machine, as the relay's host sees it
    await tap.start()
    try:
        await joins_through_the_relay(tmp_path, start_node, fake, http, client_for, relay, tap)
    finally:
        await tap.close()


async def joins_through_the_relay(
    tmp_path: Path, start_node: Any, fake: Any, http: aiohttp.ClientSession, client_for: Any, relay: Any, tap: Tap
) -> None:
    node, home = await founded(tmp_path, start_node, fake, relay.url)
    code = await invite(node, home)
    via_tap = code.replace(f":{relay.port}", f":{tap.port}")
    new = tmp_path / "new"
    rc, out, err = await join(via_tap, new)
    assert rc == 0 and "joined cluster home through the relay" in out, err
    assert load_cluster(new) is not None and load_relay(new) == (relay.url, TOKEN)
    # what crossed the relay: no name, no cluster, no token in the clear (SPAKE2, then sealed)
    assert tap.seen and b"newbie" not in tap.seen and b"home" not in tap.seen and TOKEN.encode() not in tap.seen
    rc, _, err = await join(code, tmp_path / "again")
    assert rc == 1 and "no invitation" in err  # a code works once; the relay freed its number
    assert node.cluster.relay.plates == set()
    # its node, started with no relay or peer named, reaches the cluster through the stored relay
    newbie = await start_node(data_dir=str(new))
    started = asyncio.get_running_loop().time()

    async def served() -> bool:
        return await model_holders(http, newbie) == {"m": [node.name]}

    await eventually(served, "the new member sees the cluster's models through the relay", timeout_s=10)
    answer = await client_for(newbie).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello, world!"
    assert asyncio.get_running_loop().time() - started < 10


async def test_wrong_codes_through_the_relay_learn_nothing_and_three_burn_it(
    tmp_path: Path, start_node: Any, fake: Any, relay: Any
) -> None:
    node, home = await founded(tmp_path, start_node, fake, relay.url)
    code = await invite(node, home)
    bare, at = relay_of(code)
    new = tmp_path / "new"
    for left in (2, 1):
        rc, out, err = await join(f"{wrong(bare)}@{at}", new)
        assert rc == 1 and f"wrong code ({left} more tries" in err and out == ""
        assert load_cluster(new) is None and load_relay(new) is None
    rc, _, err = await join(f"{wrong(bare)}@{at}", new)
    assert rc == 1 and "burnt" in err
    rc, _, err = await join(code, new)  # the right code, too late: the relay no longer knows its number
    assert rc == 1 and "no invitation" in err and load_cluster(new) is None
    assert node.cluster.relay.plates == set()


async def test_an_expired_code_is_refused_at_the_relay(tmp_path: Path, start_node: Any, fake: Any, relay: Any) -> None:
    node, home = await founded(tmp_path, start_node, fake, relay.url)
    code = await invite(node, home, expires="1s")
    await asyncio.sleep(1.2)
    assert node.cluster.relay.plates == set()  # the relay freed its number when it expired
    rc, _, err = await join(code, tmp_path / "new")
    assert rc == 1 and "no invitation" in err


async def test_what_a_stranger_sends_on_a_join_channel_is_bounded_and_answered(
    tmp_path: Path, start_node: Any, fake: Any, relay: Any
) -> None:
    node, home = await founded(tmp_path, start_node, fake, relay.url)
    code = await invite(node, home)
    plate = int(code.split("-")[0])
    url = f"{relay.url}{wire.JOIN_PATH}{plate}"
    # a number nobody holds, and no number at all: refused at the handshake
    for path in (f"{wire.JOIN_PATH}{plate % 999 + 1}", f"{wire.JOIN_PATH}abc", f"{wire.JOIN_PATH}0"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(relay.url + path):
                pass
        assert refused.value.response.status_code == 404
    # junk the inviter cannot read: each answered with a refusal, the invitation untouched
    async with connect(url) as ws:
        for junk in (b"{}", b"not json", json.dumps({"type": "join", "nameplate": plate}).encode()):
            await ws.send(junk)
            answer = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 5), type=RelayRefused)
            assert answer.status == 400
    async with connect(url) as ws:  # another invitation's number in the message
        await ws.send(json.dumps({"type": "start", "nameplate": plate % 999 + 1, "message": ""}).encode())
        assert msgspec.json.decode(await asyncio.wait_for(ws.recv(), 5), type=RelayRefused).status == 400
    # more than a join message may be: closed unread (1009); text: the channel ends
    async with connect(url, max_size=None) as ws:
        await ws.send(b"x" * (wire.MAX_RENDEZVOUS_BYTES + 1))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    async with connect(url) as ws:
        await ws.send("text")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    # past the messages a channel carries, no more reach the inviter
    async with connect(url) as ws:
        for _ in range(wire.MAX_RENDEZVOUS_MESSAGES):
            await ws.send(b"{}")
            await asyncio.wait_for(ws.recv(), 5)
        await ws.send(b"{}")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)
    assert node.cluster.codes.pending() == 1  # nothing of it cost the invitation anything
    rc, out, err = await join(code, tmp_path / "new")
    assert rc == 0 and "joined cluster home" in out, err


async def test_with_admit_through_the_relay_the_inviter_decides(
    tmp_path: Path, start_node: Any, fake: Any, relay: Any
) -> None:
    node, home = await founded(tmp_path, start_node, fake, relay.url)
    new = tmp_path / "new"
    d = await decided(node, home, lambda code: join(code, new), "y")
    assert f"(node id {d.node_id}, from the relay) asks to join" in d.prompt
    assert d.inviter_rc == 0 and d.rc == 0 and "through the relay" in d.joined
    assert load_relay(new) == (relay.url, TOKEN)


@pytest.mark.parametrize(
    ("answers", "said"),
    [
        (["text"], "sent text"),
        ([b"\xff not json"], "malformed"),
        ([b'{"type": "started", "session": "' + b"a" * 32 + b'", "message": "AAAA"}'], "SPAKE2 message is malformed"),
        ([b'{"type": "refused", "status": 403, "message": "' + b"x" * 600 + b'"}'], "malformed"),
        ([b'{"type": "joined", "sealed": ""}'], "out of order"),
        (["started", b'{"type": "joined", "sealed": "' + b"A" * 44 + b'"}'], "does not open"),
        (["started", "started"], "out of order"),
    ],
)
async def test_a_stranger_answering_as_the_relay_gets_nothing_joined(
    tmp_path: Path, answers: list[Any], said: str
) -> None:
    """The relay is untrusted: whatever it answers in the inviter's place, the new machine refuses with a
    message and stores nothing (a valid SPAKE2 start is sent where ``answers`` says "started": without the
    code, what it seals never opens)."""
    from spake2 import SPAKE2_B
    from websockets.asyncio.server import serve

    async def fake_relay(ws: Any) -> None:
        for answer in answers:
            await ws.recv()
            if answer == "started":
                theirs = SPAKE2_B(b"not-the-code", idA=b"quorum-join", idB=b"quorum-inviter").start()
                answer = msgspec.json.encode({"type": "started", "session": "b" * 32, "message": theirs})
            await ws.send(answer)
        await ws.wait_closed()

    async with serve(fake_relay, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        new = tmp_path / "new"
        rc, out, err = await join(f"7-harbor-lantern@ws://127.0.0.1:{port}", new)
    assert rc == 1 and out == "" and said in err, err
    assert load_cluster(new) is None and load_relay(new) is None
