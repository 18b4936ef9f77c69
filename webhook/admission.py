"""AdmissionReview v1 in and out, as pure functions over plain data.

The HTTP layer (``webhook.app``) decodes the body and calls ``parse_review``;
handlers turn a ``AdmissionRequest`` into a response with ``allow``/``deny``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ADMISSION_API_VERSION = "admission.k8s.io/v1"
MAX_UID_CHARS = 256


@dataclass(frozen=True)
class Reviewed:
    """A handler's answer: the AdmissionReview to send back, and what it was for the metrics.

    ``result`` and ``reason`` are stable codes (label values of
    ``offload_webhook_admission_reviews_total``): result is one of allowed, denied,
    injected, skipped; reason a CamelCase code such as ``Invalid`` or ``WindowsPod``.
    The rest is for the one log line of the review: what was reviewed (``pod ns/name``),
    more ``key=value`` codes (`` modeldeployment=llm``), what was decided in words, and
    whether it is routine (logged at DEBUG: a pod no ModelDeployment selects).
    """

    review: dict[str, Any]
    result: str
    reason: str
    subject: str = ""
    fields: str = ""
    detail: str = ""
    routine: bool = False


class BadReview(ValueError):
    """The body is not an AdmissionReview we can answer; the message says why."""


@dataclass(frozen=True)
class AdmissionRequest:
    uid: str
    kind: dict[str, str]
    resource: dict[str, str]
    sub_resource: str
    operation: str
    namespace: str
    name: str
    object: Any
    old_object: Any
    dry_run: bool


def parse_review(review: Any) -> AdmissionRequest:
    """Check the envelope of an AdmissionReview and extract its request."""
    if not isinstance(review, dict):
        raise BadReview("body must be a JSON object (an AdmissionReview)")
    if review.get("apiVersion") != ADMISSION_API_VERSION:
        raise BadReview(f"apiVersion must be {ADMISSION_API_VERSION}, got {review.get('apiVersion')!r}")
    if review.get("kind") != "AdmissionReview":
        raise BadReview(f"kind must be AdmissionReview, got {review.get('kind')!r}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("request: required field is missing")
    uid = request.get("uid")
    if uid is None or uid == "":
        raise BadReview("request.uid: required field is missing")
    if not isinstance(uid, str) or len(uid) > MAX_UID_CHARS:
        # The API server's uids are UUIDs (36 characters).
        raise BadReview(f"request.uid: must be a string of at most {MAX_UID_CHARS} characters")
    for field in ("kind", "resource"):
        if not isinstance(request.get(field), dict):
            raise BadReview(f"request.{field}: required field is missing")
    operation = request.get("operation")
    if operation not in ("CREATE", "UPDATE", "DELETE", "CONNECT"):
        raise BadReview(f"request.operation: must be CREATE, UPDATE, DELETE or CONNECT, got {operation!r}")
    return AdmissionRequest(
        uid=uid,
        kind={k: str(v) for k, v in request["kind"].items()},
        resource={k: str(v) for k, v in request["resource"].items()},
        sub_resource=str(request.get("subResource") or ""),
        operation=operation,
        namespace=str(request.get("namespace") or ""),
        name=str(request.get("name") or ""),
        object=request.get("object"),
        old_object=request.get("oldObject"),
        dry_run=bool(request.get("dryRun")),
    )


def _review(response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


def allow(
    uid: str,
    *,
    warnings: list[str] | tuple[str, ...] = (),
    patch: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """An allowing AdmissionReview; ``patch`` is the JSONPatch (RFC 6902 operations), sent
    base64-encoded as admission.k8s.io/v1 requires (none when empty).

    >>> allow("u1", patch=[{"op": "add", "path": "/a", "value": 1}])["response"]["patch"]
    'W3sib3AiOiJhZGQiLCJwYXRoIjoiL2EiLCJ2YWx1ZSI6MX1d'
    """
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if warnings:
        response["warnings"] = list(warnings)
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = _encode_patch(patch)
    return _review(response)


def _encode_patch(patch: Sequence[Mapping[str, Any]]) -> str:
    return base64.b64encode(json.dumps(list(patch), separators=(",", ":")).encode()).decode()


def deny(
    uid: str,
    message: str,
    *,
    code: int = 422,
    reason: str = "Invalid",
    warnings: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "uid": uid,
        "allowed": False,
        "status": {"code": code, "reason": reason, "message": message},
    }
    if warnings:
        response["warnings"] = list(warnings)
    return _review(response)
