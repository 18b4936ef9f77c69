"""The mission benchmark's figures (bench/llm_bench.py), pure: which requests count, and
that a figure that does not exist is printed as such, never as a number."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "llm_bench", Path(__file__).resolve().parents[2] / "bench" / "llm_bench.py"
)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["llm_bench"] = bench  # its dataclasses look their module up while it loads
_spec.loader.exec_module(bench)

PHASES = bench.Phases(low=10, spike=10, after=5)


def rec(sent: float, ttfb: float | None = 0.2, server: str | None = "local", error: str | None = None):
    return bench.Record(sent, ttfb, server, error)


def test_the_schedule_is_seeded_and_twice_as_dense_during_the_spike():
    times = bench.schedule(PHASES, capacity=20.0, seed=3)
    assert times == bench.schedule(PHASES, capacity=20.0, seed=3)
    low = sum(t < 10 for t in times) / 10
    spike = sum(10 <= t < 20 for t in times) / 10
    assert 7 < low < 13 and 32 < spike < 48  # 10/s then 40/s, Poisson


def test_figures_count_the_spikes_requests_and_the_first_remote_one_after_the_step():
    records = [
        rec(3.0, 0.15),
        rec(5.0, 0.17, "remote"),  # before the step: not "the first after it"
        rec(10.5, 1.0),
        rec(11.0, 2.0),
        rec(11.2, 0.2, "remote"),
        rec(12.0, None, None, "timed out"),
        rec(19.9, 4.0),
        rec(21.0, 0.2, "remote"),
    ]
    f = bench.figures(records, PHASES)
    assert f.first_offload == pytest.approx(1.2)
    assert (f.p50, f.p99) == (1.0, 4.0)  # nearest rank over 1.0, 2.0, 0.2, 4.0
    assert (f.errors, f.spike_requests) == (1, 5)
    assert f.spike_offloaded == pytest.approx(1 / 4)  # of the requests served
    assert f.overall_offloaded == pytest.approx(3 / 7)
    assert (f.low_p99, f.low_requests) == (0.17, 2)
    assert f.low_offloaded == pytest.approx(1 / 2)


def test_a_policy_that_never_offloads_has_no_first_offload_and_its_ratios_are_not_numbers():
    f = bench.figures([rec(12.0, 3.0)], PHASES)
    assert f.first_offload is None and f.spike_offloaded == 0
    assert bench.ratio(f.first_offload, 1.0) == "-"
    assert bench.ratio(0.5, 0.0) == "-" and bench.ratio(0.5, None) == "-"
    assert bench.ratio(0.5, 2.0) == "0.25x"
    assert bench.seconds(None, "never") == "never" and bench.seconds(0.1234) == "0.123 s"


def test_percentiles_are_nearest_rank_and_none_without_values():
    assert bench.percentile([], 99) is None
    assert bench.percentile([3, 1, 2], 50) == 2
    assert bench.percentile(list(range(1, 101)), 99) == 99


def test_the_spikes_arrivals_start_at_the_step_not_one_slow_gap_after_it():
    """Memoryless: the first arrival after a change of rate comes at the new rate."""
    gaps = []
    for seed in range(300):
        times = bench.schedule(PHASES, capacity=20.0, seed=seed)
        assert times == sorted(times) and times[-1] < PHASES.total
        gaps.append(next(t for t in times if t >= PHASES.step) - PHASES.step)
    assert 0.015 < sum(gaps) / len(gaps) < 0.035  # 1/40 s at the spike's rate (1/10 s at the old one)
