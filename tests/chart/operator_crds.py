"""The Prometheus Operator's published CRDs (PodMonitor, ServiceMonitor, PrometheusRule), to
validate the chart's objects against their openAPIV3Schema.

They come from the operator's Go module (example/prometheus-operator-crd/), fetched once
through the Go module proxy into Go's module cache (`go mod download`), as
tests/e2e/controlplane/build.sh fetches the control plane. A missing Go toolchain or a failed
download raises: the test fails, it never skips.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import yaml

MODULE = "github.com/prometheus-operator/prometheus-operator"
VERSION = "v0.85.0"
CRDS = {
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
}


def _go() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if os.path.exists("/usr/local/go/bin/go") else None)
    if found is None:
        raise RuntimeError("the Go toolchain (go) is needed to fetch the Prometheus Operator's CRDs")
    return found


def module_dir() -> Path:
    """Where `go mod download` put the operator's module (downloading it the first time)."""
    with tempfile.TemporaryDirectory() as outside_any_module:
        done = subprocess.run(
            [_go(), "mod", "download", "-json", f"{MODULE}@{VERSION}"],
            cwd=outside_any_module,
            env={**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "on"},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"go mod download {MODULE}@{VERSION} failed:\n{done.stdout}{done.stderr}")
    return Path(json.loads(done.stdout)["Dir"])


def _strict(schema: Any) -> Any:
    """The schema with additionalProperties: false on every object that lists its properties
    and does not keep unknown fields: the API server would prune an unknown field silently
    (a misspelt key would just not take effect), so the test refuses it instead."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def schemas() -> dict[str, dict[str, Any]]:
    """kind -> the strict openAPIV3Schema of its served, storage version."""
    root = module_dir() / "example" / "prometheus-operator-crd"
    found = {}
    for kind, name in CRDS.items():
        crd = yaml.safe_load((root / name).read_text())
        assert crd["spec"]["names"]["kind"] == kind
        version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        found[kind] = {
            "version": version["name"],
            "schema": _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"])),
        }
    return found


def problems(obj: dict[str, Any], crd: dict[str, Any]) -> list[str]:
    """Every schema violation of ``obj``, as "path: message"."""
    apiversion = f"monitoring.coreos.com/{crd['version']}"
    found = (
        []
        if obj.get("apiVersion") == apiversion
        else [f"apiVersion: {obj.get('apiVersion')} is not {apiversion}"]
    )
    validator = jsonschema.Draft7Validator(crd["schema"])
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in error.absolute_path) or "(root)"
        found.append(f"{path}: {error.message}")
    return found
