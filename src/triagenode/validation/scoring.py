"""Scoring studies for ``evaluate``: the node's code path, or the node's stored results.

Studies are classified exactly as ``serve`` classifies them (:func:`plan_study` for the label
set and the images, :meth:`ZeroShotClassifier.classify_study` for preprocessing, the backend,
calibration and aggregation), minus the quiet periods, the database and the SRs. A few
studies are in flight at a time so the batcher fills its batches across studies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from triagenode.validation.dataset import StudyFiles

__all__ = ["FindingScore", "ScoredStudy", "classify_studies", "stored_results"]


@dataclass(frozen=True)
class FindingScore:
    name: str
    score: float
    logit: float | None
    threshold: float


@dataclass
class ScoredStudy:
    """One study's outcome: classified (``ok``), ``failed``, ``not_applicable`` or ``ignored``."""

    study_uid: str
    folder: str
    status: str
    reason: str = ""
    label_set: str | None = None
    findings: list[FindingScore] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    weights_sha256: str = ""
    inputs: dict[str, str] = field(default_factory=dict)  # triage inputs, for the drift mix


def _classify_one(
    classifier: Any, study: StudyFiles, model_settings: Any, label_set: str | None
) -> ScoredStudy:
    from triagenode.inference.classifier import NoUsableImagesError
    from triagenode.inference.plan import plan_study

    plan = plan_study(
        classifier.labels,
        study.records,
        study.triage_inputs,
        slices_per_series=model_settings.slices_per_series,
        max_images=model_settings.max_images_per_study,
        label_set=label_set,
        label_set_reason="--label-set" if label_set else "",
    )
    out = ScoredStudy(study.study_uid, study.folder, "ok", label_set=plan.label_set)
    out.inputs = dict(study.triage_inputs)
    if not plan.selection.images:
        reasons = sorted({s.reason for s in plan.selection.skipped})
        out.status, out.reason = "ignored", "no classifiable images: " + "; ".join(reasons)
        return out
    if plan.label_set is None:
        out.status, out.reason = "not_applicable", plan.reason
        return out
    try:
        result = classifier.classify_study(
            study.study_uid,
            [(image.ref, image.path) for image in plan.selection.images],
            label_set=plan.label_set,
            label_set_reason=plan.reason,
            series_skipped=plan.selection.skipped,
        )
    except NoUsableImagesError as exc:
        out.status, out.reason = "failed", str(exc)
        return out
    out.findings = [FindingScore(f.name, f.score, f.logit, f.threshold) for f in result.findings]
    out.images = [
        ref.sop_instance_uid + (f"#{ref.frame}" if ref.frame else "") for ref in result.images_used
    ]
    out.weights_sha256 = result.model.weights_sha256
    return out


def classify_studies(
    classifier: Any,
    studies: Iterable[StudyFiles],
    model_settings: Any,
    *,
    label_set: str | None = None,
    in_flight: int = 4,
) -> Iterator[ScoredStudy]:
    """Classify ``studies`` as the node does, ``in_flight`` at a time, yielding in order."""
    if label_set is not None:
        classifier.label_set(label_set)  # fail now, naming the known sets
    with ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="evaluate") as pool:
        pending: deque[tuple[StudyFiles, Future[ScoredStudy]]] = deque()

        def done(study: StudyFiles, future: Future[ScoredStudy]) -> ScoredStudy:
            try:
                return future.result()
            except Exception as exc:  # one bad study is listed, never the end of the run
                return ScoredStudy(
                    study.study_uid, study.folder, "failed", f"{type(exc).__name__}: {exc}"
                )

        for study in studies:
            pending.append(
                (study, pool.submit(_classify_one, classifier, study, model_settings, label_set))
            )
            if len(pending) >= max(1, in_flight):
                yield done(*pending.popleft())
        while pending:
            yield done(*pending.popleft())


def stored_results(db: Any) -> Iterator[ScoredStudy]:
    """The node's stored results (newest run of each study): what shadow mode recorded."""
    from sqlalchemy import select

    from triagenode.store.models import Result, Study

    with db.session() as session:
        rows = session.execute(
            select(Study.study_uid, Result.findings, Result.weights_sha256, Result.label_set)
            .join(Result, Result.study_id == Study.id)
            .order_by(Study.study_uid, Result.run, Result.id)
        ).all()
    newest: dict[str, Any] = {}
    for row in rows:
        newest[row.study_uid] = row
    for uid, row in newest.items():
        data = row.findings or {}
        yield ScoredStudy(
            study_uid=uid,
            folder="",
            status="ok",
            label_set=row.label_set,
            findings=[
                FindingScore(
                    f["name"], float(f["score"]), f.get("logit"), float(f.get("threshold", 0.5))
                )
                for f in data.get("findings", [])
            ],
            images=[i["sop_instance_uid"] for i in data.get("images_used", [])],
            weights_sha256=row.weights_sha256,
        )
