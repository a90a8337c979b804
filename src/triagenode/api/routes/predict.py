"""Research endpoints: zero-shot scores for images posted as base64 (operator role).

Images are measured from their headers and refused above ``api.max_image_pixels`` and
friends before anything is decoded (:mod:`triagenode.api.uploads`): PNG and JPEG become
pixel arrays, DICOM files are passed on as bytes for the model's own preprocessing. At most
``api.max_concurrent_predictions`` calls decode and predict at once; the next is answered
503 with ``Retry-After``, so memory stays bounded whatever the number of callers.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from triagenode.api.deps import CallAuditDep, ServicesDep, require
from triagenode.api.problems import Problem
from triagenode.api.schemas import BatchPredictRequest, PredictRequest, PredictResponse
from triagenode.api.services import Predictor
from triagenode.api.tokens import Principal, Role
from triagenode.api.uploads import ImageLimits, PredictSlots, decode_images
from triagenode.audit.events import AuditEventId
from triagenode.errors import TriageNodeError

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["research"])
Operator = Annotated[Principal, Depends(require(Role.operator, AuditEventId.query, "E", "predict"))]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _predictor(services: Any) -> Predictor:
    if services.predictor is None:
        raise Problem(503, "no model is loaded in this node's API", "no-predictor")
    predictor: Predictor = services.predictor
    return predictor


def _check(queries: list[str] | None, label_set: str | None) -> None:
    if not queries and not label_set:
        raise Problem(422, "give queries or a label_set", "invalid-request")
    if queries and any(not q.strip() or len(q) > 256 for q in queries):
        raise Problem(422, "queries must be 1-256 characters each", "invalid-request")


def _decode_and_predict(
    predictor: Predictor, encoded: list[str], limits: ImageLimits, body: Any
) -> list[dict[str, Any]]:
    images = decode_images(encoded, limits)
    return predictor.predict(images, body.queries, body.label_set)


async def _run(
    request: Request, predictor: Predictor, encoded: list[str], body: Any
) -> PredictResponse:
    slots: PredictSlots = request.app.state.predict_slots
    limits = ImageLimits.from_settings(request.app.state.settings.api)
    with slots:
        try:
            results = await run_in_threadpool(_decode_and_predict, predictor, encoded, limits, body)
        except (TriageNodeError, ValueError) as exc:
            raise Problem(422, str(exc), "prediction-failed") from None
    return PredictResponse(results=_jsonable(list(results)))


@router.post("/predict", response_model=PredictResponse, summary="Score one image")
async def predict(
    request: Request, body: PredictRequest, services: ServicesDep, _: Operator, call: CallAuditDep
) -> PredictResponse:
    predictor = _predictor(services)
    _check(body.queries, body.label_set)
    call.details.update(images=1, label_set=body.label_set)
    return await _run(request, predictor, [body.image], body)


@router.post("/batch-predict", response_model=PredictResponse, summary="Score several images")
async def batch_predict(
    request: Request,
    body: BatchPredictRequest,
    services: ServicesDep,
    _: Operator,
    call: CallAuditDep,
) -> PredictResponse:
    predictor = _predictor(services)
    _check(body.queries, body.label_set)
    call.details.update(images=len(body.images), label_set=body.label_set)
    return await _run(request, predictor, body.images, body)
