"""A structural check of a Pod, for patched pods in tests: the rules of the API server's
Pod validation that an injector could break (names, ports, probes, restart policies,
volumes and their mounts)."""

from __future__ import annotations

import re
from typing import Any

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def pod_problems(pod: Any) -> list[str]:
    """Every problem found, as 'path: what'; empty for a structurally valid Pod."""
    problems: list[str] = []
    if not isinstance(pod, dict) or pod.get("kind") != "Pod" or pod.get("apiVersion") != "v1":
        return ["<root>: not a v1 Pod"]
    meta = pod.get("metadata")
    if not isinstance(meta, dict) or not (meta.get("name") or meta.get("generateName")):
        problems.append("metadata.name: neither name nor generateName")
    else:
        for key in ("labels", "annotations"):
            values = meta.get(key, {})
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                problems.append(f"metadata.{key}: must map strings to strings")
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return [*problems, "spec: required"]
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        problems.append("spec.containers: at least one container is required")
        containers = []
    init = spec.get("initContainers", [])
    if not isinstance(init, list):
        problems.append("spec.initContainers: must be a list")
        init = []
    volumes = spec.get("volumes", [])
    volume_names: set[str] = set()
    if not isinstance(volumes, list):
        problems.append("spec.volumes: must be a list")
        volumes = []
    for i, volume in enumerate(volumes):
        name = volume.get("name") if isinstance(volume, dict) else None
        if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name) or len(name) > 63:
            problems.append(f"spec.volumes[{i}].name: not a DNS label: {name!r}")
        elif name in volume_names:
            problems.append(f"spec.volumes[{i}].name: duplicate volume name {name!r}")
        volume_names.add(str(name))
    names: set[str] = set()
    port_numbers: set[tuple[int, str]] = set()
    for group, items in (("initContainers", init), ("containers", containers)):
        for i, container in enumerate(items):
            path = f"spec.{group}[{i}]"
            if not isinstance(container, dict):
                problems.append(f"{path}: must be an object")
                continue
            name = container.get("name")
            if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name) or len(name) > 63:
                problems.append(f"{path}.name: not a DNS label: {name!r}")
            elif name in names:
                problems.append(f"{path}.name: duplicate container name {name!r}")
            names.add(str(name))
            if not isinstance(container.get("image"), str) or not container["image"]:
                problems.append(f"{path}.image: required")
            restart = container.get("restartPolicy")
            if group == "containers" and restart is not None:
                problems.append(f"{path}.restartPolicy: only init containers may set it")
            if group == "initContainers" and restart not in (None, "Always"):
                problems.append(f"{path}.restartPolicy: must be Always when set, got {restart!r}")
            if group == "initContainers" and restart != "Always":
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    if probe in container:
                        problems.append(f"{path}.{probe}: a regular init container may not have probes")
            port_names: set[str] = set()
            for j, port in enumerate(container.get("ports", [])):
                where = f"{path}.ports[{j}]"
                number = port.get("containerPort")
                if not isinstance(number, int) or not 1 <= number <= 65535:
                    problems.append(f"{where}.containerPort: must be 1-65535, got {number!r}")
                    continue
                key = (number, port.get("protocol", "TCP"))
                if key in port_numbers:
                    problems.append(f"{where}.containerPort: {number}/{key[1]} is already used in the pod")
                port_numbers.add(key)
                if "name" in port:
                    pname = port["name"]
                    if not isinstance(pname, str) or len(pname) > 15 or not _PORT_NAME.fullmatch(pname):
                        problems.append(f"{where}.name: not an IANA service name: {pname!r}")
                    elif pname in port_names:
                        problems.append(f"{where}.name: duplicate port name {pname!r}")
                    port_names.add(str(pname))
            mount_paths: set[str] = set()
            for j, mount in enumerate(container.get("volumeMounts", [])):
                where = f"{path}.volumeMounts[{j}]"
                if mount.get("name") not in volume_names:
                    problems.append(f"{where}.name: no volume named {mount.get('name')!r}")
                mount_path = mount.get("mountPath")
                if not isinstance(mount_path, str) or not mount_path.startswith("/"):
                    problems.append(f"{where}.mountPath: must be an absolute path, got {mount_path!r}")
                elif mount_path in mount_paths:
                    problems.append(f"{where}.mountPath: {mount_path!r} is mounted twice")
                mount_paths.add(str(mount_path))
            env_names = [e.get("name") for e in container.get("env", [])]
            if len(env_names) != len(set(env_names)):
                problems.append(f"{path}.env: duplicate names")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                target = (container.get(probe) or {}).get("httpGet", {}).get("port")
                if isinstance(target, str) and target not in port_names:
                    problems.append(
                        f"{path}.{probe}.httpGet.port: {target!r} is not a port of this container"
                    )
    return problems
