"""The key store as pure logic: merge order, tombstones, signatures, scopes, rate buckets, durations."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import random

import msgspec
import pytest

from quorum_node.cluster.identity import NodeIdentity
from quorum_node.cluster.members import Candidate, MemberStore
from quorum_node.cluster.members_sync import RecordSigner
from quorum_node.control import keys as keys_module
from quorum_node.control.keys import EXPIRED_GRACE_S, KeyStore, compactable, parse_duration, sign_record
from quorum_node.errors import BadRequest

DAY = 86400.0
T0 = 1_700_000_000.0

NODES = {name: NodeIdentity.generate() for name in ("node-a", "node-b", "node-c", "node-x")}
"""The members of one cluster (node-a founded it and admitted the others)."""
STRANGER = NodeIdentity.generate()
"""A node of no cluster this one knows: its records must never be taken."""


def cluster() -> MemberStore:
    """A fresh view of the cluster's membership, as each node holds its own."""
    root = NODES["node-a"]
    members = MemberStore(root.node_id)
    members.found(root, "node-a", T0)
    for name, identity in NODES.items():
        if identity is not root:
            members.admit(root, Candidate.of(identity, name), T0)
    return members


MEMBERS = cluster()  # never changed by a test: one that removes a member takes its own ``cluster()``


def signer(name: str = "node-a", members: MemberStore | None = None) -> RecordSigner:
    return RecordSigner(NODES[name], MEMBERS if members is None else members)


def store(
    origin: str = "node-a",
    *,
    now: list[float] | None = None,
    path=None,
    retention_s: float = 0.0,
    members: MemberStore | None = None,
) -> KeyStore:
    clock = now if now is not None else [T0]
    s = signer(origin, members)
    return KeyStore(
        path,
        signer=s,
        origin=s.origin,
        clock=lambda: clock[0],
        monotonic=lambda: clock[0],
        tombstone_retention_s=retention_s,
    )


def test_merging_in_any_order_any_number_of_times_ends_the_same() -> None:
    a, b = store("node-a"), store("node-b")
    a.create("one")
    a.create("two", models=["llama*"])
    b.merge(a.records())
    b.revoke("one")
    b.create("three")
    a.revoke("two")
    records = a.records() + b.records()
    digests = set()
    for order in itertools.islice(itertools.permutations(records), 60):
        s = store("node-x")
        s.merge(list(order) + random.sample(records, 2))  # repeats change nothing
        digests.add(s.digest)
        revoked = {k.name for k in s.list() if k.revoked}
        assert revoked == {"one", "two"}
    assert len(digests) == 1


def test_a_tombstone_outranks_any_live_version() -> None:
    a = store()
    _info, secret = a.create("k")
    live = a.records()[0]
    a.revoke("k")
    tomb = a.records()[0]
    newer_live = sign_record(signer("node-b"), msgspec.structs.replace(live, version=99, sig=""))
    b = store("node-b")
    b.merge([tomb, newer_live])
    assert b.authenticate(secret) is None and b.lookup(secret)[1] == "revoked"
    c = store("node-c")
    c.merge([newer_live])
    assert c.authenticate(secret) is not None
    c.merge([tomb])
    assert c.authenticate(secret) is None


def test_records_that_do_not_verify_are_refused() -> None:
    a = store()
    _, secret = a.create("k", models=["small"])
    r = a.records()[0]
    stranger = RecordSigner(STRANGER, MEMBERS)  # it knows the cluster, but is not in it
    legacy = msgspec.structs.replace(r, sig=hmac.new(b"cluster secret", b"record", hashlib.sha256).hexdigest())
    b = store("node-b")
    changed, rejected = b.merge(
        [
            msgspec.structs.replace(r, models=()),  # tampered: the scope widened
            msgspec.structs.replace(r, origin=NODES["node-c"].node_id),  # claimed by another
            sign_record(stranger, r),  # signed by a node that is not a member
            msgspec.structs.replace(sign_record(stranger, r), origin=r.origin),
            legacy,  # signed the old way, with the cluster's shared secret
            msgspec.structs.replace(r, sig=""),
        ]
    )
    assert (changed, rejected) == (0, 6) and b.records() == [] and b.authenticate(secret) is None
    assert b.merge([r]) == (1, 0) and b.authenticate(secret) is not None  # the genuine record is taken
    unsigned = KeyStore(None, signer=None, origin="lonely")
    assert unsigned.merge([r]) == (0, 1)  # a node in no cluster takes nothing from anyone


def test_a_removed_members_records_stay_where_held_and_are_refused_where_new(tmp_path) -> None:
    path = tmp_path / "keys.json"
    b_view, d_view = cluster(), cluster()
    c = store("node-c")
    _, secret = c.create("made-by-c")
    held = store("node-b", path=path, members=b_view)
    assert held.merge(c.records()) == (1, 0)
    held.save()  # as the replication does after a merge that changed something
    for view in (b_view, d_view):
        view.remove(NODES["node-a"], NODES["node-c"].node_id, T0 + 1)
    assert not b_view.is_member(NODES["node-c"].node_id)
    # The key c made while a member keeps working where it is held, and after a restart.
    assert held.authenticate(secret) is not None
    reopened = store("node-b", path=path, members=b_view)
    assert reopened.authenticate(secret) is not None
    assert reopened.records()[0].origin == NODES["node-c"].node_id  # kept as c signed it, not taken over
    # A node that had not taken it yet refuses it now, as it refuses anything c signs from now on.
    fresh = store("node-x", members=d_view)
    _, later = c.create("made-after-removal")
    assert fresh.merge(c.records()) == (0, 2)
    assert fresh.authenticate(secret) is None and fresh.authenticate(later) is None
    assert held.merge(c.records()) == (0, 1) and held.authenticate(later) is None  # the one it held: no alarm


def test_keys_are_checked_by_hash_expiry_and_format() -> None:
    now = [1_700_000_000.0]
    s = store(now=now)
    _, secret = s.create("k", expires_s=60)
    assert s.authenticate(secret) is not None
    assert s.lookup(secret[:-1])[1] == "unknown" and s.lookup("qk_" + "é" * 10)[1] == "unknown"
    assert s.lookup("x" * 10_000)[1] == "unknown"
    now[0] += 61
    assert s.lookup(secret) == (None, "expired")


def test_scopes_are_case_sensitive_globs() -> None:
    s = store()
    _, secret = s.create("k", models=["llama3*", "qwen2.5:7b"])
    grant, _ = s.lookup(secret)
    assert grant.allows("llama3.1:8b") and grant.allows("qwen2.5:7b")
    assert not grant.allows("qwen2.5:72b") and not grant.allows("Llama3") and not grant.allows("x-llama3")


def test_the_rate_bucket_refills_at_its_rate() -> None:
    now = [1000.0]
    s = store(now=now)
    _, secret = s.create("k", rate_per_min=6)
    grant, _ = s.lookup(secret)
    assert all(grant.take(now[0]) == 0 for _ in range(6))
    assert grant.take(now[0]) == pytest.approx(10.0)
    now[0] += 10
    assert grant.take(now[0]) == 0 and grant.take(now[0]) > 0


def test_the_store_survives_reopening_and_resigns_what_it_wrote_unsigned(tmp_path) -> None:
    path = tmp_path / "keys.json"
    lonely = KeyStore(path, signer=None, origin="node-a")
    _, secret = lonely.create("made-offline")
    assert lonely.records()[0].sig == ""
    joined = store("node-a", path=path)  # the node joined a cluster since
    assert joined.authenticate(secret) is not None and joined.records()[0].sig
    assert store("node-b").merge(joined.records()) == (1, 0)
    assert secret not in path.read_text()


def test_records_signed_with_the_old_shared_secret_are_signed_anew_when_the_store_opens(tmp_path) -> None:
    path = tmp_path / "keys.json"
    _, secret = KeyStore(path, signer=None, origin="node-a").create("from-before-keys")
    stored = json.loads(path.read_text())
    stored["records"][0]["sig"] = hmac.new(b"cluster secret", b"record", hashlib.sha256).hexdigest()  # 64 hex
    path.write_text(json.dumps(stored))
    legacy = KeyStore(path, signer=None, origin="node-a").records()
    assert store("node-b").merge(legacy) == (0, 1)  # as it was, no peer takes it
    upgraded = store("node-a", path=path)
    assert upgraded.authenticate(secret) is not None
    r = upgraded.records()[0]
    assert r.origin == NODES["node-a"].node_id and len(r.sig) == 128
    assert store("node-b").merge([r]) == (1, 0)  # now every member takes it
    assert json.loads(path.read_text())["records"][0]["sig"] == r.sig  # and it was written back so


# -- compaction: what may be forgotten, and that a forgotten key stays refused -------------------


def test_the_compaction_rule() -> None:
    s = store(now=[T0])
    s.create("expiring", expires_s=DAY)
    s.create("forever")
    s.create("revoked-expiring", expires_s=DAY)
    s.revoke("revoked-expiring")
    s.create("revoked-forever")
    s.revoke("revoked-forever")
    r = {x.name: x for x in s.records()}
    retention = 90 * DAY
    forgotten = lambda now, retention_s=retention: {  # noqa: E731
        name for name, x in r.items() if compactable(x, now, retention_s)
    }
    assert forgotten(T0) == set()
    assert forgotten(T0 + DAY + EXPIRED_GRACE_S - 1) == set()  # expired, but within the grace for clocks
    expired_for_good = {"expiring", "revoked-expiring"}  # live or revoked: the key is refused everywhere anyway
    assert forgotten(T0 + DAY + EXPIRED_GRACE_S) == expired_for_good
    assert forgotten(T0 + retention - 1) == expired_for_good
    assert forgotten(T0 + retention) == expired_for_good | {"revoked-forever"}  # a tombstone past its retention
    assert forgotten(T0 + 100 * 365 * DAY, 0.0) == expired_for_good  # retention 0: tombstones are kept for good
    assert "forever" not in forgotten(T0 + 100 * 365 * DAY)  # a live key that never expires is never forgotten


def test_a_compacted_store_still_refuses_the_key_and_does_not_take_it_back() -> None:
    now = [T0]
    a = store("node-a", now=now, retention_s=30 * DAY)
    _, expiring = a.create("expiring", expires_s=DAY)
    _, revoked = a.create("revoked")
    _, kept = a.create("kept")
    live_copies = [r for r in a.records() if r.name in ("expiring", "revoked")]  # as a node that was away holds them
    a.revoke("revoked")
    now[0] = T0 + 8 * DAY  # past expiry and its grace; the tombstone is still within its retention
    assert a.compact() == 1
    assert a.lookup(expiring) == (None, "unknown") and a.lookup(revoked) == (None, "revoked")
    assert a.merge(live_copies) == (0, 0)  # the expired key's record is passed over, the tombstone wins
    assert a.lookup(expiring) == (None, "unknown") and a.lookup(revoked) == (None, "revoked")
    assert {k.name for k in a.list()} == {"revoked", "kept"}
    now[0] = T0 + 31 * DAY
    assert a.compact() == 1 and a.lookup(revoked) == (None, "unknown")  # the tombstone is gone, and so is the key
    assert a.lookup(kept)[1] == "ok" and len(a) == 1
    assert a.compact() == 0


def test_a_stores_file_is_compacted_when_it_is_opened(tmp_path) -> None:
    path = tmp_path / "keys.json"
    now = [T0]
    a = store(now=now, path=path)
    _, secret = a.create("old", expires_s=60)
    now[0] = T0 + 60 + EXPIRED_GRACE_S
    b = store(now=now, path=path)
    assert b.records() == [] and b.lookup(secret) == (None, "unknown")
    assert b"old" not in path.read_bytes()  # written back without it


def test_the_store_is_capped_and_says_so(monkeypatch) -> None:
    monkeypatch.setattr(keys_module, "MAX_RECORDS", 3)
    now = [T0]
    s = store(now=now)
    s.create("one", expires_s=60)
    s.create("two")
    s.create("three")
    s.revoke("three")  # a tombstone still counts
    with pytest.raises(BadRequest) as e:
        s.create("four")
    assert e.value.code == "too_many_keys" and "revoked ones included" in e.value.message
    now[0] = T0 + 60 + EXPIRED_GRACE_S  # "one" expired long ago: making a key forgets it to make room
    s.create("four")
    assert sorted(k.name for k in s.list()) == ["four", "three", "two"]


# -- last use, across the cluster ---------------------------------------------------------------------


def test_last_uses_merge_by_maximum_and_only_changes_are_handed_out() -> None:
    now = [T0]
    a, b = store("node-a", now=now), store("node-b", now=now)
    info, secret = a.create("k")
    b.merge(a.records())
    assert a.take_used_changes() == {} and b.list()[0].last_used is None
    now[0] = T0 + 100
    assert a.lookup(secret)[1] == "ok"
    now[0] = T0 + 130
    assert a.lookup(secret)[1] == "ok"
    changes = a.take_used_changes()
    assert changes == {info.id: T0 + 130}  # one entry per key, however many requests
    assert a.take_used_changes() == {}  # nothing new since
    assert b.merge_used(changes) == 1 and b.list()[0].last_used == T0 + 130
    assert b.take_used_changes() == {info.id: T0 + 130}  # passed on once (to peers a cannot reach)
    assert a.merge_used(b.take_used_changes() or {info.id: T0 + 130}) == 0  # the echo changes nothing
    assert b.merge_used({info.id: T0 + 5}) == 0 and b.list()[0].last_used == T0 + 130  # older: kept the newer
    assert b.merge_used({"k_000000000000": T0}) == 0 and "k_000000000000" not in b.used()  # unknown keys: dropped


@pytest.mark.parametrize(
    "text,seconds",
    [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600), ("1d12h", 129600), ("3600", 3600)],
)
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0", "5 m", "1y", "nan", "inf"])
def test_bad_durations(text) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
