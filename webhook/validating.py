"""The validating webhook for ModelDeployments: review in, verdict out (pure)."""

from __future__ import annotations

from typing import Any

from crds.model import GROUP, KIND, PLURAL
from crds.validation import ValidationSettings, validate_object
from webhook.admission import AdmissionRequest, Reviewed, allow, deny


def review_modeldeployment(request: AdmissionRequest, settings: ValidationSettings) -> dict[str, Any]:
    """Allow a good ModelDeployment, deny a bad one listing every error with its path."""
    return answer_modeldeployment(request, settings).review


def answer_modeldeployment(request: AdmissionRequest, settings: ValidationSettings) -> Reviewed:
    """``review_modeldeployment`` with its result and reason code: allowed (``Valid``, or
    ``NotValidated`` for a DELETE, a status write or an unchanged spec) or denied
    (``Invalid``, or ``BadRequest`` for a review of another resource)."""
    if request.resource.get("group") != GROUP or request.resource.get("resource") != PLURAL:
        review = deny(
            request.uid,
            f"this webhook validates {PLURAL}.{GROUP}, got {request.resource}",
            code=400,
            reason="BadRequest",
        )
        return Reviewed(review, "denied", "BadRequest")
    if request.operation not in ("CREATE", "UPDATE") or request.sub_resource == "status":
        return Reviewed(allow(request.uid), "allowed", "NotValidated")
    # A status-only update never changes the spec: never block the controller.
    if (
        request.operation == "UPDATE"
        and isinstance(request.old_object, dict)
        and isinstance(request.object, dict)
    ):
        if request.old_object.get("spec") == request.object.get("spec"):
            return Reviewed(allow(request.uid), "allowed", "NotValidated")
    obj = request.object
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(meta, dict) and not meta.get("namespace") and request.namespace:
        # On CREATE the object may not carry its namespace yet; the request does.
        obj = {**obj, "metadata": {**meta, "namespace": request.namespace}}
    result = validate_object(obj, settings)
    subject = f"{PLURAL} {request.namespace}/{request.name or '<new>'}"
    if not result.ok:
        name = request.name or "<new>"
        review = deny(
            request.uid,
            f'{KIND}.{GROUP} "{name}" is invalid: {result.message()}',
            warnings=result.warnings,
        )
        return Reviewed(review, "denied", "Invalid", subject=subject, detail=result.message())
    return Reviewed(allow(request.uid, warnings=result.warnings), "allowed", "Valid", subject=subject)
