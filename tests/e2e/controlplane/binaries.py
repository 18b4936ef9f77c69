"""Locates the control-plane binaries, building them with build.sh first."""

from __future__ import annotations

import collections
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUILD_SCRIPT = Path(__file__).with_name("build.sh")


class BuildFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    helm: Path

    def all(self) -> dict[str, Path]:
        return {name.replace("_", "-"): path for name, path in self.__dict__.items()}


@dataclass(frozen=True)
class NodeBinaries:
    """The real node's: built by the same recipe, from the same Kubernetes module."""

    kubelet: Path
    kube_proxy: Path
    metrics_server: Path

    def all(self) -> dict[str, Path]:
        return {name.replace("_", "-"): path for name, path in self.__dict__.items()}


CONTROL_PLANE = ("kubernetes", "etcd", "kwok", "helm")
NODE = ("kubernetes-node", "metrics-server")


def _run_build(
    args: list[str], echo: Callable[[str], None] = lambda line: None, components: tuple[str, ...] = ()
) -> str:
    """Runs build.sh (for `components` only, when given), passing each line of its progress
    (stderr) to `echo`; returns stdout."""
    tail: collections.deque[str] = collections.deque(maxlen=80)
    env = {**os.environ, "OFFLOAD_E2E_COMPONENTS": " ".join(components)} if components else None
    with tempfile.TemporaryFile("w+") as stdout:
        with subprocess.Popen(
            ["bash", str(BUILD_SCRIPT), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            for line in proc.stderr:
                tail.append(line.rstrip("\n"))
                echo(line.rstrip("\n"))
        stdout.seek(0)
        output = stdout.read()
    if proc.returncode != 0:
        raise BuildFailed(
            f"{BUILD_SCRIPT} {' '.join(args)} failed with code {proc.returncode}; last lines:\n"
            + "\n".join(tail)
        )
    return output


def _bin_dirs() -> dict[str, str]:
    return dict(line.split(" ", 1) for line in _run_build(["--print-bin-dirs"]).splitlines() if line)


def build(echo: Callable[[str], None] = lambda line: None) -> Binaries:
    """Runs build.sh for the control plane (seconds when everything is cached) and returns
    the binaries' paths. A first build takes long: `echo` receives its progress lines."""
    _run_build([], echo, CONTROL_PLANE)
    dirs = _bin_dirs()
    kube, etcd, kwok, helm = (Path(dirs[k]) for k in ("kubernetes", "etcd", "kwok", "helm"))
    binaries = Binaries(
        etcd=etcd / "etcd",
        kube_apiserver=kube / "kube-apiserver",
        kube_controller_manager=kube / "kube-controller-manager",
        kube_scheduler=kube / "kube-scheduler",
        kubectl=kube / "kubectl",
        kwok=kwok / "kwok",
        helm=helm / "helm",
    )
    missing = [str(p) for p in binaries.all().values() if not p.is_file()]
    if missing:
        raise BuildFailed(f"build.sh succeeded but these binaries are missing: {missing}")
    return binaries


def build_node(echo: Callable[[str], None] = lambda line: None) -> NodeBinaries:
    """Runs build.sh for kubelet, kube-proxy and metrics-server; returns their paths."""
    _run_build([], echo, NODE)
    dirs = _bin_dirs()
    node, metrics = Path(dirs["kubernetes-node"]), Path(dirs["metrics-server"])
    binaries = NodeBinaries(
        kubelet=node / "kubelet", kube_proxy=node / "kube-proxy", metrics_server=metrics / "metrics-server"
    )
    missing = [str(p) for p in binaries.all().values() if not p.is_file()]
    if missing:
        raise BuildFailed(f"build.sh succeeded but these binaries are missing: {missing}")
    return binaries


def version_of(binary: Path) -> str:
    """The first line a binary prints about its version."""
    args = {"kubectl": ["version", "--client"], "helm": ["version", "--short"]}.get(
        binary.name, ["--version"]
    )
    result = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30, check=False)
    out = (result.stdout or result.stderr).strip().splitlines()
    return out[0] if out else f"(no version output, exit {result.returncode})"
