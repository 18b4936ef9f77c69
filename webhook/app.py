"""The webhook's HTTP layer: a starlette app that decodes AdmissionReviews.

Every malformed or hostile request gets a 4xx with a reason: wrong method,
wrong content type, oversized, late (``BODY_TIMEOUT``) or non-JSON body, a body that
is not an AdmissionReview. Handlers receive a parsed ``AdmissionRequest`` and return the
AdmissionReview to send back (a dict, or a ``Reviewed`` carrying its result and
reason codes for the metrics); they are pure and tested without sockets. A handler
that raises (a bug) still gets the client an answer: a denial with code 500 in the
AdmissionReview and the traceback in the log, never an HTTP 500. (The pod webhook
catches its own bugs first and allows the pod, as its failurePolicy Ignore would.)

``/metrics`` serves ``webhook.metrics.REGISTRY``; each review is counted by webhook
(the path without its slash), result and reason, and timed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from webhook import metrics
from webhook.admission import AdmissionRequest, BadReview, Reviewed, deny, parse_review

log = logging.getLogger("webhook")

ReviewHandler = Callable[[AdmissionRequest], "dict[str, Any] | Reviewed"]

# The API server sends at most a few MiB (an object and its old version, each at most
# 1.5 MiB in etcd, a little more as JSON); anything larger is not from the API server.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Reviews decoded and answered at once, each in a worker thread: the event loop keeps
# answering probes and other reviews meanwhile, and a few huge bodies cannot together hold
# more than this many decoded copies in memory (about 60 MB each at worst).
MAX_REVIEWS_AT_ONCE = 2
# What a log line quotes of a reviewed object's text (a uid, a denial): enough to act on.
MAX_LOGGED_CHARS = 2000
# Seconds from the request head to the end of its body. The API server sends a review at
# once and gives up after the webhook's timeoutSeconds (5 in the chart), so a body still
# arriving later only holds a connection and its buffers.
BODY_TIMEOUT = 5.0


class _BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class AsciiJSONResponse(JSONResponse):
    """Compact JSON with every non-ASCII character escaped (``\\uXXXX``).

    A request may carry a lone surrogate as a JSON escape (``"\\ud800"``); echoed in an
    answer (the uid, a message), it cannot be encoded as UTF-8, which starlette's
    ``JSONResponse`` does, but escaped it renders, and reads back as the same string."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _problem(status: int, message: str) -> JSONResponse:
    return AsciiJSONResponse({"error": message}, status_code=status)


def classify(answer: dict[str, Any] | Reviewed) -> Reviewed:
    """A handler's answer with result and reason codes; a bare AdmissionReview is
    allowed or denied, its reason the status reason (``Allowed`` when it has none)."""
    if isinstance(answer, Reviewed):
        return answer
    response = answer["response"]
    if response["allowed"]:
        return Reviewed(answer, metrics.ALLOWED, "Allowed")
    reason = str((response.get("status") or {}).get("reason") or "Denied")
    return Reviewed(answer, metrics.DENIED, reason)


def _review(handler: ReviewHandler, body: bytes, webhook: str) -> tuple[AdmissionRequest, Reviewed] | str:
    """A body decoded and answered (run in a worker thread), or why it is no review (a 400)."""
    try:
        review = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return f"body: not valid JSON ({type(exc).__name__})"
    try:
        admission = parse_review(review)
    except BadReview as exc:
        return str(exc)
    return admission, _answer(handler, admission, webhook)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_LOGGED_CHARS else f"{text[:MAX_LOGGED_CHARS]}… ({len(text)} characters)"


def _answer(handler: ReviewHandler, admission: AdmissionRequest, webhook: str) -> Reviewed:
    try:
        return classify(handler(admission))
    except Exception:  # a bug must still get the client an answer
        log.exception("%s: the handler failed on uid=%s; answering with a denial", webhook, admission.uid)
        review = deny(
            admission.uid, "internal error in the webhook (see its log)", code=500, reason="InternalError"
        )
        return Reviewed(review, metrics.ERROR, "InternalError")


def review_endpoint(
    handler: ReviewHandler,
    *,
    webhook: str = "",
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout: float = BODY_TIMEOUT,
    clock: Callable[[], float] = time.perf_counter,
) -> Callable[..., Any]:
    """The endpoint of one webhook; ``webhook`` labels its metrics. A body larger than
    ``max_body_bytes`` gets a 413, one not received within ``body_timeout`` seconds a 408
    (and the connection is closed)."""

    limiter: anyio.CapacityLimiter | None = None

    def problem(status: int, message: str, started: float) -> JSONResponse:
        metrics.ADMISSION_REVIEWS.labels(webhook, metrics.ERROR, str(status)).inc()
        metrics.ADMISSION_DURATION.labels(webhook).observe(clock() - started)
        return _problem(status, message)

    async def endpoint(request: Request) -> Response:
        started = clock()
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return problem(
                415, f"Content-Type: must be application/json, got {media_type or 'none'!r}", started
            )
        try:
            async with asyncio.timeout(body_timeout):
                body = await _read_body(request, max_body_bytes)
        except _BodyTooLarge:
            return problem(413, f"body: larger than {max_body_bytes} bytes", started)
        except TimeoutError:
            response = problem(408, f"body: not received within {body_timeout:g} s", started)
            response.headers["Connection"] = "close"  # the rest of the body must not be read as a request
            return response
        except ClientDisconnect:
            return problem(400, "body: client disconnected", started)
        nonlocal limiter
        if limiter is None:  # made in the loop that serves: anyio binds it there
            limiter = anyio.CapacityLimiter(MAX_REVIEWS_AT_ONCE)
        outcome = await anyio.to_thread.run_sync(_review, handler, body, webhook, limiter=limiter)
        if isinstance(outcome, str):
            return problem(400, outcome, started)
        admission, answer = outcome
        metrics.ADMISSION_REVIEWS.labels(webhook, answer.result, answer.reason).inc()
        metrics.ADMISSION_DURATION.labels(webhook).observe(clock() - started)
        log.log(
            logging.DEBUG if answer.routine else logging.INFO,
            "admission uid=%s %s %s allowed=%s result=%s reason=%s%s%s",
            admission.uid,
            admission.operation,
            _clip(answer.subject or f"{admission.namespace}/{admission.name}"),
            answer.review["response"]["allowed"],
            answer.result,
            answer.reason,
            answer.fields,
            f": {_clip(answer.detail)}" if answer.detail else "",
        )
        return AsciiJSONResponse(answer.review)

    return endpoint


def build_app(
    reviews: Mapping[str, ReviewHandler],
    *,
    ready: Callable[[], bool] = lambda: True,
    body_timeout: float = BODY_TIMEOUT,
) -> Starlette:
    """An app serving each review handler at its path, plus /healthz, /readyz and /metrics;
    ``body_timeout`` as in :func:`review_endpoint`."""
    metrics.READY.set_function(lambda: 1 if ready() else 0)

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(_: Request) -> Response:
        if ready():
            return PlainTextResponse("ok")
        return PlainTextResponse("not ready", status_code=503)

    async def metrics_endpoint(_: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, headers={"content-type": content_type})

    routes = [
        Route(
            path,
            review_endpoint(handler, webhook=path.strip("/"), body_timeout=body_timeout),
            methods=["POST"],
        )
        for path, handler in reviews.items()
    ]
    routes += [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    return Starlette(routes=routes)
