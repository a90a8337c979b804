"""Research endpoints: zero-shot scores for images posted as base64 (operator role).

Images are decoded here only as far as needed to refuse garbage early: PNG and JPEG become
pixel arrays, DICOM files are passed on as bytes for the model's own preprocessing.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from triagenode.api.deps import CallAuditDep, ServicesDep, require
from triagenode.api.problems import Problem
from triagenode.api.schemas import BatchPredictRequest, PredictRequest, PredictResponse
from triagenode.api.services import Predictor
from triagenode.api.tokens import Principal, Role
from triagenode.audit.events import AuditEventId
from triagenode.errors import TriageNodeError

__all__ = ["decode_image", "router"]

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["research"])
Operator = Annotated[Principal, Depends(require(Role.operator, AuditEventId.query, "E", "predict"))]


def decode_image(encoded: str, index: int = 0) -> np.ndarray | bytes:
    """The pixels of a base64 PNG/JPEG, or the bytes of a base64 DICOM file.

    Raises
    ------
    Problem
        422 naming the image (by position) that is not base64 or not a supported format.
    """
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise Problem(422, f"image {index}: not valid base64", "bad-image") from None
    if data[128:132] == b"DICM":
        return data
    if data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                if opened.mode in ("L", "I", "I;16", "RGB"):
                    return np.asarray(opened)
                return np.asarray(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError):
            raise Problem(422, f"image {index}: cannot be decoded", "bad-image") from None
    raise Problem(422, f"image {index}: not a PNG, JPEG or DICOM Part 10 file", "bad-image")


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
    return services.predictor


def _check(queries: list[str] | None, label_set: str | None) -> None:
    if not queries and not label_set:
        raise Problem(422, "give queries or a label_set", "invalid-request")
    if queries and any(not q.strip() or len(q) > 256 for q in queries):
        raise Problem(422, "queries must be 1-256 characters each", "invalid-request")


async def _run(
    predictor: Predictor, images: list[np.ndarray | bytes], body: Any
) -> PredictResponse:
    try:
        results = await run_in_threadpool(predictor.predict, images, body.queries, body.label_set)
    except (TriageNodeError, ValueError) as exc:
        raise Problem(422, str(exc), "prediction-failed") from None
    return PredictResponse(results=_jsonable(list(results)))


@router.post("/predict", response_model=PredictResponse, summary="Score one image")
async def predict(
    body: PredictRequest, services: ServicesDep, _: Operator, call: CallAuditDep
) -> PredictResponse:
    predictor = _predictor(services)
    _check(body.queries, body.label_set)
    call.details.update(images=1, label_set=body.label_set)
    return await _run(predictor, [decode_image(body.image)], body)


@router.post("/batch-predict", response_model=PredictResponse, summary="Score several images")
async def batch_predict(
    body: BatchPredictRequest, services: ServicesDep, _: Operator, call: CallAuditDep
) -> PredictResponse:
    predictor = _predictor(services)
    _check(body.queries, body.label_set)
    call.details.update(images=len(body.images), label_set=body.label_set)
    images = [decode_image(image, i) for i, image in enumerate(body.images)]
    return await _run(predictor, images, body)
