"""The webhook's HTTP layer: a starlette app that decodes AdmissionReviews.

Every malformed or hostile request gets a 4xx with a reason: wrong method,
wrong content type, oversized or non-JSON body, a body that is not an
AdmissionReview. Handlers receive a parsed ``AdmissionRequest`` and return the
AdmissionReview to send back; they are pure and tested without sockets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from webhook.admission import AdmissionRequest, BadReview, parse_review

log = logging.getLogger("webhook")

ReviewHandler = Callable[[AdmissionRequest], dict[str, Any]]

# The API server sends at most a few MiB (an object and its old version, each
# at most 1.5 MiB in etcd); anything far larger is not from the API server.
MAX_BODY_BYTES = 8 * 1024 * 1024


class _BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def review_endpoint(handler: ReviewHandler, *, max_body_bytes: int = MAX_BODY_BYTES) -> Callable[..., Any]:
    async def endpoint(request: Request) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return _problem(415, f"Content-Type: must be application/json, got {media_type or 'none'!r}")
        try:
            body = await _read_body(request, max_body_bytes)
        except _BodyTooLarge:
            return _problem(413, f"body: larger than {max_body_bytes} bytes")
        except ClientDisconnect:
            return _problem(400, "body: client disconnected")
        try:
            review = json.loads(body)
        except (ValueError, RecursionError) as exc:
            return _problem(400, f"body: not valid JSON ({type(exc).__name__})")
        try:
            admission = parse_review(review)
        except BadReview as exc:
            return _problem(400, str(exc))
        answer = handler(admission)
        verdict = answer["response"]
        log.info(
            "admission uid=%s %s %s/%s allowed=%s",
            admission.uid,
            admission.operation,
            admission.namespace,
            admission.name,
            verdict["allowed"],
        )
        return JSONResponse(answer)

    return endpoint


def build_app(reviews: Mapping[str, ReviewHandler], *, ready: Callable[[], bool] = lambda: True) -> Starlette:
    """An app serving each review handler at its path, plus /healthz and /readyz."""

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(_: Request) -> Response:
        if ready():
            return PlainTextResponse("ok")
        return PlainTextResponse("not ready", status_code=503)

    routes = [Route(path, review_endpoint(handler), methods=["POST"]) for path, handler in reviews.items()]
    routes += [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
    return Starlette(routes=routes)
