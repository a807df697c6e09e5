"""Join with a short code (issue 23): ``quorum-node invite --code`` and ``quorum-node join CODE``, as people run them.

The founder's node runs on loopback; the new machine is a data dir the command line joins with, then a node
of its own. The code goes over SPAKE2 (``cluster/codes.py``): the right one brings the invite token, a
wrong one brings nothing and costs the invitation a try, and three burn it.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest

from quorum_node.cluster.codes import WORDS, CodeError, CodeInvites, Joiner, parse_code
from quorum_node.cluster.membership import load_cluster
from tests.members_support import model_holders
from tests.support import QN, clean_env, cli, eventually

CODE = re.compile(r"\A(\d{1,3})-([a-z]+)-([a-z]+)\Z")


async def founded(tmp_path: Path, start_node: Any, fake: Any) -> tuple[Any, Path]:
    home = tmp_path / "home"
    rc, _, err = await cli("cluster", "init", "--name", "home", "--data-dir", str(home))
    assert rc == 0, err
    eng = await fake("openai", models=["m"])
    node = await start_node(data_dir=str(home), backends=[{"kind": "openai", "url": eng.url}])
    return node, home


async def invite(node: Any, home: Path, expires: str = "10m") -> str:
    rc, out, err = await cli(
        "invite", "--code", "--expires", expires, "--data-dir", str(home), "--url", node.url,
        "--address", f"127.0.0.1:{node.peer_port}",
    )  # fmt: skip
    assert rc == 0, err
    code = out.strip()
    assert CODE.match(code), out
    assert "▄" in err or "█" in err  # the QR code, in the terminal
    return code


def wrong(code: str) -> str:
    plate, a, b = code.split("-")
    other = next(w for w in WORDS if w not in (a, b))
    return f"{plate}-{other}-{b}"


async def join(code: str, node: Any, data: Path) -> tuple[int, str, str]:
    return await cli("join", code, "--via", f"127.0.0.1:{node.peer_port}", "--name", "newbie", "--data-dir", str(data))


async def test_a_machine_joins_with_the_code_serves_and_is_served(
    tmp_path: Path, start_node: Any, fake: Any, http: aiohttp.ClientSession, client_for: Any
) -> None:
    node, home = await founded(tmp_path, start_node, fake)
    code = await invite(node, home)
    new = tmp_path / "new"
    rc, out, err = await join(code, node, new)
    assert rc == 0 and "joined cluster home" in out, err
    rc, _, err = await join(code, node, tmp_path / "again")
    assert rc == 1 and "no invitation" in err  # a code works once
    newbie = await start_node(data_dir=str(new), peers=(f"127.0.0.1:{node.peer_port}",))
    started = asyncio.get_running_loop().time()

    async def served() -> bool:
        return await model_holders(http, newbie) == {"m": [node.name]}

    await eventually(served, "the new member sees the cluster's models", timeout_s=10)
    answer = await client_for(newbie).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello, world!"
    assert asyncio.get_running_loop().time() - started < 10


async def test_a_wrong_code_learns_nothing_and_three_burn_the_invitation(
    tmp_path: Path, start_node: Any, fake: Any
) -> None:
    node, home = await founded(tmp_path, start_node, fake)
    code = await invite(node, home)
    new = tmp_path / "new"
    for left in (2, 1):
        rc, out, err = await join(wrong(code), node, new)
        assert rc == 1 and f"wrong code ({left} more tries" in err and out == ""
        assert load_cluster(new) is None  # nothing joined, nothing learnt
    rc, _, err = await join(wrong(code), node, new)
    assert rc == 1 and "burnt" in err
    rc, _, err = await join(code, node, new)  # the right code, too late
    assert rc == 1 and "no invitation" in err and load_cluster(new) is None


async def test_an_expired_code_is_refused(tmp_path: Path, start_node: Any, fake: Any) -> None:
    node, home = await founded(tmp_path, start_node, fake)
    code = await invite(node, home, expires="1s")
    await asyncio.sleep(1.2)
    rc, _, err = await join(code, node, tmp_path / "new")
    assert rc == 1 and "no invitation" in err


@pytest.mark.parametrize(
    "code", ["", "7", "7-harbor", "7-harbor-notaword", "0-harbor-lantern", "1000-harbor-lantern", "x-y-z"]
)
def test_what_is_no_code_is_said_so(code: str) -> None:
    with pytest.raises(ValueError, match=r"join code|1 to 999"):
        parse_code(code)


def test_the_exchange_gives_the_token_to_the_right_code_only() -> None:
    invites = CodeInvites()
    code = invites.add("the-token", 60.0, now=0.0)
    right = Joiner(code)
    session, theirs = invites.start(right.nameplate, right.message, now=1.0)
    right.key_from(theirs)
    assert right.token(invites.finish(right.nameplate, session, right.proof(), now=2.0)) == "the-token"
    assert invites.pending() == 0
    # malformed SPAKE2 messages are 400s, never exceptions of the library's own
    code = invites.add("t2", 60.0, now=0.0)
    plate, _ = parse_code(code)
    for junk in (b"", b"A", b"B" + b"\x00" * 32, b"x" * 200):
        with pytest.raises(CodeError, match="not a SPAKE2 message") as bad:
            invites.start(plate, junk, now=1.0)
        assert bad.value.status == 400


class Decided(NamedTuple):
    inviter_rc: int
    inviter_out: str
    prompt: str
    rc: int
    joined: str
    said: str
    node_id: str  # what the new machine showed while it waited


async def decided(
    node: Any, home: Path, join_with: Callable[[str], Awaitable[tuple[int, str, str]]], answer: str, *args: str
) -> Decided:
    """``invite --code --admit ARGS`` with a machine joining (``join_with(code)``) and the user answering."""
    inviter = await asyncio.create_subprocess_exec(
        QN, "invite", "--code", "--admit", "--data-dir", str(home), "--url", node.url, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )  # fmt: skip
    assert inviter.stdout is not None and inviter.stdin is not None
    code = (await asyncio.wait_for(inviter.stdout.readline(), 20)).decode().strip()
    joining = asyncio.ensure_future(join_with(code))
    prompt = (await asyncio.wait_for(inviter.stdout.readuntil(b"[y/N] "), 20)).decode()
    await asyncio.sleep(1.5)  # the user reads it
    assert not joining.done()  # it waits for the answer
    inviter.stdin.write(f"{answer}\n".encode())
    await inviter.stdin.drain()
    out, _ = await asyncio.wait_for(inviter.communicate(), 20)
    rc, joined, said = await asyncio.wait_for(joining, 20)
    shown = re.search(r"waiting for the inviter to confirm this machine: newbie, node id ([0-9a-f]{24})", said)
    assert shown is not None, said
    assert inviter.returncode is not None
    return Decided(inviter.returncode, out.decode(), prompt, rc, joined, said, shown.group(1))


@pytest.mark.parametrize("answer", ["y", "n"])
async def test_with_admit_the_inviter_sees_who_joins_and_decides(
    tmp_path: Path, start_node: Any, fake: Any, answer: str
) -> None:
    """``invite --code --admit`` waits, shows the machine that proved the code (the node id it shows on its own
    screen too), and admits it only on "y"; on "n" it joins nothing and the invite is spent."""
    node, home = await founded(tmp_path, start_node, fake)
    new = tmp_path / "new"
    at = f"127.0.0.1:{node.peer_port}"
    d = await decided(node, home, lambda code: join(code, node, new), answer, "--address", at)
    assert d.prompt.startswith("newbie (node id ") and "Admit it?" in d.prompt
    assert d.node_id in d.prompt  # the same id on both screens
    if answer == "y":
        assert d.inviter_rc == 0 and "admitted newbie" in d.inviter_out
        assert d.rc == 0 and "joined cluster home" in d.joined and load_cluster(new) is not None
    else:
        assert d.inviter_rc == 1 and "declined newbie" in d.inviter_out
        assert d.rc == 1 and "did not confirm this machine" in d.said and load_cluster(new) is None
        assert node.cluster.members.known(d.node_id) is None  # not admitted


def test_an_invitation_starts_a_few_exchanges_at_once_not_a_flood() -> None:
    """Each exchange costs the inviter a SPAKE2 computation; its number is easy to guess while few are out."""
    invites = CodeInvites()
    code = invites.add("t", 60.0, now=0.0)
    joiner = Joiner(code)
    for _ in range(8):
        invites.start(joiner.nameplate, joiner.message, now=1.0)
    with pytest.raises(CodeError, match="try again in a few seconds") as flood:
        invites.start(joiner.nameplate, joiner.message, now=1.0)
    assert flood.value.status == 429
    invites.start(joiner.nameplate, joiner.message, now=3.0)  # one more every 2 s
    assert invites.pending() == 1  # a flood burns nothing: only wrong proofs do


async def test_invite_gives_a_code_where_the_node_runs_and_a_token_for_scripts(
    tmp_path: Path, start_node: Any, fake: Any
) -> None:
    node, home = await founded(tmp_path, start_node, fake)
    at = ("--data-dir", str(home), "--address", f"127.0.0.1:{node.peer_port}")
    rc, out, err = await cli("invite", "--url", node.url, *at)
    assert rc == 0 and CODE.match(out.strip()), err  # the node runs: a code to type
    rc, out, err = await cli("invite", "--token", "--url", node.url, *at)
    assert rc == 0 and out.startswith("qrm2.") and "quorum-node join TOKEN" in err
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))
        none_there = f"http://127.0.0.1:{nobody.getsockname()[1]}"
        rc, out, err = await cli("invite", "--url", none_there, *at)
        assert rc == 0 and out.startswith("qrm2.") and "a token instead" in err  # no node: the token
        rc, out, err = await cli("invite", "--code", "--url", none_there, *at)
        assert rc == 1 and out == "" and "needs the node running" in err
