"""One log line per admission review: what was reviewed, the verdict and its reason codes,
and the decision in words. A pod no ModelDeployment selects (most pods of a cluster) is
logged at DEBUG only."""

from __future__ import annotations

import asyncio
import logging
import threading
from functools import partial

import httpx
import pytest

from crds.validation import ValidationSettings
from tests.modeldeployments import admission_review, variant
from tests.unit.test_golden import CONFIG, cluster, load_case, review_for
from webhook.app import build_app
from webhook.mutating import answer_pod
from webhook.validating import answer_modeldeployment


class Client:
    """The webhook's app over ASGI, in process: the log line is the endpoint's own."""

    def __init__(self) -> None:
        self.app = build_app(
            {
                "/mutate-pods": partial(answer_pod, view=cluster(), config=CONFIG),
                "/validate-modeldeployments": partial(answer_modeldeployment, settings=ValidationSettings()),
            }
        )

    def post(self, path: str, json: dict) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as client:
                return await client.post(path, json=json)

        response = asyncio.run(send())
        assert response.status_code == 200, response.text
        return response


@pytest.fixture
def client() -> Client:
    return Client()


def said(caplog, uid: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("webhook") and uid in r.getMessage()]


def test_an_injected_pod_gets_one_line_naming_the_pod_its_modeldeployment_and_the_decision(client, caplog):
    caplog.set_level(logging.DEBUG, logger="webhook")
    namespace, pod = load_case("one-container")
    client.post("/mutate-pods", json=review_for("injected", namespace, pod))
    (line,) = said(caplog, "uid-injected")
    assert line.levelno == logging.INFO
    message = line.getMessage()
    assert message.startswith("admission uid=uid-injected CREATE pod models/llm-7c9f8d6b5-* allowed=True")
    assert "result=injected reason=Injected modeldeployment=llm: " in message
    assert "injected for ModelDeployment" in message


def test_a_pod_no_modeldeployment_selects_is_logged_at_debug_only(client, caplog):
    caplog.set_level(logging.DEBUG, logger="webhook")
    namespace, pod = load_case("one-container")
    pod = {**pod, "metadata": {**pod["metadata"], "labels": {"app": "something-else"}}}
    client.post("/mutate-pods", json=review_for("unselected", namespace, pod))
    (line,) = said(caplog, "uid-unselected")
    assert line.levelno == logging.DEBUG
    assert "result=skipped reason=NoMatchingModelDeployment" in line.getMessage()


def test_a_denied_modeldeployment_gets_one_line_with_every_error(client, caplog):
    caplog.set_level(logging.DEBUG, logger="webhook")
    bad = variant("my-model", {"spec.offloadingConfig.behavior.percentage": 150, "spec.model": ""})
    client.post("/validate-modeldeployments", json=admission_review(bad, uid="denied-md"))
    (line,) = said(caplog, "denied-md")
    assert line.levelno == logging.INFO
    message = line.getMessage()
    assert "modeldeployments default/my-model allowed=False result=denied reason=Invalid: " in message
    assert "spec.offloadingConfig.behavior.percentage" in message and "spec.model" in message


def test_a_content_length_of_no_ascii_digits_is_no_500(client):
    """'²' passes str.isdigit() but not int(): the declared length is ignored, the body read."""
    sent: list[dict] = []
    body = b'{"apiVersion": "admission.k8s.io/v1"}'
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": "/mutate-pods",
        "raw_path": b"/mutate-pods",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", "²".encode("latin-1"))],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 9443),
    }

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400


def test_a_long_uid_is_refused_naming_it_and_a_long_denial_is_clipped_in_the_log(client, caplog):
    caplog.set_level(logging.INFO, logger="webhook")
    response = asyncio.run(_post(client, admission_review(variant("my-model"), uid="u" * 300)))
    assert response.status_code == 400 and "request.uid: must be a string of at most 256" in response.text

    many = [
        {"type": "Resource", "resource": {"name": f"x{i}", "target": {"type": "Value"}}} for i in range(300)
    ]
    bad = variant("my-model", {"spec.offloadingConfig.metrics": many})
    client.post("/validate-modeldeployments", json=admission_review(bad, uid="long-denial"))
    (line,) = said(caplog, "long-denial")
    assert len(line.getMessage()) < 2300 and line.getMessage().endswith(" characters)")


async def _post(client: Client, body: dict) -> httpx.Response:
    transport = httpx.ASGITransport(app=client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as http:
        return await http.post("/validate-modeldeployments", json=body)


def test_a_review_being_answered_does_not_hold_up_the_probes():
    """The handler runs in a worker thread: /healthz answers while it works."""
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow(request):
        started.set()
        release.wait(5)
        order.append("review answered")
        return answer_modeldeployment(request, ValidationSettings())

    app = build_app({"/validate-modeldeployments": slow})

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as http:
            review = asyncio.create_task(
                http.post("/validate-modeldeployments", json=admission_review(variant("my-model")))
            )
            while not started.is_set():  # the handler is at work (in the loop, were it not offloaded)
                await asyncio.sleep(0.001)
            probe = await http.get("/healthz")
            order.append(f"healthz {probe.status_code}")
            release.set()
            assert (await review).status_code == 200

    asyncio.run(run())
    assert order == ["healthz 200", "review answered"]
