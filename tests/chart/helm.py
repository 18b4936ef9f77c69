"""The chart under test and the helm binary that renders it.

helm is the one build.sh pins and caches for the e2e tier (tests/e2e/controlplane/build.sh):
found with `--print-bin-dirs`, built (helm alone) when missing. A missing Go toolchain or a
failed build raises: chart tests fail loudly, they never skip.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "offload"
BUILD_SCRIPT = REPO_ROOT / "tests" / "e2e" / "controlplane" / "build.sh"
GOLDEN = Path(__file__).with_name("golden")

# What the default render is made for: the e2e tier's Kubernetes, a conventional namespace.
RELEASE = "offload"
NAMESPACE = "offload-system"
KUBE_VERSION = "v1.34.4"


class HelmUnavailable(RuntimeError):
    pass


def find_helm() -> Path:
    """The cached helm binary, building it first if it is not there yet."""
    path = _cached_helm()
    if path.is_file():
        return path
    built = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        env={**os.environ, "OFFLOAD_E2E_COMPONENTS": "helm"},
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if built.returncode != 0 or not path.is_file():
        raise HelmUnavailable(
            f"building helm with OFFLOAD_E2E_COMPONENTS=helm bash {BUILD_SCRIPT} failed "
            f"(exit {built.returncode}); last output:\n{built.stderr[-4000:]}"
        )
    return path


def _cached_helm() -> Path:
    printed = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-bin-dirs"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    dirs = dict(line.split(" ", 1) for line in printed.splitlines() if " " in line)
    if "helm" not in dirs:
        raise HelmUnavailable(f"{BUILD_SCRIPT} --print-bin-dirs names no helm directory:\n{printed}")
    return Path(dirs["helm"]) / "helm"


@dataclass(frozen=True)
class Helm:
    binary: Path

    def run(
        self, *args: str, kubeconfig: Path | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        # An empty HOME-independent configuration: no user repositories or plugins leak in.
        env = {**os.environ, "HELM_CONFIG_HOME": "/nonexistent-helm-config", "HELM_PLUGINS": "/nonexistent"}
        if kubeconfig is not None:
            args = (*args, "--kubeconfig", str(kubeconfig))
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
        )

    def template(
        self, *args: str, namespace: str = NAMESPACE, release: str = RELEASE
    ) -> subprocess.CompletedProcess:
        return self.run(
            "template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *args
        )

    def render(self, *args: str, **kw: str) -> str:
        """`helm template` output; fails the test with helm's message when it does not render."""
        result = self.template(*args, **kw)
        if result.returncode != 0:
            raise AssertionError(f"helm template {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout


def documents(rendered: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object; a duplicate is a bug in the chart."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in found, f"two {key[0]} objects named {key[1]}"
        found[key] = doc
    return found


# Lines whose values change on every render (generated keys and certificates, and what is
# derived from them); the golden file holds a placeholder instead.
_VOLATILE = re.compile(
    r"^(?P<key>\s*(?:tls\.crt|tls\.key|ca\.crt|caBundle|checksum/tls|[\w.-]+/not-after):) .*$", re.MULTILINE
)


def mask_volatile(rendered: str) -> str:
    return _VOLATILE.sub(r"\g<key> <generated>", rendered)
