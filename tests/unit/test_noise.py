"""The Noise NNpsk0 implementation against the published cacophony test vectors, and its failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from quorum_node.cluster.noise import CipherState, Handshake, NoiseError

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "noise.json").read_text())["vectors"]
NNPSK0 = next(v for v in VECTORS if v["protocol_name"] == "Noise_NNpsk0_25519_ChaChaPoly_SHA256")


def _key(hex_: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_))


def _pair(v=NNPSK0, *, psk_i=None, psk_r=None, prologue_r=None):
    init = Handshake(initiator=True, psk=psk_i or bytes.fromhex(v["init_psks"][0]),
                     prologue=bytes.fromhex(v["init_prologue"]), ephemeral=_key(v["init_ephemeral"]))
    resp = Handshake(initiator=False, psk=psk_r or bytes.fromhex(v["resp_psks"][0]),
                     prologue=prologue_r if prologue_r is not None else bytes.fromhex(v["resp_prologue"]),
                     ephemeral=_key(v["resp_ephemeral"]))
    return init, resp


def test_the_handshake_and_transport_match_the_published_vector() -> None:
    init, resp = _pair()
    msgs = NNPSK0["messages"]
    m1 = init.write_message(bytes.fromhex(msgs[0]["payload"]))
    assert m1.hex() == msgs[0]["ciphertext"]
    assert resp.read_message(m1).hex() == msgs[0]["payload"]
    m2 = resp.write_message(bytes.fromhex(msgs[1]["payload"]))
    assert m2.hex() == msgs[1]["ciphertext"]
    assert init.read_message(m2).hex() == msgs[1]["payload"]
    assert init.handshake_hash.hex() == resp.handshake_hash.hex() == NNPSK0["handshake_hash"]
    i_send, i_recv = init.split()
    r_send, r_recv = resp.split()
    for k, m in enumerate(msgs[2:]):  # transport messages alternate, the initiator first
        send, recv = (i_send, r_recv) if k % 2 == 0 else (r_send, i_recv)
        ct = send.seal(bytes.fromhex(m["payload"]))
        assert ct.hex() == m["ciphertext"]
        assert recv.open(ct).hex() == m["payload"]


def _established():
    init = Handshake(initiator=True, psk=b"k" * 32, prologue=b"p")
    resp = Handshake(initiator=False, psk=b"k" * 32, prologue=b"p")
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    return init.split(), resp.split()


def test_a_wrong_psk_or_prologue_fails_the_handshake() -> None:
    init, resp = _pair(psk_r=b"x" * 32)
    with pytest.raises(NoiseError):
        resp.read_message(init.write_message(b"hi"))
    init, resp = _pair(prologue_r=b"another relay session")
    with pytest.raises(NoiseError):
        resp.read_message(init.write_message(b"hi"))


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
    init = Handshake(initiator=True, psk=b"k" * 32, prologue=b"")
    with pytest.raises(NoiseError):
        init.read_message(b"\x00" * 48)
    resp = Handshake(initiator=False, psk=b"k" * 32, prologue=b"")
    with pytest.raises(NoiseError):
        resp.read_message(b"short")
    with pytest.raises(NoiseError):
        resp.split()


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


def test_the_relay_psk_is_hkdf_of_the_secret_under_its_own_label() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from quorum_node.cluster.relay_link import relay_psk
    from quorum_node.cluster.signing import derive_keys

    secret = b"s" * 32
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"quorum/v1/relay",
                    info=b"quorum/v1/relay-noise-psk").derive(secret)
    assert relay_psk(secret) == expected
    assert relay_psk(secret) != derive_keys(secret).sign_key  # never the signing key
    assert relay_psk(b"t" * 32) != relay_psk(secret)  # another cluster, another key
