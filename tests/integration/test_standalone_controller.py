"""The control loop's state machine (sidecar.control.state.OffloadingState) with a held clock.

The metric source here is a fake (named so): it returns the observations the
test sets, since the point is what the controller does with them; the real
sources are tested in test_cpu.py and test_standalone.py.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from crds.model import OffloadingConfig
from crds.observation import MetricObservation
from sidecar.control.state import OffloadingState
from sidecar.proxy.routing import RoutePlan, RoutingTable
from sidecar.standalone.config import parse_document

TUTORIAL = (
    Path(__file__).resolve().parents[1] / "testdata" / "modeldeployments" / "tutorial.yaml"
).read_text()
FAST = TUTORIAL.replace(
    "      percentage: 50\n", "      percentage: 50\n      sustainSeconds: 10\n      cooldownSeconds: 20\n"
)
CPU = "resource cpu on pods (as a percentage of request)"


def model(text: str = FAST):
    loaded = parse_document(text)
    assert loaded.model is not None, loaded.errors
    return loaded.model


class FakeMetricSource:
    """Returns ``percent`` for every metric asked about; counts the calls."""

    def __init__(self) -> None:
        self.percent: float | None = 20.0
        self.calls = 0
        self.gate: asyncio.Event | None = None  # when set: observe waits for it
        self.observing = asyncio.Event()  # an observation has started

    async def observe(self, config: OffloadingConfig) -> list[MetricObservation]:
        self.calls += 1
        self.observing.set()
        if self.gate is not None:
            await self.gate.wait()
        return [MetricObservation(CPU, self.percent, 50.0, "fake", unit="percent") for _ in config.metrics]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[OffloadingState, RoutingTable, FakeMetricSource, Clock]:
    routing, metrics, clock = RoutingTable(), FakeMetricSource(), Clock()
    return (
        OffloadingState(routing, metrics, clock=clock, wall=lambda: 1000.0 + clock.now),
        routing,
        metrics,
        clock,
    )


def poll(controller: OffloadingState, clock: Clock, until: float, every: float = 1.0) -> None:
    async def main():
        while clock.now < until:
            clock.now += every
            await controller.evaluate()

    asyncio.run(main())


def test_hot_for_the_sustain_window_starts_offloading_and_says_so_once(caplog):
    controller, routing, metrics, clock = make()
    controller.apply_config(model())
    assert routing.plan.remote is not None and not routing.plan.offloading
    metrics.percent = 80
    with caplog.at_level(logging.INFO, logger="sidecar"):
        poll(controller, clock, until=9)
        assert not routing.plan.offloading
        poll(controller, clock, until=40)
    assert routing.plan.offloading and routing.plan.active_percentage == 50
    started = [r.getMessage() for r in caplog.records if "offloading started" in r.getMessage()]
    assert len(started) == 1
    assert "50% of requests to http://my-model-on-another-cluster:80" in started[0]
    assert "80%/50% above target for 10s" in started[0]
    view = controller.view()
    assert view.plan.offloading and view.offloading_since == 1011.0
    assert dict(view.transitions) == {"on": 1, "off": 0}


def test_cool_for_the_cooldown_window_stops_offloading(caplog):
    controller, routing, metrics, clock = make()
    controller.apply_config(model())
    metrics.percent = 80
    poll(controller, clock, until=15)
    assert routing.plan.offloading
    metrics.percent = 10
    with caplog.at_level(logging.INFO, logger="sidecar"):
        poll(controller, clock, until=34)
        assert routing.plan.offloading
        poll(controller, clock, until=60)
    assert not routing.plan.offloading and routing.plan.remote is not None
    assert sum("offloading stopped" in r.getMessage() for r in caplog.records) == 1
    assert dict(controller.view().transitions) == {"on": 1, "off": 1}
    assert controller.view().offloading_since is None


def test_a_deleted_or_disabled_configuration_stops_offloading_at_once_and_passes_through(caplog):
    controller, routing, metrics, clock = make()
    controller.apply_config(model())
    metrics.percent = 80
    poll(controller, clock, until=15)
    with caplog.at_level(logging.INFO, logger="sidecar"):
        controller.apply_config(None)
    assert routing.plan == RoutePlan()
    assert "offloading stopped" in caplog.text and "pass-through" in caplog.text
    calls = metrics.calls
    poll(controller, clock, until=30)
    assert metrics.calls == calls  # nothing to evaluate
    assert "no valid ModelDeployment" in controller.view().reason
    disabled = model(FAST.replace("  model: my-model\n", "  model: my-model\n  enabled: false\n"))
    controller.apply_config(disabled)
    assert routing.plan == RoutePlan() and "disabled" in controller.view().reason
    # Coming back starts from scratch: the sustain window runs again.
    controller.apply_config(model())
    poll(controller, clock, until=35)
    assert not routing.plan.offloading


def test_an_edit_while_offloading_keeps_offloading_with_the_new_percentage():
    controller, routing, metrics, clock = make()
    controller.apply_config(model())
    metrics.percent = 80
    poll(controller, clock, until=15)
    controller.apply_config(model(FAST.replace("percentage: 50", "percentage: 20")))
    assert routing.plan.offloading and routing.plan.active_percentage == 20
    assert sum(routing.choose() is not None for _ in range(100)) == 20


def test_no_metrics_never_offloads():
    controller, routing, metrics, clock = make()
    text = FAST[: FAST.index("    metrics:")]
    controller.apply_config(model(text))
    poll(controller, clock, until=30)
    assert not routing.plan.offloading and metrics.calls == 0
    assert "no metrics configured: never offloading" in controller.view().reason


def test_the_static_split_is_on_at_the_first_evaluation():
    controller, routing, metrics, clock = make()
    text = FAST[: FAST.index("    metrics:")].replace(
        "      percentage: 50\n", "      percentage: 50\n      staticSplit: true\n"
    )
    controller.apply_config(model(text))
    poll(controller, clock, until=1)
    assert routing.plan.offloading and metrics.calls == 0
    assert "static split" in controller.view().reason


def test_a_configuration_change_during_a_slow_observation_discards_that_observation():
    controller, routing, metrics, _ = make()
    controller.apply_config(model(FAST.replace("sustainSeconds: 10", "sustainSeconds: 0")))
    metrics.percent = 80

    async def main():
        metrics.gate = asyncio.Event()
        pending = asyncio.create_task(controller.evaluate())
        await metrics.observing.wait()
        controller.apply_config(None)  # deleted while the metrics were being read
        metrics.gate.set()
        assert await pending is None

    asyncio.run(main())
    assert routing.plan == RoutePlan()
    assert dict(controller.view().transitions) == {"on": 0, "off": 0}


def test_a_remote_that_needs_a_token_is_used_only_with_one():
    controller, routing, metrics, clock = make()
    controller.needs_authorization = True
    controller.apply_config(model(FAST.replace("sustainSeconds: 10", "sustainSeconds: 0")))
    metrics.percent = 80
    poll(controller, clock, until=1)
    assert controller.state.offloading
    assert routing.plan.remote is None  # offloading, but no token yet: local
    controller.set_authorization("Bearer abc")
    assert routing.plan.remote is not None
    assert ("Authorization", "Bearer abc") in routing.plan.remote.headers
    assert sum(routing.choose() is not None for _ in range(100)) == 50
    controller.set_authorization(None)  # the token expired and could not be renewed
    assert routing.plan.remote is None


def test_unreadable_metrics_show_in_the_view_and_keep_the_decision():
    controller, routing, metrics, clock = make()
    controller.apply_config(model())
    metrics.percent = 80
    poll(controller, clock, until=15)
    metrics.percent = None
    poll(controller, clock, until=100)
    view = controller.view()
    assert routing.plan.offloading
    assert view.observations[0].current is None
    assert "metrics unavailable" in view.reason and "cannot tell it cooled down" in view.reason
