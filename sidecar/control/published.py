"""Cluster mode's decision: the controller's, as published in the ModelDeployment's status.

One evaluation per ModelDeployment (the controller's), not one per pod: the sidecar only
follows it. Pure: the published decision, the current state and the time in, the decision
and what /status shows of it out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from crds.decision import NOT_EVALUATED, Decision, DecisionState
from crds.status import PublishedDecision, format_time


def follow_published(
    state: DecisionState, published: PublishedDecision | None, now: datetime
) -> tuple[Decision, dict[str, Any] | None]:
    """The decision to follow and what /status shows of it (None when nothing is published).

    Nothing published yet keeps the current state (off at start). A stale decision
    (not re-evaluated for max(4 periods, 60 s): the controller is down) still stands:
    nothing proves the load changed; the reason and /status say it is stale.
    """
    if published is None:
        what = "offloading continues" if state.offloading else "not offloading"
        reason = f"no decision published in the ModelDeployment's status yet: {what}"
        new = DecisionState(state.offloading, state.since, None, reason, NOT_EVALUATED)
        return Decision(new, state.offloading, reason, False, None, NOT_EVALUATED), None
    age = published.age(now)
    stale = published.stale(now)
    message = published.message or ("offloading" if published.offloading else "not offloading")
    if stale:
        when = "never dated" if age is None else f"evaluated {age:.0f}s ago"
        reason = (
            f"the controller's decision is stale ({when}, bound {published.stale_after:.0f}s) "
            f"and stays in force: {message}"
        )
    else:
        reason = f"controller: {message}"
    readable = [o for o in published.observations if o.ratio is not None]
    deciding = max(readable, key=lambda o: o.ratio or 0.0, default=None)
    since = published.last_transition.timestamp() if published.last_transition is not None else state.since
    new = DecisionState(published.offloading, since, None, reason, published.code or NOT_EVALUATED)
    decision = Decision(
        new,
        published.offloading,
        reason,
        published.offloading != state.offloading,
        deciding.ratio if deciding is not None else None,
        published.code or NOT_EVALUATED,
        deciding,
    )
    view = {
        "observedGeneration": published.observed_generation,
        "reason": published.code,
        "lastTransitionTime": format_time(published.last_transition) if published.last_transition else None,
        "lastEvaluationTime": format_time(published.last_evaluation) if published.last_evaluation else None,
        "ageSeconds": None if age is None else round(age, 1),
        "staleAfterSeconds": published.stale_after,
        "stale": stale,
        "utilization": published.utilization,
    }
    return decision, view
