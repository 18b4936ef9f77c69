"""Benchmark of /mutate-pods over TLS: python bench/mutate_bench.py

The webhook app (uvicorn, uvloop, httptools, TLS) runs in its own process with 1,000
ModelDeployments in its cache (100 namespaces x 10, each with its Deployment and Service;
filled directly, no API server). 50 concurrent keep-alive TLS clients (raw asyncio) in this
process send AdmissionReviews of a pod that one of its namespace's ModelDeployments selects,
so every answer carries a JSONPatch.

Each endpoint is measured the same way, in the same run, against the same server:
- /mutate-pods     the injection (a review in, a patched review out);
- /allow-pods      a reference review handler that parses the same review and allows it
                   (the HTTP + TLS + JSON cost without the injection);
- /healthz         the trivial baseline (GET, "ok").
Two load shapes:
- saturation: each client sends its next request as soon as the previous answer arrives
  (throughput; latency there is mostly queueing: 50 in flight / throughput);
- paced: 50 clients together offering a fixed rate (default 500/s, far above any cluster's
  pod creation rate), latency measured from each request's scheduled time (no coordinated
  omission) — the figure the p99 <= 5 ms goal is about.
Also printed: the pure decision's cost per pod, in process (selection + copy + jsonpatch).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certs.issue import issue_ca, issue_serving_cert
from webhook.admission import AdmissionRequest, allow, parse_review
from webhook.app import build_app
from webhook.cache import DEPLOYMENTS, MODELDEPLOYMENTS, RESOURCES, SERVICES, ClusterCache
from webhook.injector_config import InjectorConfig
from webhook.mutating import decide, review_pod

NAMESPACES = 100
PER_NAMESPACE = 10
CLIENTS = 50
CONFIG = InjectorConfig(
    image="ghcr.io/model-offloading/offload:0.1.0",
    config_version="bench",
    resources={"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
)


# --- the cluster and the request ----------------------------------------------------------------


def filled_cache() -> ClusterCache:
    mds, deployments, services = [], [], []
    for n in range(NAMESPACES):
        ns = f"team-{n:03d}"
        for i in range(PER_NAMESPACE):
            name = f"model-{i}"
            deployments.append(
                {
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {
                        "selector": {
                            "matchLabels": {"app": name},
                            "matchExpressions": [
                                {"key": "tier", "operator": "In", "values": ["serving", "canary"]}
                            ],
                        }
                    },
                }
            )
            services.append(
                {
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
                }
            )
            mds.append(
                {
                    "apiVersion": "deployment.beamlit.com/v1alpha1",
                    "kind": "ModelDeployment",
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "creationTimestamp": f"2026-01-01T00:00:{i:02d}Z",
                    },
                    "spec": {
                        "model": name,
                        "modelSourceRef": {"kind": "Deployment", "name": name},
                        "serviceRef": {"name": name, "targetPort": 80},
                        "offloadingConfig": {
                            "remoteBackend": {"host": f"{name}.remote.example:443", "scheme": "https"},
                            "metrics": [
                                {
                                    "type": "Resource",
                                    "resource": {
                                        "name": "cpu",
                                        "target": {"type": "Utilization", "averageUtilization": 60},
                                    },
                                }
                            ],
                        },
                    },
                }
            )
    cache = ClusterCache()
    cache.replace(MODELDEPLOYMENTS, mds)
    cache.replace(DEPLOYMENTS, deployments)
    cache.replace(SERVICES, services)
    for resource in RESOURCES:
        cache.mark_listed(resource)
    assert cache.counts()[MODELDEPLOYMENTS] == NAMESPACES * PER_NAMESPACE
    return cache


def review(uid: str) -> dict:
    """A ReplicaSet's pod of team-042/model-7, as the API server sends it."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "model-7-6d8f9c7b5-",
            "labels": {"app": "model-7", "tier": "serving", "pod-template-hash": "6d8f9c7b5"},
            "annotations": {"prometheus.io/scrape": "true"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "model-7-6d8f9c7b5",
                    "uid": "0b4e2a52-1b1f-4c1e-9d55-5f2b5a4f0a01",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": "model",
                    "image": "vllm/vllm-openai:v0.6.0",
                    "args": ["--model", "meta-llama/Llama-3-8B", "--port", "8080"],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}},
                    "env": [{"name": f"VAR_{i}", "value": "x" * 20} for i in range(10)],
                    "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "volumes": [
                {"name": "models", "emptyDir": {}},
                {
                    "name": "kube-api-access",
                    "projected": {
                        "sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]
                    },
                },
            ],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
        },
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "team-042",
            "name": "",
            "object": pod,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        },
    }


# --- the server process -------------------------------------------------------------------------


def serve(port: int, cert_dir: Path) -> None:
    import uvicorn

    cache = filled_cache()

    def allow_pods(request: AdmissionRequest) -> dict:
        return allow(request.uid)

    app = build_app(
        {"/mutate-pods": partial(review_pod, view=cache, config=CONFIG), "/allow-pods": allow_pods},
        ready=cache.synced,
    )
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ssl_certfile=str(cert_dir / "tls.crt"),
        ssl_keyfile=str(cert_dir / "tls.key"),
        log_level="warning",
        access_log=False,
    )


# --- the clients --------------------------------------------------------------------------------


def request_bytes(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    status = head[9:12]
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length)
    if status != b"200":
        raise RuntimeError(f"HTTP {status.decode()}: {body[:200]!r}")
    return body


async def client(
    port: int,
    ctx: ssl.SSLContext,
    payload: bytes,
    stop_at: float,
    interval: float | None,
    latencies: list[float],
    check,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    clock = time.perf_counter
    scheduled = clock() + (random.random() * interval if interval else 0)
    try:
        while True:
            if interval:
                delay = scheduled - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                start = scheduled  # latency from the scheduled time: no coordinated omission
                scheduled += interval
            else:
                start = clock()
            if start >= stop_at:
                return
            writer.write(payload)
            body = await read_response(reader)
            latencies.append(clock() - start)
            check(body)
    finally:
        writer.close()


async def measure(
    port: int, ctx: ssl.SSLContext, payload: bytes, seconds: float, rate: float | None, check
) -> dict:
    latencies: list[float] = []
    began = time.perf_counter()
    interval = CLIENTS / rate if rate else None
    await asyncio.gather(
        *(client(port, ctx, payload, began + seconds, interval, latencies, check) for _ in range(CLIENTS))
    )
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def check_patched(body: bytes) -> None:
    if b'"patchType":"JSONPatch"' not in body:
        raise RuntimeError(f"no patch in {body[:300]!r}")


def check_allowed(body: bytes) -> None:
    if b'"allowed":true' not in body:
        raise RuntimeError(f"not allowed: {body[:300]!r}")


def check_ok(body: bytes) -> None:
    if body != b"ok":
        raise RuntimeError(f"healthz said {body!r}")


async def run_clients(port: int, ca: Path, seconds: float, rate: float) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    mutate = request_bytes("POST", "/mutate-pods", json.dumps(review("bench-uid")).encode())
    allow_ = request_bytes("POST", "/allow-pods", json.dumps(review("bench-uid")).encode())
    healthz = request_bytes("GET", "/healthz")
    endpoints = [
        ("/mutate-pods", mutate, check_patched),
        ("/allow-pods (reference)", allow_, check_allowed),
        ("/healthz (baseline)", healthz, check_ok),
    ]
    for _, payload, check in endpoints:  # warm-up: connections, caches, allocator
        await measure(port, ctx, payload, 1.0, None, check)
    results: dict[tuple[str, str], dict] = {}
    for shape, shape_rate in (("saturation", None), (f"paced {rate:.0f}/s", rate)):
        for name, payload, check in endpoints:
            results[(shape, name)] = await measure(port, ctx, payload, seconds, shape_rate, check)

    print(
        f"\n{CLIENTS} keep-alive TLS clients, {NAMESPACES * PER_NAMESPACE} ModelDeployments cached "
        f"({NAMESPACES} namespaces x {PER_NAMESPACE}), {seconds:.0f} s per measurement, {os.cpu_count()} CPUs"
    )
    print(f"{'load':<16} {'endpoint':<24} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for (shape, name), r in results.items():
        print(
            f"{shape:<16} {name:<24} {r['requests']:>9} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
        )
    for shape in ("saturation", f"paced {rate:.0f}/s"):
        m, b = results[(shape, "/mutate-pods")], results[(shape, "/healthz (baseline)")]
        a = results[(shape, "/allow-pods (reference)")]
        print(
            f"{shape}: /mutate-pods vs /healthz: throughput x{m['rps'] / b['rps']:.2f}, "
            f"p50 x{m['p50_ms'] / b['p50_ms']:.2f}, p99 x{m['p99_ms'] / b['p99_ms']:.2f}; "
            f"vs /allow-pods: throughput x{m['rps'] / a['rps']:.2f}, p99 x{m['p99_ms'] / a['p99_ms']:.2f}"
        )
    paced = results[(f"paced {rate:.0f}/s", "/mutate-pods")]
    verdict = "met" if paced["p99_ms"] <= 5.0 else "NOT met"
    print(f"goal p99 <= 5 ms at {rate:.0f}/s: {verdict} ({paced['p99_ms']:.2f} ms)")


def decision_cost() -> None:
    cache = filled_cache()
    request = parse_review(review("uid"))
    n = 2000
    for _ in range(200):
        decide(request, cache, CONFIG)
    began = time.perf_counter()
    for _ in range(n):
        outcome = decide(request, cache, CONFIG)
    per = (time.perf_counter() - began) / n * 1e6
    assert outcome.injected
    print(
        f"pure decision (selection among the namespace's {PER_NAMESPACE} + copy + jsonpatch): {per:.0f} us per pod"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each measurement")
    parser.add_argument("--rate", type=float, default=500.0, help="offered rate of the paced load (req/s)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cert-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.cert_dir)
        return 0

    decision_cost()
    with tempfile.TemporaryDirectory() as tmp:
        cert_dir = Path(tmp)
        now = dt.datetime.now(dt.UTC)
        ca = issue_ca("bench-ca", now=now, days=1)
        serving = issue_serving_cert(ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now, days=1)
        (cert_dir / "ca.crt").write_bytes(ca.cert_pem)
        (cert_dir / "tls.crt").write_bytes(serving.cert_pem)
        (cert_dir / "tls.key").write_bytes(serving.key_pem)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--port", str(port), "--cert-dir", tmp]
        )
        try:
            ctx = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                        with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                            break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("the webhook server did not start") from None
                    time.sleep(0.1)
            try:
                import uvloop

                uvloop.install()
            except ImportError:
                pass
            asyncio.run(run_clients(port, cert_dir / "ca.crt", args.seconds, args.rate))
        finally:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
