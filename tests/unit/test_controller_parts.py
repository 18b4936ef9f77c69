"""Leader election's rule, the work queue and condition bookkeeping: pure, with fake clocks."""

from __future__ import annotations

import pytest

from webhook.controller.conditions import Condition, merge, transitions
from webhook.controller.leader import Observed, Timing, decide
from webhook.controller.workqueue import WorkQueue

T = Timing(lease_duration=15, renew_deadline=10, retry_period=2)


@pytest.mark.parametrize(
    ("observed", "now", "action"),
    [
        (None, 0, "acquire"),
        (Observed("", ("", None, 1), 0), 0, "acquire"),  # released
        (Observed("me", ("me", "t", 15), 0), 100, "renew"),
        (Observed("other", ("other", "t", 15), 10), 24.9, "wait"),
        (Observed("other", ("other", "t", 15), 10), 25, "acquire"),  # not renewed for 15 s, our clock
        # The holder's duration counts, not ours: --release-all holds it for an hour.
        (Observed("release", ("release", "t", 3600), 10), 25, "wait"),
        (Observed("release", ("release", "t", 3600), 10), 3610, "acquire"),
    ],
)
def test_leader_election_rule(observed, now, action):
    assert decide(observed, "me", now, T) == action


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_key_is_queued_once_and_requeued_when_added_during_processing():
    q = WorkQueue(FakeClock())
    q.add("a")
    q.add("a")
    assert len(q) == 1
    assert q.get(timeout=0) == "a"
    q.add("a")  # while processing: handed out again after done
    assert q.get(timeout=0) is None
    q.done("a")
    assert q.get(timeout=0) == "a"


def test_add_after_waits_for_the_clock():
    clock = FakeClock()
    q = WorkQueue(clock)
    q.add_after("a", 5)
    assert q.get(timeout=0) is None
    clock.now = 5
    assert q.get(timeout=0) == "a"


def test_closed_queue_returns_none():
    q = WorkQueue(FakeClock())
    q.close()
    assert q.get() is None


def test_last_transition_time_moves_only_when_status_changes():
    first = merge(None, [Condition("Ready", True, "Ready", "ok")], generation=1, now="t1")
    same = merge(first, [Condition("Ready", True, "Ready", "still ok")], generation=2, now="t2")
    flipped = merge(same, [Condition("Ready", False, "Broken", "no")], generation=2, now="t3")
    assert first[0]["lastTransitionTime"] == "t1"
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "t3"


def test_conditions_are_written_in_a_stable_order():
    out = merge(
        None,
        [Condition("Offloading", False, "x", ""), Condition("Ready", True, "y", "")],
        generation=1,
        now="t",
    )
    assert [c["type"] for c in out] == ["Ready", "Offloading"]


def test_transitions_are_status_or_reason_changes():
    before = merge(None, [Condition("Ready", False, "A", "m")], generation=1, now="t")
    assert transitions(before, [Condition("Ready", False, "A", "other message")]) == []
    assert transitions(before, [Condition("Ready", False, "B", "m")])[0].reason == "B"
