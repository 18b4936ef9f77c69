"""Standalone mode's MetricSource: CPU and memory of the local machine.

Where the numbers come from, first match wins:

- **cgroup v2** (``<root>/cgroup.controllers`` exists): ``cpu.stat`` usage_usec,
  ``cpu.max`` quota/period; ``memory.current`` / ``memory.max``.
- **cgroup v1** (``<root>/cpuacct/cpuacct.usage`` or ``cpu,cpuacct``):
  ``cpuacct.usage`` (ns), ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``;
  ``memory/memory.usage_in_bytes`` / ``memory.limit_in_bytes``.
- **the host** (``/proc/stat``, ``/proc/meminfo``) when there is no cgroup.
- **one process tree** (``--cpu-pid``): utime+stime of the process, its live
  descendants and its reaped children from ``/proc/<pid>/stat``, for a model
  server on a laptop or CI box without cgroup delegation (the local demo).

The cgroup root is the container's own cgroup inside a container (cgroup
namespaces put it at ``/sys/fs/cgroup``), the whole machine on a host, or any
cgroup directory given with ``--cgroup-root`` (a systemd service's, say).

Utilization is CPU time used over a sliding window (``window`` seconds, like
metrics-server's resolution) divided by the *reference*: ``--cpu-request`` if
given (as the HPA divides by the pod's request), else the cgroup's CPU quota,
else the host's CPU count. Memory Utilization is usage over ``--memory-request``,
else the cgroup's limit, else the host's total memory.

Parsing is pure functions over file texts; the readers are thin and take a
root path, so tests lay out a cgroupfs in a temporary directory.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from crds.hpa import metric_display_name, spec_target
from crds.model import MetricSpec, MetricTarget, OffloadingConfig
from crds.observation import MetricObservation, unit_of
from crds.quantity import parse_quantity

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# cgroup v1 reports "no memory limit" as a page-rounded LONG_MAX.
_V1_UNLIMITED = 2**62
DEFAULT_WINDOW = 10.0
NOT_STANDALONE = "not available in standalone mode"


# --- pure parsing ----------------------------------------------------------------------


def _fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out[key.rstrip(":")] = value.strip()
    return out


def parse_v2_usage_seconds(cpu_stat: str) -> float:
    """CPU seconds from cgroup v2 ``cpu.stat`` (``usage_usec N``)."""
    value = _fields(cpu_stat).get("usage_usec")
    if value is None:
        raise ValueError("cpu.stat has no usage_usec")
    return int(value) / 1e6


def parse_v2_cpu_max(cpu_max: str) -> float | None:
    """Cores from cgroup v2 ``cpu.max`` (``"50000 100000"`` -> 0.5; ``"max ..."`` -> None)."""
    parts = cpu_max.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100000
    return int(parts[0]) / period


def parse_v1_usage_seconds(cpuacct_usage: str) -> float:
    """CPU seconds from cgroup v1 ``cpuacct.usage`` (nanoseconds)."""
    return int(cpuacct_usage.strip()) / 1e9


def parse_v1_cfs(quota_us: str, period_us: str) -> float | None:
    """Cores from cgroup v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` (quota -1: none)."""
    quota = int(quota_us.strip())
    if quota <= 0:
        return None
    return quota / int(period_us.strip())


def parse_memory_limit(text: str) -> int | None:
    """Bytes from ``memory.max`` (``max``: none) or v1 ``memory.limit_in_bytes`` (huge: none)."""
    text = text.strip()
    if text == "max":
        return None
    value = int(text)
    return None if value >= _V1_UNLIMITED else value


def parse_proc_stat_seconds(proc_stat: str, clk_tck: int = CLK_TCK) -> float:
    """Busy CPU seconds of the whole host from ``/proc/stat``'s ``cpu`` line.

    Busy = user + nice + system + irq + softirq + steal; idle and iowait are not
    (guest time is already inside user).
    """
    for line in proc_stat.splitlines():
        if line.startswith("cpu "):
            ticks = [int(v) for v in line.split()[1:]]
            ticks += [0] * (8 - len(ticks))
            user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
            return (user + nice + system + irq + softirq + steal) / clk_tck
    raise ValueError("/proc/stat has no cpu line")


def parse_pid_stat(pid_stat: str, clk_tck: int = CLK_TCK) -> tuple[float, int]:
    """``(cpu seconds, ppid)`` from ``/proc/<pid>/stat``: utime+stime+cutime+cstime.

    The command name (field 2) may hold spaces and parentheses, so fields are
    counted from its last ``)``.
    """
    rest = pid_stat[pid_stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime is field 14.
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(v) for v in rest[11:15])
    return (utime + stime + cutime + cstime) / clk_tck, ppid


def parse_meminfo(meminfo: str) -> tuple[int, int]:
    """``(used, total)`` bytes from ``/proc/meminfo`` (used = MemTotal - MemAvailable)."""
    fields = _fields(meminfo)
    total = int(fields["MemTotal"].split()[0]) * 1024
    available = int(fields.get("MemAvailable", fields.get("MemFree", "0")).split()[0]) * 1024
    return total - available, total


def parse_vm_rss(status: str) -> int:
    """Bytes from ``/proc/<pid>/status``'s VmRSS (0 for a zombie)."""
    value = _fields(status).get("VmRSS")
    return int(value.split()[0]) * 1024 if value else 0


def parse_cores(text: str) -> float:
    """A CPU quantity as the user writes it: ``500m`` -> 0.5, ``2`` -> 2.0."""
    cores = float(parse_quantity(text))
    if cores <= 0:
        raise ValueError(f"a CPU amount must be positive, got {text!r}")
    return cores


@dataclass(frozen=True)
class CpuSample:
    usage_seconds: float  # CPU time used since some origin
    at: float  # the wall (monotonic) clock when it was read


def utilization_percent(first: CpuSample, last: CpuSample, cores: float) -> float:
    """CPU used between two samples as a percentage of ``cores``."""
    elapsed = last.at - first.at
    if elapsed <= 0:
        raise ValueError("samples must be apart in time")
    return (last.usage_seconds - first.usage_seconds) / elapsed / cores * 100


# --- readers: thin I/O -------------------------------------------------------------------


@dataclass(frozen=True)
class CpuReading:
    usage_seconds: float
    limit_cores: float | None  # the quota, if any


@dataclass(frozen=True)
class MemoryReading:
    used_bytes: int
    limit_bytes: int | None


class Reader(Protocol):
    kind: str  # "cgroup v2", "cgroup v1", "host", "process 1234"

    def cpu(self) -> CpuReading: ...

    def memory(self) -> MemoryReading: ...


def _read(path: Path) -> str:
    return path.read_text()


class HostReader:
    kind = "host"

    def __init__(self, proc_root: Path = Path("/proc")):
        self.proc = proc_root

    def cpu(self) -> CpuReading:
        return CpuReading(parse_proc_stat_seconds(_read(self.proc / "stat")), None)

    def memory(self) -> MemoryReading:
        used, total = parse_meminfo(_read(self.proc / "meminfo"))
        return MemoryReading(used, total)


class CgroupV2Reader:
    kind = "cgroup v2"

    def __init__(self, root: Path, proc_root: Path = Path("/proc")):
        self.root = root
        self.host = HostReader(proc_root)

    def cpu(self) -> CpuReading:
        usage = parse_v2_usage_seconds(_read(self.root / "cpu.stat"))
        cpu_max = self.root / "cpu.max"  # absent in the root cgroup
        return CpuReading(usage, parse_v2_cpu_max(_read(cpu_max)) if cpu_max.exists() else None)

    def memory(self) -> MemoryReading:
        current = self.root / "memory.current"  # absent in the root cgroup
        if not current.exists():
            return self.host.memory()
        limit = parse_memory_limit(_read(self.root / "memory.max"))
        return MemoryReading(int(_read(current).strip()), limit)


class CgroupV1Reader:
    kind = "cgroup v1"

    def __init__(self, root: Path, proc_root: Path = Path("/proc")):
        self.root = root
        self.host = HostReader(proc_root)
        self.cpuacct = _first_dir(root, ("cpuacct", "cpu,cpuacct", "cpuacct,cpu"), "cpuacct.usage")
        self.cpu_dir = _first_dir(root, ("cpu", "cpu,cpuacct", "cpuacct,cpu"), "cpu.cfs_quota_us")

    def cpu(self) -> CpuReading:
        if self.cpuacct is None:
            raise FileNotFoundError(f"no cpuacct.usage under {self.root}")
        usage = parse_v1_usage_seconds(_read(self.cpuacct / "cpuacct.usage"))
        limit = None
        if self.cpu_dir is not None:
            limit = parse_v1_cfs(
                _read(self.cpu_dir / "cpu.cfs_quota_us"), _read(self.cpu_dir / "cpu.cfs_period_us")
            )
        return CpuReading(usage, limit)

    def memory(self) -> MemoryReading:
        memory = self.root / "memory"
        if not (memory / "memory.usage_in_bytes").exists():
            return self.host.memory()
        used = int(_read(memory / "memory.usage_in_bytes").strip())
        return MemoryReading(used, parse_memory_limit(_read(memory / "memory.limit_in_bytes")))


def _first_dir(root: Path, names: tuple[str, ...], marker: str) -> Path | None:
    for name in names:
        if (root / name / marker).exists():
            return root / name
    return None


class ProcessTreeReader:
    """CPU and RSS of one process, its live descendants and its reaped children."""

    def __init__(self, pid: int, proc_root: Path = Path("/proc")):
        self.pid = pid
        self.proc = proc_root
        self.host = HostReader(proc_root)
        self.kind = f"process {pid}"

    def _tree(self) -> list[int]:
        """The pid and its live descendants, from each process's ppid."""
        parents: dict[int, list[int]] = {}
        for entry in self.proc.iterdir():
            if not entry.name.isdigit() or entry.name == str(self.pid):
                continue
            try:
                _, ppid = parse_pid_stat(_read(entry / "stat"))
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            parents.setdefault(ppid, []).append(int(entry.name))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(parents.get(pid, ()))
        return tree

    def cpu(self) -> CpuReading:
        # The root process must be there; a descendant may exit between reads.
        total, _ = parse_pid_stat(_read(self.proc / str(self.pid) / "stat"))
        for pid in self._tree()[1:]:
            try:
                total += parse_pid_stat(_read(self.proc / str(pid) / "stat"))[0]
            except (OSError, ValueError, IndexError):
                pass
        return CpuReading(total, None)

    def memory(self) -> MemoryReading:
        used = parse_vm_rss(_read(self.proc / str(self.pid) / "status"))
        for pid in self._tree()[1:]:
            try:
                used += parse_vm_rss(_read(self.proc / str(pid) / "status"))
            except (OSError, ValueError):
                pass
        return MemoryReading(used, self.host.memory().limit_bytes)


def detect_reader(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_root: Path = Path("/proc")) -> Reader:
    """The reader for this machine: cgroup v2, cgroup v1, else the host."""
    if (cgroup_root / "cgroup.controllers").exists() and (cgroup_root / "cpu.stat").exists():
        return CgroupV2Reader(cgroup_root, proc_root)
    v1 = CgroupV1Reader(cgroup_root, proc_root)
    if v1.cpuacct is not None:
        return v1
    return HostReader(proc_root)


# --- the MetricSource ----------------------------------------------------------------------


def _target_number(target: MetricTarget) -> float:
    if target.type == "Utilization":
        return float(target.average_utilization or 0)
    raw = target.average_value if target.type == "AverageValue" else target.value
    return float(parse_quantity(raw if raw is not None else 0))


def _resource_name(spec: MetricSpec) -> str | None:
    """The resource a Resource/ContainerResource metric measures; here both mean the local one."""
    if spec.type == "Resource" and spec.resource is not None:
        return spec.resource.name
    if spec.type == "ContainerResource" and spec.container_resource is not None:
        return spec.container_resource.name
    return None


class LocalMetricSource:
    """Evaluates Resource cpu/memory metrics on this machine; others are unavailable.

    ``clock`` is a monotonic clock in seconds. CPU utilization needs two readings
    a moment apart, so the first observation of cpu is unknown ("warming up").
    """

    def __init__(
        self,
        reader: Reader,
        clock: Callable[[], float],
        *,
        cpu_request: float | None = None,
        memory_request: int | None = None,
        window: float = DEFAULT_WINDOW,
        host_cpus: int | None = None,
    ):
        self.reader = reader
        self.clock = clock
        self.cpu_request = cpu_request
        self.memory_request = memory_request
        self.window = window
        self.host_cpus = host_cpus or os.cpu_count() or 1
        self._samples: deque[CpuSample] = deque()

    async def observe(self, config: OffloadingConfig) -> list[MetricObservation]:
        return self.sample(config.metrics)

    def sample(self, metrics: tuple[MetricSpec, ...]) -> list[MetricObservation]:
        """One observation per metric; reads each resource at most once."""
        cpu: tuple[float | None, float | None, str] | None = None
        memory: tuple[float | None, float | None, str] | None = None
        out = []
        for spec in metrics:
            name = metric_display_name(spec)
            target = spec_target(spec)
            goal = _target_number(target)
            unit = unit_of(target.type)
            resource = _resource_name(spec)
            if resource == "cpu":
                cpu = cpu or self._cpu()
                reading = cpu
            elif resource == "memory":
                memory = memory or self._memory()
                reading = memory
            else:
                what = f"{spec.type} metric" if resource is None else f"resource {resource!r}"
                out.append(MetricObservation(name, None, goal, f"{what}: {NOT_STANDALONE}", spec.type, unit))
                continue
            percent, amount, how = reading
            if target.type == "Utilization":
                out.append(MetricObservation(name, percent, goal, how, spec.type, unit))
            elif target.type == "AverageValue":
                out.append(MetricObservation(name, amount, goal, how, spec.type, unit))
            else:
                out.append(
                    MetricObservation(
                        name, None, goal, f"target type {target.type!r}: {NOT_STANDALONE}", spec.type, unit
                    )
                )
        return out

    def cpu_reference(self, limit: float | None) -> tuple[float, str]:
        if self.cpu_request is not None:
            return self.cpu_request, "the cpu request"
        if limit is not None:
            return limit, "the cgroup's cpu quota"
        return float(self.host_cpus), "the host's cpus"

    def _cpu(self) -> tuple[float | None, float | None, str]:
        """(percent of the reference, cores used, how) over the window."""
        try:
            reading = self.reader.cpu()
        except (OSError, ValueError, IndexError) as exc:
            self._samples.clear()
            return None, None, f"{self.reader.kind} cpu unreadable: {exc}"
        now = self.clock()
        samples = self._samples
        if samples and reading.usage_seconds < samples[-1].usage_seconds:
            samples.clear()  # the counter restarted (a new process or cgroup)
        samples.append(CpuSample(reading.usage_seconds, now))
        while len(samples) > 2 and samples[1].at <= now - self.window:
            samples.popleft()
        first = samples[0]
        if now - first.at <= 0:
            return None, None, f"{self.reader.kind} cpu: warming up (utilization needs two readings)"
        cores_used = (reading.usage_seconds - first.usage_seconds) / (now - first.at)
        reference, of = self.cpu_reference(reading.limit_cores)
        percent = utilization_percent(first, samples[-1], reference)
        how = (
            f"{self.reader.kind}: {cores_used:.3g} cores over {now - first.at:.0f}s "
            f"against {reference:g} ({of})"
        )
        return round(percent, 1), cores_used, how

    def _memory(self) -> tuple[float | None, float | None, str]:
        try:
            reading = self.reader.memory()
        except (OSError, ValueError, IndexError, KeyError) as exc:
            return None, None, f"{self.reader.kind} memory unreadable: {exc}"
        if self.memory_request is not None:
            reference, of = self.memory_request, "the memory request"
        elif reading.limit_bytes is not None:
            reference, of = reading.limit_bytes, "the memory limit"
        else:
            try:
                reference, of = self._host_memory_total(), "the host's memory"
            except (OSError, ValueError, KeyError) as exc:
                return None, reading.used_bytes, f"no memory reference: {exc}"
        percent = reading.used_bytes / reference * 100
        how = f"{self.reader.kind}: {reading.used_bytes} bytes against {reference} ({of})"
        return round(percent, 1), float(reading.used_bytes), how

    def _host_memory_total(self) -> int:
        host = getattr(self.reader, "host", None)
        if host is None:
            host = HostReader()
        total = host.memory().limit_bytes
        if total is None:
            raise ValueError("the host's total memory is unknown")
        return total
