"""The injector configuration file: the chart's output parses; every bad key is named."""

from __future__ import annotations

import pytest
import yaml

from webhook.injector_config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_PROXY_PORT,
    ConfigError,
    load_config,
    parse_config,
)

# What charts/offload/templates/_helpers.tpl "offload.injectorConfig" renders by default.
CHART_OUTPUT = """\
configVersion: "0.1.0"
image: ghcr.io/model-offloading/offload:0.1.0
imagePullPolicy: IfNotPresent
proxyPort: 8080
adminPort: 9090
nativeSidecar: true
resources:
  limits:
    memory: 128Mi
  requests:
    cpu: 50m
    memory: 64Mi
"""


def test_the_charts_configuration_loads(tmp_path):
    path = tmp_path / "injector.yaml"
    path.write_text(CHART_OUTPUT)
    config = load_config(path)
    assert config.image == "ghcr.io/model-offloading/offload:0.1.0"
    assert (config.proxy_port, config.admin_port, config.native_sidecar) == (8080, 9090, True)
    assert config.config_version == "0.1.0"
    assert config.resources == {"limits": {"memory": "128Mi"}, "requests": {"cpu": "50m", "memory": "64Mi"}}


def test_defaults():
    config = parse_config({"image": "offload:1", "resources": {"requests": {"cpu": "10m"}}})
    assert (
        (config.proxy_port, config.admin_port) == (DEFAULT_PROXY_PORT, DEFAULT_ADMIN_PORT) == (15080, 15090)
    )
    assert config.native_sidecar is True and config.image_pull_policy == "IfNotPresent"
    assert config.prometheus_annotations is False


# A sidecar without a cpu request makes every cpu Utilization metric of its pod invalid (the
# HPA's rule): offloading could never start and an HPA on the same workload would break.
@pytest.mark.parametrize(
    "resources",
    [
        None,
        {},
        {"requests": {"memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        {"requests": None, "limits": {"memory": "128Mi"}},
    ],
)
def test_a_sidecar_without_a_cpu_request_is_refused_naming_the_key(resources):
    data = {"image": "offload:1"}
    if resources is not None:
        data["resources"] = resources
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value).startswith("resources.requests.cpu: required: ")
    assert "Utilization" in str(caught.value)


def test_a_cpu_limit_alone_is_enough_the_api_server_defaults_the_request_to_it():
    assert parse_config({"image": "offload:1", "resources": {"limits": {"cpu": "1"}}}).resources == {
        "limits": {"cpu": "1"}
    }


def test_the_file_without_a_cpu_request_is_refused_with_its_path(tmp_path):
    path = tmp_path / "injector.yaml"
    path.write_text(CHART_OUTPUT.replace("    cpu: 50m\n", ""))
    with pytest.raises(ConfigError, match=f"^{path}: resources.requests.cpu: required"):
        load_config(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": None}, "image: not a valid image reference"),
        ({"imagePullPolicy": "Sometimes"}, "imagePullPolicy: must be one of Always, IfNotPresent, Never"),
        ({"proxyPort": 70000}, "proxyPort: must be a port number between 1 and 65535"),
        ({"adminPort": 8080, "proxyPort": 8080}, "adminPort: must differ from proxyPort (8080)"),
        ({"nativeSidecar": "yes"}, "nativeSidecar: must be true or false"),
        ({"prometheusAnnotations": "true"}, "prometheusAnnotations: must be true or false"),
        ({"resources": {"requests": {"cpu": "fast"}}}, "resources.requests.cpu: not a valid quantity"),
        ({"resources": {"requets": {}}}, "resources.requets: unknown key"),
        (
            {"resources": {"requests": {"memory": "1Gi"}, "limits": {"memory": "1Mi"}}},
            "resources.requests.memory: 1Gi is above the limit 1Mi",
        ),
        ({"proxyport": 1}, "proxyport: unknown key"),
    ],
)
def test_bad_configurations_name_the_key(change, message):
    data = {**yaml.safe_load(CHART_OUTPUT), **change}
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert message in str(caught.value)


def test_a_missing_image_or_file_or_bad_yaml_is_an_error_with_the_path(tmp_path):
    with pytest.raises(ConfigError, match="image: required key is missing"):
        parse_config({"proxyPort": 1})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(listed)
