"""The relay's pure logic, fed events directly: tokens, limits, presence, streams, splicing, settings."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from quorum_relay import wire
from quorum_relay.errors import ConfigError
from quorum_relay.limits import AddressCounts, TokenBuckets, address_key, client_address, parse_networks
from quorum_relay.presence import Roster
from quorum_relay.rendezvous import Plates
from quorum_relay.settings import Settings, load_settings, parse_bytes
from quorum_relay.splice import encode_peer, peer_span, rewrite_peer
from quorum_relay.streams import OpenResult, StreamTable
from quorum_relay.tokens import TokenTable, parse_tokens
from quorum_relay.wire import Close, Data, Hello, Open, Reset, Welcome, Window, decode, encode

T1 = "0123456789abcdef-one"
T2 = "0123456789abcdef-two"
T3 = "0123456789abcdef-three"


# tokens


def test_tokens_file_labels_comments_and_namespaces() -> None:
    text = f"""
    # a comment
    {T1}   team-a   # trailing comment
    {T2} team-a
    {T3}
    """
    entries = parse_tokens(text)
    assert entries == [(T1, "team-a"), (T2, "team-a"), (T3, None)]
    table = TokenTable(entries)
    a1, a2, a3 = table.admit(T1), table.admit(T2), table.admit(T3)
    assert a1 is not None and a2 is not None and a3 is not None
    assert a1.namespace == a2.namespace == "team-a"  # one label, one namespace (rotation)
    assert a3.namespace not in ("team-a", T3) and T3 not in a3.namespace  # derived, never the token itself
    assert table.admit("0123456789abcdef-nope") is None
    assert table.admit(T1[:-1]) is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("short", "16-512"),
        (f"{T1} bad/label", "label"),
        (f"{T1} a b", r"expected TOKEN \[LABEL\]"),
    ],
)
def test_tokens_file_errors_name_the_line(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as e:
        parse_tokens("# ok\n" + text, source="tokens.txt")
    assert "tokens.txt:2" in str(e.value)


def test_same_token_two_labels_refused() -> None:
    with pytest.raises(ConfigError):
        TokenTable([(T1, "a"), (T1, "b")])


def test_still_admits_follows_token_and_namespace() -> None:
    old = TokenTable([(T1, "a"), (T2, None)])
    a1, a2 = old.admit(T1), old.admit(T2)
    assert a1 is not None and a2 is not None
    new = TokenTable([(T1, "b"), (T2, None)])
    assert not new.still_admits(a1)  # same token, other namespace: out
    assert new.still_admits(a2)
    assert not TokenTable([]).still_admits(a2)


# limits


def test_token_bucket_burst_refill_and_retry_after() -> None:
    b = TokenBuckets(rate_per_s=2.0, burst=3)
    assert [b.take("x", 0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take("y", 0.0)  # another address has its own bucket
    assert b.retry_after_s("x", 0.0) == pytest.approx(0.5)
    assert not b.take("x", 0.4)
    assert b.take("x", 0.6)
    assert b.prune(100.0) == 2 and len(b) == 0


def test_token_bucket_forgets_least_recent_past_max_keys() -> None:
    b = TokenBuckets(rate_per_s=0.001, burst=1, max_keys=2)
    assert b.take("a", 0.0) and b.take("b", 0.0)
    assert not b.take("a", 0.0)  # "a" is now the most recent
    assert b.take("c", 0.0)  # forgets "b"
    assert len(b) == 2 and b.take("b", 0.0) and not b.take("c", 0.0)


def test_address_counts() -> None:
    c = AddressCounts(limit=2)
    assert c.acquire("x") and c.acquire("x") and not c.acquire("x")
    c.release("x")
    assert c.acquire("x")
    c.release("x")
    c.release("x")
    assert c.count("x") == 0 and len(c) == 0


def test_address_key_groups_ipv6_by_64() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"


def test_client_address_believes_only_trusted_proxies() -> None:
    trusted = parse_networks(["127.0.0.1", "10.0.0.0/8"])
    assert client_address("198.51.100.1", "203.0.113.5", trusted) == "198.51.100.1"  # not a proxy: ignored
    assert client_address("127.0.0.1", "203.0.113.5", trusted) == "203.0.113.5"
    # the client may prepend anything; the rightmost untrusted hop is the one our proxies saw
    assert client_address("127.0.0.1", "1.2.3.4, 203.0.113.5, 10.1.1.1", trusted) == "203.0.113.5"
    assert client_address("127.0.0.1", None, trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", "203.0.113.5", ()) == "127.0.0.1"


# presence


class M(msgspec.Struct):
    node_id: str
    since: float


def test_roster_namespaces_replacement_and_leave() -> None:
    r: Roster[M] = Roster()
    a, b, a_other_ns = M("a", 1.0), M("b", 2.0), M("a", 3.0)
    members, old = r.join("ns1", a)
    assert old is None and members == {"a": a}
    r.join("ns1", b)
    r.join("ns2", a_other_ns)
    assert len(r) == 2 and r.online() == 3
    assert r.peers("ns1", "b") == [a] and r.peers("ns2", "a") == []
    a2 = M("a", 4.0)
    members, old = r.join("ns1", a2)
    assert old is a and members["a"] is a2
    assert not r.leave("ns1", a)  # the replaced one cannot remove its successor
    assert r.get("ns1", "a") is a2
    assert r.leave("ns1", a2) and r.leave("ns1", b)
    assert len(r) == 1 and r.namespaces() == ["ns2"]


# streams


def test_stream_parity_duplicates_and_limits() -> None:
    t = StreamTable(max_per_node=2)
    assert t.open("n", "a", "b", 2) is OpenResult.BAD_ID  # "a" < "b" opens odd ids
    assert t.open("n", "b", "a", 1) is OpenResult.BAD_ID
    assert t.open("n", "a", "b", 0) is OpenResult.BAD_ID
    assert t.open("n", "a", "b", 1) is OpenResult.OPENED
    assert t.open("n", "a", "b", 1) is OpenResult.DUPLICATE
    assert t.open("n", "b", "a", 2) is OpenResult.OPENED
    assert t.open("n", "a", "c", 1) is OpenResult.TOO_MANY  # "a" holds 2
    assert t.open("n", "c", "d", 1) is OpenResult.OPENED
    assert t.open("n", "c", "b", 2) is OpenResult.TOO_MANY  # the destination "b" holds 2
    assert t.count("n", "a") == 2 and t.count("n", "b") == 2 and len(t) == 3
    assert t.open("m", "a", "b", 1) is OpenResult.OPENED  # another namespace, another table entry


def test_stream_open_until_both_close_or_one_resets() -> None:
    t = StreamTable(max_per_node=10)
    t.open("n", "a", "b", 1)
    assert t.close("n", "a", "b", 1)
    assert t.is_open("n", "b", "a", 1)
    assert t.close("n", "a", "b", 1) and t.is_open("n", "a", "b", 1)  # the same side twice: still half
    assert t.close("n", "b", "a", 1)
    assert not t.is_open("n", "a", "b", 1) and t.count("n", "a") == 0
    assert not t.close("n", "a", "b", 1)  # late frames are dropped
    t.open("n", "b", "a", 2)
    assert t.reset("n", "a", "b", 2) and not t.is_open("n", "a", "b", 2)
    assert not t.reset("n", "a", "b", 2)


def test_stream_drop_node_lists_streams_to_reset() -> None:
    t = StreamTable(max_per_node=10)
    t.open("n", "a", "b", 1)
    t.open("n", "b", "a", 2)
    assert t.open("n", "c", "b", 2) is OpenResult.OPENED
    t.open("n", "a", "c", 3)
    assert t.drop_node("n", "b") == [("a", 1), ("a", 2), ("c", 2)]
    assert t.count("n", "a") == 1 and t.count("n", "c") == 1 and len(t) == 1
    assert t.drop_node("n", "b") == []


# splicing


@pytest.mark.parametrize(
    "frame",
    [
        Data(peer="b", stream=7, payload=b"\x00" * 70000),
        Hello(peer="x" * 64, payload=b"noise"),
        Open(peer="node-1.example", stream=1, payload=b""),
        Window(peer="b", stream=3, credit=1 << 40),
        Close(peer="b", stream=3),
        Reset(peer="b", stream=3, code="cancelled"),
    ],
)
@pytest.mark.parametrize("src", ["a", "s" * 31, "s" * 32, "m" * 64])
def test_rewrite_peer_changes_peer_only(frame: object, src: str) -> None:
    raw = encode(frame)  # type: ignore[arg-type]
    out = rewrite_peer(raw, encode_peer(src))
    assert decode(out) == msgspec.structs.replace(frame, peer=src)  # type: ignore[type-var]


def test_rewrite_peer_keeps_unknown_trailing_fields_and_long_headers() -> None:
    # a newer node's extra field, and array 16 / str 16 encodings a node could legally use
    raw = msgspec.msgpack.encode(["Data", "b", 1, b"xyz", {"future": True}])
    out = rewrite_peer(raw, encode_peer("a"))
    assert msgspec.msgpack.decode(out) == ["Data", "a", 1, b"xyz", {"future": True}]
    long_form = b"\xdc\x00\x04" + b"\xda\x00\x04Data" + b"\xda\x00\x01b" + b"\x01\xc4\x01z"
    assert decode(rewrite_peer(long_form, encode_peer("a"))) == Data(peer="a", stream=1, payload=b"z")
    start, end = peer_span(long_form)
    assert long_form[start:end] == b"\xda\x00\x01b"


# settings


def test_settings_env_flags_sizes_and_precedence() -> None:
    s, unknown = load_settings(
        {"port": 9000},
        {
            "QUORUM_RELAY_PORT": "1",
            "QUORUM_RELAY_TOKEN": f"{T1}, {T2}",
            "QUORUM_RELAY_MAX_FRAME_BYTES": "64KiB",
            "QUORUM_RELAY_SEND_QUEUE_BYTES": "2m",
            "QUORUM_RELAY_IDLE_TIMEOUT_S": "30",
            "QUORUM_RELAY_TRUSTED_PROXIES": "127.0.0.1,10.0.0.0/8",
            "QUORUM_RELAY_URL": "the node's, not ours",
            "HOME": "/root",
        },
    )
    assert s.port == 9000 and s.tokens == (T1, T2)
    assert s.max_frame_bytes == 64 * 1024 and s.send_queue_bytes == 2 * 1024 * 1024 and s.idle_timeout_s == 30
    assert s.trusted_proxies == ("127.0.0.1", "10.0.0.0/8")
    assert unknown == ["QUORUM_RELAY_URL"]
    assert T1 not in repr(s)
    assert parse_bytes("8MiB") == 8 << 20 and parse_bytes("256kib") == 256 << 10 and parse_bytes("17") == 17


@pytest.mark.parametrize(
    "bad",
    [
        {"port": 70000},
        {"tokens": ("short",)},
        {"tls_cert": "c.pem"},
        {"max_frame_bytes": 100},
        {"max_frame_bytes": 1 << 20, "send_queue_bytes": 1 << 19},
        {"ping_interval_s": 60, "idle_timeout_s": 60},
        {"max_streams_per_node": 0},
        {"trusted_proxies": ("not-an-ip",)},
        {"bogus": 1},
    ],
)
def test_bad_settings_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_settings(bad, {})


def test_settings_built_directly_are_validated_too() -> None:
    with pytest.raises(ConfigError):
        Settings(port=-1)


@pytest.mark.slow  # a fresh interpreter
def test_relay_never_imports_quorum_node() -> None:
    """It ships alone to a VPS."""
    code = (
        "import sys, quorum_relay.cli, quorum_relay.server\n"
        "print(sorted(m for m in sys.modules if m.startswith('quorum_node')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == "[]"


def test_welcome_with_a_newer_field_still_decodes_for_an_older_node_and_back() -> None:
    """``send_queue_bytes`` was appended with a default: old and new decoders both accept both."""
    new = encode(Welcome(session="s", node_id="n", max_frame_bytes=1, max_streams=2, send_queue_bytes=3))
    old_shape = msgspec.msgpack.encode(["Welcome", "s", "n", [], 1, 2])

    class OldWelcome(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="Welcome"):
        session: str
        node_id: str
        peers: tuple = ()
        max_frame_bytes: int = 0
        max_streams: int = 0

    assert msgspec.msgpack.decode(new, type=OldWelcome).max_streams == 2
    assert decode(old_shape) == Welcome(session="s", node_id="n", max_frame_bytes=1, max_streams=2)


def test_nameplates_held_once_bounded_per_member_and_answered_by_their_holder_only() -> None:
    holder, other = M(node_id="a", since=0.0), M(node_id="b", since=0.0)
    plates = Plates()
    first = plates.claim(holder, 0)
    assert first == 1 and plates.claim(other, first) != first  # taken: another one
    assert plates.claim(holder, first) == first  # its own again (a reconnection)
    held = {first} | {plates.claim(holder, 0) for _ in range(wire.MAX_PLATES_PER_NODE - 1)}
    assert len(held) == wire.MAX_PLATES_PER_NODE and plates.claim(holder, 0) == 0  # no more for it
    channel = plates.open(first)
    assert channel is not None
    assert not plates.answer(other, first, channel.id, b"x")  # not its holder: dropped
    assert plates.answer(holder, first, channel.id, b"x") and channel.answers.get_nowait() == b"x"
    for _ in range(8):  # more answers than it asked for: it ends, bounded
        plates.answer(holder, first, channel.id, b"y")
    assert channel.answers.qsize() <= 4
    plates.release(other, first)  # not its holder: nothing
    assert plates.holder(first) is holder
    # released (its code was used): the number is free at once, the channel open on it still gets the answer
    talking = plates.open(first)
    assert talking is not None
    plates.release(holder, first)
    assert plates.holder(first) is None and plates.open(first) is None
    assert plates.claim(other, first) == first  # another member may hold it now
    assert not plates.answer(other, first, talking.id, b"z")  # the channel is still the first holder's
    assert plates.answer(holder, first, talking.id, b"joined") and talking.answers.get_nowait() == b"joined"
    plates.drop(holder)  # it left the relay: every number free, its channels ended
    assert not [n for n, h in plates.holders.items() if h is holder] and talking.answers.get_nowait() is None
