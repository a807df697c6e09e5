"""Signed peer requests: who may talk to a node, and what a replay gets."""

from __future__ import annotations

import pytest

from quorum_node.cluster.signing import (
    ANY_DESTINATION,
    HEADER_DIGEST,
    HEADER_NODE_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    HEADER_TO,
    HOP_HEADER,
    KEY_HEADER,
    ORIGIN_HEADER,
    ReplayGuard,
    body_matches,
    derive_keys,
    derive_records_key,
    sign,
    verify,
    verify_head,
)

SECRET = b"s" * 32
NOW = 1_700_000_000.0
BODY = b'{"model":"llama3.1:8b","messages":[]}'


def _signed(keys=None, *, now=NOW, body=BODY, path="/v1/chat/completions", to="node-b", method="POST", **kw):
    return sign(keys or derive_keys(SECRET), method=method, path=path, body=body, node_id="node-a", to=to, now=now,
                **kw)


def _verify(headers, *, keys=None, guard=None, now=NOW, body=BODY, path="/v1/chat/completions", method="POST",
            self_id="node-b", not_before=0.0):
    return verify(
        keys or derive_keys(SECRET),
        guard if guard is not None else ReplayGuard(),
        method=method,
        path=path,
        body=body,
        headers=headers,
        self_id=self_id,
        now=now,
        not_before=not_before,
    )


def test_a_signed_request_from_a_cluster_member_is_accepted():
    result = _verify(_signed())
    assert result.ok and result.reason == "ok"
    assert result.node_id == "node-a"


def test_header_names_are_matched_case_insensitively():
    headers = {k.lower(): v for k, v in _signed().items()}
    assert _verify(headers).ok


def test_a_wrong_cluster_signature_fails():
    other = derive_keys(b"another cluster's secret")
    assert _verify(_signed(other)).reason == "bad_signature"


def test_a_replayed_signed_request_is_refused():
    guard = ReplayGuard()
    headers = _signed()
    assert _verify(headers, guard=guard).ok
    again = _verify(headers, guard=guard, now=NOW + 5)
    assert not again.ok and again.reason == "replayed"


def test_a_request_replayed_after_the_window_is_refused_as_stale():
    guard = ReplayGuard(window_s=30)
    headers = _signed()
    assert _verify(headers, guard=guard).ok
    assert _verify(headers, guard=guard, now=NOW + 31).reason == "stale_timestamp"


def test_clock_skew_within_the_window_is_tolerated_both_ways():
    assert _verify(_signed(now=NOW - 29)).ok
    assert _verify(_signed(now=NOW + 29)).ok
    assert _verify(_signed(now=NOW - 31)).reason == "stale_timestamp"
    assert _verify(_signed(now=NOW + 31)).reason == "stale_timestamp"


def test_a_changed_body_does_not_match_the_signed_digest():
    assert _verify(_signed(), body=BODY.replace(b"8b", b"70b")).reason == "body_mismatch"


def test_the_head_is_verified_before_any_body_is_read():
    headers = _signed()
    head = verify_head(derive_keys(SECRET), ReplayGuard(), method="POST", path="/v1/chat/completions",
                       headers=headers, self_id="node-b", now=NOW)
    assert head.ok and head.digest == headers[HEADER_DIGEST]
    assert body_matches(head, BODY) and not body_matches(head, BODY + b" ")


def test_a_request_signed_for_one_node_is_refused_by_another():
    # the replay of issue 7 item 8: a captured request sent on to another member of the cluster
    assert _verify(_signed(to="node-b"), self_id="node-c").reason == "wrong_destination"


def test_only_a_health_probe_may_be_addressed_to_any_node():
    probe = _signed(to=ANY_DESTINATION, method="GET", path="/quorum/v1/health", body=b"")
    assert _verify(probe, method="GET", path="/quorum/v1/health", body=b"", self_id="node-c").ok
    catalog = _signed(to=ANY_DESTINATION, method="GET", path="/quorum/v1/catalog", body=b"")
    assert _verify(catalog, method="GET", path="/quorum/v1/catalog", body=b"").reason == "wrong_destination"
    chat = _signed(to=ANY_DESTINATION)
    assert _verify(chat).reason == "wrong_destination"


def test_a_restarted_node_refuses_requests_signed_before_it_started():
    headers = _signed(now=NOW - 2)
    assert _verify(headers, not_before=NOW - 1).reason == "before_start"
    assert _verify(_signed(now=NOW), not_before=NOW - 1).ok


@pytest.mark.parametrize("header,value", [(HOP_HEADER, "2"), (ORIGIN_HEADER, "node-x")])
def test_the_hop_headers_are_signed(header, value):
    headers = _signed(hop="1", origin="node-a")
    assert headers[HOP_HEADER] == "1" and headers[ORIGIN_HEADER] == "node-a"
    assert _verify(dict(headers)).ok
    assert _verify(dict(headers, **{header: value})).reason == "bad_signature"
    stripped = {k: v for k, v in headers.items() if k != header}
    assert _verify(stripped).reason == "bad_signature"


def test_the_api_key_id_of_a_forwarded_request_is_signed():
    """The serving node credits the key the entry node verified; a middlebox cannot move it to another key."""
    headers = _signed(hop="1", origin="node-a", key_id="k_0123456789ab")
    assert headers[KEY_HEADER] == "k_0123456789ab"
    result = _verify(dict(headers))
    assert result.ok and result.key_id == "k_0123456789ab"
    assert _verify(dict(headers, **{KEY_HEADER: "k_other"})).reason == "bad_signature"
    assert _verify({k: v for k, v in headers.items() if k != KEY_HEADER}).reason == "bad_signature"
    added = dict(_signed(hop="1", origin="node-a"), **{KEY_HEADER: "k_0123456789ab"})
    assert _verify(added).reason == "bad_signature"
    assert _verify(dict(headers, **{KEY_HEADER: "bad id!"})).reason == "malformed"
    assert _verify(_signed(hop="1", origin="node-a")).key_id == ""
    with pytest.raises(ValueError):
        _signed(key_id="no\nnewlines")


def test_the_key_record_key_is_its_own():
    keys = derive_keys(SECRET)
    record_key = derive_records_key(SECRET)
    assert len(record_key) == 32 and record_key != keys.sign_key
    assert record_key == derive_records_key(SECRET) and record_key != derive_records_key(b"other")


@pytest.mark.parametrize(
    "change",
    [
        {"path": "/v1/embeddings"},
        {"path": "/v1/chat/completions?x=1"},
        {"method": "PUT"},
    ],
    ids=["path", "query", "method"],
)
def test_tampering_with_the_request_breaks_the_signature(change):
    assert _verify(_signed(), **change).reason == "bad_signature"


@pytest.mark.parametrize("header", [HEADER_NODE_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_DIGEST])
def test_tampering_with_signed_headers_breaks_the_signature(header):
    headers = _signed()
    headers[header] = {
        HEADER_NODE_ID: "node-c",
        HEADER_TIMESTAMP: str(int(NOW * 1000) + 1),
        HEADER_NONCE: "0" * 32,
        HEADER_DIGEST: "0" * 64,
    }[header]
    assert _verify(headers).reason == "bad_signature"


def test_unsigned_and_malformed_requests_get_distinct_reasons():
    assert _verify({}).reason == "missing_signature"
    headers = _signed()
    del headers[HEADER_NONCE]
    assert _verify(headers).reason == "malformed"
    for name, bad in [
        (HEADER_TIMESTAMP, "yesterday"),
        (HEADER_NONCE, "xyz"),
        (HEADER_SIGNATURE, "zz"),
        (HEADER_NODE_ID, "bad id\n"),
        (HEADER_TO, "two words"),
        (HEADER_DIGEST, "not-hex"),
    ]:
        broken = dict(_signed(), **{name: bad})
        result = _verify(broken)
        assert not result.ok and result.reason == "malformed", name


def test_invalid_signatures_do_not_fill_the_replay_guard():
    guard = ReplayGuard(max_entries=2)
    other = derive_keys(b"attacker")
    for _ in range(10):
        assert _verify(_signed(other), guard=guard).reason == "bad_signature"
    assert len(guard) == 0
    assert _verify(_signed(), guard=guard).ok


def test_a_forged_request_does_not_burn_the_nonce_of_a_real_one():
    guard = ReplayGuard()
    real = _signed()
    forged = dict(real, **{HEADER_SIGNATURE: "0" * 64})
    assert _verify(forged, guard=guard).reason == "bad_signature"
    assert _verify(real, guard=guard).ok


def test_replay_guard_memory_is_bounded_and_pruned():
    guard = ReplayGuard(window_s=30, max_entries=3)
    for i in range(3):
        assert guard.check(f"{i:032x}", NOW, NOW)
    # Full: refuse rather than forget a nonce early (that would reopen replays).
    assert not guard.check(f"{9:032x}", NOW, NOW)
    # Once the first nonces' timestamps leave the window, they are dropped and room returns.
    later = NOW + 31
    assert guard.check(f"{9:032x}", later, later)
    assert len(guard) == 1


def test_overloaded_guard_is_reported_not_called_a_replay():
    guard = ReplayGuard(max_entries=1)
    assert _verify(_signed(), guard=guard).ok
    assert _verify(_signed(), guard=guard).reason == "overloaded"


def test_fingerprint_is_public_and_stable_and_keys_are_distinct():
    keys = derive_keys(SECRET)
    assert keys == derive_keys(SECRET)
    assert len(keys.fingerprint) == 16 and int(keys.fingerprint, 16) >= 0
    assert keys.fingerprint != derive_keys(b"other").fingerprint
    assert len(keys.sign_key) == 32 and keys.sign_key != SECRET
    assert keys.fingerprint not in keys.sign_key.hex() and keys.fingerprint not in SECRET.hex()
    assert keys.sign_key.hex() not in repr(keys)


def test_each_signature_gets_a_fresh_nonce():
    a, b = _signed(), _signed()
    assert a[HEADER_NONCE] != b[HEADER_NONCE]
    assert len(a[HEADER_NONCE]) == 32


def test_sign_refuses_inputs_that_would_make_the_canonical_string_ambiguous():
    with pytest.raises(ValueError):
        _signed(path="/v1/x\nPOST")
    with pytest.raises(ValueError):
        sign(derive_keys(SECRET), method="POST", path="/", body=b"", node_id="a\nb", to="b", now=NOW)
    with pytest.raises(ValueError):
        sign(derive_keys(SECRET), method="POST", path="/", body=b"", node_id="a", to="b\nc", now=NOW)
    with pytest.raises(ValueError):
        derive_keys(b"")
