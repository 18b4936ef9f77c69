"""The signal arithmetic, pure: sampled averages, the model's gauges picked out of a
Prometheus exposition, one pod's value from its /signals document, and the HPA's
AverageValue/Value arithmetic over the workload's ready pods. Fake clocks only."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crds.model import LabelSelector, LabelSelectorRequirement, MetricTarget
from crds.signals import IN_FLIGHT, WAITING, aggregate, selector_matches, signal_value
from sidecar.control.interfaces import MetricObservation
from sidecar.proxy.stats import ProxyStats
from sidecar.signals import (
    GaugeReading,
    ModelScraper,
    Sample,
    Sampler,
    ScrapeState,
    ScrapeTarget,
    Series,
    SignalBoard,
    SignalMetricSource,
    lines_of,
    parse_gauges,
    window_mean,
)

VLLM = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="llama"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama"} 7.0
vllm:num_requests_waiting{model_name="mistral"} 2.0
# HELP vllm:num_requests_waiting_total not the gauge, a longer name
# TYPE vllm:num_requests_waiting_total counter
vllm:num_requests_waiting_total 99.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{finished_reason="stop",model_name="llama"} 1234.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="llama"} 3.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="llama"} 5.0
vllm:e2e_request_latency_seconds_count{model_name="llama"} 5.0
vllm:e2e_request_latency_seconds_sum{model_name="llama"} 4.5
# TYPE tgi_queue_size gauge
tgi_queue_size 3
untyped_queue 12
"""


# --- sampling -------------------------------------------------------------------------------------


def test_the_mean_is_over_the_samples_of_the_window_only():
    samples = [Sample(0.1 * i, in_flight=i, waiting=i // 2) for i in range(1, 21)]  # t = 0.1 .. 2.0
    mean = window_mean(samples, now=2.0, window=1.0)
    assert mean is not None
    in_flight, waiting, n = mean
    assert n == 10  # t in (1.0, 2.0]
    assert in_flight == pytest.approx(sum(range(11, 21)) / 10)
    assert waiting == pytest.approx(sum(i // 2 for i in range(11, 21)) / 10)
    assert window_mean(samples, now=10.0, window=1.0) is None


def test_the_sampler_reads_the_data_paths_counters_on_its_clock():
    stats = ProxyStats()
    now = [100.0]
    sampler = Sampler(stats, interval=0.1, keep=0.5, clock=lambda: now[0])
    for i in range(8):
        stats.local_in_flight, stats.local_waiting = i, 1
        sampler.sample()
        now[0] += 0.1
    assert len(sampler.samples) == 5  # keep / interval: bounded memory
    assert [s.in_flight for s in sampler.samples] == [3, 4, 5, 6, 7]


# --- the model's gauges -----------------------------------------------------------------------------


def test_only_the_wanted_gauges_lines_are_kept():
    kept = lines_of(VLLM, ["vllm:num_requests_waiting"])
    assert kept.splitlines() == [
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{model_name="llama"} 7.0',
        'vllm:num_requests_waiting{model_name="mistral"} 2.0',
    ]
    assert lines_of(VLLM, []) == ""


def test_gauges_are_parsed_with_their_labels_and_other_kinds_refused():
    names = [
        "vllm:num_requests_waiting",
        "tgi_queue_size",
        "untyped_queue",
        "vllm:request_success_total",
        "vllm:e2e_request_latency_seconds",
        "sglang:num_queue_reqs",
    ]
    got = parse_gauges(VLLM, names)
    assert got["vllm:num_requests_waiting"] == GaugeReading(
        (Series({"model_name": "llama"}, 7.0), Series({"model_name": "mistral"}, 2.0))
    )
    assert got["tgi_queue_size"] == GaugeReading((Series({}, 3.0),))
    assert got["untyped_queue"] == GaugeReading((Series({}, 12.0),))  # untyped counts as a gauge
    assert got["vllm:request_success_total"].error == "vllm:request_success_total is a counter, not a gauge"
    assert got["vllm:e2e_request_latency_seconds"].error == (
        "vllm:e2e_request_latency_seconds is a histogram, not a gauge"
    )
    assert got["sglang:num_queue_reqs"].error == "sglang:num_queue_reqs is not in the model's metrics"


def test_an_exposition_that_does_not_parse_is_an_error_for_each_gauge_never_an_exception():
    got = parse_gauges("tgi_queue_size{oops 3\n", ["tgi_queue_size", "other"])
    assert set(got) == {"tgi_queue_size", "other"}
    assert got["tgi_queue_size"].error.startswith("the model's metrics could not be parsed")


@given(st.text(max_size=400))
def test_parse_gauges_never_raises(text):
    got = parse_gauges(text, ["tgi_queue_size"])
    assert set(got) == {"tgi_queue_size"}


# --- one pod's value ----------------------------------------------------------------------------


def doc_with(**gauges) -> dict:
    return {
        "signals": {IN_FLIGHT: {"value": 2.5, "now": 3}, WAITING: {"value": 0.5, "now": 0}},
        "gauges": gauges,
    }


def test_the_sidecars_own_signals_are_read_from_the_document():
    doc = doc_with()
    assert signal_value(doc, IN_FLIGHT) == (2.5, "")
    assert signal_value(doc, WAITING) == (0.5, "")


def test_a_gauges_series_are_summed_over_those_the_selector_matches():
    series = [
        {"labels": {"model_name": "llama"}, "value": 7.0},
        {"labels": {"model_name": "mistral"}, "value": 2.0},
    ]
    doc = doc_with(**{"vllm:num_requests_waiting": {"series": series}})
    assert signal_value(doc, "vllm:num_requests_waiting") == (9.0, "")
    llama = LabelSelector(match_labels={"model_name": "llama"})
    assert signal_value(doc, "vllm:num_requests_waiting", llama) == (7.0, "")
    none = LabelSelector(match_labels={"model_name": "gpt"})
    assert signal_value(doc, "vllm:num_requests_waiting", none) == (
        None,
        "no series of vllm:num_requests_waiting matches the metric's selector",
    )


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ([], "the sidecar's /signals answer is not a JSON object"),
        ({"signals": "x"}, "the sidecar does not scrape tgi_queue_size (yet)"),
        ({"gauges": {"tgi_queue_size": {"error": "scraping failed: refused"}}}, "scraping failed: refused"),
        ({"gauges": {"tgi_queue_size": {"series": "x"}}}, "the sidecar reported no series of tgi_queue_size"),
        (
            {"gauges": {"tgi_queue_size": {"series": [{"labels": {}, "value": "7"}]}}},
            "no series of tgi_queue_size has a value",
        ),
        (
            {"gauges": {"tgi_queue_size": {"series": [{"labels": {}, "value": math.nan}]}}},
            "no series of tgi_queue_size has a value",
        ),
    ],
)
def test_a_document_without_the_value_says_why(doc, reason):
    assert signal_value(doc, "tgi_queue_size") == (None, reason)


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    )
)
def test_signal_value_never_raises_whatever_the_document(doc):
    for name in (IN_FLIGHT, "tgi_queue_size"):
        value, reason = signal_value(doc, name)
        assert (value is None) == bool(reason)


def test_label_selectors_match_as_kubernetes_does():
    labels = {"model_name": "llama", "engine": "0"}
    req = LabelSelectorRequirement
    assert selector_matches(None, labels)
    assert selector_matches(
        LabelSelector(match_expressions=(req("model_name", "In", ("llama", "x")),)), labels
    )
    assert not selector_matches(
        LabelSelector(match_expressions=(req("model_name", "NotIn", ("llama",)),)), labels
    )
    assert selector_matches(LabelSelector(match_expressions=(req("engine", "Exists"),)), labels)
    assert not selector_matches(LabelSelector(match_expressions=(req("engine", "DoesNotExist"),)), labels)
    assert not selector_matches(LabelSelector(match_expressions=(req("gpu", "In", ("a",)),)), labels)


# --- over the ready pods ----------------------------------------------------------------------------


AVG4 = MetricTarget(type="AverageValue", average_value="4")
TOTAL12 = MetricTarget(type="Value", value="12")


def test_average_value_is_the_mean_over_the_ready_pods():
    result = aggregate(AVG4, ["a", "b", "c"], {"a": 2.0, "b": 6.0, "c": 7.0}, {})
    assert (result.current, result.target, result.reason) == (5.0, 4.0, "average over 3 ready pods")


def test_value_is_the_sum_over_the_ready_pods():
    result = aggregate(TOTAL12, ["a", "b", "c"], {"a": 2.0, "b": 6.0, "c": 7.0}, {})
    assert (result.current, result.target, result.reason) == (15.0, 12.0, "sum over 3 ready pods")


def test_pods_without_a_value_count_as_zero_when_the_others_are_over_target():
    result = aggregate(AVG4, ["a", "b", "c"], {"a": 9.0, "b": 9.0}, {"c": "timed out"})
    assert result.current == 6.0
    assert "1 without a value (c: timed out): counted as 0" in result.reason


def test_pods_without_a_value_count_as_the_target_when_the_others_are_under():
    result = aggregate(TOTAL12, ["a", "b", "c"], {"a": 1.0, "b": 1.0}, {"c": "refused"})
    assert result.current == 6.0  # 1 + 1 + the per-pod share of the target, 4
    assert "counted as the target" in result.reason


def test_when_counting_the_missing_pods_flips_the_direction_the_metric_is_held_at_target():
    # Alone, a is over (5 > 4); with b and c counted as 0 the average is 5/3, under.
    result = aggregate(AVG4, ["a", "b", "c"], {"a": 5.0}, {"b": "x", "c": "y"})
    assert (result.current, result.target) == (4.0, 4.0)
    assert "flips the direction: held at target" in result.reason


def test_no_ready_pod_or_no_value_at_all_is_unknown_saying_why():
    assert aggregate(AVG4, [], {}, {}).current is None
    assert aggregate(AVG4, [], {}, {}).reason == "no ready pod"
    result = aggregate(AVG4, ["a", "b"], {}, {"a": "connection refused", "b": "timed out"})
    assert result.current is None
    assert (
        result.reason
        == "no value from any ready pod (2 without a value (a: connection refused; b: timed out))"
    )


def test_values_of_pods_that_are_not_ready_are_ignored():
    assert aggregate(AVG4, ["a"], {"a": 1.0, "gone": 100.0}, {}).current == 1.0


# --- the document and the standalone source -------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def board_with(clock: Clock, state: ScrapeState | None = None) -> SignalBoard:
    stats = ProxyStats()
    sampler = Sampler(stats, clock=clock)
    for in_flight in (1, 3):
        clock.t += 0.1
        stats.local_in_flight = in_flight
        sampler.sample()
    scraper = ModelScraper(clock=clock)
    scraper.state = state
    return SignalBoard(sampler, scraper, window=1.0, pod="p-1", clock=clock, wall=lambda: 1.7e9)


TARGET = ScrapeTarget("127.0.0.1", 8000, "/metrics", 1.0, ("vllm:num_requests_waiting",))


def test_the_document_holds_the_windowed_signals_and_the_last_scrape():
    clock = Clock()
    state = ScrapeState(TARGET, finished=clock.t, duration=0.002, scrapes=3)
    state.readings = {"vllm:num_requests_waiting": GaugeReading((Series({"model_name": "m"}, 5.0),))}
    doc = board_with(clock, state).document()
    assert doc["pod"] == "p-1"
    assert doc["signals"][IN_FLIGHT] == {"value": 2.0, "now": 3}
    assert doc["gauges"] == {
        "vllm:num_requests_waiting": {"series": [{"labels": {"model_name": "m"}, "value": 5.0}]}
    }
    assert doc["scrape"]["url"] == "http://127.0.0.1:8000/metrics"
    json.dumps(doc)  # served as JSON


def test_a_stale_or_failed_scrape_reports_an_error_not_its_old_value():
    clock = Clock()
    state = ScrapeState(TARGET, finished=clock.t, scrapes=1)
    state.readings = {"vllm:num_requests_waiting": GaugeReading((Series({}, 5.0),))}
    board = board_with(clock, state)
    clock.t += 60
    assert board.document()["gauges"]["vllm:num_requests_waiting"] == {"error": "the last scrape is 60s old"}
    state.error, state.readings = "scraping http://127.0.0.1:8000/metrics failed: answered 500", {}
    assert "answered 500" in board.document()["gauges"]["vllm:num_requests_waiting"]["error"]
    assert board_with(Clock(), ScrapeState(TARGET)).document()["gauges"] == {
        "vllm:num_requests_waiting": {"error": "not scraped yet"}
    }


class FixedSource:
    def __init__(self):
        self.asked: list[tuple] = []

    async def observe(self, config):
        self.asked.append(config.metrics)
        return [MetricObservation(f"inner {m.type}", 10.0, 5.0, "inner") for m in config.metrics]


def test_the_standalone_source_serves_local_signals_and_passes_the_rest_on_in_order():
    from crds.validation import validate_object
    from tests.modeldeployments import standalone

    doc = standalone(9, metrics=True)
    doc["spec"]["offloadingConfig"]["metrics"] = [
        {
            "type": "Pods",
            "pods": {"metric": {"name": IN_FLIGHT}, "target": {"type": "AverageValue", "averageValue": "1"}},
        },
        doc["spec"]["offloadingConfig"]["metrics"][0],
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "vllm:num_requests_waiting"},
                "target": {"type": "Value", "value": "4"},
            },
        },
    ]
    model = validate_object(doc).model
    assert model is not None
    clock = Clock()
    state = ScrapeState(TARGET, finished=clock.t, scrapes=1)
    state.readings = {"vllm:num_requests_waiting": GaugeReading((Series({}, 6.0),))}
    inner = FixedSource()
    source = SignalMetricSource(inner, board_with(clock, state))
    got = asyncio.run(source.observe(model.spec.offloading_config))
    assert [(o.metric, o.current, o.target) for o in got] == [
        (f'"{IN_FLIGHT}" on pods', 2.0, 1.0),
        ("inner Resource", 10.0, 5.0),
        ('"vllm:num_requests_waiting" on pods (total)', 6.0, 4.0),
    ]
    assert [tuple(m.type for m in asked) for asked in inner.asked] == [("Resource",)]
