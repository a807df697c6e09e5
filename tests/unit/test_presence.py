"""Presence in the peer table: online since (reset by a spell down), and the load a peer tells."""

from __future__ import annotations

import msgspec
import pytest

from quorum_node.cluster.messages import EngineLoad, NodeLoad, decode_identity
from quorum_node.cluster.peers import PeerInfo, PeerState, PeerTable


def table() -> PeerTable:
    t = PeerTable(self_id="me", is_member=lambda node_id: node_id == "a", down_after_s=10.0, suspect_after_s=5.0)
    t.on_discovered(PeerInfo(node_id="a", name="alpha", address="127.0.0.1:1"), 0.0)
    return t


def test_online_since_is_the_first_good_check_and_survives_a_suspect_spell() -> None:
    t = table()
    peer = t.get("a")
    assert peer is not None and peer.up_since is None  # seen, not yet confirmed: not online
    t.on_health_ok("a", 0.001, 2.0)
    assert peer.up_since == 2.0
    t.on_health_ok("a", 0.001, 3.0)
    assert peer.up_since == 2.0  # later checks do not move it
    t.tick(9.0)  # 6 s without a good check: suspect, still the same stay
    assert peer.state is PeerState.SUSPECT
    t.on_health_ok("a", 0.001, 9.5)
    assert peer.state is PeerState.UP and peer.up_since == 2.0


def test_online_since_resets_when_the_peer_went_down_and_came_back() -> None:
    t = table()
    peer = t.get("a")
    assert peer is not None
    t.on_health_ok("a", 0.001, 1.0, NodeLoad(in_flight=3))
    assert peer.load is not None and peer.load.in_flight == 3
    t.tick(12.0)
    assert peer.state is PeerState.DOWN
    assert peer.up_since is None and peer.load is None  # a down peer's last load is not its load now
    t.on_health_ok("a", 0.001, 40.0, NodeLoad(in_flight=0))
    assert peer.state is PeerState.UP and peer.up_since == 40.0


def test_health_answer_load_is_typed_and_optional() -> None:
    old = decode_identity(b'{"node_id": "a", "name": "alpha", "proto": 2}')
    assert old.load is None  # a peer from before presence
    new = decode_identity(
        b'{"node_id": "a", "load": {"in_flight": 2, "engines": [{"name": "e", "kind": "ollama",'
        b' "state": "ready", "load": 1, "models": 4, "future": true}], "future": 1}}'
    )
    assert new.load == NodeLoad(
        in_flight=2, engines=[EngineLoad(name="e", kind="ollama", state="ready", load=1, models=4)]
    )


@pytest.mark.parametrize(
    "load",
    [
        b'{"in_flight": -1}',
        b'{"in_flight": "2"}',
        b'{"in_flight": 1e30}',
        b"[1]",
        b'"busy"',
        b'{"engines": [{"name": "' + b"x" * 300 + b'"}]}',
        b'{"engines": [' + b",".join([b"{}"] * 300) + b"]}",
    ],
)
def test_a_malformed_load_fails_the_health_check(load: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_identity(b'{"node_id": "a", "load": ' + load + b"}")
