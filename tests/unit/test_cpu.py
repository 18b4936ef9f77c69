"""The local CPU/memory source: parsing, cgroupfs layouts in a temp dir, a held clock."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from crds.model import (
    ContainerResourceMetricSource,
    ExternalMetricSource,
    MetricIdentifier,
    MetricSpec,
    MetricTarget,
    OffloadingConfig,
    PodsMetricSource,
    ResourceMetricSource,
)
from sidecar.standalone.metrics import (
    CgroupV1Reader,
    CgroupV2Reader,
    CpuSample,
    HostReader,
    LocalMetricSource,
    ProcessTreeReader,
    detect_reader,
    parse_cores,
    parse_meminfo,
    parse_memory_limit,
    parse_pid_stat,
    parse_proc_stat_seconds,
    parse_v1_cfs,
    parse_v1_usage_seconds,
    parse_v2_cpu_max,
    parse_v2_usage_seconds,
    utilization_percent,
)

# --- parsing -------------------------------------------------------------------------------

CPU_STAT_V2 = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 0\n"


def test_v2_usage_is_read_from_usage_usec():
    assert parse_v2_usage_seconds(CPU_STAT_V2) == 2.5


def test_v2_cpu_stat_without_usage_is_an_error():
    with pytest.raises(ValueError, match="usage_usec"):
        parse_v2_usage_seconds("nr_periods 0\n")


@pytest.mark.parametrize(
    ("text", "cores"),
    [("50000 100000\n", 0.5), ("200000 100000", 2.0), ("max 100000\n", None), ("150000", 1.5)],
)
def test_v2_cpu_max(text, cores):
    assert parse_v2_cpu_max(text) == cores


def test_v1_usage_is_nanoseconds():
    assert parse_v1_usage_seconds("1500000000\n") == 1.5


@pytest.mark.parametrize(
    ("quota", "period", "cores"),
    [("-1\n", "100000\n", None), ("25000\n", "100000\n", 0.25), ("300000", "100000", 3)],
)
def test_v1_cfs_quota(quota, period, cores):
    assert parse_v1_cfs(quota, period) == cores


@pytest.mark.parametrize(
    ("text", "limit"), [("max\n", None), ("536870912\n", 536870912), ("9223372036854771712\n", None)]
)
def test_memory_limit_max_and_the_v1_unlimited_value_mean_none(text, limit):
    assert parse_memory_limit(text) == limit


def test_host_busy_seconds_leave_idle_and_iowait_out():
    text = "cpu  100 20 30 1000 50 5 5 10 0 0\ncpu0 50 10 15 500 25 2 3 5 0 0\nintr 1\n"
    assert parse_proc_stat_seconds(text, clk_tck=100) == pytest.approx((100 + 20 + 30 + 5 + 5 + 10) / 100)


def test_pid_stat_counts_utime_stime_and_reaped_children_and_survives_odd_names():
    fields = ["S", "7", "1", "1", "0", "-1", "0", "0", "0", "0", "0", "250", "50", "30", "20"]
    text = "1234 (my (odd) server) " + " ".join(fields + ["20", "0", "1", "0"]) + "\n"
    seconds, ppid = parse_pid_stat(text, clk_tck=100)
    assert seconds == pytest.approx(3.5)
    assert ppid == 7


def test_pid_stat_of_this_process_agrees_with_os_times():
    for _ in range(200_000):
        pass
    seconds, ppid = parse_pid_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    times = os.times()
    assert ppid == os.getppid()
    assert seconds == pytest.approx(
        times.user + times.system + times.children_user + times.children_system, abs=0.05
    )


def test_meminfo_used_is_total_minus_available():
    text = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    400 kB\n"
    assert parse_meminfo(text) == (600 * 1024, 1000 * 1024)


@pytest.mark.parametrize(("text", "cores"), [("500m", 0.5), ("2", 2.0), ("1.5", 1.5), ("250m", 0.25)])
def test_cpu_amounts_as_users_write_them(text, cores):
    assert parse_cores(text) == cores


@pytest.mark.parametrize("text", ["0", "-1", "lots", "0m"])
def test_cpu_amounts_must_be_positive_quantities(text):
    with pytest.raises(ValueError):
        parse_cores(text)


def test_utilization_is_cpu_time_over_wall_time_over_the_reference():
    assert utilization_percent(CpuSample(10.0, 100.0), CpuSample(12.0, 110.0), cores=0.5) == pytest.approx(
        40.0
    )


# --- cgroupfs layouts ------------------------------------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


PROC = {
    "stat": "cpu  100 0 100 1000 0 0 0 0 0 0\n",
    "meminfo": "MemTotal:  8000 kB\nMemFree: 1000 kB\nMemAvailable: 6000 kB\n",
}


def v2_tree(tmp_path: Path, usage_usec: int = 0, cpu_max: str | None = "50000 100000") -> Path:
    files = {
        "cgroup/cgroup.controllers": "cpu memory io\n",
        "cgroup/cpu.stat": f"usage_usec {usage_usec}\nuser_usec 0\n",
        "cgroup/memory.current": "104857600\n",
        "cgroup/memory.max": "419430400\n",
    }
    if cpu_max is not None:
        files["cgroup/cpu.max"] = cpu_max
    write(tmp_path, files)
    write(tmp_path / "proc", PROC)
    return tmp_path / "cgroup"


def v1_tree(tmp_path: Path, usage_ns: int = 0, quota: str = "100000", dirname: str = "cpuacct") -> Path:
    files = {
        f"cgroup/{dirname}/cpuacct.usage": f"{usage_ns}\n",
        "cgroup/cpu/cpu.cfs_quota_us": f"{quota}\n",
        "cgroup/cpu/cpu.cfs_period_us": "100000\n",
        "cgroup/memory/memory.usage_in_bytes": "1048576\n",
        "cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
    }
    write(tmp_path, files)
    write(tmp_path / "proc", PROC)
    return tmp_path / "cgroup"


def test_detect_prefers_cgroup_v2(tmp_path):
    reader = detect_reader(v2_tree(tmp_path), tmp_path / "proc")
    assert isinstance(reader, CgroupV2Reader)
    assert reader.cpu().limit_cores == 0.5
    assert reader.memory().limit_bytes == 419430400


@pytest.mark.parametrize("dirname", ["cpuacct", "cpu,cpuacct"])
def test_detect_finds_cgroup_v1_in_either_directory_layout(tmp_path, dirname):
    reader = detect_reader(v1_tree(tmp_path, usage_ns=3_000_000_000, dirname=dirname), tmp_path / "proc")
    assert isinstance(reader, CgroupV1Reader)
    assert reader.cpu().usage_seconds == 3.0
    assert reader.cpu().limit_cores == 1.0
    assert reader.memory().limit_bytes is None


def test_detect_falls_back_to_the_host(tmp_path):
    write(tmp_path / "proc", PROC)
    (tmp_path / "empty").mkdir()
    reader = detect_reader(tmp_path / "empty", tmp_path / "proc")
    assert isinstance(reader, HostReader)
    assert reader.cpu().usage_seconds == pytest.approx(200 / os.sysconf("SC_CLK_TCK"))
    assert reader.memory() == HostReader(tmp_path / "proc").memory()


def test_v2_root_cgroup_without_cpu_max_or_memory_current_uses_host_memory(tmp_path):
    root = v2_tree(tmp_path, cpu_max=None)
    (root / "memory.current").unlink()
    reader = CgroupV2Reader(root, tmp_path / "proc")
    assert reader.cpu().limit_cores is None
    assert reader.memory().limit_bytes == 8000 * 1024


def test_this_machines_reader_reads_something_real():
    reader = detect_reader()
    assert reader.cpu().usage_seconds > 0


def test_process_tree_sums_a_process_and_its_descendants_but_not_others(tmp_path):
    def stat(pid, ppid, ticks):
        return f"{pid} (x) S {ppid} 1 1 0 -1 0 0 0 0 0 {ticks} 0 0 0 20 0 1 0\n"

    tck = os.sysconf("SC_CLK_TCK")
    write(
        tmp_path / "proc",
        {
            **PROC,
            "10/stat": stat(10, 1, tck),  # the model server
            "11/stat": stat(11, 10, 2 * tck),  # its worker
            "12/stat": stat(12, 11, 4 * tck),  # the worker's child
            "13/stat": stat(13, 1, 100 * tck),  # someone else
            "10/status": "VmRSS:  100 kB\n",
            "11/status": "VmRSS:  200 kB\n",
            "12/status": "VmRSS:  300 kB\n",
            "13/status": "VmRSS: 9999 kB\n",
            "self": "",
        },
    )
    reader = ProcessTreeReader(10, tmp_path / "proc")
    assert reader.cpu().usage_seconds == pytest.approx(7.0)
    assert reader.memory().used_bytes == 600 * 1024


# --- the MetricSource ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def resource(name: str, target: MetricTarget) -> MetricSpec:
    return MetricSpec(type="Resource", resource=ResourceMetricSource(name=name, target=target))


CPU_50 = resource("cpu", MetricTarget(type="Utilization", average_utilization=50))
CPU_300M = resource("cpu", MetricTarget(type="AverageValue", average_value="300m"))
MEMORY_50 = resource("memory", MetricTarget(type="Utilization", average_utilization=50))
PODS = MetricSpec(
    type="Pods",
    pods=PodsMetricSource(
        metric=MetricIdentifier(name="qps"), target=MetricTarget(type="AverageValue", average_value="10")
    ),
)
EXTERNAL = MetricSpec(
    type="External",
    external=ExternalMetricSource(
        metric=MetricIdentifier(name="queue"), target=MetricTarget(type="Value", value="5")
    ),
)


def set_usage_v2(root: Path, seconds: float) -> None:
    (root / "cpu.stat").write_text(f"usage_usec {int(seconds * 1e6)}\n")


def test_cpu_is_unknown_at_first_then_measured_against_the_cgroup_quota(tmp_path):
    root = v2_tree(tmp_path)
    clock = Clock()
    source = LocalMetricSource(CgroupV2Reader(root, tmp_path / "proc"), clock, window=10)
    (first,) = source.sample((CPU_50,))
    assert first.current is None and "warming up" in first.reason
    clock.now, _ = 2.0, set_usage_v2(root, 0.6)  # 0.3 cores of a 0.5 quota
    (obs,) = source.sample((CPU_50,))
    assert obs.current == pytest.approx(60.0)
    assert obs.target == 50
    assert obs.metric == "resource cpu on pods (as a percentage of request)"
    assert "cgroup v2" in obs.reason and "quota" in obs.reason


def test_the_cpu_request_flag_beats_the_quota_and_the_quota_beats_the_host(tmp_path):
    root = v2_tree(tmp_path)
    for request, expected in [(0.25, 120.0), (None, 60.0)]:
        clock = Clock()
        set_usage_v2(root, 0)
        source = LocalMetricSource(CgroupV2Reader(root, tmp_path / "proc"), clock, cpu_request=request)
        source.sample((CPU_50,))
        clock.now = 2.0
        set_usage_v2(root, 0.6)
        assert source.sample((CPU_50,))[0].current == pytest.approx(expected)
    no_quota = v2_tree(tmp_path / "other", cpu_max="max 100000")
    clock = Clock()
    source = LocalMetricSource(CgroupV2Reader(no_quota, tmp_path / "proc"), clock, host_cpus=4)
    source.sample((CPU_50,))
    clock.now = 1.0
    set_usage_v2(no_quota, 2.0)
    (obs,) = source.sample((CPU_50,))
    assert obs.current == pytest.approx(50.0) and "host's cpus" in obs.reason


def test_cpu_is_averaged_over_the_sliding_window(tmp_path):
    root = v1_tree(tmp_path)
    clock = Clock()
    source = LocalMetricSource(CgroupV1Reader(root, tmp_path / "proc"), clock, cpu_request=1.0, window=4)
    usage = 0.0
    values = []
    # 1 core busy for 4 s, then idle: the window's average falls by a quarter a second.
    for t in range(1, 10):
        usage += 1.0 if t <= 4 else 0.0
        (root / "cpuacct" / "cpuacct.usage").write_text(str(int(usage * 1e9)))
        clock.now = float(t)
        values.append(source.sample((CPU_50,))[0].current)
    assert values == [None, 100.0, 100.0, 100.0, 75.0, 50.0, 25.0, 0.0, 0.0]


def test_a_counter_that_goes_backwards_restarts_the_measurement(tmp_path):
    root = v2_tree(tmp_path, usage_usec=5_000_000)
    clock = Clock()
    source = LocalMetricSource(CgroupV2Reader(root, tmp_path / "proc"), clock)
    source.sample((CPU_50,))
    clock.now = 1.0
    set_usage_v2(root, 0.1)
    (obs,) = source.sample((CPU_50,))
    assert obs.current is None and "warming up" in obs.reason


def test_average_value_cpu_is_in_cores(tmp_path):
    root = v2_tree(tmp_path)
    clock = Clock()
    source = LocalMetricSource(CgroupV2Reader(root, tmp_path / "proc"), clock)
    source.sample((CPU_300M,))
    clock.now, _ = 1.0, set_usage_v2(root, 0.4)
    (obs,) = source.sample((CPU_300M,))
    assert obs.current == pytest.approx(0.4) and obs.target == pytest.approx(0.3)


def test_memory_utilization_is_usage_over_the_limit_else_the_host(tmp_path):
    v2 = v2_tree(tmp_path / "a")
    (obs,) = LocalMetricSource(CgroupV2Reader(v2, tmp_path / "a" / "proc"), Clock()).sample((MEMORY_50,))
    assert obs.current == pytest.approx(25.0)
    v1 = v1_tree(tmp_path / "b")  # unlimited: against the host's 8000 kB
    (obs,) = LocalMetricSource(CgroupV1Reader(v1, tmp_path / "b" / "proc"), Clock()).sample((MEMORY_50,))
    assert obs.current == pytest.approx(1024 / 8000 * 100, abs=0.1)
    assert "host's memory" in obs.reason


def test_other_metric_types_are_not_available_in_standalone_mode(tmp_path):
    root = v2_tree(tmp_path)
    source = LocalMetricSource(CgroupV2Reader(root, tmp_path / "proc"), Clock())
    gpu = resource("nvidia.com/gpu", MetricTarget(type="Utilization", average_utilization=50))
    observations = source.sample((PODS, EXTERNAL, gpu))
    assert [o.current for o in observations] == [None, None, None]
    assert all("not available in standalone mode" in o.reason for o in observations)
    assert [o.target for o in observations] == [10, 5, 50]


def test_container_resource_metrics_mean_the_local_container(tmp_path):
    root = v2_tree(tmp_path)
    clock = Clock()
    source = LocalMetricSource(CgroupV2Reader(root, tmp_path / "proc"), clock)
    spec = MetricSpec(
        type="ContainerResource",
        container_resource=ContainerResourceMetricSource(
            name="cpu", container="model", target=MetricTarget(type="Utilization", average_utilization=50)
        ),
    )
    source.sample((spec,))
    clock.now, _ = 1.0, set_usage_v2(root, 0.25)
    assert source.sample((spec,))[0].current == pytest.approx(50.0)


def test_a_vanished_cgroup_file_is_an_unknown_value_naming_it(tmp_path):
    root = v2_tree(tmp_path)
    source = LocalMetricSource(CgroupV2Reader(root, tmp_path / "proc"), Clock())
    (root / "cpu.stat").unlink()
    (obs,) = source.sample((CPU_50,))
    assert obs.current is None and "cpu.stat" in obs.reason


def test_a_process_that_exited_is_an_unknown_value(tmp_path):
    write(tmp_path / "proc", PROC)
    source = LocalMetricSource(ProcessTreeReader(4242, tmp_path / "proc"), Clock())
    (obs,) = source.sample((CPU_50,))
    assert obs.current is None and "process 4242" in obs.reason


def test_observe_is_the_async_face_of_sample(tmp_path):
    root = v2_tree(tmp_path)
    source = LocalMetricSource(CgroupV2Reader(root, tmp_path / "proc"), Clock())
    (obs,) = asyncio.run(source.observe(OffloadingConfig(metrics=(MEMORY_50,))))
    assert obs.current == pytest.approx(25.0)
