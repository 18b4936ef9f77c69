"""The remote's circuit breaker, driven by a clock the test holds."""

from __future__ import annotations

import pytest

from sidecar.proxy.breaker import BreakerSettings, CircuitBreaker


def tripped(threshold=3, backoff=1.0, max_backoff=8.0, at=0.0):
    breaker = CircuitBreaker(
        BreakerSettings(failure_threshold=threshold, backoff_seconds=backoff, max_backoff_seconds=max_backoff)
    )
    for _ in range(threshold):
        breaker.record_failure(at)
    return breaker


def test_closed_allows_everything_and_failures_below_the_threshold_keep_it_closed():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=3))
    breaker.record_failure(0)
    breaker.record_failure(0)
    assert breaker.state == "closed"
    assert all(breaker.allow(t) for t in range(10))


def test_a_success_resets_the_consecutive_count():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=3))
    for _ in range(2):
        breaker.record_failure(0)
    breaker.record_success(0)
    for _ in range(2):
        breaker.record_failure(0)
    assert breaker.state == "closed"


def test_n_consecutive_failures_open_it_and_nothing_passes_until_the_backoff():
    breaker = tripped(threshold=3, backoff=1.0, at=10.0)
    assert breaker.state == "open"
    assert not breaker.allow(10.0)
    assert not breaker.allow(10.99)


def test_after_the_backoff_exactly_one_probe_passes():
    breaker = tripped(backoff=1.0, at=0.0)
    assert breaker.allow(1.0)
    assert breaker.state == "half_open"
    assert not breaker.allow(1.0)
    assert not breaker.allow(1.5)


def test_a_successful_probe_closes_it():
    breaker = tripped(at=0.0)
    assert breaker.allow(1.0)
    breaker.record_success(1.1)
    assert breaker.state == "closed"
    assert breaker.allow(1.2) and breaker.allow(1.2)


def test_a_failed_probe_reopens_with_a_doubled_backoff_capped_at_the_maximum():
    breaker = tripped(backoff=1.0, max_backoff=3.0, at=0.0)
    waits = []
    now = 0.0
    for _ in range(4):
        start = now
        while not breaker.allow(now):
            now += 0.25
        waits.append(now - start)
        breaker.record_failure(now)
    assert waits == [1.0, 2.0, 3.0, 3.0]


def test_a_probe_whose_outcome_never_comes_is_replaced_after_the_backoff():
    breaker = tripped(backoff=1.0, at=0.0)
    assert breaker.allow(1.0)  # the probe's client went away: no outcome recorded
    assert not breaker.allow(1.9)
    assert breaker.allow(2.0)


def test_a_success_after_recovery_restores_the_initial_backoff():
    breaker = tripped(backoff=1.0, at=0.0)
    breaker.allow(1.0)
    breaker.record_failure(1.0)  # backoff now 2
    breaker.allow(3.0)
    breaker.record_success(3.0)
    for _ in range(3):
        breaker.record_failure(4.0)
    assert not breaker.allow(4.9)
    assert breaker.allow(5.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"failure_threshold": 0}, {"backoff_seconds": 0}, {"backoff_seconds": 5, "max_backoff_seconds": 1}],
)
def test_nonsense_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        BreakerSettings(**kwargs)


def test_a_last_resort_request_passes_an_open_breaker_and_closes_it_on_success():
    breaker = tripped(backoff=30.0, max_backoff=30.0, at=0.0)
    assert not breaker.allow(1.0)
    breaker.probe(1.0)  # the local model failed this request: the remote is all that is left
    assert breaker.state == "half_open"
    assert not breaker.allow(1.0)  # it is the probe: no other request goes along
    breaker.record_success(1.2)
    assert breaker.state == "closed" and breaker.allow(1.3)


def test_a_failed_last_resort_counts_as_a_failed_probe():
    breaker = tripped(backoff=1.0, max_backoff=8.0, at=0.0)
    breaker.probe(0.5)
    breaker.record_failure(0.6)
    assert breaker.state == "open"
    assert not breaker.allow(2.5) and breaker.allow(2.6)  # backoff doubled to 2 s from 0.6


def test_a_last_resort_while_closed_or_probing_changes_nothing():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=3))
    breaker.probe(0.0)
    assert breaker.state == "closed"
    probing = tripped(backoff=1.0, at=0.0)
    assert probing.allow(1.0)
    probing.probe(1.5)
    assert probing.state == "half_open" and probing.retry_at == 2.0


def test_retry_after_opens_it_at_once_for_that_long_capped_at_the_maximum_backoff():
    breaker = CircuitBreaker(
        BreakerSettings(failure_threshold=5, backoff_seconds=1.0, max_backoff_seconds=30.0)
    )
    breaker.hold(10.0, 7.0)
    assert breaker.state == "open"
    assert not breaker.allow(16.9) and breaker.allow(17.0)
    breaker.record_success(17.1)
    breaker.hold(20.0, 3600.0)
    assert not breaker.allow(49.9) and breaker.allow(50.0)


def test_retry_after_never_shortens_a_wait_already_running_and_keeps_the_probe_backoff():
    breaker = tripped(backoff=8.0, max_backoff=30.0, at=0.0)
    breaker.hold(1.0, 2.0)  # ends at 3.0, before the breaker's own 8.0
    assert not breaker.allow(7.9) and breaker.allow(8.0)
    breaker.record_failure(8.1)  # a failed probe still doubles from the old backoff
    assert not breaker.allow(24.0) and breaker.allow(24.1)
    later = tripped(backoff=1.0, at=0.0)
    later.hold(0.5, 0.0)  # Retry-After: 0 asks for no wait: the running one stays
    assert not later.allow(0.9) and later.allow(1.0)
