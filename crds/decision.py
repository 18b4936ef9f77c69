"""Whether to offload now: the pure decision engine, shared by the controller and the
standalone sidecar.

``step(state, observations, now, behavior)`` takes the previous state, one
observation per metric of the offloadingConfig (evaluated just now) and the
time, and returns the next state with a stable CamelCase ``code`` and a reason a
person can read. No clock, no I/O: the caller passes ``now`` (seconds on any
clock it keeps using; the controller uses Unix time so that a new leader can
continue from the published ``lastTransitionTime``).

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
- **No metrics** (an absent or empty ``metrics`` list) never offloads, as with the
  Beamlit controller, except while the workload has no ready replica
  (``ready_replicas == 0``): then there is nothing local to serve.
- **A static split** (``behavior.staticSplit: true``, no metrics) is always on, at
  ``percentage``: how a user asks for "always send 20% elsewhere".
"""

from __future__ import annotations

from dataclasses import dataclass

from crds.model import OffloadingBehavior
from crds.observation import MetricObservation

# The stable reason codes (CamelCase, as Kubernetes condition reasons).
ABOVE_TARGET = "AboveTarget"  # hot: offloading (turned on, or staying on)
BELOW_TARGET = "BelowTarget"  # cool: not offloading (turned off, or staying off)
WITHIN_TOLERANCE = "WithinTolerance"  # in the band: nothing changes
METRICS_UNAVAILABLE = "MetricsUnavailable"  # cannot tell: nothing changes
SUSTAIN_PENDING = "SustainPending"  # hot, not yet for sustainSeconds
COOLDOWN_PENDING = "CooldownPending"  # cool while offloading, not yet for cooldownSeconds
NO_METRICS = "NoMetrics"  # no metrics: never offloading (Beamlit)
NO_READY_REPLICAS = "NoReadyReplicas"  # no metrics and no ready replica: offloading
STATIC_SPLIT = "StaticSplit"  # behavior.staticSplit: always offloading
NOT_EVALUATED = "NotEvaluated"  # no step yet
CODES = (
    ABOVE_TARGET,
    BELOW_TARGET,
    WITHIN_TOLERANCE,
    METRICS_UNAVAILABLE,
    SUSTAIN_PENDING,
    COOLDOWN_PENDING,
    NO_METRICS,
    NO_READY_REPLICAS,
    STATIC_SPLIT,
    NOT_EVALUATED,
)


@dataclass(frozen=True)
class DecisionState:
    """What the engine remembers between steps."""

    offloading: bool = False
    since: float | None = None  # when the current state began (None: since start)
    pending_since: float | None = None  # when the way out of it first held, if it still does
    reason: str = "no observations yet"
    code: str = NOT_EVALUATED


INITIAL = DecisionState()


@dataclass(frozen=True)
class Decision:
    state: DecisionState
    offloading: bool
    reason: str
    changed: bool = False  # this step turned offloading on or off
    ratio: float | None = None  # the largest readable current/target, for display
    code: str = NOT_EVALUATED  # one of CODES
    deciding: MetricObservation | None = None  # the metric the decision rests on (the hottest)


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
    *,
    ready_replicas: int | None = None,
) -> Decision:
    """The next decision; pure.

    ``ready_replicas`` (the workload's ready pods, None when unknown, as in the
    standalone sidecar) matters only without metrics: 0 turns offloading on.
    """
    if behavior.static_split:
        reason = f"static split (behavior.staticSplit): always offloading {behavior.percentage}%"
        return _settle(state, True, now, reason, STATIC_SPLIT)
    if not observations:
        if ready_replicas == 0:
            reason = f"no metrics configured and no ready replica: offloading {behavior.percentage}%"
            return _settle(state, True, now, reason, NO_READY_REPLICAS)
        reason = "no metrics configured: never offloading (behavior.staticSplit: true offloads at all times)"
        return _settle(state, False, now, reason, NO_METRICS)

    readable = [o for o in observations if o.ratio is not None]
    unknown = [o for o in observations if o.ratio is None]
    high = 1 + behavior.tolerance
    low = 1 - behavior.tolerance
    hottest = max(readable, key=lambda o: o.ratio or 0.0, default=None)
    ratio = hottest.ratio if hottest is not None else None
    deciding = hottest if hottest is not None else observations[0]

    hot = ratio is not None and ratio > high
    cool = not unknown and ratio is not None and ratio < low

    if not state.offloading:
        if hot:
            assert hottest is not None
            what = f"{_describe(hottest)} above target"
            return _pending(state, now, behavior.sustain_seconds, True, what, "offloading", deciding, unknown)
        if unknown:
            return _hold(state, _unavailable(unknown) + "; not offloading", deciding, METRICS_UNAVAILABLE)
        assert hottest is not None
        if cool:
            return _hold(state, f"{_describe(hottest)} below target; not offloading", deciding, BELOW_TARGET)
        reason = f"{_describe(hottest)} within tolerance of target; not offloading"
        return _hold(state, reason, deciding, WITHIN_TOLERANCE)

    # Offloading: the way out is "cool" for the cooldown window.
    if cool:
        assert hottest is not None
        what = f"{_describe(hottest)} below target"
        return _pending(state, now, behavior.cooldown_seconds, False, what, "back to local", deciding, [])
    if unknown:
        reason = _unavailable(unknown) + "; offloading continues (cannot tell it cooled down)"
        return _hold(state, reason, deciding, METRICS_UNAVAILABLE)
    assert hottest is not None
    if hot:
        reason = f"{_describe(hottest)} above target; offloading {behavior.percentage}%"
        return _hold(state, reason, deciding, ABOVE_TARGET)
    reason = f"{_describe(hottest)} within tolerance of target; offloading {behavior.percentage}%"
    return _hold(state, reason, deciding, WITHIN_TOLERANCE)


def _pending(
    state: DecisionState,
    now: float,
    window: float,
    target: bool,
    what: str,
    outcome: str,
    deciding: MetricObservation,
    unknown: list[MetricObservation],
) -> Decision:
    """The way out of the current state holds now: start or continue its window."""
    started = state.pending_since if state.pending_since is not None else now
    held = now - started
    note = f" ({_unavailable(unknown)})" if unknown else ""
    settled = ABOVE_TARGET if target else BELOW_TARGET
    if held >= window:
        return _settle(state, target, now, f"{what} for {_fmt_seconds(held)}{note}", settled, deciding)
    reason = f"{what}; {outcome} in {_fmt_seconds(window - held)} if it stays there{note}"
    code = SUSTAIN_PENDING if target else COOLDOWN_PENDING
    new = DecisionState(state.offloading, state.since, started, reason, code)
    return Decision(new, state.offloading, reason, False, deciding.ratio, code, deciding)


def _hold(state: DecisionState, reason: str, deciding: MetricObservation, code: str) -> Decision:
    new = DecisionState(state.offloading, state.since, None, reason, code)
    return Decision(new, state.offloading, reason, False, deciding.ratio, code, deciding)


def _settle(
    state: DecisionState,
    offloading: bool,
    now: float,
    reason: str,
    code: str,
    deciding: MetricObservation | None = None,
) -> Decision:
    changed = offloading != state.offloading
    since = now if changed else state.since
    new = DecisionState(offloading, since, None, reason, code)
    ratio = deciding.ratio if deciding is not None else None
    return Decision(new, offloading, reason, changed, ratio, code, deciding)
