"""Who is a member, by the signed records alone (``members.MemberStore``): pure logic, records fed directly."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from quorum_node.cluster.identity import NodeIdentity
from quorum_node.cluster.members import (
    MAX_RECORDS,
    Admission,
    Candidate,
    MemberStore,
    Record,
    Removal,
    decode_records,
    encode_records,
)

T0 = 1_700_000_000.0


def admission(signer: NodeIdentity, subject: NodeIdentity, name: str, at: float) -> Admission:
    """``signer``'s admission of ``subject``, as ``MemberStore.admit`` makes it (but not checked here)."""
    c = Candidate.of(subject, name)
    a = Admission(
        node_id=c.node_id,
        sign_key=c.sign_key,
        dh_key=c.dh_key,
        cert=c.cert,
        name=c.name,
        self_sig=c.self_sig,
        by=signer.node_id,
        at=at,
    )
    return msgspec.structs.replace(a, sig=signer.sign(a.signed_bytes()))


def removal(signer: NodeIdentity, node_id: str, at: float, keep: list[str] | None = None) -> Removal:
    r = Removal(node_id=node_id, by=signer.node_id, at=at, keep=sorted(keep or []))
    return msgspec.structs.replace(r, sig=signer.sign(r.signed_bytes()))


def founded(root: NodeIdentity, name: str = "root") -> MemberStore:
    store = MemberStore(root.node_id)
    store.found(root, name, T0)
    return store


def peer_of(store: MemberStore) -> MemberStore:
    """Another node, that has heard everything ``store`` holds (in its order, as a peer sends it)."""
    return MemberStore(store.root, store.records())


def names(store: MemberStore) -> set[str]:
    return {a.name for a in store.members().values()}


@pytest.fixture
def ids() -> dict[str, NodeIdentity]:
    return {n: NodeIdentity.generate() for n in ("a", "b", "c", "d", "e", "f", "x")}


# -- founding and admitting ------------------------------------------------------------------------


def test_the_founder_admits_itself_and_nobody_else_can(ids: dict[str, NodeIdentity]) -> None:
    a, x = ids["a"], ids["x"]
    store = founded(a)
    assert names(store) == {"root"} and store.is_member(a.node_id)
    # a stranger vouching for itself is not a member, in a store of A's cluster or a fresh one
    self_made = admission(x, x, "me", T0)
    assert store.merge([self_made]) == (0, 1)
    assert MemberStore(a.node_id, [self_made]).members() == {}
    assert not store.is_member(x.node_id)
    with pytest.raises(ValueError, match="only the root"):
        store.found(x, "me", T0)


def test_a_member_admits_and_every_peer_agrees(ids: dict[str, NodeIdentity]) -> None:
    a, b, c = ids["a"], ids["b"], ids["c"]
    store = founded(a)
    store.admit(a, Candidate.of(b, "bee"), T0 + 1)
    store.admit(b, Candidate.of(c, "sea"), T0 + 2)  # a member admitted by A admits in turn
    assert names(store) == {"root", "bee", "sea"}
    peer = peer_of(store)
    assert names(peer) == {"root", "bee", "sea"} and peer.digest == store.digest != ""
    assert peer.get(c.node_id).by == b.node_id and peer.get(c.node_id).dh_key == c.dh_key


def test_a_non_member_cannot_admit(ids: dict[str, NodeIdentity]) -> None:
    a, x, d = ids["a"], ids["x"], ids["d"]
    store = founded(a)
    assert store.merge([admission(x, d, "dee", T0 + 1)]) == (0, 1)
    assert not store.is_member(d.node_id)
    with pytest.raises(ValueError, match="not a member"):
        store.admit(x, Candidate.of(d, "dee"), T0 + 1)
    assert names(store) == {"root"} and len(store.records()) == 1


def _other_cert_for(identity: NodeIdentity) -> bytes:
    """A valid certificate of the same key, but not the one the node presented."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else's idea")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.sign_private.public_key())
        .serial_number(42)
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
        .sign(identity.sign_private, None)
    )
    return cert.public_bytes(Encoding.DER)


@pytest.mark.parametrize("field", ["name", "dh_key", "cert", "by", "at", "self_sig", "sign_key"])
def test_a_tampered_admission_is_refused(ids: dict[str, NodeIdentity], field: str) -> None:
    a, b, c, d = ids["a"], ids["b"], ids["c"], ids["d"]
    store = founded(a)
    store.admit(a, Candidate.of(b, "bee"), T0 + 1)
    genuine = admission(a, d, "dee", T0 + 2)
    changed: dict[str, Any] = {
        "name": "mallory",
        "dh_key": ids["x"].dh_key,  # someone else would hold the relay sessions' key
        "cert": _other_cert_for(d),  # still d's key, but not the certificate d vouched for
        "by": b.node_id,  # says a member other than the signer admitted it
        "at": T0 + 999,
        "self_sig": c.sign(Candidate.of(d, "dee").signed_bytes()),
        "sign_key": ids["x"].sign_key,
    }
    forged = msgspec.structs.replace(genuine, **{field: changed[field]})
    assert store.merge([forged]) == (0, 1)
    assert not store.is_member(d.node_id) and names(store) == {"root", "bee"}
    assert store.merge([genuine]) == (1, 0)  # the record as signed is fine
    assert store.get(d.node_id).dh_key == d.dh_key


def test_a_candidate_must_be_its_own_keys(ids: dict[str, NodeIdentity]) -> None:
    a, d, x = ids["a"], ids["d"], ids["x"]
    store = founded(a)
    honest = Candidate.of(d, "dee")

    def self_signed(c: Candidate, by: NodeIdentity) -> Candidate:
        return msgspec.structs.replace(c, self_sig=by.sign(c.signed_bytes()))

    wrong_cert = self_signed(msgspec.structs.replace(honest, cert=x.cert_der), d)
    wrong_signer = self_signed(honest, x)
    wrong_id = self_signed(msgspec.structs.replace(honest, node_id=x.node_id), d)
    for bad, why in (
        (wrong_cert, "certificate is not for its key"),
        (wrong_signer, "not signed by its own key"),
        (wrong_id, "node id does not match"),
    ):
        with pytest.raises(ValueError, match=why):
            store.admit(a, bad, T0 + 1)
        # nor does a member's signature over such a candidate make it one
        rec = Admission(
            node_id=bad.node_id,
            sign_key=bad.sign_key,
            dh_key=bad.dh_key,
            cert=bad.cert,
            name=bad.name,
            self_sig=bad.self_sig,
            by=a.node_id,
            at=T0 + 1,
        )
        rec = msgspec.structs.replace(rec, sig=a.sign(rec.signed_bytes()))
        assert store.merge([rec]) == (0, 1)
    assert names(store) == {"root"}


# -- removal -------------------------------------------------------------------------------------


def test_removal_wins_for_good(ids: dict[str, NodeIdentity]) -> None:
    a, b, c = ids["a"], ids["b"], ids["c"]
    store = founded(a)
    store.admit(a, Candidate.of(b, "bee"), T0 + 1)
    store.admit(a, Candidate.of(c, "sea"), T0 + 2)
    store.remove(a, b.node_id, T0 + 3)
    assert not store.is_member(b.node_id) and store.was_removed(b.node_id) and store.removed_ids() == [b.node_id]
    assert store.known(b.node_id) is not None  # still known: what it signed while a member can be checked
    with pytest.raises(ValueError, match="removed"):
        store.admit(a, Candidate.of(b, "bee again"), T0 + 4)
    # admitted again by hand, by the root and by another member, in either order: still out
    again = [admission(a, b, "bee again", T0 + 5), admission(c, b, "bee", T0 + 6)]
    store.merge(again)
    for node in (store, peer_of(store), MemberStore(a.node_id, list(reversed(store.records())))):
        assert not node.is_member(b.node_id)
        assert names(node) == {"root", "sea"}


def test_a_non_member_cannot_remove(ids: dict[str, NodeIdentity]) -> None:
    a, b, x = ids["a"], ids["b"], ids["x"]
    store = founded(a)
    store.admit(a, Candidate.of(b, "bee"), T0 + 1)
    assert store.merge([removal(x, b.node_id, T0 + 2), removal(x, a.node_id, T0 + 2)]) == (0, 2)
    assert names(store) == {"root", "bee"}
    with pytest.raises(ValueError, match="not a member"):
        store.remove(x, b.node_id, T0 + 2)


def test_a_removed_node_can_remove_nobody_once_its_removal_is_known(ids: dict[str, NodeIdentity]) -> None:
    a, b, c = ids["a"], ids["b"], ids["c"]
    store = founded(a)
    store.admit(a, Candidate.of(b, "bee"), T0 + 1)
    store.admit(a, Candidate.of(c, "sea"), T0 + 2)
    store.remove(a, b.node_id, T0 + 3)
    revenge = [removal(b, c.node_id, T0 + 4), removal(b, a.node_id, T0 + 4)]
    assert store.merge(revenge) == (0, 2)
    assert names(store) == {"root", "sea"}
    with pytest.raises(ValueError, match="not a member"):
        store.remove(b, c.node_id, T0 + 5)


def _history(ids: dict[str, NodeIdentity]) -> list[Record]:
    """A cluster's life, in the order its founder accepted it: A founds; admits B and C; B admits D; D
    admits E; A removes B (keeping D, and so E) and C."""
    a, b, c, d, e = (ids[k] for k in "abcde")
    store = founded(a)
    store.admit(a, Candidate.of(b, "bee"), T0 + 1)
    store.admit(a, Candidate.of(c, "sea"), T0 + 2)
    store.admit(b, Candidate.of(d, "dee"), T0 + 3)
    store.admit(d, Candidate.of(e, "eve"), T0 + 4)
    rm = store.remove(a, b.node_id, T0 + 5)
    assert rm.keep == [d.node_id]
    store.remove(a, c.node_id, T0 + 6)
    assert names(store) == {"root", "dee", "eve"}
    return store.records()


def test_records_in_any_order_give_the_same_members_and_digest(ids: dict[str, NodeIdentity]) -> None:
    history = _history(ids)
    reference = MemberStore(ids["a"].node_id, history)
    assert names(reference) == {"root", "dee", "eve"}
    rng = random.Random(19)
    orders = [list(reversed(history))] + [rng.sample(history, len(history)) for _ in range(150)]
    for order in orders:
        node = MemberStore(ids["a"].node_id, order)
        assert node.members() == reference.members(), [type(r).__name__ for r in order]
        assert node.digest == reference.digest
        assert sorted(r.sig for r in node.records()) == sorted(r.sig for r in history)


def test_a_node_that_hears_of_a_removal_first_ends_up_like_the_others(ids: dict[str, NodeIdentity]) -> None:
    """The removal was pushed to it while it missed the admissions (down, or not yet introduced)."""
    a, b, d, e = ids["a"], ids["b"], ids["d"], ids["e"]
    history = _history(ids)
    removals = [r for r in history if isinstance(r, Removal)]
    late = MemberStore(a.node_id, history[:1])  # knows the founder only
    assert late.merge(removals) == (2, 0)
    late.merge(history)  # then pulls everything from a peer
    reference = MemberStore(a.node_id, history)
    assert late.digest == reference.digest
    assert names(late) == {"root", "dee", "eve"}
    assert late.known(b.node_id) is not None  # B's admission too: its records of the time still verify
    assert late.get(d.node_id).by == b.node_id and late.is_member(e.node_id)


def test_a_removed_members_admissions_count_only_where_its_removal_keeps_them(ids: dict[str, NodeIdentity]) -> None:
    a, b, d, f, g = ids["a"], ids["b"], ids["d"], ids["f"], ids["x"]
    at_a = founded(a)
    at_a.admit(a, Candidate.of(b, "bee"), T0 + 1)
    at_b = peer_of(at_a)
    to_d = at_b.admit(b, Candidate.of(d, "dee"), T0 + 2)
    to_f = at_b.admit(b, Candidate.of(f, "eff"), T0 + 3)
    assert at_a.merge([to_d]) == (1, 0)  # A has heard of D, not of F, when it removes B
    rm = at_a.remove(a, b.node_id, T0 + 4)
    assert rm.keep == [d.node_id]
    forged = admission(b, g, "gee", T0 + 5)  # made by B after its removal (or dated before it: it can lie)
    backdated = admission(b, g, "gee", T0 + 1.5)
    assert at_a.merge([forged, backdated]) == (0, 2)
    assert at_a.merge([to_f]) == (0, 1)  # not kept: its admitter was removed before A heard of it
    everyone = [*at_b.records(), rm]
    for node in (at_a, MemberStore(a.node_id, everyone), MemberStore(a.node_id, everyone[::-1])):
        assert node.is_member(d.node_id), "kept by the removal"
        assert not node.is_member(f.node_id) and not node.is_member(g.node_id)
        assert not node.is_member(b.node_id)


# -- finding, limits, decoding ----------------------------------------------------------------------


def test_find_by_name_id_or_prefix(ids: dict[str, NodeIdentity]) -> None:
    a, b, c, d = ids["a"], ids["b"], ids["c"], ids["d"]
    store = founded(a)
    store.admit(a, Candidate.of(b, "bee"), T0 + 1)
    store.admit(a, Candidate.of(c, "twin"), T0 + 2)
    store.admit(a, Candidate.of(d, "twin"), T0 + 3)
    assert store.find("bee") == b.node_id
    assert store.find(b.node_id) == b.node_id
    assert store.find(b.node_id[:8]) == b.node_id
    with pytest.raises(ValueError, match="2 members are named 'twin': give the node id"):
        store.find("twin")
    assert store.find(c.node_id) == c.node_id
    with pytest.raises(ValueError, match="no member is named"):
        store.find(b.node_id[:5])  # too short to be taken as an id
    with pytest.raises(ValueError, match="no member is named 'nobody'"):
        store.find("nobody")
    store.remove(a, b.node_id, T0 + 4)
    with pytest.raises(ValueError, match="no member is named 'bee'"):
        store.find("bee")


def test_records_are_bounded(ids: dict[str, NodeIdentity]) -> None:
    a, b = ids["a"], ids["b"]
    store = founded(a)
    rng = random.Random(7)
    filler = [removal(a, rng.randbytes(12).hex(), T0 + 1) for _ in range(MAX_RECORDS - 1)]
    assert store.merge(filler) == (MAX_RECORDS - 1, 0)
    assert store.merge([admission(a, b, "bee", T0 + 2)]) == (0, 1)
    assert len(store.records()) == MAX_RECORDS and not store.is_member(b.node_id)
    with pytest.raises(ValueError, match="4096"):
        decode_records(encode_records([*store.records(), admission(a, b, "bee", T0 + 2)]))


def test_records_survive_encoding(ids: dict[str, NodeIdentity]) -> None:
    history = _history(ids)
    assert decode_records(encode_records(history)) == history


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"kind": "admit"}',  # not a list
        b'[{"kind": "promote", "node_id": "' + b"0" * 24 + b'"}]',
        b'[{"kind": "remove", "node_id": "' + b"0" * 24 + b'", "by": "not-an-id", "at": 1}]',
        b'[{"kind": "remove", "node_id": "' + b"0" * 24 + b'", "by": "' + b"1" * 24 + b'", "at": -5}]',
        b'[{"kind": "admit", "node_id": "' + b"0" * 24 + b'"}]',  # fields missing
        b'[{"kind": "remove", "node_id": "' + b"0" * 24 + b'", "by": "' + b"1" * 24 + b'", "at": 1, "sig": "AAAA"}]',
    ],
)
def test_malformed_records_are_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_records(raw)


def test_a_store_tells_who_listens_when_members_change(ids: dict[str, NodeIdentity]) -> None:
    a, b = ids["a"], ids["b"]
    store = founded(a)
    seen: list[int] = []
    store.on_change.append(lambda: seen.append(len(store)))
    digest = store.digest
    store.admit(a, Candidate.of(b, "bee"), T0 + 1)
    assert seen == [2] and store.digest != digest
    store.merge(store.records())  # nothing new: no change, no callback
    assert seen == [2]
    store.remove(a, b.node_id, T0 + 2)
    assert seen == [2, 1]
