"""Whether to offload now: the pure decision engine.

``step(state, observations, now, behavior)`` takes the previous state, one
observation per metric of the offloadingConfig (evaluated just now) and the
time, and returns the next state with a reason a person can read. No clock, no
I/O: the caller passes ``now`` (seconds, any monotonic origin).

The rules, HPA-style, over ``ratio = current / target`` of each metric:

- **Combine by max.** The workload is *hot* when the largest ratio is above
  ``1 + tolerance``, *cool* when it is below ``1 - tolerance``, and in the band
  otherwise. An unreadable metric (``current is None``) is an unknown term of
  that max: a readable metric above the band still proves "hot" (the max can
  only be higher), but "cool" needs every metric readable and below the band.
  So stale or unknown data never starts an offload on its own, and while
  offloading one unreadable metric keeps it on (nothing proves it cooled down),
  as the HPA blocks scale-down on missing metrics.
- **Sustain.** Offloading turns on once the workload has been hot continuously
  for ``sustain_seconds``; **cooldown**: it turns off once cool continuously
  for ``cooldown_seconds``. A zero window acts on the first observation.
- **Anything else holds.** In the band, or when the metrics cannot show the
  way out of the current state, nothing changes and a pending timer restarts:
  "continuously" means every observation in the window agreed.
- **No metrics** (an empty ``metrics`` list) is a static split: offloading is
  always on, at ``percentage``. The validator warns about such a spec; this is
  how a user asks for "always send 20% elsewhere".
"""

from __future__ import annotations

from dataclasses import dataclass

from crds.model import OffloadingBehavior
from sidecar.interfaces import MetricObservation


@dataclass(frozen=True)
class DecisionState:
    """What the engine remembers between steps."""

    offloading: bool = False
    since: float | None = None  # when the current state began (None: since start)
    pending_since: float | None = None  # when the way out of it first held, if it still does
    reason: str = "no observations yet"


INITIAL = DecisionState()


@dataclass(frozen=True)
class Decision:
    state: DecisionState
    offloading: bool
    reason: str
    changed: bool = False  # this step turned offloading on or off
    ratio: float | None = None  # the largest readable current/target, for display


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f}s"


def _describe(observation: MetricObservation) -> str:
    return f"{observation.metric} {observation.display()}"


def _unavailable(unknown: list[MetricObservation]) -> str:
    parts = [f"{o.metric}: {o.reason or 'no value'}" for o in unknown]
    return "metrics unavailable: " + "; ".join(parts)


def step(
    state: DecisionState,
    observations: list[MetricObservation],
    now: float,
    behavior: OffloadingBehavior,
) -> Decision:
    """The next decision; pure."""
    if not observations:
        reason = f"no metrics configured: static split, always offloading {behavior.percentage}%"
        return _settle(state, True, now, reason)

    readable = [o for o in observations if o.ratio is not None]
    unknown = [o for o in observations if o.ratio is None]
    high = 1 + behavior.tolerance
    low = 1 - behavior.tolerance
    hottest = max(readable, key=lambda o: o.ratio or 0.0, default=None)
    ratio = hottest.ratio if hottest is not None else None

    hot = ratio is not None and ratio > high
    cool = not unknown and ratio is not None and ratio < low

    if not state.offloading:
        if hot:
            assert hottest is not None
            what = f"{_describe(hottest)} above target"
            return _pending(state, now, behavior.sustain_seconds, True, what, "offloading", ratio, unknown)
        if unknown:
            return _hold(state, _unavailable(unknown) + "; not offloading", ratio)
        assert hottest is not None
        where = "below target" if cool else "within tolerance of target"
        return _hold(state, f"{_describe(hottest)} {where}; not offloading", ratio)

    # Offloading: the way out is "cool" for the cooldown window.
    if cool:
        assert hottest is not None
        what = f"{_describe(hottest)} below target"
        return _pending(state, now, behavior.cooldown_seconds, False, what, "back to local", ratio, [])
    if unknown:
        return _hold(
            state, _unavailable(unknown) + "; offloading continues (cannot tell it cooled down)", ratio
        )
    assert hottest is not None
    where = "above target" if hot else "within tolerance of target"
    return _hold(state, f"{_describe(hottest)} {where}; offloading {behavior.percentage}%", ratio)


def _pending(
    state: DecisionState,
    now: float,
    window: float,
    target: bool,
    what: str,
    outcome: str,
    ratio: float | None,
    unknown: list[MetricObservation],
) -> Decision:
    """The way out of the current state holds now: start or continue its window."""
    started = state.pending_since if state.pending_since is not None else now
    held = now - started
    note = f" ({_unavailable(unknown)})" if unknown else ""
    if held >= window:
        return _settle(state, target, now, f"{what} for {_fmt_seconds(held)}{note}", ratio)
    reason = f"{what}; {outcome} in {_fmt_seconds(window - held)} if it stays there{note}"
    new = DecisionState(state.offloading, state.since, started, reason)
    return Decision(new, state.offloading, reason, False, ratio)


def _hold(state: DecisionState, reason: str, ratio: float | None) -> Decision:
    new = DecisionState(state.offloading, state.since, None, reason)
    return Decision(new, state.offloading, reason, False, ratio)


def _settle(
    state: DecisionState, offloading: bool, now: float, reason: str, ratio: float | None = None
) -> Decision:
    changed = offloading != state.offloading
    since = now if changed else state.since
    new = DecisionState(offloading, since, None, reason)
    return Decision(new, offloading, reason, changed, ratio)
