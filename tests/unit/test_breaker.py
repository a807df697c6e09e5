"""Circuit breaker: a failing upstream stops getting traffic, then is probed."""

from __future__ import annotations

from quorum_node.breaker import BreakerState, CircuitBreaker


def _open(breaker: CircuitBreaker, now: float = 0.0) -> None:
    for _ in range(breaker.failure_threshold):
        assert breaker.allow(now)
        breaker.on_failure(now)
    assert breaker.state(now) is BreakerState.OPEN


def test_three_failures_in_a_row_stop_traffic():
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=5)
    breaker.on_failure(0)
    breaker.on_failure(0)
    assert breaker.allow(0)
    breaker.on_failure(0)
    assert not breaker.allow(1)
    assert not breaker.available(4.9)


def test_a_success_between_failures_resets_the_count():
    breaker = CircuitBreaker(failure_threshold=3)
    for _ in range(5):
        breaker.on_failure(0)
        breaker.on_failure(0)
        breaker.on_success(0)
    assert breaker.state(0) is BreakerState.CLOSED


def test_after_the_reset_timeout_exactly_one_probe_goes_through():
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=5)
    _open(breaker)
    assert breaker.state(5) is BreakerState.HALF_OPEN
    assert breaker.available(5)
    assert breaker.allow(5)
    assert not breaker.available(5.1)
    assert not breaker.allow(5.1)
    breaker.on_success(6)
    assert breaker.state(6) is BreakerState.CLOSED
    assert breaker.allow(6) and breaker.allow(6)


def test_available_does_not_take_the_probe_slot():
    breaker = CircuitBreaker(reset_after_s=5)
    _open(breaker)
    for _ in range(3):
        assert breaker.available(5)
    assert breaker.allow(5)


def test_a_failed_probe_reopens_with_a_growing_capped_timeout():
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=5, max_reset_after_s=12, backoff_factor=2)
    _open(breaker)
    assert breaker.allow(5)
    breaker.on_failure(5)
    assert breaker.state(5) is BreakerState.OPEN
    assert not breaker.allow(14.9)  # 5 + 10
    assert breaker.allow(15)
    breaker.on_failure(15)
    assert breaker.reset_after_s == 12  # 20 capped at 12
    assert not breaker.allow(26.9)
    assert breaker.allow(27)
    breaker.on_success(27)
    # Once healthy again, the next outage starts from the base timeout.
    _open(breaker, 100)
    assert breaker.allow(105)


def test_an_abandoned_probe_gives_its_slot_back():
    breaker = CircuitBreaker(reset_after_s=5)
    _open(breaker)
    assert breaker.allow(5)
    breaker.release(5.5)
    assert breaker.allow(6)


def test_a_probe_that_never_reports_back_does_not_wedge_the_breaker():
    breaker = CircuitBreaker(reset_after_s=5, probe_timeout_s=30)
    _open(breaker)
    assert breaker.allow(5)
    assert not breaker.allow(34)
    assert breaker.allow(35)


def test_late_results_from_before_the_trip_do_not_change_an_open_breaker():
    breaker = CircuitBreaker(reset_after_s=5)
    _open(breaker)
    breaker.on_success(1)
    assert not breaker.allow(1)
    breaker.on_failure(4)
    assert breaker.allow(5)  # timeout not extended by the straggler
