"""The spillover rule, pure: a request the percentage spread leaves local goes to the
remote once the local model already has ``spillover`` requests in flight."""

from __future__ import annotations

from crds.validation import validate_object
from sidecar.control.plan import plan_for
from sidecar.proxy.routing import NEVER, RemoteTarget, RoutePlan, RoutingTable
from tests.modeldeployments import standalone

REMOTE = RemoteTarget("http", "remote.example", 80, "remote.example")


def test_requests_spill_over_from_the_limit_on_and_are_counted():
    table = RoutingTable(RoutePlan(remote=REMOTE, spillover=3))
    chosen = [table.choose(n) for n in (0, 1, 2, 3, 4, 2)]
    assert chosen == [None, None, None, REMOTE, REMOTE, None]
    assert table.spillovers == 2


def test_spillover_acts_whether_offloading_is_on_or_off():
    for offloading in (False, True):
        table = RoutingTable(RoutePlan(remote=REMOTE, percentage=0, offloading=offloading, spillover=1))
        assert table.choose(1) is REMOTE


def test_no_spillover_without_a_limit_or_without_a_remote():
    assert RoutePlan(remote=REMOTE).spill_at == NEVER
    assert RoutePlan(remote=None, spillover=1).spill_at == NEVER
    table = RoutingTable(RoutePlan(remote=None, spillover=1))
    assert table.choose(10**6) is None and table.spillovers == 0


def test_the_percentage_share_stays_exact_while_requests_spill_over():
    """The spread is asked first for every request, so its share is the same whatever the
    local load; spillover only adds remote requests among those it leaves local."""
    table = RoutingTable(RoutePlan(remote=REMOTE, percentage=25, offloading=True, spillover=4))
    by_spread = sum(table.choose(0) is REMOTE for _ in range(100))
    assert by_spread == 25
    loaded = [table.choose(4) is REMOTE for _ in range(100)]
    assert all(loaded) and table.spillovers == 75


def test_a_new_plan_changes_the_limit_and_keeps_the_count():
    table = RoutingTable(RoutePlan(remote=REMOTE, spillover=2))
    assert table.choose(2) is REMOTE
    table.update(RoutePlan(remote=REMOTE, spillover=5))
    assert table.choose(2) is None and table.choose(5) is REMOTE
    table.update(RoutePlan(remote=REMOTE))
    assert table.choose(10**6) is None
    assert table.spillovers == 2


def test_the_plan_of_a_modeldeployment_carries_its_spillover_limit():
    doc = standalone(8080, behavior={"spilloverInFlight": 6}, percentage=30)
    model = validate_object(doc).model
    assert model is not None
    plan = plan_for(model, offloading=False)
    assert (plan.spillover, plan.spill_at, plan.active_percentage) == (6, 6, 0)
    assert plan_for(validate_object(standalone(8080)).model, offloading=False).spill_at == NEVER
