"""The admin port: Prometheus exposition, /status without secrets, and the server on a real socket."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from crds.decision import INITIAL, step
from crds.model import OffloadingBehavior
from crds.observation import MetricObservation
from sidecar.admin.metrics import render_metrics
from sidecar.admin.server import AdminServer
from sidecar.admin.status import configuration_document, status_document
from sidecar.control.view import ControlView
from sidecar.proxy.routing import RemoteTarget, RoutePlan
from sidecar.proxy.stats import ProxyStats
from sidecar.standalone.config import parse_document

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
TUTORIAL = (TESTDATA / "modeldeployments" / "tutorial.yaml").read_text()
CPU = "resource cpu on pods (as a percentage of request)"
REMOTE = RemoteTarget("http", "my-model-on-another-cluster", 80, "my-model-on-another-cluster:80")

SECRET_TUTORIAL = TUTORIAL.replace(
    "      scheme: http\n",
    "      scheme: https\n"
    "      headersToAdd:\n"
    "        X-Api-Key: sk-very-secret-key\n"
    "      authConfig:\n"
    "        type: oauth\n"
    "        oauthConfig:\n"
    "          clientId: sidecar\n"
    "          tokenUrl: https://auth.example/token\n"
    "          clientSecret: inline-client-secret\n",
).replace("my-model-on-another-cluster:80", "my-model-on-another-cluster:443")


def busy_stats() -> ProxyStats:
    stats = ProxyStats()
    for _ in range(7):
        stats.count_response("local", 200)
    for _ in range(3):
        stats.count_response("remote", 200)
    stats.count_response("local", 503)
    stats.count_rejection(400)
    stats.count_fallback("remote", "local", "connect")
    stats.count_failure("remote", "connect")
    for seconds in (0.0001, 0.003, 0.2, 400.0):
        stats.response_seconds["local"].observe(seconds)
    stats.breaker_state = "open"
    stats.in_flight = 2
    return stats


def offloading_view(observations=None) -> ControlView:
    model = parse_document(TUTORIAL).model
    observations = observations or [
        MetricObservation(CPU, 80.0, 50.0, "cgroup v2", unit="percent"),
        MetricObservation('"queue \\ depth" on pods', None, 10.0, "not available in standalone mode"),
    ]
    decision = step(INITIAL, observations, 0, OffloadingBehavior(percentage=50, sustain_seconds=0))
    return ControlView(
        model=model,
        observations=tuple(observations),
        decision=decision,
        plan=RoutePlan(remote=REMOTE, percentage=50, offloading=True),
        reason=decision.reason,
        offloading_since=1_700_000_000.0,
        transitions=(("on", 1), ("off", 0)),
    )


# --- Prometheus exposition ----------------------------------------------------------------------

SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)$'
)


def parse_exposition(text: str) -> dict[str, float]:
    """Checks the text format line by line; returns {'name{labels}': value}."""
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in typed, f"family {name} declared twice"
            typed[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match.group(1)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
        assert family in typed, f"{name} has no TYPE"
        key = line.rsplit(" ", 1)[0]
        assert key not in samples, f"duplicate series {key}"
        samples[key] = float(match.group(4))
    return samples


def test_metrics_render_in_the_text_format_with_the_counts():
    samples = parse_exposition(render_metrics(offloading_view(), busy_stats(), ready=True))
    assert samples['offload_sidecar_requests_total{backend="local",code="2xx"}'] == 7
    assert samples['offload_sidecar_requests_total{backend="remote",code="2xx"}'] == 3
    assert samples['offload_sidecar_requests_total{backend="local",code="5xx"}'] == 1
    assert samples['offload_sidecar_requests_total{backend="proxy",code="4xx"}'] == 1
    assert samples['offload_sidecar_fallbacks_total{from="remote",to="local",reason="connect"}'] == 1
    assert samples['offload_sidecar_upstream_failures_total{backend="remote",kind="connect"}'] == 1
    assert samples['offload_sidecar_rejected_requests_total{code="400"}'] == 1
    assert samples["offload_sidecar_breaker_open"] == 1
    assert samples["offload_sidecar_in_flight_requests"] == 2
    assert samples["offload_sidecar_offloading"] == 1
    assert samples["offload_sidecar_offload_share_ratio"] == 0.5
    assert samples['offload_sidecar_offloading_transitions_total{to="on"}'] == 1
    assert samples["offload_sidecar_ready"] == 1
    assert samples["offload_sidecar_config_loaded"] == 1
    assert samples["process_resident_memory_bytes"] > 0


def test_metric_series_carry_the_metric_name_escaped_and_unknowns_are_absent_not_zero():
    samples = parse_exposition(render_metrics(offloading_view(), ProxyStats(), ready=True))
    assert samples[f'offload_sidecar_metric_ratio{{metric="{CPU}"}}'] == 1.6
    assert samples[f'offload_sidecar_observed_value{{metric="{CPU}"}}'] == 80
    assert samples[f'offload_sidecar_target_value{{metric="{CPU}"}}'] == 50
    assert samples[f'offload_sidecar_metric_available{{metric="{CPU}"}}'] == 1
    queue = 'metric="\\"queue \\\\ depth\\" on pods"'
    assert samples[f"offload_sidecar_metric_available{{{queue}}}"] == 0
    assert samples[f"offload_sidecar_target_value{{{queue}}}"] == 10
    assert f"offload_sidecar_metric_ratio{{{queue}}}" not in samples


def test_latency_histograms_are_cumulative_and_end_at_the_count():
    samples = parse_exposition(render_metrics(ControlView(), busy_stats(), ready=False))
    name = "offload_sidecar_request_duration_seconds"
    buckets = [(k, v) for k, v in samples.items() if k.startswith(f'{name}_bucket{{backend="local"')]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert buckets[0] == (f'{name}_bucket{{backend="local",le="0.0005"}}', 1)
    assert buckets[-1] == (f'{name}_bucket{{backend="local",le="+Inf"}}', 4)
    assert samples[f'{name}_count{{backend="local"}}'] == 4
    assert samples[f'{name}_sum{{backend="local"}}'] == pytest.approx(400.2031)
    assert samples["offload_sidecar_ready"] == 0
    assert samples["offload_sidecar_config_loaded"] == 0
    assert samples["offload_sidecar_offload_share_ratio"] == 0


def test_names_follow_prometheus_conventions():
    text = render_metrics(offloading_view(), busy_stats(), ready=True)
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert re.fullmatch(r"[a-z_]+", name), name
            if kind == "counter":
                assert name.endswith("_total"), name
            if kind == "histogram":
                assert name.endswith("_seconds"), name
            assert "percent" not in name and "millis" not in name, name


def test_info_names_the_modeldeployment_in_every_mode():
    model = parse_document(TUTORIAL).model
    assert model is not None
    cases = [
        (ControlView(model=model), "my-model"),
        (ControlView(mode="cluster", source="team-a/llama"), "llama"),  # deleted or unreadable
        (ControlView(mode="cluster", source="?/?"), ""),  # the injector's environment is missing
        (ControlView(source="/etc/offload/md.yaml"), ""),  # an invalid file: no name to tell
    ]
    for view, name in cases:
        samples = parse_exposition(render_metrics(view, ProxyStats(), ready=True, process=False))
        info = [k for k in samples if k.startswith("offload_sidecar_info")]
        assert info == [f'offload_sidecar_info{{modeldeployment="{name}"}}'], view
        assert samples["offload_sidecar_decision_stale"] == 0


def test_the_decision_reason_code_follows_the_engine_through_on_and_off():
    from sidecar.admin.metrics import decision_code

    model = parse_document(TUTORIAL).model
    assert model is not None
    behavior = OffloadingBehavior(percentage=50, sustain_seconds=10, cooldown_seconds=20)
    state, codes = INITIAL, []
    assert decision_code(ControlView(model=model)) == "NotEvaluated"
    # cpu% over time: in the band, hot for the sustain window, cool for the cooldown, unreadable.
    for now, cpu in [(0, 50), (1, 80), (11, 80), (12, 50), (13, 30), (33, 30), (34, None)]:
        observations = [MetricObservation(CPU, cpu, 50.0, "test", unit="percent")]
        decision = step(state, observations, now, behavior)
        state = decision.state
        view = ControlView(model=model, observations=tuple(observations), decision=decision)
        codes.append((decision.offloading, decision_code(view)))
    assert codes == [
        (False, "WithinTolerance"),
        (False, "SustainPending"),
        (True, "AboveTarget"),
        (True, "WithinTolerance"),
        (True, "CooldownPending"),
        (False, "BelowTarget"),
        (False, "MetricsUnavailable"),
    ]
    static = step(INITIAL, [], 0, OffloadingBehavior(percentage=50, static_split=True))
    assert decision_code(ControlView(model=model, decision=static)) == "StaticSplit"
    assert decision_code(ControlView()) == "PassThrough"
    disabled = parse_document(TUTORIAL.replace("spec:\n", "spec:\n  enabled: false\n", 1)).model
    assert disabled is not None and not disabled.spec.enabled
    assert decision_code(ControlView(model=disabled, decision=static)) == "PassThrough"
    samples = parse_exposition(render_metrics(offloading_view(), ProxyStats(), ready=True, process=False))
    assert samples['offload_sidecar_decision_reason{reason="AboveTarget"}'] == 1
    assert len([k for k in samples if k.startswith("offload_sidecar_decision_reason")]) == 1


# --- /status -------------------------------------------------------------------------------------


def test_status_has_the_configuration_observations_decision_and_counters():
    doc = status_document(offloading_view(), busy_stats(), ready=True)
    json.dumps(doc)  # serialisable
    assert doc["ready"] is True
    assert doc["configuration"]["offloadingConfig"]["behavior"]["percentage"] == 50
    assert doc["configuration"]["offloadingConfig"]["metrics"][0]["resource"]["target"] == {
        "type": "Utilization",
        "averageUtilization": 50,
    }
    assert doc["observations"][0]["display"] == "80%/50%"
    assert doc["observations"][0]["ratio"] == 1.6
    assert doc["observations"][1]["current"] is None
    assert doc["decision"]["offloading"] is True
    assert "above target" in doc["decision"]["reason"]
    assert doc["decision"]["offloadingSince"] == "2023-11-14T22:13:20Z"
    assert doc["routing"] == {
        "remote": "http://my-model-on-another-cluster:80",
        "percentage": 50,
        "activePercentage": 50,
        "remoteUnavailable": None,
    }
    assert doc["counters"]["local"] == 8 and doc["counters"]["remote"] == 3
    assert doc["counters"]["breaker"] == "open"


def test_status_never_shows_a_secret():
    model = parse_document(SECRET_TUTORIAL).model
    assert model is not None
    text = json.dumps(status_document(ControlView(model=model), ProxyStats(), ready=True))
    assert "sk-very-secret-key" not in text
    assert "inline-client-secret" not in text
    remote = configuration_document(model)["offloadingConfig"]["remoteBackend"]
    assert remote["headersToAdd"] == {"X-Api-Key": "<redacted>"}
    assert remote["authConfig"]["oauthConfig"]["clientId"] == "sidecar"
    assert remote["authConfig"]["oauthConfig"]["clientSecret"] == "<redacted>"


# --- the server on a real socket -----------------------------------------------------------------


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode()


def serve(test):
    async def main():
        state = {"ready": False}
        server = AdminServer(offloading_view, busy_stats(), lambda: state["ready"])
        port = await server.start("127.0.0.1", 0)
        try:
            await test(port, state)
        finally:
            await server.close()

    asyncio.run(main())


def test_healthz_and_readyz_follow_readiness():
    async def test(port, state):
        assert (await exchange(port, get("/healthz")))[0] == 200
        status, _, body = await exchange(port, get("/readyz"))
        assert (status, body) == (503, b"not ready\n")
        state["ready"] = True
        assert (await exchange(port, get("/readyz")))[0] == 200

    serve(test)


def test_metrics_and_status_over_http():
    async def test(port, state):
        status, headers, body = await exchange(port, get("/metrics"))
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert int(headers["content-length"]) == len(body)
        assert parse_exposition(body.decode())["offload_sidecar_offloading"] == 1
        status, headers, body = await exchange(port, get("/status?pretty=1"))
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body)["routing"]["activePercentage"] == 50

    serve(test)


@pytest.mark.parametrize(
    ("request_bytes", "status", "fragment"),
    [
        (get("/nope"), 404, b"/healthz /readyz /metrics /status"),
        (get("/metrics", "POST"), 405, b"method POST not allowed"),
        (b"GARBAGE\r\n\r\n", 400, b"malformed request line"),
        (b"GET http://elsewhere/ HTTP/1.1\r\n\r\n", 400, b"malformed"),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, b"over 8 KiB"),
    ],
)
def test_bad_requests_get_a_clear_4xx(request_bytes, status, fragment):
    async def test(port, state):
        got, _, body = await exchange(port, request_bytes)
        assert got == status
        assert fragment in body

    serve(test)


def test_head_gets_the_head_without_a_body():
    async def test(port, state):
        status, headers, body = await exchange(port, get("/metrics", "HEAD"))
        assert status == 200 and int(headers["content-length"]) > 100 and body == b""

    serve(test)


# --- connection flood: probes are never starved ------------------------------------------------


async def eventually(what: str, attempt, timeout: float = 10.0):
    """Awaits ``attempt()`` until it returns a truthy value; fails naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await attempt()
        if result:
            return result
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nX-Slow: "], ids=["idle", "slowloris"])
def test_a_flood_of_idle_or_slow_connections_never_fails_a_probe(sent):
    async def test(port, state):
        state["ready"] = True
        flood = []
        for _ in range(100):  # more than MAX_CONNECTIONS (64)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(sent)
            flood.append((reader, writer))
        try:
            loop = asyncio.get_running_loop()
            for path in ("/healthz", "/readyz"):
                started = loop.time()
                status, _, body = await exchange(port, get(path))
                assert status == 200, body
                assert loop.time() - started < 1.0  # answered at once, not after a head timeout
            # The oldest connections were closed without an answer to make room.
            oldest = flood[0][0]
            assert await asyncio.wait_for(oldest.read(), 1.0) == b""
        finally:
            for _, writer in flood:
                writer.close()

    serve(test)


def test_a_head_that_does_not_arrive_in_time_gets_408():
    async def test(port, state):
        status, _, body = await exchange(port, b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        assert (status, body) == (408, b"request head not received in time\n")

    async def main():
        server = AdminServer(offloading_view, busy_stats(), lambda: True, head_timeout=0.2)
        port = await server.start("127.0.0.1", 0)
        try:
            await test(port, {})
        finally:
            await server.close()

    asyncio.run(main())


def test_only_busy_connections_refuse_a_newcomer_and_a_client_that_stops_reading_is_cut():
    """Two slots, both answering /signals (16 MB) to clients that never read: a probe is
    refused with 503 until the send timeout cuts them, then answered."""
    huge = {"x": "a" * 16_000_000}

    async def main():
        server = AdminServer(
            offloading_view, busy_stats(), lambda: True, lambda: huge, max_connections=2, send_timeout=0.5
        )
        port = await server.start("127.0.0.1", 0)
        stalled = []
        try:
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(get("/signals"))
                stalled.append(writer)

            async def probe(expected: int) -> bool:
                try:
                    return (await exchange(port, get("/healthz")))[0] == expected
                except ConnectionResetError:  # the 503 of a refusal may be lost to the unread head
                    return expected == 503

            await eventually("a probe refused while both slots are busy", lambda: probe(503))
            await eventually("a probe answered once the stalled clients are cut", lambda: probe(200))
        finally:
            for writer in stalled:
                writer.close()
            await server.close()

    asyncio.run(main())
