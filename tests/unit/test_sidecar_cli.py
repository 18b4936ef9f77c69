"""The sidecar starts from what the injector gives it: its command and environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar.cli import build_parser

INJECTED = Path(__file__).parents[1] / "testdata" / "inject" / "one-container.patched.yaml"


def injected_sidecar() -> dict:
    pod = yaml.safe_load(INJECTED.read_text())
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "offload-proxy"]
    return sidecar


def test_the_injected_container_starts_with_the_addresses_from_its_environment():
    sidecar = injected_sidecar()
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    args = build_parser(env).parse_args(sidecar["command"][1:] + sidecar.get("args", []))
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert args.upstream == ("127.0.0.1", int(env["OFFLOAD_MODEL_PORT"]))
    assert args.listen == ("0.0.0.0", ports["offload-proxy"])
    assert args.admin_listen == ("0.0.0.0", ports["offload-admin"])


def test_flags_override_the_environment():
    env = {"OFFLOAD_UPSTREAM": "127.0.0.1:8000", "OFFLOAD_PROXY_PORT": "15080"}
    args = build_parser(env).parse_args(["--upstream", "9000", "--listen", "127.0.0.1:7000"])
    assert args.upstream == ("127.0.0.1", 9000)
    assert args.listen == ("127.0.0.1", 7000)


def test_without_the_environment_the_upstream_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser({}).parse_args([])
    assert exc.value.code == 2
    assert "--upstream" in capsys.readouterr().err


def test_a_bad_port_in_the_environment_is_a_usage_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser({"OFFLOAD_UPSTREAM": "127.0.0.1:notaport"}).parse_args([])
    assert "--upstream" in capsys.readouterr().err
