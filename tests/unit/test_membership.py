"""Node identity and cluster membership as stored in the data dir."""

from __future__ import annotations

import stat

import pytest

from quorum_node.cluster.membership import (
    CLUSTER_FILE,
    NODE_ID_FILE,
    Cluster,
    cluster_from_cli,
    init_cluster,
    join_cluster,
    leave_cluster,
    load_cluster,
    load_or_create_node_id,
    parse_join_token,
)
from quorum_node.cluster.signing import ReplayGuard, sign, verify


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_node_id_is_stable_across_restarts(tmp_path):
    data = tmp_path / "quorum"
    first = load_or_create_node_id(data)
    assert first == load_or_create_node_id(data)
    assert first != load_or_create_node_id(tmp_path / "other")


def test_data_dir_is_0700_and_node_id_file_is_0600(tmp_path):
    data = tmp_path / "deep" / "quorum"
    load_or_create_node_id(data)
    assert _mode(data) == 0o700
    assert _mode(data / NODE_ID_FILE) == 0o600


def test_a_corrupt_node_id_is_reported_not_silently_replaced(tmp_path):
    (tmp_path / NODE_ID_FILE).write_text("not a valid id!\n")
    with pytest.raises(ValueError, match="node id"):
        load_or_create_node_id(tmp_path)


def test_secret_file_is_0600_and_survives_a_restart(tmp_path):
    cluster = init_cluster(tmp_path, "home lab")
    assert _mode(tmp_path / CLUSTER_FILE) == 0o600
    assert load_cluster(tmp_path) == cluster
    assert len(cluster.secret) == 32
    # No stray temp files left behind by the atomic write.
    assert sorted(p.name for p in tmp_path.iterdir()) == [CLUSTER_FILE]


def test_no_cluster_yet_loads_as_none(tmp_path):
    assert load_cluster(tmp_path) is None


def test_a_token_from_init_joins_the_same_cluster_fingerprint(tmp_path):
    founder = init_cluster(tmp_path / "a", "home lab")
    joined = join_cluster(tmp_path / "b", founder.join_token())
    assert joined.fingerprint == founder.fingerprint
    assert joined.name == "home lab"
    assert load_cluster(tmp_path / "b").fingerprint == founder.fingerprint
    # And the two can really talk: one signs, the other verifies.
    headers = sign(founder.keys(), method="GET", path="/peer/catalog", body=b"", node_id="a1", to="b1", now=100.0)
    result = verify(joined.keys(), ReplayGuard(), method="GET", path="/peer/catalog", body=b"", headers=headers,
                    self_id="b1", now=100.0)
    assert result.ok


def test_init_refuses_to_overwrite_an_existing_cluster(tmp_path):
    original = init_cluster(tmp_path, "one")
    with pytest.raises(FileExistsError, match="already belongs"):
        init_cluster(tmp_path, "two")
    assert load_cluster(tmp_path) == original
    replaced = init_cluster(tmp_path, "two", force=True)
    assert load_cluster(tmp_path) == replaced != original


def test_joining_another_cluster_needs_force_but_rejoining_the_same_is_fine(tmp_path):
    mine = init_cluster(tmp_path / "me", "mine")
    theirs = init_cluster(tmp_path / "them", "theirs")
    assert join_cluster(tmp_path / "me", mine.join_token()) == mine
    with pytest.raises(FileExistsError):
        join_cluster(tmp_path / "me", theirs.join_token())
    assert join_cluster(tmp_path / "me", theirs.join_token(), force=True) == theirs
    assert load_cluster(tmp_path / "me") == theirs


def test_leaving_forgets_the_cluster(tmp_path):
    init_cluster(tmp_path, "c")
    assert leave_cluster(tmp_path)
    assert load_cluster(tmp_path) is None
    assert not leave_cluster(tmp_path)


def test_the_secret_never_shows_in_repr_or_str():
    cluster = Cluster(name="lab", secret=b"hunter2-hunter2-hunter2")
    for text in (repr(cluster), str(cluster), f"{cluster}", repr(cluster.keys())):
        assert "hunter2" not in text
        assert repr(b"hunter2-hunter2-hunter2") not in text
    assert cluster.fingerprint in repr(cluster)


def test_token_roundtrips_unicode_names_and_ignores_surrounding_whitespace():
    cluster = Cluster(name="Küche · lab", secret=bytes(range(32)))
    token = cluster.join_token()
    assert token.startswith("qrm1.") and "=" not in token
    assert parse_join_token(f"  {token}\n") == cluster


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "three dot-separated parts"),
        ("qrm1.abc", "three dot-separated parts"),
        ("qrm2.bGFi.c2VjcmV0", "must start with 'qrm1.'"),
        ("qrm1.!!!.c2VjcmV0", "name part"),
        ("qrm1.bGFi.c2Vj+mV0", "secret part"),
        ("qrm1.bGFi.", "secret must not be empty"),
        ("qrm1..c2VjcmV0", "cluster name"),
        ("qrm1.__8.c2VjcmV0", "name part"),  # 0xff 0xff is not UTF-8
    ],
)
def test_malformed_tokens_are_rejected_with_a_clear_message(token, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_join_token(token)


def test_a_damaged_token_error_does_not_echo_the_secret():
    with pytest.raises(ValueError) as info:
        parse_join_token("qrm1.bGFi.c2VjcmV0c2VjcmV0*")
    assert "c2VjcmV0" not in str(info.value)


def test_cli_secret_string_gives_the_same_cluster_on_every_node():
    a = cluster_from_cli("lab", "correct horse battery staple")
    b = cluster_from_cli("lab", "correct horse battery staple")
    assert a.fingerprint == b.fingerprint
    assert a.secret == "correct horse battery staple".encode()
    assert a.fingerprint != cluster_from_cli("lab", "other").fingerprint
    with pytest.raises(ValueError):
        cluster_from_cli("lab", "")
    with pytest.raises(ValueError):
        cluster_from_cli("", "x")


def test_a_damaged_cluster_file_is_reported(tmp_path):
    (tmp_path / CLUSTER_FILE).write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="damaged"):
        load_cluster(tmp_path)
