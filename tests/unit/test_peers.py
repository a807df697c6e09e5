"""Peer table and peer choice: which peer a request goes to, and when not."""

from __future__ import annotations

import pytest

from quorum_node.backoff import Backoff
from quorum_node.cluster.peers import (
    CatalogChanged,
    CatalogWanted,
    Outcome,
    PeerAdded,
    PeerDown,
    PeerDraining,
    PeerInfo,
    PeerRemoved,
    PeerState,
    PeerSuspect,
    PeerTable,
    PeerUp,
    ProbeTarget,
)
from quorum_node.cluster.scoring import RetryBudget, pick

MODEL = "llama3.1:8b"
MEMBERS = {"me", "a", "b", "c", "s", "old", "new", "zed", "amy", "kim"}
"""Node ids admitted to this node's cluster; anyone else is a stranger."""


def _info(node_id: str, address: str | None = None, **kw) -> PeerInfo:
    return PeerInfo(
        node_id=node_id,
        name=f"box-{node_id}",
        address=address or f"10.0.0.{len(node_id)}:32768",
        **kw,
    )


def _table(members=MEMBERS, **kw) -> PeerTable:
    return PeerTable(self_id="me", is_member=lambda node_id: node_id in members, **kw)


def _up(table: PeerTable, node_id: str, now: float = 0.0, models=(MODEL,), address=None) -> None:
    table.on_discovered(_info(node_id, address), now)
    table.on_health_ok(node_id, 0.001, now)
    table.on_catalog(node_id, list(models), "d1", now)


def _ids(peers) -> list[str]:
    return [p.node_id for p in peers]


# Discovery and health ----------------------------------------------------


def test_a_discovered_peer_carries_traffic_only_after_a_good_health_check():
    table = _table()
    events = table.on_discovered(_info("a", catalog_digest="d1"), 0)
    assert events == [PeerAdded(node_id="a"), CatalogWanted(node_id="a", address="10.0.0.1:32768")]
    assert table.on_catalog("a", [MODEL], "d1", 0.5) == [CatalogChanged(node_id="a", models=(MODEL,))]
    assert table.get("a").state is PeerState.SUSPECT
    assert table.holders(MODEL, 1) == []
    assert table.on_health_ok("a", 0.002, 1) == [PeerUp(node_id="a")]
    assert _ids(table.holders(MODEL, 1)) == ["a"]


def test_a_crashed_peer_is_marked_down_10s_after_its_last_good_check_and_no_longer_chosen():
    table = _table()
    _up(table, "a", now=100)
    _up(table, "b", now=100)
    for t in (102, 104, 106, 108, 110):
        table.on_health_ok("b", 0.001, t)  # b keeps answering; a crashed after t=100
    assert table.tick(109.9) == [PeerSuspect(node_id="a")]
    assert _ids(table.holders(MODEL, 109.9)) == ["b"]
    assert table.tick(110) == [PeerDown(node_id="a")]
    assert table.get("a").state is PeerState.DOWN
    assert _ids(pick(table.holders(MODEL, 110), 110)) == ["b"]
    assert not table.begin_request("a", 110)


def test_two_failed_checks_make_a_peer_suspect_and_one_good_check_brings_it_back():
    table = _table()
    _up(table, "a")
    assert table.on_health_fail("a", 2) == []
    assert _ids(table.holders(MODEL, 2)) == ["a"]  # one miss under load is forgiven
    assert table.on_health_fail("a", 4) == [PeerSuspect(node_id="a")]
    assert table.holders(MODEL, 4) == []
    assert table.on_health_ok("a", 0.001, 6) == [PeerUp(node_id="a")]
    assert _ids(table.holders(MODEL, 6)) == ["a"]


def test_a_down_peer_comes_back_when_it_answers_again():
    table = _table()
    _up(table, "a")
    table.tick(10)
    assert table.on_health_ok("a", 0.001, 30) == [PeerUp(node_id="a")]
    assert _ids(table.holders(MODEL, 30)) == ["a"]


def test_goodbye_removes_a_peer_at_once():
    table = _table()
    _up(table, "a")
    assert table.on_goodbye("a", 1) == [PeerRemoved(node_id="a", reason="goodbye")]
    assert table.get("a") is None and table.holders(MODEL, 1) == []
    assert table.on_goodbye("a", 1) == []
    # Late events for a peer that left are ignored, not resurrecting it.
    assert table.on_health_ok("a", 0.001, 2) == []
    assert table.get("a") is None


def test_a_draining_peer_finishes_its_requests_takes_no_new_ones_and_its_models_are_unavailable_for_now():
    table = _table()
    _up(table, "a")
    _up(table, "b")
    assert table.begin_request("a", 1)  # in flight when it says it is stopping
    assert table.on_draining("a", 2) == [PeerDraining(node_id="a")]
    assert table.on_draining("a", 2.5) == []  # said again (the relay, a reset stream): nothing new
    assert _ids(table.holders(MODEL, 3)) == ["b"]
    assert not table.begin_request("a", 3)  # a plan made just before is refused too
    table.end_request("a", 3)  # the one in flight ends as usual
    assert table.get("a").in_flight == 0 and table.models() == {MODEL: ["b"]}
    table.on_goodbye("b", 4)  # b had no relay route: gone
    assert table.holders(MODEL, 4) == [] and table.unavailable_for_s(MODEL, 4) == 2.0  # 503, not 404


def test_a_draining_peer_is_back_only_when_a_check_sent_after_it_said_so_answers():
    table = _table()
    _up(table, "a")
    table.on_draining("a", 10.0)
    table.on_health_ok("a", 0.5, 10.2)  # sent at 9.7, before it said it was stopping: answered by the old life
    assert table.get("a").draining and table.holders(MODEL, 10.2) == []
    table.on_health_fail("a", 11)  # while draining it answers nothing new
    table.on_health_ok("a", 0.1, 15.0)  # sent at 14.9: the restarted node
    assert not table.get("a").draining and _ids(table.holders(MODEL, 15)) == ["a"]


def test_goodbye_from_a_peer_the_relay_still_reaches_makes_it_draining_not_gone():
    table = _table()
    _up(table, "a")
    table.on_relay("a", True, 1)
    assert table.on_goodbye("a", 2) == [PeerDraining(node_id="a")]
    peer = table.get("a")
    assert peer.routes == ["relay"] and peer.draining and table.holders(MODEL, 2) == []
    table.on_health_ok("a", 0.01, 3)  # it answers through the relay: only the LAN's records had expired
    assert _ids(table.holders(MODEL, 3)) == ["a"]
    table.on_draining("a", 4)
    table.on_relay("a", False, 5)
    table.on_relay("a", True, 6)  # a new relay connection of it: the drain was its last life's
    assert not table.get("a").draining


def test_a_long_dead_discovered_peer_is_forgotten():
    table = _table(forget_after_s=300)
    _up(table, "a")
    table.tick(10)
    assert table.tick(299) == []
    assert table.tick(300) == [PeerRemoved(node_id="a", reason="forgotten")]
    assert table.all() == []


def test_peers_of_other_clusters_and_this_node_itself_are_ignored():
    table = _table()
    assert table.on_discovered(_info("stranger"), 0) == []
    assert table.on_discovered(_info("me"), 0) == []
    assert table.all() == []


def test_a_non_members_announcement_and_relay_presence_are_ignored():
    table = _table()
    assert table.on_discovered(_info("stranger", catalog_digest="d1"), 0) == []
    assert table.on_relay("stranger", True, 0) == []
    assert table.on_relay("me", True, 0) == []
    # Whatever it answers later, a stranger never becomes a holder or a probe target.
    assert table.on_health_ok("stranger", 0.001, 1) == []
    assert table.on_catalog("stranger", [MODEL], "d1", 1) == []
    assert table.all() == [] and table.holders(MODEL, 1) == []
    assert table.relay_probe_targets() == [] and table.probe_targets() == []
    assert table.refused == 0  # ignored, not refused for lack of room


def test_a_removed_member_is_forgotten_with_its_static_identification():
    members = set(MEMBERS)
    table = _table(members)
    table.add_static("h:1")
    table.on_identified("h:1", _info("s"), 0)
    _up(table, "a")
    table.on_relay("s", True, 0)
    assert table.probe_targets() == [
        ProbeTarget(address="10.0.0.1:32768", node_id="a"),
        ProbeTarget(address="h:1", node_id="s"),
    ]
    members.discard("s")  # removed from the cluster
    assert table.forget("s") == [PeerRemoved(node_id="s", reason="removed")]
    assert _ids(table.all()) == ["a"]
    # Its address is probed again only as an unknown one: whoever answers there must prove membership anew.
    assert table.probe_targets() == [
        ProbeTarget(address="10.0.0.1:32768", node_id="a"),
        ProbeTarget(address="h:1", node_id=None),
    ]
    assert table.relay_probe_targets() == []
    # Its later announcements, relay presence and health answers do not bring it back.
    assert table.on_identified("h:1", _info("s"), 1) == []
    assert table.on_relay("s", True, 1) == []
    assert table.on_health_ok("s", 0.001, 1) == []
    assert _ids(table.all()) == ["a"]
    assert table.forget("s") == []  # forgetting twice is harmless


def test_the_table_holds_at_most_max_peers_and_counts_those_refused():
    table = _table(max_peers=2)
    _up(table, "a")
    _up(table, "b")
    assert table.on_discovered(_info("c"), 1) == []
    assert table.on_relay("c", True, 1) == []
    assert table.refused == 2
    assert _ids(table.all()) == ["a", "b"]
    # Peers already in the table still re-announce freely.
    assert table.on_discovered(_info("a", catalog_digest="d2"), 2) == [
        CatalogWanted(node_id="a", address="10.0.0.1:32768")
    ]
    assert table.refused == 2
    # Once one leaves, there is room again.
    table.on_goodbye("b", 3)
    assert table.on_discovered(_info("c"), 3) == [
        PeerAdded(node_id="c"),
        CatalogWanted(node_id="c", address="10.0.0.1:32768"),
    ]
    assert _ids(table.all()) == ["a", "c"]


def test_a_changed_catalog_digest_asks_for_a_refetch():
    table = _table()
    table.on_discovered(_info("a", catalog_digest="d1"), 0)
    table.on_catalog("a", [MODEL], "d1", 0)
    assert table.on_discovered(_info("a", catalog_digest="d1"), 1) == []
    assert table.on_discovered(_info("a", catalog_digest="d2"), 2) == [
        CatalogWanted(node_id="a", address="10.0.0.1:32768")
    ]
    table.on_health_ok("a", 0.001, 2)
    table.on_catalog("a", ["qwen2.5:7b"], "d2", 3)
    assert table.holders(MODEL, 3) == []
    assert _ids(table.holders("qwen2.5:7b", 3)) == ["a"]
    assert table.models() == {"qwen2.5:7b": ["a"]}


# Static peers ------------------------------------------------------------


def test_a_static_peer_is_probed_by_address_until_identified_and_never_forgotten():
    table = _table()
    table.add_static("192.168.1.50:32768")
    assert table.probe_targets() == [ProbeTarget(address="192.168.1.50:32768", node_id=None)]
    events = table.on_identified("192.168.1.50:32768", _info("s", address="whatever:1"), 0)
    assert PeerAdded(node_id="s") in events
    table.on_health_ok("s", 0.003, 0)
    table.on_catalog("s", [MODEL], "d", 0)
    peer = table.get("s")
    assert peer.static and peer.info.address == "192.168.1.50:32768"
    assert table.probe_targets() == [ProbeTarget(address="192.168.1.50:32768", node_id="s")]
    assert _ids(table.holders(MODEL, 1)) == ["s"]
    table.tick(10_000)
    assert table.get("s").state is PeerState.DOWN  # down, but still there and still probed
    assert table.probe_targets() == [ProbeTarget(address="192.168.1.50:32768", node_id="s")]


def test_a_static_peer_that_says_goodbye_is_found_again_after_restart():
    table = _table()
    table.add_static("h:1")
    table.on_identified("h:1", _info("s"), 0)
    table.on_goodbye("s", 1)
    assert table.probe_targets() == [ProbeTarget(address="h:1", node_id=None)]
    table.on_identified("h:1", _info("s"), 5)
    assert table.on_health_ok("s", 0.001, 5) == [PeerUp(node_id="s")]


def test_a_reinstalled_node_at_a_static_address_replaces_the_old_one():
    table = _table()
    table.add_static("h:1")
    table.on_identified("h:1", _info("old"), 0)
    events = table.on_identified("h:1", _info("new"), 5)
    assert PeerRemoved(node_id="old", reason="replaced") in events
    assert _ids(table.all()) == ["new"]


def test_a_static_address_answering_for_another_cluster_is_not_adopted():
    table = _table()
    table.add_static("h:1")
    assert table.on_identified("h:1", _info("x"), 0) == []
    assert table.all() == []
    assert table.probe_targets() == [ProbeTarget(address="h:1", node_id=None)]


def test_static_peer_address_must_have_a_port():
    with pytest.raises(ValueError, match="HOST:PORT"):
        _table().add_static("just-a-host")


# Requests, breaker and scoring --------------------------------------------


def test_a_peer_that_fails_three_requests_is_skipped_then_probed_with_one_request():
    table = _table()
    _up(table, "a")
    _up(table, "b")
    for _ in range(3):
        assert table.begin_request("a", 1)
        table.end_request("a", 1, Outcome.FAILURE)
    assert _ids(table.holders(MODEL, 2)) == ["b"]
    assert not table.begin_request("a", 2)
    # After the reset timeout one probe may go; a second concurrent one may not.
    assert _ids(table.holders(MODEL, 6)) == ["a", "b"]
    assert table.begin_request("a", 6)
    assert _ids(table.holders(MODEL, 6)) == ["b"]
    assert not table.begin_request("a", 6)
    table.on_first_token("a", 0.2, 6.2)  # the probe worked
    assert _ids(table.holders(MODEL, 6.3)) == ["a", "b"]
    table.end_request("a", 7)
    assert table.get("a").in_flight == 0


def test_a_cancelled_request_neither_trips_nor_heals_the_breaker():
    table = _table()
    _up(table, "a")
    for _ in range(2):
        table.begin_request("a", 0)
        table.end_request("a", 0, Outcome.FAILURE)
    for _ in range(5):
        table.begin_request("a", 0)
        table.end_request("a", 0, Outcome.ABANDONED)
    table.begin_request("a", 0)
    table.end_request("a", 0, Outcome.FAILURE)
    assert table.holders(MODEL, 0) == []


def test_requests_go_to_the_least_loaded_peer_first():
    table = _table()
    for n in ("a", "b", "c"):
        _up(table, n)
    for _ in range(2):
        table.begin_request("a", 1)
    table.begin_request("b", 1)
    assert _ids(pick(table.holders(MODEL, 1), 1)) == ["c", "b", "a"]


def test_a_peer_with_fast_first_tokens_wins_over_a_slow_one():
    table = _table()
    _up(table, "a")
    _up(table, "b")
    table.on_first_token("a", 3.0, 1)
    table.on_first_token("b", 0.1, 1)
    assert _ids(pick(table.holders(MODEL, 2), 2)) == ["b", "a"]


def test_an_old_slow_ttft_is_forgotten_after_a_while():
    table = _table()
    _up(table, "a")
    _up(table, "b")
    table.on_first_token("a", 9.0, 0)  # a was slow once; b was never measured
    assert _ids(pick(table.holders(MODEL, 10), 10)) == ["b", "a"]
    # Minutes later that measurement says nothing about a's load: a and b tie, node id decides.
    assert _ids(pick(table.holders(MODEL, 200), 200)) == ["a", "b"]


def test_equal_peers_are_ordered_by_node_id_so_choice_is_deterministic():
    table = _table()
    for n in ("zed", "amy", "kim"):
        _up(table, n)
    assert _ids(pick(table.holders(MODEL, 1), 1)) == ["amy", "kim", "zed"]


def test_a_peer_that_just_missed_a_health_check_ranks_after_healthy_ones():
    table = _table()
    _up(table, "a")
    _up(table, "b")
    table.on_health_fail("a", 1)
    assert _ids(pick(table.holders(MODEL, 1), 1)) == ["b", "a"]


def test_ewma_smooths_rtt_and_ttft():
    table = _table(ewma_alpha=0.5)
    _up(table, "a")
    table.on_health_ok("a", 0.010, 1)
    assert table.get("a").ewma_rtt_s == pytest.approx(0.0055)
    table.on_first_token("a", 1.0, 1)
    table.on_first_token("a", 3.0, 2)
    assert table.get("a").ewma_ttft_s == pytest.approx(2.0)


# Retry budget and backoff -------------------------------------------------


def test_retries_are_capped_at_a_fifth_of_requests_under_a_failure_storm():
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, max_tokens=20)
    retries = 0
    now = 0.0
    for i in range(10_000):
        now = i * 0.001  # 1000 requests/s for 10 s
        budget.on_request(now)
        if budget.can_retry(now) and budget.on_retry(now):
            retries += 1
    # ≤ 20% of requests + the 1/s floor over 10 s + the initial balance.
    assert retries <= 0.2 * 10_000 + 10 + 1
    assert retries >= 0.2 * 10_000 - 1


def test_a_quiet_node_can_still_retry_thanks_to_the_floor():
    budget = RetryBudget(ratio=0.2, min_per_s=1.0)
    budget.on_request(0)
    assert budget.on_retry(0)
    assert not budget.can_retry(0.1)
    assert budget.can_retry(1.1)


def test_retry_budget_does_not_bank_a_storm_during_calm():
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, max_tokens=5)
    budget.on_request(0)
    budget.on_request(3600)
    allowed = sum(budget.on_retry(3600) for _ in range(100))
    assert allowed == 5


def test_backoff_grows_exponentially_with_bounded_jitter_and_caps():
    low = Backoff(0.1, factor=2, max_s=1.0, jitter=0.5, rand=lambda: 0.999999)
    high = Backoff(0.1, factor=2, max_s=1.0, jitter=0.5, rand=lambda: 0.0)
    assert [high.delay(n) for n in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert low.delay(2) == pytest.approx(0.2, rel=1e-4)  # never below half the step
    assert high.delay(10_000) == 1.0
    assert [high.next_delay() for _ in range(3)] == pytest.approx([0.1, 0.2, 0.4])
    high.reset()
    assert high.next_delay() == pytest.approx(0.1)
