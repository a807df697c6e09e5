"""The key store as pure logic: merge order, tombstones, signatures, scopes, rate buckets, durations."""

from __future__ import annotations

import itertools
import random

import msgspec
import pytest

from quorum_node.cluster.signing import derive_records_key
from quorum_node.control.keys import KeyStore, parse_duration, sign_record

KEY = derive_records_key(b"cluster secret")


def store(origin: str = "node-a", *, now: list[float] | None = None, path=None) -> KeyStore:
    clock = now if now is not None else [1_700_000_000.0]
    return KeyStore(path, signer=KEY, origin=origin, clock=lambda: clock[0], monotonic=lambda: clock[0])


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
    info, secret = a.create("k")
    live = a.records()[0]
    a.revoke("k")
    tomb = a.records()[0]
    newer_live = sign_record(KEY, msgspec.structs.replace(live, version=99, sig=""))
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
    b = store("node-b")
    changed, rejected = b.merge([msgspec.structs.replace(r, models=()),
                                 sign_record(derive_records_key(b"other"), r),
                                 msgspec.structs.replace(r, sig="")])
    assert (changed, rejected) == (0, 3) and b.records() == []
    unsigned = KeyStore(None, signer=None, origin="lonely")
    assert unsigned.merge([r]) == (0, 1)  # a node in no cluster takes nothing from anyone


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
    joined = KeyStore(path, signer=KEY, origin="node-a")  # the node joined a cluster since
    assert joined.authenticate(secret) is not None and joined.records()[0].sig
    assert store("node-b").merge(joined.records()) == (1, 0)
    assert secret not in path.read_text()


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000),
                                          ("2w", 1209600), ("1d12h", 129600), ("3600", 3600)])
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0", "5 m", "1y", "nan", "inf"])
def test_bad_durations(text) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
