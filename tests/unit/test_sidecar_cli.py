"""The sidecar starts from what the injector gives it: its command and environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar.cli import build_parser, choose_mode, env_defaults

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


def test_a_bad_upstream_in_the_environment_falls_back_to_the_model_port_and_says_so():
    env = {"OFFLOAD_UPSTREAM": "127.0.0.1:notaport", "OFFLOAD_MODEL_PORT": "8000"}
    args = build_parser(env).parse_args([])
    assert args.upstream == ("127.0.0.1", 8000)
    assert env_defaults(env).problems == (
        "OFFLOAD_UPSTREAM: not host:port: '127.0.0.1:notaport'; using OFFLOAD_MODEL_PORT: 127.0.0.1:8000",
    )


def test_bad_ports_in_the_environment_fall_back_to_the_injectors_and_say_so():
    env = {"OFFLOAD_UPSTREAM": "8000", "OFFLOAD_PROXY_PORT": "x", "OFFLOAD_ADMIN_PORT": "99999"}
    args = build_parser(env).parse_args([])
    assert (args.listen, args.admin_listen) == (("0.0.0.0", 15080), ("0.0.0.0", 15090))
    assert env_defaults(env).problems == (
        "OFFLOAD_PROXY_PORT: not host:port: 'x'; using 15080",
        "OFFLOAD_ADMIN_PORT: not host:port: '99999'; using 15090",
    )


def test_with_no_usable_model_address_at_all_the_upstream_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser({"OFFLOAD_UPSTREAM": "127.0.0.1:notaport"}).parse_args([])
    assert exc.value.code == 2
    assert "--upstream" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env, has_config, mode",
    [
        ({"POD_NAMESPACE": "m", "MODELDEPLOYMENT_NAME": "x"}, False, "cluster"),
        ({"POD_NAMESPACE": "m", "MODELDEPLOYMENT_NAME": "x"}, True, "cluster"),
        # An injected pod whose environment lost a variable: cluster mode, degraded, not an exit.
        ({"POD_NAMESPACE": "m"}, False, "cluster"),
        ({"MODELDEPLOYMENT_NAME": "x"}, False, "cluster"),
        ({"OFFLOAD_SERVICEACCOUNT_DIR": "/var/run/x"}, False, "cluster"),
        # Standalone in a pod: --config says so.
        ({"POD_NAMESPACE": "m"}, True, "standalone"),
        ({}, False, "standalone"),
    ],
)
def test_the_mode_follows_the_injectors_environment(env, has_config, mode):
    assert choose_mode("auto", env, has_config) == mode
    assert choose_mode("standalone", env, has_config) == "standalone"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1m30s", 90.0), ("500ms", 0.5), ("2m", 120.0), ("1h0m5s", 3605.0), ("1.5", 1.5), ("30", 30.0)],
)
def test_durations_are_go_durations_or_bare_seconds(text, seconds):
    args = build_parser({}).parse_args(
        ["--upstream", "8000", "--poll-interval", text, "--shutdown-deadline", text]
    )
    assert args.poll_interval == seconds and args.shutdown_deadline == seconds


@pytest.mark.parametrize("text", ["", "1x", "m", "-1s", "1e3", "nan", "1m30"])
def test_a_malformed_duration_is_a_usage_error_with_examples(text, capsys):
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["--upstream", "8000", f"--shutdown-deadline={text}"])
    err = capsys.readouterr().err
    assert "not a duration" in err and "1m30s" in err
