"""What a node keeps in its data dir: its identity, its cluster, its open invites (``membership``, ``identity``)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509

from quorum_node.cluster.identity import (
    IDENTITY_FILE,
    NodeIdentity,
    cert_sign_key,
    load_or_create_identity,
    node_id_for,
    verify_signature,
)
from quorum_node.cluster.members import MemberStore, decode_records, encode_records
from quorum_node.cluster.membership import (
    CLUSTER_FILE,
    INVITES_FILE,
    MEMBERS_FILE,
    Cluster,
    InviteToken,
    create_invite,
    legacy_cluster,
    load_cluster,
    load_member_records,
    parse_invite,
    store_cluster,
    take_invite,
)

NOW = 1_700_000_000.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _founded(data_dir: Path, name: str = "home") -> tuple[NodeIdentity, Cluster]:
    """``data_dir`` made the founder of a cluster, as ``quorum-node cluster init`` leaves it."""
    me = load_or_create_identity(data_dir)
    store = MemberStore(me.node_id)
    store.found(me, "first", NOW)
    cluster = Cluster(name=name, root=me.node_id)
    store_cluster(data_dir, cluster, encode_records(store.records()))
    return me, cluster


# -- identity ----------------------------------------------------------------------------------


def test_identity_is_stable_across_restarts_and_distinct_per_data_dir(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path / "a")
    again = load_or_create_identity(tmp_path / "a")
    assert (again.node_id, again.sign_key, again.dh_key) == (first.node_id, first.sign_key, first.dh_key)
    # and the restarted node signs as the first one did: its peers still recognise it
    assert verify_signature(first.sign_key, b"hello", again.sign(b"hello"))
    other = load_or_create_identity(tmp_path / "b")
    assert other.node_id != first.node_id and other.dh_key != first.dh_key


def test_data_dir_is_0700_and_identity_0600_with_no_temp_files(tmp_path: Path) -> None:
    data = tmp_path / "deep" / "quorum"
    load_or_create_identity(data)
    assert _mode(data) == 0o700
    assert _mode(data / IDENTITY_FILE) == 0o600
    assert sorted(p.name for p in data.iterdir()) == [IDENTITY_FILE]


def test_nodes_starting_at_once_on_a_fresh_data_dir_agree_on_one_identity(tmp_path: Path) -> None:
    data = tmp_path / "quorum"
    start = threading.Barrier(8)

    def load() -> str:
        start.wait()
        return load_or_create_identity(data).node_id

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: load(), range(8)))
    assert len(ids) == 1
    assert ids == {load_or_create_identity(data).node_id}


def test_node_id_is_derived_from_its_key(tmp_path: Path) -> None:
    me = load_or_create_identity(tmp_path)
    assert me.node_id == node_id_for(me.sign_key)
    assert len(me.node_id) == 24 and int(me.node_id, 16) >= 0
    stranger = NodeIdentity.generate()
    assert node_id_for(stranger.sign_key) != me.node_id
    with pytest.raises(ValueError):
        node_id_for(me.sign_key[:31])


def test_certificate_is_deterministic_and_is_for_the_nodes_key(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    again = load_or_create_identity(tmp_path)
    assert first.cert_der == again.cert_der  # the same every time: peers pin it through membership
    assert cert_sign_key(first.cert_der) == first.sign_key
    cert = x509.load_der_x509_certificate(first.cert_der)
    assert first.node_id in cert.subject.rfc4514_string()
    assert cert_sign_key(NodeIdentity.generate().cert_der) != first.sign_key
    with pytest.raises(ValueError, match="not a certificate"):
        cert_sign_key(b"\x30\x03garbage")
    with pytest.raises(ValueError, match="too large"):
        cert_sign_key(b"\x00" * 4096)


def test_repr_never_shows_a_private_key(tmp_path: Path) -> None:
    me = load_or_create_identity(tmp_path)
    stored = json.loads((tmp_path / IDENTITY_FILE).read_text())
    for text in (repr(me), str(me)):
        assert stored["sign"] not in text and stored["dh"] not in text
        assert me.node_id in text


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"version": 1, "sign": "AAAA", "dh": "AAAA"}',  # keys of the wrong length
        b'{"version": 1, "sign": "!!!", "dh": "!!!"}',  # not base64
        b'{"version": 7, "sign": "'
        + base64.b64encode(b"\x01" * 32)
        + b'", "dh": "'
        + base64.b64encode(b"\x02" * 32)
        + b'"}',
        b'{"version": 1, "sign": "' + base64.b64encode(b"\x01" * 32) + b'"}',  # a key missing
    ],
)
def test_a_damaged_identity_is_a_clear_error_and_is_left_alone(tmp_path: Path, content: bytes) -> None:
    (tmp_path / IDENTITY_FILE).write_bytes(content)
    with pytest.raises(ValueError) as caught:
        load_or_create_identity(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / IDENTITY_FILE) in message and "damaged" in message and "backup" in message
    assert (tmp_path / IDENTITY_FILE).read_bytes() == content  # never silently replaced by a new identity


# -- cluster.json, members.json -----------------------------------------------------------------


def test_no_cluster_yet_loads_as_none(tmp_path: Path) -> None:
    assert load_cluster(tmp_path) is None
    assert legacy_cluster(tmp_path) is None
    assert load_member_records(tmp_path) == b"[]"


def test_cluster_is_stored_as_version_2_private_and_atomic(tmp_path: Path) -> None:
    me, cluster = _founded(tmp_path / "node")
    data = tmp_path / "node"
    assert load_cluster(data) == cluster
    stored = json.loads((data / CLUSTER_FILE).read_text())
    assert (stored["version"], stored["name"], stored["root"]) == (2, "home", me.node_id)
    assert not stored.get("secret")  # a keyed cluster has no shared secret
    store = MemberStore(cluster.root, decode_records(load_member_records(data)))
    assert store.is_member(me.node_id) and store.get(me.node_id).name == "first"
    for name in (CLUSTER_FILE, MEMBERS_FILE, IDENTITY_FILE):
        assert _mode(data / name) == 0o600
    assert _mode(data) == 0o700
    assert sorted(p.name for p in data.iterdir()) == sorted([CLUSTER_FILE, MEMBERS_FILE, IDENTITY_FILE])


def test_storing_another_cluster_needs_force(tmp_path: Path) -> None:
    _me, original = _founded(tmp_path)
    other = Cluster(name="work", root=NodeIdentity.generate().node_id)
    with pytest.raises(FileExistsError, match=r"already belongs to cluster 'home'.*--force"):
        store_cluster(tmp_path, other, b"[]")
    assert load_cluster(tmp_path) == original
    store_cluster(tmp_path, original, load_member_records(tmp_path))  # the same cluster again: fine
    store_cluster(tmp_path, other, b"[]", force=True)
    assert load_cluster(tmp_path) == other


def test_open_invites_do_not_survive_a_move_to_another_cluster(tmp_path: Path) -> None:
    me, _ = _founded(tmp_path)
    token = create_invite(tmp_path, inviter=me.node_id, addresses=("127.0.0.1:1",), ttl_s=600, now=NOW)
    store_cluster(tmp_path, Cluster(name="work", root=NodeIdentity.generate().node_id), b"[]", force=True)
    # that invite was for "home": it must not admit its holder into "work"
    assert take_invite(tmp_path, token.secret_hash, NOW + 1) == "unknown"


@pytest.mark.parametrize(
    "content, why",
    [
        (b"[1, 2", "damaged"),
        (b'{"version": 2, "name": "home", "root": "not-an-id"}', "bad root"),
        (b'{"version": 3, "name": "home", "root": "' + b"0" * 24 + b'"}', "unsupported version 3"),
    ],
)
def test_a_damaged_cluster_file_is_a_clear_error(tmp_path: Path, content: bytes, why: str) -> None:
    (tmp_path / CLUSTER_FILE).write_bytes(content)
    with pytest.raises(ValueError, match=why) as caught:
        load_cluster(tmp_path)
    assert str(tmp_path / CLUSTER_FILE) in str(caught.value)


def test_a_cluster_of_the_shared_secret_days_is_read_for_migration_and_makes_no_member(tmp_path: Path) -> None:
    secret = bytes(range(32))
    (tmp_path / CLUSTER_FILE).write_text(json.dumps({"version": 1, "name": "old", "secret": _b64url(secret)}))
    legacy = legacy_cluster(tmp_path)
    assert legacy is not None and legacy.name == "old" and legacy.secret == secret
    assert _b64url(secret) not in repr(legacy) and _b64url(secret) not in str(legacy)
    assert load_cluster(tmp_path) is None  # the secret makes this node a member of nothing
    # the migration writes the keyed cluster over it, no --force needed
    _me, cluster = _founded(tmp_path, name="old")
    assert load_cluster(tmp_path) == cluster and legacy_cluster(tmp_path) is None


# -- invites -------------------------------------------------------------------------------------


def _invite(data_dir: Path, *, ttl_s: float = 600, now: float = NOW) -> InviteToken:
    return create_invite(
        data_dir, inviter="ab" * 12, addresses=("192.0.2.7:32769", "[2001:db8::1]:32769"), ttl_s=ttl_s, now=now
    )


def test_an_invite_works_once(tmp_path: Path) -> None:
    token = _invite(tmp_path)
    assert take_invite(tmp_path, token.secret_hash, NOW + 1) == "ok"
    assert take_invite(tmp_path, token.secret_hash, NOW + 2) == "used"
    assert _mode(tmp_path / INVITES_FILE) == 0o600


def test_an_invite_taken_by_two_joiners_at_once_admits_one(tmp_path: Path) -> None:
    token = _invite(tmp_path)
    start = threading.Barrier(8)

    def take() -> str:
        start.wait()
        return take_invite(tmp_path, token.secret_hash, NOW + 1)

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(lambda _: take(), range(8)))
    assert outcomes == ["ok"] + ["used"] * 7


def test_an_invite_expires(tmp_path: Path) -> None:
    token = _invite(tmp_path, ttl_s=60)
    assert take_invite(tmp_path, token.secret_hash, NOW + 60) == "expired"
    assert take_invite(tmp_path, token.secret_hash, NOW + 3600) == "expired"


def test_an_unknown_invite_is_refused_and_others_stay_open(tmp_path: Path) -> None:
    assert take_invite(tmp_path, hashlib.sha256(b"guess").hexdigest(), NOW) == "unknown"
    kept = _invite(tmp_path)
    assert take_invite(tmp_path, hashlib.sha256(b"guess").hexdigest(), NOW) == "unknown"
    assert take_invite(tmp_path, kept.secret_hash, NOW + 1) == "ok"


def test_invites_are_kept_only_as_hashes(tmp_path: Path) -> None:
    tokens = [_invite(tmp_path) for _ in range(3)]
    at_rest = (tmp_path / INVITES_FILE).read_text()
    for token in tokens:
        for form in (
            _b64url(token.secret),
            base64.b64encode(token.secret).decode(),
            token.secret.hex(),
            token.encode(),
        ):
            assert form not in at_rest
        assert token.secret_hash in at_rest
        assert "secret=<hidden>" in repr(token) and _b64url(token.secret) not in repr(token)


def test_a_token_round_trips(tmp_path: Path) -> None:
    token = _invite(tmp_path)
    text = token.encode()
    assert text.startswith("qrm2." + "ab" * 12 + ".")
    parsed = parse_invite("  " + text + "\n")  # pasted with the newline
    assert parsed == token


_MARK = "Zq9Zq9Zq9Zq9"  # in every bad token below: no error message may repeat it


@pytest.mark.parametrize(
    "token, why",
    [
        ("not-a-token-" + _MARK, "has the form qrm2"),
        (f"qrm2.{'ab' * 12}.{_MARK}", "has the form qrm2"),
        (f"qrm2.{_MARK}.{_b64url(bytes(32))}.{_b64url(b'1.2.3.4:5')}", "bad node id"),
        (f"qrm2.{'ab' * 12}.{_MARK}!.{_b64url(b'1.2.3.4:5')}", "damaged"),
        (f"qrm2.{'ab' * 12}.{_b64url(_MARK.encode())}.{_b64url(b'1.2.3.4:5')}", "bad secret"),
        (f"qrm2.{'ab' * 12}.{_b64url(bytes(32))}.{_b64url(('h:1,' * 17 + _MARK).encode())}", "bad addresses"),
        (f"qrm2.{'ab' * 12}.{_b64url(bytes(32))}.{_b64url(bytes([0xFF]) + _MARK.encode())}", "damaged"),
        (f"qrm3.{'ab' * 12}.{_b64url(bytes(32))}.{_MARK}", "has the form qrm2"),
    ],
)
def test_a_bad_token_says_what_is_wrong_without_echoing_it(token: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as caught:
        parse_invite(token)
    assert _MARK not in str(caught.value)


def test_a_token_of_the_shared_secret_days_gets_a_helpful_message() -> None:
    old = f"qrm1.{_b64url(b'home')}.{_b64url(_MARK.encode())}"
    with pytest.raises(ValueError, match=r"shared-secret days.*quorum-node invite") as caught:
        parse_invite(old)
    assert _MARK not in str(caught.value) and _b64url(_MARK.encode()) not in str(caught.value)
