"""The Noise implementation against the published cacophony test vectors, and its failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from quorum_node.cluster.noise import CipherState, Handshake, NoiseError

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "noise.json").read_text())["vectors"]


def _key(hex_: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_))


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _side(v: dict, who: str, pattern: str) -> Handshake:
    """One side of a vector's handshake, with what the vector gives that side."""
    static = _key(v[f"{who}_static"]) if f"{who}_static" in v else None
    remote = bytes.fromhex(v[f"{who}_remote_static"]) if f"{who}_remote_static" in v else None
    return Handshake(
        pattern=pattern,
        initiator=who == "init",
        prologue=bytes.fromhex(v[f"{who}_prologue"]),
        static=static,
        remote_static=remote,
        ephemeral=_key(v[f"{who}_ephemeral"]),
    )


@pytest.mark.parametrize("v", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_the_handshake_and_transport_match_the_published_vector(v: dict) -> None:
    pattern = v["protocol_name"].split("_")[1]
    init, resp = _side(v, "init", pattern), _side(v, "resp", pattern)
    msgs = v["messages"]
    k = 0
    while not (init.done and resp.done):  # handshake messages alternate, the initiator first
        writer, reader = (init, resp) if k % 2 == 0 else (resp, init)
        out = writer.write_message(bytes.fromhex(msgs[k]["payload"]))
        assert out.hex() == msgs[k]["ciphertext"], f"message {k}"
        assert reader.read_message(out).hex() == msgs[k]["payload"]
        k += 1
    assert init.handshake_hash.hex() == resp.handshake_hash.hex() == v["handshake_hash"]
    if "init_static" in v:  # each side knows the other's static key, given or learnt
        assert resp.remote_static == _pub(_key(v["init_static"]))
    assert init.remote_static == _pub(_key(v["resp_static"])) if "resp_static" in v else init.remote_static is None
    i_send, i_recv = init.split()
    r_send, r_recv = resp.split()
    # after the handshake, transport messages go the way the next handshake message would have gone
    for j, m in enumerate(msgs[k:]):
        send, recv = (i_send, r_recv) if (k + j) % 2 == 0 else (r_send, i_recv)
        ct = send.seal(bytes.fromhex(m["payload"]))
        assert ct.hex() == m["ciphertext"]
        assert recv.open(ct).hex() == m["payload"]


def test_ik_is_in_the_vectors() -> None:
    assert {v["protocol_name"] for v in VECTORS} >= {"Noise_IK_25519_ChaChaPoly_SHA256"}


def _ik(*, init_s=None, resp_s=None, told=None, prologue_i=b"p", prologue_r=b"p"):
    """An IK pair; ``told`` is the responder key the initiator believes in (membership's)."""
    init_s = init_s or X25519PrivateKey.generate()
    resp_s = resp_s or X25519PrivateKey.generate()
    init = Handshake(
        initiator=True, prologue=prologue_i, static=init_s, remote_static=told if told is not None else _pub(resp_s)
    )
    resp = Handshake(initiator=False, prologue=prologue_r, static=resp_s)
    return init, resp, init_s, resp_s


def _established():
    init, resp, _, _ = _ik()
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    return init.split(), resp.split()


def test_the_responder_learns_exactly_the_initiators_static_key() -> None:
    init, resp, init_s, _ = _ik()
    assert resp.remote_static is None
    m1 = init.write_message(b"features")
    assert _pub(init_s) not in m1  # sent encrypted: the relay never sees it
    assert resp.read_message(m1) == b"features"
    assert resp.remote_static == _pub(init_s)


def test_an_initiator_with_a_wrong_idea_of_the_responders_key_fails() -> None:
    # the initiator holds the key membership has; a relay (or anyone) answering in its place cannot read m1
    init, resp, _, _ = _ik(told=_pub(X25519PrivateKey.generate()))
    with pytest.raises(NoiseError):
        resp.read_message(init.write_message(b"hi"))
    with pytest.raises(NoiseError):
        resp.split()  # and a failed handshake stays failed


def test_a_wrong_prologue_fails_the_handshake() -> None:
    init, resp, _, _ = _ik(prologue_r=b"another relay session")
    with pytest.raises(NoiseError):
        resp.read_message(init.write_message(b"hi"))


def test_an_answer_opens_only_for_the_handshake_it_answers() -> None:
    # whoever replays or intercepts a member's message 1 learns nothing from the responder's answer
    init, resp, _, resp_s = _ik()
    resp.read_message(init.write_message())
    reply = resp.write_message(b"ok")
    other = Handshake(initiator=True, prologue=b"p", static=X25519PrivateKey.generate(), remote_static=_pub(resp_s))
    other.write_message()
    with pytest.raises(NoiseError):
        other.read_message(reply)
    assert init.read_message(reply) == b"ok"


def test_replayed_reordered_and_tampered_messages_are_rejected() -> None:
    (i_send, _), (_, r_recv) = _established()
    a, b = i_send.seal(b"first"), i_send.seal(b"second")
    with pytest.raises(NoiseError):
        r_recv.open(b)  # out of order
    (i_send, _), (_, r_recv) = _established()
    a = i_send.seal(b"first")
    assert r_recv.open(a) == b"first"
    with pytest.raises(NoiseError):
        r_recv.open(a)  # replayed
    (i_send, _), (_, r_recv) = _established()
    a = bytearray(i_send.seal(b"first"))
    a[3] ^= 1
    with pytest.raises(NoiseError):
        r_recv.open(bytes(a))  # one flipped bit


def test_each_handshake_gives_fresh_keys() -> None:
    (s1, _), _ = _established()
    (s2, _), _ = _established()
    assert s1.seal(b"same") != s2.seal(b"same")


def test_rekey_keeps_both_sides_in_step() -> None:
    (i_send, _), (_, r_recv) = _established()
    import quorum_node.cluster.noise as noise

    old = noise.REKEY_EVERY
    noise.REKEY_EVERY = 3
    try:
        for i in range(10):
            assert r_recv.open(i_send.seal(b"m%d" % i)) == b"m%d" % i
    finally:
        noise.REKEY_EVERY = old
    key_after = CipherState(b"\x01" * 32)
    before = key_after.encrypt(b"", b"x")
    key_after.rekey()
    assert key_after.encrypt(b"", b"x") != before


def test_messages_out_of_turn_and_garbage_are_errors() -> None:
    init, resp, _, _ = _ik()
    with pytest.raises(NoiseError):
        init.read_message(b"\x00" * 48)
    with pytest.raises(NoiseError):
        resp.read_message(b"short")
    with pytest.raises(NoiseError):
        resp.split()
    init, resp, _, _ = _ik()
    m1 = bytearray(init.write_message())
    m1[40] ^= 1  # inside the encrypted static key
    with pytest.raises(NoiseError):
        resp.read_message(bytes(m1))
    init, resp, _, _ = _ik()
    low_order = bytes(32)  # an all-zero ephemeral key: no shared secret with anyone
    with pytest.raises(NoiseError):
        resp.read_message(low_order + init.write_message()[32:])


def test_a_pattern_needs_the_keys_it_names() -> None:
    with pytest.raises(ValueError):
        Handshake(initiator=True, prologue=b"", static=X25519PrivateKey.generate())  # IK: whose key?
    with pytest.raises(ValueError):
        Handshake(initiator=False, prologue=b"")  # IK: the responder's own
    with pytest.raises(ValueError):
        Handshake(pattern="XK1", initiator=True, prologue=b"")


def _numbered_pair():
    from quorum_node.cluster.noise import NumberedReceiver, NumberedSender

    (i_send, _), (_, r_recv) = _established()
    return NumberedSender(i_send), NumberedReceiver(r_recv)


def test_numbered_messages_survive_drops_and_reordering_but_not_replays() -> None:
    send, recv = _numbered_pair()
    msgs = [send.seal(b"m%d" % i) for i in range(6)]
    assert recv.open(msgs[0]) == b"m0"
    assert recv.open(msgs[3]) == b"m3"  # 1 and 2 dropped by the carrier
    assert recv.open(msgs[2]) == b"m2"  # late, still inside the window
    for again in (msgs[0], msgs[3], msgs[2]):
        with pytest.raises(NoiseError):
            recv.open(again)  # each nonce opens at most once


def test_numbered_messages_too_old_forged_or_flipped_are_rejected() -> None:
    from quorum_node.cluster.noise import REPLAY_WINDOW

    send, recv = _numbered_pair()
    first = send.seal(b"first")
    for _ in range(REPLAY_WINDOW):
        send.seal(b"skipped")
    assert recv.open(send.seal(b"far ahead")) == b"far ahead"
    with pytest.raises(NoiseError):
        recv.open(first)  # fell out of the window: a replay cannot be told from it
    flipped = bytearray(send.seal(b"payload"))
    flipped[-1] ^= 1
    with pytest.raises(NoiseError):
        recv.open(bytes(flipped))
    renumbered = bytearray(send.seal(b"payload"))
    renumbered[0] ^= 1  # the nonce is authenticated too
    with pytest.raises(NoiseError):
        recv.open(bytes(renumbered))


def test_garbage_in_place_of_message_1_is_only_ever_a_noise_error() -> None:
    import os
    import random

    rng = random.Random(19)
    for _ in range(300):
        _, resp, _, _ = _ik()
        size = rng.choice([0, 1, 31, 32, 33, 79, 80, 96, 97, 128, rng.randrange(0, 400)])
        with pytest.raises(NoiseError):
            resp.read_message(os.urandom(size))
        assert resp.remote_static is None  # no key learnt from it
        with pytest.raises(NoiseError):
            resp.write_message(b"")
