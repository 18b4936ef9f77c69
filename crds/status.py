"""The offloading decision as published in a ModelDeployment's status, read back.

The controller writes it (``webhook/controller/evaluation.py: decision_status``)::

    status:
      observedGeneration: 3
      offloading: true
      offloadingStatus: true              # the Beamlit controller's name for the same
      utilization: 72%/50%
      decision:
        reason: AboveTarget               # crds.decision.CODES
        message: resource cpu on pods ... above target for 30s
        lastTransitionTime: "2025-06-01T12:00:00Z"
        lastEvaluationTime: "2025-06-01T12:03:15Z"
        evaluationPeriodSeconds: 15
        metrics: [{name, type, current: "72%" | null, target: "50%", ratio: 1.44 | null, message}]

and the sidecars and a new leader read it with :meth:`PublishedDecision.from_status`.
Pure: no clock (``now`` is passed), never raises on a malformed status (a field of the
wrong type reads as absent).

**Staleness.** A decision not re-evaluated for :func:`stale_after_seconds` (4 periods,
at least 60 s) is stale: the controller is down or cannot read the metrics API. It still
stands (nothing proves the load changed); readers say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from crds.observation import MetricObservation
from crds.quantity import parse_quantity

STALE_PERIODS = 4
STALE_MIN_SECONDS = 60.0


def stale_after_seconds(period_seconds: float | None) -> float:
    """How old a published decision may be before it is stale: max(4 periods, 60 s)."""
    return max(STALE_PERIODS * (period_seconds or 0.0), STALE_MIN_SECONDS)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC to the second, as Kubernetes writes metav1.Time."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any) -> datetime | None:
    """An RFC 3339 time, or None when absent or not one."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def format_value(value: float, percent: bool) -> str:
    """A metric value as the status shows it: ``72%``, ``2``, ``250m`` (milli-units)."""
    if percent:
        return f"{value:g}%"
    if float(value).is_integer():
        return str(int(value))
    milli = round(value * 1000)
    return f"{milli}m" if milli % 1000 else str(milli // 1000)


def parse_value(text: Any) -> float | None:
    """The inverse of :func:`format_value`; None when absent or not a value."""
    if not isinstance(text, str) or not text:
        return None
    try:
        if text.endswith("%"):
            return float(Decimal(text[:-1]))
        return float(parse_quantity(text))
    except (ValueError, InvalidOperation):
        return None


def observation_document(o: MetricObservation) -> dict[str, Any]:
    """One entry of ``status.decision.metrics``."""
    return {
        "name": o.metric,
        "type": o.type,
        "current": None if o.current is None else format_value(o.current, o.percent),
        "target": format_value(o.target, o.percent),
        "ratio": None if o.ratio is None else round(o.ratio, 4),
        "message": o.reason,
    }


def utilization(o: MetricObservation | None) -> str:
    """The printer column: ``72%/50%``, ``<unknown>/50%``; empty without a metric."""
    if o is None:
        return ""
    current = "<unknown>" if o.current is None else format_value(o.current, o.percent)
    return f"{current}/{format_value(o.target, o.percent)}"


def _observation(entry: Any) -> MetricObservation | None:
    if not isinstance(entry, Mapping):
        return None
    name = entry.get("name")
    target = parse_value(entry.get("target"))
    if not isinstance(name, str) or target is None:
        return None
    message = entry.get("message")
    kind = entry.get("type")
    return MetricObservation(
        name,
        parse_value(entry.get("current")),
        target,
        message if isinstance(message, str) else "",
        kind if isinstance(kind, str) else "",
        # format_value writes a percentage with its "%": the unit travels with the value.
        "percent" if str(entry.get("target")).endswith("%") else "quantity",
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class PublishedDecision:
    """What ``status`` says about offloading."""

    offloading: bool
    code: str = ""
    message: str = ""
    last_transition: datetime | None = None
    last_evaluation: datetime | None = None
    period_seconds: float | None = None
    observed_generation: int | None = None
    utilization: str = ""
    observations: tuple[MetricObservation, ...] = ()

    @classmethod
    def from_status(cls, status: Any) -> PublishedDecision | None:
        """None when no decision is published (no boolean ``offloading`` or ``offloadingStatus``)."""
        if not isinstance(status, Mapping):
            return None
        offloading = status.get("offloading")
        if not isinstance(offloading, bool):
            offloading = status.get("offloadingStatus")
        if not isinstance(offloading, bool):
            return None
        decision = status.get("decision")
        decision = decision if isinstance(decision, Mapping) else {}
        period = decision.get("evaluationPeriodSeconds")
        metrics = decision.get("metrics")
        observations = [_observation(m) for m in metrics] if isinstance(metrics, list) else []
        code, message, shown = decision.get("reason"), decision.get("message"), status.get("utilization")
        return cls(
            offloading=offloading,
            code=code if isinstance(code, str) else "",
            message=message if isinstance(message, str) else "",
            last_transition=parse_time(decision.get("lastTransitionTime")),
            last_evaluation=parse_time(decision.get("lastEvaluationTime")),
            period_seconds=float(seconds) if (seconds := _int(period)) is not None and seconds > 0 else None,
            observed_generation=_int(status.get("observedGeneration")),
            utilization=shown if isinstance(shown, str) else "",
            observations=tuple(o for o in observations if o is not None),
        )

    @property
    def stale_after(self) -> float:
        return stale_after_seconds(self.period_seconds)

    def age(self, now: datetime) -> float | None:
        """Seconds since the last evaluation; None when the status does not say."""
        if self.last_evaluation is None:
            return None
        return max(0.0, (now - self.last_evaluation).total_seconds())

    def stale(self, now: datetime) -> bool:
        """Not re-evaluated within :attr:`stale_after` (or never dated: cannot tell it is fresh)."""
        age = self.age(now)
        return age is None or age > self.stale_after
