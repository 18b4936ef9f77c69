"""Cluster mode's decision: the sidecar follows the controller's ``status.offloading``
(sidecar.control.published.follow_published and the OffloadingState wired to it), stale or not, and says
so on /status and /metrics. No I/O: the published status is set by the test."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from crds.decision import INITIAL, DecisionState
from crds.status import PublishedDecision
from crds.validation import validate_object
from sidecar.admin.metrics import render_metrics
from sidecar.admin.status import status_document
from sidecar.control.published import follow_published
from sidecar.control.state import OffloadingState
from sidecar.proxy.routing import RoutingTable
from sidecar.proxy.stats import ProxyStats
from tests.modeldeployments import standalone

EVALUATED = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


def status(offloading: bool, *, evaluated: datetime = EVALUATED, period: int = 15, **extra: Any) -> dict:
    return {
        "observedGeneration": 2,
        "offloading": offloading,
        "offloadingStatus": offloading,
        "utilization": "90%/50%" if offloading else "20%/50%",
        "decision": {
            "reason": "AboveTarget" if offloading else "BelowTarget",
            "message": "resource cpu on pods (as a percentage of request) 90%/50% above target for 30s"
            if offloading
            else "resource cpu on pods (as a percentage of request) 20%/50% below target; not offloading",
            "lastTransitionTime": "2025-06-01T11:58:00Z",
            "lastEvaluationTime": evaluated.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "evaluationPeriodSeconds": period,
            "metrics": [
                {
                    "name": "resource cpu on pods (as a percentage of request)",
                    "type": "Resource",
                    "current": "90%" if offloading else "20%",
                    "target": "50%",
                    "ratio": 1.8 if offloading else 0.4,
                    "message": "2 pods",
                }
            ],
        },
        **extra,
    }


def published(offloading: bool, **kwargs: Any) -> PublishedDecision:
    decision = PublishedDecision.from_status(status(offloading, **kwargs))
    assert decision is not None
    return decision


def test_the_published_decision_is_followed_both_ways():
    decision, view = follow_published(INITIAL, published(True), EVALUATED + timedelta(seconds=5))
    assert decision.offloading and decision.changed and decision.code == "AboveTarget"
    assert decision.reason.startswith("controller: resource cpu on pods")
    assert decision.ratio == 1.8
    assert view is not None and view["stale"] is False and view["ageSeconds"] == 5.0
    assert view["observedGeneration"] == 2 and view["staleAfterSeconds"] == 60
    later, _ = follow_published(decision.state, published(True), EVALUATED + timedelta(seconds=20))
    assert later.offloading and not later.changed
    off, _ = follow_published(later.state, published(False), EVALUATED + timedelta(seconds=21))
    assert not off.offloading and off.changed and off.code == "BelowTarget"


def test_a_stale_decision_stays_in_force_and_says_it_is_stale():
    on = DecisionState(True, 0.0, None, "x", "AboveTarget")
    now = EVALUATED + timedelta(seconds=61)
    decision, view = follow_published(on, published(True), now)
    assert decision.offloading and not decision.changed
    assert "stale (evaluated 61s ago, bound 60s) and stays in force" in decision.reason
    assert view is not None and view["stale"] is True
    # A longer period: a longer bound (4 periods).
    decision, view = follow_published(on, published(True, period=30), now)
    assert view is not None and view["stale"] is False and view["staleAfterSeconds"] == 120


def test_an_undated_decision_is_stale():
    decision, view = follow_published(INITIAL, PublishedDecision(offloading=True), EVALUATED)
    assert decision.offloading and "never dated" in decision.reason
    assert view is not None and view["stale"] is True


def test_nothing_published_keeps_the_current_state():
    decision, view = follow_published(INITIAL, None, EVALUATED)
    assert not decision.offloading and not decision.changed and view is None
    assert decision.code == "NotEvaluated" and "no decision published" in decision.reason
    on = DecisionState(True, 0.0, None, "x", "AboveTarget")
    decision, _ = follow_published(on, None, EVALUATED)
    assert decision.offloading and "offloading continues" in decision.reason


class Holder:
    """What ClusterConfigSource.published would hold, set by the test."""

    def __init__(self) -> None:
        self.value: PublishedDecision | None = None

    def __call__(self) -> PublishedDecision | None:
        return self.value


def cluster_controller(now: list[float]) -> tuple[OffloadingState, RoutingTable, Holder]:
    routing, holder = RoutingTable(), Holder()
    controller = OffloadingState(routing, None, published=holder, wall=lambda: now[0], mode="cluster")
    doc = standalone(9, percentage=50, metrics=True)
    model = validate_object(doc).model
    assert model is not None
    controller.apply_config(model)
    return controller, routing, holder


def test_the_controller_routes_by_the_published_decision_and_status_shows_it():
    now = [EVALUATED.timestamp() + 3]
    controller, routing, holder = cluster_controller(now)
    asyncio.run(controller.evaluate())
    assert not routing.plan.offloading  # nothing published yet
    holder.value = published(True)
    asyncio.run(controller.evaluate())
    assert routing.plan.offloading and routing.plan.active_percentage == 50
    doc = status_document(controller.view(), ProxyStats(), ready=True)
    assert doc["decision"]["offloading"] is True and doc["decision"]["code"] == "AboveTarget"
    assert doc["decision"]["stale"] is False
    assert doc["decision"]["controller"]["lastEvaluationTime"] == "2025-06-01T12:00:00Z"
    assert doc["observations"][0]["display"] == "90%/50%"
    assert "offload_sidecar_decision_stale 0" in render_metrics(controller.view(), ProxyStats(), ready=True)

    now[0] = EVALUATED.timestamp() + 300  # the controller went away
    asyncio.run(controller.evaluate())
    doc = status_document(controller.view(), ProxyStats(), ready=True)
    assert routing.plan.offloading and doc["decision"]["stale"] is True
    assert "offload_sidecar_decision_stale 1" in render_metrics(controller.view(), ProxyStats(), ready=True)

    holder.value = published(False, evaluated=EVALUATED + timedelta(seconds=295))
    asyncio.run(controller.evaluate())
    assert not routing.plan.offloading and controller.transitions == {"on": 1, "off": 1}


def test_disabled_is_pass_through_whatever_the_status():
    now = [EVALUATED.timestamp()]
    controller, routing, holder = cluster_controller(now)
    holder.value = published(True)
    doc = standalone(9, percentage=50, metrics=True, enabled=False)
    controller.apply_config(validate_object(doc).model)
    asyncio.run(controller.evaluate())
    assert routing.plan.remote is None and not routing.plan.offloading
    assert status_document(controller.view(), ProxyStats(), ready=True)["decision"]["controller"] is None
