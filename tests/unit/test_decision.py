"""The decision engine, rule by rule, driven by a clock the test holds.

Each case is a timeline: at time t the metrics read so (a ratio per metric,
None = unreadable), and the engine must then be offloading or not, with a
reason that says why.
"""

from __future__ import annotations

import pytest

from crds.decision import INITIAL, Decision, DecisionState, step
from crds.model import OffloadingBehavior
from crds.observation import MetricObservation

CPU = "resource cpu on pods (as a percentage of request)"
QUEUE = '"queue_depth" on pods'

BEHAVIOR = OffloadingBehavior(percentage=50, sustain_seconds=30, cooldown_seconds=60, tolerance=0.1)


def cpu(percent: float | None, target: float = 50, reason: str = "") -> MetricObservation:
    return MetricObservation(CPU, percent, target, reason, unit="percent")


def queue(value: float | None, target: float = 10, reason: str = "") -> MetricObservation:
    return MetricObservation(QUEUE, value, target, reason)


def run(timeline, behavior=BEHAVIOR, state: DecisionState = INITIAL) -> list[Decision]:
    decisions = []
    for now, observations in timeline:
        decision = step(state, observations, now, behavior)
        state = decision.state
        decisions.append(decision)
    return decisions


def offloading_at(decisions: list[Decision]) -> list[bool]:
    return [d.offloading for d in decisions]


def every(seconds: float, start: float, end: float, observations) -> list:
    out, t = [], start
    while t <= end:
        out.append((t, observations))
        t += seconds
    return out


HOT = [cpu(80)]  # ratio 1.6
WARM = [cpu(52)]  # ratio 1.04, within the 10% band
COOL = [cpu(20)]  # ratio 0.4
JUST_ABOVE = [cpu(55.5)]  # ratio 1.11
AT_HIGH_EDGE = [cpu(55)]  # ratio 1.1: not above 1 + tolerance
AT_LOW_EDGE = [cpu(45)]  # ratio 0.9: not below 1 - tolerance


# --- turning on ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "timeline", "expected"),
    [
        ("hot for less than the sustain window stays off", [(0, HOT), (29, HOT)], [False, False]),
        (
            "hot for exactly the sustain window turns on",
            [(0, HOT), (15, HOT), (30, HOT)],
            [False, False, True],
        ),
        (
            "a cool sample in between restarts the window",
            [(0, HOT), (20, COOL), (25, HOT), (50, HOT), (55, HOT)],
            [False, False, False, False, True],
        ),
        (
            "a sample within the band in between restarts the window",
            [(0, HOT), (20, WARM), (25, HOT), (54, HOT), (55, HOT)],
            [False, False, False, False, True],
        ),
        ("just above the band counts as hot", [(0, JUST_ABOVE), (30, JUST_ABOVE)], [False, True]),
        (
            "on the upper edge of the band is not hot",
            [(0, AT_HIGH_EDGE), (100, AT_HIGH_EDGE)],
            [False, False],
        ),
        (
            "an unreadable metric never starts an offload",
            [(0, [cpu(None, reason="no samples")]), (100, [cpu(None, reason="no samples")])],
            [False, False],
        ),
        (
            "an unreadable sample breaks the sustain window",
            [(0, HOT), (20, [cpu(None)]), (31, HOT), (60, HOT), (61, HOT)],
            [False, False, False, False, True],
        ),
        (
            "metrics combine by max: one hot metric of two is enough",
            [(0, [cpu(20), queue(30)]), (30, [cpu(20), queue(30)])],
            [False, True],
        ),
        (
            "a hot readable metric beside an unreadable one still proves hot",
            [(0, [cpu(80), queue(None)]), (30, [cpu(80), queue(None)])],
            [False, True],
        ),
    ],
)
def test_turning_on(name, timeline, expected):
    assert offloading_at(run(timeline)) == expected, name


def test_a_zero_sustain_window_turns_on_at_the_first_hot_sample():
    behavior = OffloadingBehavior(percentage=50, sustain_seconds=0, cooldown_seconds=60)
    decisions = run([(0, WARM), (1, HOT)], behavior)
    assert offloading_at(decisions) == [False, True]
    assert decisions[1].changed


# --- turning off -----------------------------------------------------------------------


def on_at_zero() -> DecisionState:
    """A state that started offloading at t=0."""
    behavior = OffloadingBehavior(percentage=50, sustain_seconds=0, cooldown_seconds=60)
    decision = step(INITIAL, HOT, 0, behavior)
    assert decision.offloading
    return decision.state


@pytest.mark.parametrize(
    ("name", "timeline", "expected"),
    [
        ("cool for less than the cooldown window stays on", [(10, COOL), (69, COOL)], [True, True]),
        (
            "cool for exactly the cooldown window turns off",
            [(10, COOL), (40, COOL), (70, COOL)],
            [True, True, False],
        ),
        (
            "a hot sample in between restarts the cooldown",
            [(10, COOL), (50, HOT), (60, COOL), (119, COOL), (120, COOL)],
            [True, True, True, True, False],
        ),
        (
            "within the band it stays on and the cooldown restarts",
            [(10, COOL), (50, WARM), (60, COOL), (120, COOL)],
            [True, True, True, False],
        ),
        ("on the lower edge of the band is not cool", [(10, AT_LOW_EDGE), (500, AT_LOW_EDGE)], [True, True]),
        ("an unreadable metric keeps it on", [(10, [cpu(None)]), (500, [cpu(None)])], [True, True]),
        (
            "one unreadable metric of two keeps it on, however cool the other",
            [(10, [cpu(10), queue(None)]), (500, [cpu(10), queue(None)])],
            [True, True],
        ),
        (
            "an unreadable sample breaks the cooldown window",
            [(10, COOL), (60, [cpu(None)]), (61, COOL), (120, COOL), (121, COOL)],
            [True, True, True, True, False],
        ),
        (
            "every metric must be cool: one warm metric keeps it on",
            [(10, [cpu(10), queue(10.5)]), (500, [cpu(10), queue(10.5)])],
            [True, True],
        ),
        (
            "every metric cool turns it off",
            [(10, [cpu(10), queue(2)]), (70, [cpu(10), queue(2)])],
            [True, False],
        ),
    ],
)
def test_turning_off(name, timeline, expected):
    assert offloading_at(run(timeline, state=on_at_zero())) == expected, name


def test_it_turns_on_and_off_again_over_a_load_cycle():
    timeline = every(5, 0, 100, HOT) + every(5, 105, 300, COOL) + every(5, 305, 400, HOT)
    decisions = run(timeline)
    changes = [(t, d.offloading) for (t, _), d in zip(timeline, decisions) if d.changed]
    assert changes == [(30, True), (165, False), (335, True)]


# --- no metrics (Beamlit: never), no ready replica, the static split -------------------------


def test_no_metrics_never_offloads():
    decisions = run([(0, []), (1, []), (1000, [])])
    assert offloading_at(decisions) == [False, False, False]
    assert [d.code for d in decisions] == ["NoMetrics"] * 3
    assert "never offloading" in decisions[0].reason and "staticSplit" in decisions[0].reason


def test_removing_the_metrics_while_offloading_stops_at_once():
    decisions = run([(10, [])], state=on_at_zero())
    assert offloading_at(decisions) == [False] and decisions[0].changed


def test_no_metrics_and_no_ready_replica_offloads_until_one_is_ready():
    state, out = INITIAL, []
    for now, ready in ((0, 2), (5, 0), (6, 0), (7, 1), (8, None)):
        decision = step(state, [], now, BEHAVIOR, ready_replicas=ready)
        state = decision.state
        out.append((decision.offloading, decision.code, decision.changed))
    assert out == [
        (False, "NoMetrics", False),
        (True, "NoReadyReplicas", True),
        (True, "NoReadyReplicas", False),
        (False, "NoMetrics", True),
        (False, "NoMetrics", False),  # unknown (standalone): not offloading
    ]


def test_a_ready_replica_count_does_not_change_a_decision_over_metrics():
    assert not step(INITIAL, COOL, 0, BEHAVIOR, ready_replicas=0).offloading


def test_the_static_split_is_always_on():
    behavior = OffloadingBehavior(percentage=20, static_split=True)
    decisions = run([(0, []), (1, []), (1000, [])], behavior)
    assert offloading_at(decisions) == [True, True, True]
    assert [d.changed for d in decisions] == [True, False, False]
    assert [d.code for d in decisions] == ["StaticSplit"] * 3
    assert "static split" in decisions[0].reason and "20%" in decisions[0].reason


# --- the state and its reasons ---------------------------------------------------------


def test_since_is_when_the_state_began_and_survives_holding_steps():
    decisions = run([(0, HOT), (30, HOT), (40, WARM), (50, HOT)])
    assert [d.state.since for d in decisions] == [None, 30, 30, 30]


def test_the_pending_timer_is_visible_in_the_state_and_cleared_on_a_hold():
    decisions = run([(0, HOT), (10, HOT), (12, WARM)])
    assert [d.state.pending_since for d in decisions] == [0, 0, None]


def test_the_ratio_is_the_largest_readable_one():
    (decision,) = run([(0, [cpu(25), queue(15), MetricObservation("x", None, 1)])])
    assert decision.ratio == pytest.approx(1.5)
    (decision,) = run([(0, [cpu(None)])])
    assert decision.ratio is None


@pytest.mark.parametrize(
    ("timeline", "state", "fragments"),
    [
        ([(0, HOT)], INITIAL, [CPU, "80%/50%", "above target", "offloading in 30s"]),
        ([(0, HOT), (18, HOT)], INITIAL, ["above target", "offloading in 12s"]),
        ([(0, HOT), (30, HOT)], INITIAL, ["80%/50%", "above target for 30s"]),
        ([(0, WARM)], INITIAL, ["52%/50%", "within tolerance", "not offloading"]),
        ([(0, COOL)], INITIAL, ["20%/50%", "below target", "not offloading"]),
        (
            [(0, [cpu(None, reason="no pods have samples")])],
            INITIAL,
            ["metrics unavailable", CPU, "no pods have samples", "not offloading"],
        ),
        ([(10, COOL)], None, ["20%/50%", "below target", "back to local in 60s"]),
        ([(10, COOL), (70, COOL)], None, ["below target for 60s"]),
        (
            [(10, [cpu(None, reason="metrics API down")])],
            None,
            ["metrics unavailable", "metrics API down", "cannot tell it cooled down"],
        ),
        ([(10, HOT)], None, ["above target", "offloading 50%"]),
        (
            [(0, [cpu(80), queue(None, reason="no such metric")])],
            INITIAL,
            ["above target", "offloading in 30s", "metrics unavailable", "no such metric"],
        ),
    ],
)
def test_every_state_has_a_reason_that_says_why(timeline, state, fragments):
    decisions = run(timeline, state=state if state is not None else on_at_zero())
    reason = decisions[-1].reason
    assert reason == decisions[-1].state.reason
    for fragment in fragments:
        assert fragment in reason, (fragment, reason)


def test_a_changed_behavior_applies_to_a_pending_window_at_once():
    # The user shortens sustainSeconds while the workload is already hot.
    state = run([(0, HOT), (10, HOT)])[-1].state
    shorter = OffloadingBehavior(percentage=50, sustain_seconds=10, cooldown_seconds=60)
    assert step(state, HOT, 11, shorter).offloading


@pytest.mark.parametrize(
    ("timeline", "state", "code"),
    [
        ([(0, HOT)], INITIAL, "SustainPending"),
        ([(0, HOT), (30, HOT)], INITIAL, "AboveTarget"),
        ([(0, WARM)], INITIAL, "WithinTolerance"),
        ([(0, COOL)], INITIAL, "BelowTarget"),
        ([(0, [cpu(None)])], INITIAL, "MetricsUnavailable"),
        ([(0, [cpu(20), queue(None)])], INITIAL, "MetricsUnavailable"),
        ([(10, COOL)], None, "CooldownPending"),
        ([(10, COOL), (70, COOL)], None, "BelowTarget"),
        ([(10, HOT)], None, "AboveTarget"),
        ([(10, WARM)], None, "WithinTolerance"),
        ([(10, [cpu(None)])], None, "MetricsUnavailable"),
    ],
)
def test_every_decision_has_a_stable_code(timeline, state, code):
    decisions = run(timeline, state=state if state is not None else on_at_zero())
    assert decisions[-1].code == code
    assert decisions[-1].state.code == code


def test_the_deciding_metric_is_the_hottest_readable_one():
    (decision,) = run([(0, [cpu(25), queue(15), MetricObservation("x", None, 1)])])
    assert decision.deciding is not None and decision.deciding.metric == QUEUE
    (decision,) = run([(0, [cpu(None), queue(None)])])
    assert decision.deciding is not None and decision.deciding.metric == CPU  # the first, unknown
