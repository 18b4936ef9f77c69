"""headersFromSecrets: the headers a remote gets from Secrets, or why it is not used.

Pure resolution, the mounted-Secret file reader on real files, the keeper's
refresh with a held reader (a fake, named so: it returns what the test sets) on a
scripted sleep, the offloading state's plan and /status, and the RBAC rules that open
those Secrets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from crds.model import HeaderFromSecret, SecretKeySelector
from crds.rbac import sidecar_rules_for
from sidecar.admin.status import status_document
from sidecar.control.state import OffloadingState
from sidecar.credentials.headers import (
    SecretHeaderKeeper,
    SecretHeaders,
    header_value_problem,
    keeper_for,
    resolve_secret_headers,
    secret_keys,
    with_secret_headers,
)
from sidecar.credentials.secrets import SecretFileReader, follow_key
from sidecar.proxy.routing import RoutingTable
from sidecar.proxy.stats import ProxyStats
from sidecar.standalone.config import parse_document
from tests.modeldeployments import as_yaml, standalone

API_KEY = "k-7f3a9c1e"  # the value that must never be logged or shown

SPECS = (
    HeaderFromSecret("X-Api-Key", SecretKeySelector("remote-api", "apiKey")),
    HeaderFromSecret("X-Tenant", SecretKeySelector("remote-api", "tenant")),
    HeaderFromSecret("X-Other", SecretKeySelector("other", "apiKey")),
)

API_KEY_FROM_SECRET = {"name": "X-Api-Key", "secretKeyRef": {"name": "remote-api", "key": "apiKey"}}


def model_text(**remote) -> str:
    fields = {"headersToAdd": {"X-Static": "s"}, "headersFromSecrets": [API_KEY_FROM_SECRET], **remote}
    return as_yaml(standalone(host="remote.example:8443", scheme="https", remote=fields))


MODEL = model_text()


def model(text: str = MODEL):
    loaded = parse_document(text)
    assert loaded.model is not None, loaded.errors
    return loaded.model


# --- pure ----------------------------------------------------------------------------------------


def test_every_value_read_gives_the_headers_in_their_order():
    values = {("remote-api", "apiKey"): API_KEY, ("remote-api", "tenant"): "t1", ("other", "apiKey"): "o"}
    resolved = resolve_secret_headers(SPECS, values)
    assert resolved.usable
    assert resolved.headers == (("X-Api-Key", API_KEY), ("X-Tenant", "t1"), ("X-Other", "o"))
    assert API_KEY not in repr(resolved)


def test_a_missing_value_makes_the_headers_unusable_and_says_which_and_why():
    values = {("remote-api", "apiKey"): API_KEY, ("remote-api", "tenant"): "t1"}
    resolved = resolve_secret_headers(
        SPECS, values, {("other", "apiKey"): "cannot read Secret ns/other: 403"}
    )
    assert not resolved.usable and resolved.headers == ()
    assert (
        resolved.problem == "header X-Other from Secret other key 'apiKey': cannot read Secret ns/other: 403"
    )
    assert resolve_secret_headers(SPECS, {}).problem == (
        "header X-Api-Key from Secret remote-api key 'apiKey': not read yet"
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "is empty"),
        ("a\r\nInjected: yes", "holds CR, LF or NUL"),
        ("a\0b", "holds CR, LF or NUL"),
        ("a\x1bb", "holds characters not allowed in a header value"),
        ("clé-€", "holds characters not allowed in a header value"),  # € is not latin-1
        ("key-\u4e2d", "holds characters not allowed in a header value"),  # not latin-1
        ("a\x01b", "holds characters not allowed in a header value"),
        ("a\x7fb", "holds characters not allowed in a header value"),  # DEL
        ("a\x0bb", "holds characters not allowed in a header value"),  # vertical tab: only \t is allowed
        ("café", None),  # latin-1 (obs-text): sent as it is
        ("Bearer abc.def", None),
        ("tab\there", None),
    ],
)
def test_a_value_that_is_not_a_header_value_is_refused_without_echoing_it(value, problem):
    assert header_value_problem(value) == problem
    resolved = resolve_secret_headers(SPECS[:1], {("remote-api", "apiKey"): value})
    assert resolved.usable is (problem is None)
    if problem is not None:
        assert resolved.problem.endswith(f"the value {problem}")
        assert value not in resolved.problem or value == ""


def test_each_secret_key_is_read_once():
    assert secret_keys(SPECS + SPECS[:1]) == (
        ("remote-api", "apiKey"),
        ("remote-api", "tenant"),
        ("other", "apiKey"),
    )


def test_secret_headers_replace_same_named_headers_of_the_target():
    merged = with_secret_headers((("X-Static", "s"), ("x-api-key", "old")), (("X-Api-Key", "new"),))
    assert merged == (("X-Static", "s"), ("X-Api-Key", "new"))


# --- the mounted-Secret reader -------------------------------------------------------------------


def read(reader: SecretFileReader) -> str | None:
    return asyncio.run(reader.read())


def test_the_file_reader_reads_dir_name_key_as_a_secret_volume_lays_it_out(tmp_path: Path, caplog):
    caplog.set_level(logging.DEBUG)
    reader = SecretFileReader(tmp_path, "remote-api", "apiKey")
    assert read(reader) is None and reader.problem is not None and "no such file" in reader.problem
    (tmp_path / "remote-api").mkdir()
    (tmp_path / "remote-api" / "apiKey").write_text(API_KEY + "\n")  # editors add a newline
    assert read(reader) == API_KEY and reader.problem is None
    (tmp_path / "remote-api" / "apiKey").write_bytes(b"\xff\xfe")
    assert read(reader) is None and "not UTF-8" in reader.problem
    assert API_KEY not in caplog.text and API_KEY not in repr(reader)


@pytest.mark.parametrize(("name", "key"), [("..", "passwd"), ("remote-api", ".."), ("a/b", "k"), ("s", ".")])
def test_the_file_reader_never_leaves_the_secret_folder(tmp_path: Path, name, key):
    (tmp_path / "outside").write_text("not a secret of this dir")
    reader = SecretFileReader(tmp_path / "secrets", name, key)
    assert read(reader) is None and "not a Secret name and key" in reader.problem


def test_a_huge_file_is_not_a_header_value(tmp_path: Path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "k").write_bytes(b"x" * 100_000)
    reader = SecretFileReader(tmp_path, "s", "k")
    assert read(reader) is None and "larger than" in reader.problem


def test_standalone_without_a_secrets_dir_has_a_reason_and_no_keeper():
    reason = keeper_for(SPECS, lambda _: None)
    assert isinstance(reason, str) and "--secrets-dir" in reason


# --- the keeper ----------------------------------------------------------------------------------


class HeldReader:
    """A FAKE reader: returns ``value`` (None with ``problem``) as the test sets them."""

    def __init__(self, value: str | None = None, problem: str | None = "Secret missing"):
        self.value = value
        self.problem: str | None = problem
        self.reads = 0

    async def read(self) -> str | None:
        self.reads += 1
        self.problem = None if self.value is not None else (self.problem or "Secret missing")
        return self.value


class ScriptedSleep:
    """A FAKE sleep: records each delay; at the n-th call runs ``steps[n]`` (the world
    changing while the loop waits), yields, and returns. Past the last step it parks the
    loop for good and sets ``done``."""

    def __init__(self, *steps) -> None:
        self.steps = list(steps)
        self.delays: list[float] = []
        self.done = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) > len(self.steps):
            self.done.set()
            await asyncio.Event().wait()
        self.steps[len(self.delays) - 1]()
        await asyncio.sleep(0)


def nothing() -> None:
    """A step of a ScriptedSleep in which nothing changes."""


def setting(reader: HeldReader, value: str):
    """A step of a ScriptedSleep in which the Secret's value becomes ``value``."""

    def step() -> None:
        reader.value = value

    return step


def test_the_keeper_reports_each_change_and_retries_a_failing_read_sooner():
    reader = HeldReader()
    seen: list[SecretHeaders] = []
    sleep = ScriptedSleep(
        nothing,  # failing: retried after 0.01 s
        nothing,  # ... then 0.02 s
        setting(reader, API_KEY),  # ... then 0.04 s, and the Secret appears
        setting(reader, "rotated"),  # picked up at the next period
        nothing,  # the same value again: nothing to report
    )

    async def scenario() -> None:
        keeper = SecretHeaderKeeper(
            SPECS[:1], {("remote-api", "apiKey"): reader}, seen.append, period=0.4, retry=0.01, sleep=sleep
        )
        task = asyncio.create_task(keeper.run())
        async with asyncio.timeout(10):
            await sleep.done.wait()
        task.cancel()

    asyncio.run(scenario())
    assert sleep.delays == pytest.approx([0.01, 0.02, 0.04, 0.4, 0.4, 0.4])
    assert reader.reads == 6
    assert [s.problem for s in seen[:2]] == [
        "header X-Api-Key from Secret remote-api key 'apiKey': not read yet",
        "header X-Api-Key from Secret remote-api key 'apiKey': Secret missing",
    ]
    assert [s.headers for s in seen[2:]] == [(("X-Api-Key", API_KEY),), (("X-Api-Key", "rotated"),)]


def test_following_a_key_backs_off_up_to_the_period_and_hands_over_every_read():
    reader = HeldReader()
    got: list[str | None] = []
    sleep = ScriptedSleep(*[nothing] * 7, setting(reader, "v"))

    async def scenario() -> None:
        task = asyncio.create_task(follow_key(reader, got.append, period=5.0, retry=0.5, sleep=sleep))
        async with asyncio.timeout(10):
            await sleep.done.wait()
        task.cancel()

    asyncio.run(scenario())
    assert sleep.delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    assert got == [None] * 8 + ["v"]


# --- the controller's plan and /status -----------------------------------------------------------


class NoMetrics:
    """A FAKE metric source: no metrics are configured in these models anyway."""

    async def observe(self, metrics):
        return []


def make_controller() -> tuple[OffloadingState, RoutingTable]:
    routing = RoutingTable()
    controller = OffloadingState(routing, NoMetrics())
    controller.apply_config(model())
    asyncio.run(controller.evaluate())  # the static split: offloading on
    return controller, routing


def test_the_remote_is_not_used_until_its_secret_headers_are_read_and_status_says_why():
    controller, routing = make_controller()
    controller.set_secret_headers(
        resolve_secret_headers(model().spec.offloading_config.remote_backend.headers_from_secrets, {})
    )
    assert routing.plan.remote is None and routing.choose() is None
    doc = status_document(controller.view(), ProxyStats(), ready=True)
    assert doc["routing"]["remote"] is None
    assert (
        doc["routing"]["remoteUnavailable"]
        == "header X-Api-Key from Secret remote-api key 'apiKey': not read yet"
    )

    controller.set_secret_headers(SecretHeaders(headers=(("X-Api-Key", API_KEY),)))
    remote = routing.choose()
    assert remote is not None and remote.headers == (("X-Static", "s"), ("X-Api-Key", API_KEY))
    doc = status_document(controller.view(), ProxyStats(), ready=True)
    assert (
        doc["routing"]["remote"] == "https://remote.example:8443"
        and doc["routing"]["remoteUnavailable"] is None
    )
    assert doc["configuration"]["offloadingConfig"]["remoteBackend"]["headersFromSecrets"] == [
        {"name": "X-Api-Key", "secretKeyRef": {"name": "remote-api", "key": "apiKey"}}
    ]
    text = json.dumps(doc)
    assert (
        API_KEY not in text and API_KEY not in repr(routing.plan) and API_KEY not in repr(controller.view())
    )


def test_oauth_authorization_comes_after_the_secret_headers():
    controller, routing = make_controller()
    controller.needs_authorization = True
    controller.set_secret_headers(SecretHeaders(headers=(("X-Api-Key", API_KEY),)))
    assert routing.plan.remote is None
    assert "no OAuth access token" in controller.view().remote_unavailable
    controller.set_authorization("Bearer t")
    assert routing.plan.remote.headers == (
        ("X-Static", "s"),
        ("X-Api-Key", API_KEY),
        ("Authorization", "Bearer t"),
    )


# --- RBAC ----------------------------------------------------------------------------------------


def test_the_role_gets_each_referenced_secret_by_name_once():
    text = model_text(
        authConfig={
            "type": "oauth",
            "oauthConfig": {
                "clientId": "c",
                "tokenUrl": "https://auth.example/token",
                "clientSecretRef": {"name": "oauth-secret"},
            },
        },
        headersFromSecrets=[
            {"name": "X-Tenant", "secretKeyRef": {"name": "remote-api", "key": "tenant"}},
            {"name": "X-Other", "secretKeyRef": {"name": "other", "key": "k"}},
            API_KEY_FROM_SECRET,
        ],
    )
    assert sidecar_rules_for(model(text)) == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["oauth-secret", "remote-api", "other"],
            "verbs": ["get"],
        }
    ]
    assert sidecar_rules_for(model()) == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["remote-api"], "verbs": ["get"]}
    ]
