"""The parts of the node's TID 1500 report: identities, UIDs and content items.

Everything here is deterministic in its inputs (except the installation id, made once per
data folder), so the same work always produces the same UIDs and the same content tree.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes

from triagenode.config.settings import Settings
from triagenode.domain import DEMO_WARNING, ImageRef, LabelFinding, StudyResult
from triagenode.reports import codes as tn_codes
from triagenode.uids import derive_uid

__all__ = [
    "MANUFACTURER",
    "SrUids",
    "algorithm_identification",
    "device_uid",
    "image_library",
    "installation_id",
    "measurement_group",
    "observation_context",
    "qualitative_evaluations",
    "sr_uids",
    "summary_text",
    "tracking_uid",
    "unique_images",
]

log = logging.getLogger(__name__)

MANUFACTURER = "triagenode"
DEVICE_MODEL_NAME = "triagenode AI triage node"
_INSTALLATION_FILE = "installation-id"


@dataclass(frozen=True)
class SrUids:
    """The UIDs of one SR: deterministic in (study, model identity, run)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


def _model_key(result: StudyResult) -> tuple[str, str]:
    return (result.model.name, result.model.weights_sha256)


def sr_uids(result: StudyResult, settings: Settings, *, run: int) -> SrUids:
    """SR series and SOP Instance UIDs for ``result`` of processing run ``run``.

    The series depends on (study, model name + weights hash) only, so every run of the same
    model on a study lands in one series, its instances numbered by run; the SOP Instance
    UID adds the run. The same work always gives the same UIDs, so a retried or resent SR
    replaces its earlier copy in the PACS instead of adding a second.
    """
    root = settings.node.uid_root
    model = (result.study_uid, *_model_key(result))
    return SrUids(
        study_instance_uid=result.study_uid,
        series_instance_uid=derive_uid(root, "sr-series", *model),
        sop_instance_uid=derive_uid(root, "sr-instance", *model, str(run)),
    )


def tracking_uid(result: StudyResult, settings: Settings, *, run: int, label: str) -> str:
    """The tracking UID of one label's measurement group (deterministic)."""
    parts = (result.study_uid, *_model_key(result), str(run), label)
    return derive_uid(settings.node.uid_root, "sr-tracking", *parts)


def installation_id(settings: Settings) -> str:
    """A random id made once per data folder and kept in ``<data_dir>/installation-id``.

    It stays the same across restarts and upgrades, and differs between two installations
    that share a UID root, which a path or host name would not guarantee.
    """
    data_dir = Path(settings.node.data_dir)
    path = data_dir / _INSTALLATION_FILE
    try:
        existing = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    new_id = uuid.uuid4().hex
    tmp = path.with_name(f".{_INSTALLATION_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="ascii") as handle:
        handle.write(new_id + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    try:
        # link() fails if another process won the race; then its id is the one to use.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text(encoding="ascii").strip()


def device_uid(settings: Settings) -> str:
    """The node's device observer UID: stable per installation, under ``node.uid_root``."""
    return derive_uid(settings.node.uid_root, "device", installation_id(settings))


def observation_context(settings: Settings) -> ObservationContext:
    """TID 1002 with a device observer (TID 1004) describing this node."""
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(settings),
        name=settings.node.station_name,
        manufacturer_name=MANUFACTURER,
        model_name=DEVICE_MODEL_NAME,
        serial_number=installation_id(settings),
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def algorithm_identification(result: StudyResult) -> AlgorithmIdentification:
    """TID 4019: the model's name and version, its weights hash and every parameter that
    shaped the numbers (label set and why, thresholds, aggregation, calibration)."""
    thresholds = "; ".join(f"{f.name}={f.threshold:g}" for f in result.findings)
    parameters = [
        f"weights_sha256={result.model.weights_sha256}",
        f"model_source={result.model.source}",
        f"backend={result.backend}",
        f"label_set={result.label_set}",
        f"labels={', '.join(f.name for f in result.findings)}",
        "scoring=each finding on its own: present vs absent prompts",
        f"thresholds={thresholds}",
        f"aggregation={result.aggregation}",
        f"calibration={result.calibration}",
    ]
    if result.label_set_reason:
        parameters.append(f"label_set_reason={result.label_set_reason}")
    if result.model.is_demo:
        parameters.insert(0, DEMO_WARNING)
    return AlgorithmIdentification(
        name=result.model.display_name[:64],
        version=(result.model.version or "unknown")[:64],
        parameters=[p[:1024] for p in parameters],
        manufacturer=MANUFACTURER,
    )


def unique_images(refs: Iterable[ImageRef]) -> OrderedDict[str, tuple[ImageRef, tuple[int, ...]]]:
    """Refs grouped by SOP Instance UID, in first-seen order, with their frame numbers.

    An empty frame tuple means the whole instance (a single-frame image, or every frame).
    """
    grouped: OrderedDict[str, tuple[ImageRef, set[int] | None]] = OrderedDict()
    for ref in refs:
        first, frames = grouped.get(ref.sop_instance_uid, (ref, set()))
        # A whole-instance reference covers every frame.
        frames = None if ref.frame is None or frames is None else frames | {ref.frame}
        grouped[ref.sop_instance_uid] = (first, frames)
    return OrderedDict(
        (uid, (ref, tuple(sorted(frames)) if frames else ()))
        for uid, (ref, frames) in grouped.items()
    )


def _source_images(refs: Sequence[ImageRef]) -> list[SourceImageForMeasurementGroup]:
    return [
        SourceImageForMeasurementGroup(
            referenced_sop_class_uid=ref.sop_class_uid,
            referenced_sop_instance_uid=uid,
            referenced_frame_numbers=list(frames) or None,
        )
        for uid, (ref, frames) in unique_images(refs).items()
    ]


def measurement_group(
    finding: LabelFinding,
    result: StudyResult,
    settings: Settings,
    *,
    run: int,
    algorithm: AlgorithmIdentification,
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one finding: finding type, present/absent, score (a probability only
    when calibrated), the images whose own score reached the threshold."""
    concept = tn_codes.label_concept(finding.code_scheme, finding.code_value, finding.code_meaning)
    score = Measurement(
        name=tn_codes.PROBABILITY if finding.calibrated else tn_codes.SCORE,
        value=round(float(finding.score), 6),
        unit=tn_codes.NO_UNITS,
    )
    evaluation = QualitativeEvaluation(
        name=tn_codes.PRESENCE, value=tn_codes.PRESENT if finding.present else tn_codes.ABSENT
    )
    refs = finding.images or result.images_used
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(result, settings, run=run, label=finding.name),
            identifier=finding.name,
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[score],
        qualitative_evaluations=[evaluation],
        source_images=_source_images(refs) or None,
    )


def image_library(refs: Sequence[ImageRef]) -> ContainerContentItem:
    """TID 1600 listing every source image, one Image Library Group per series."""
    library = ContainerContentItem(
        name=tn_codes.IMAGE_LIBRARY, relationship_type=RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = ContentSequence()
    by_series: OrderedDict[str, list[tuple[ImageRef, tuple[int, ...]]]] = OrderedDict()
    for ref, frames in unique_images(refs).values():
        by_series.setdefault(ref.series_uid, []).append((ref, frames))
    for entries in by_series.values():
        group = ContainerContentItem(
            name=tn_codes.IMAGE_LIBRARY_GROUP, relationship_type=RelationshipTypeValues.CONTAINS
        )
        group.ContentSequence = ContentSequence()
        modality = _coded_modality(entries[0][0].sop_class_uid)
        if modality is not None:
            group.ContentSequence.append(
                CodeContentItem(
                    name=codes.DCM.Modality,
                    value=modality,
                    relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT,
                )
            )
        for ref, frames in entries:
            group.ContentSequence.append(
                ImageContentItem(
                    name=tn_codes.SOURCE,
                    referenced_sop_class_uid=ref.sop_class_uid,
                    referenced_sop_instance_uid=ref.sop_instance_uid,
                    referenced_frame_numbers=list(frames) or None,
                    relationship_type=RelationshipTypeValues.CONTAINS,
                )
            )
        library.ContentSequence.append(group)
    return library


def _coded_modality(sop_class_uid: str) -> hd.sr.CodedConcept | None:
    # highdicom keeps its SOP class -> modality table private; an unknown class simply gets
    # no modality descriptor (it is optional in TID 1602).
    from highdicom.sr.templates import _get_coded_modality

    try:
        return hd.sr.CodedConcept.from_code(_get_coded_modality(sop_class_uid))
    except (KeyError, ValueError):
        return None


def summary_text(result: StudyResult) -> str:
    """What a radiologist reads in two seconds: findings over threshold, priority and why,
    and that these are scores, not a diagnosis."""
    present = sorted((f for f in result.findings if f.present), key=lambda f: -f.score)
    calibrated = all(f.calibrated for f in result.findings)
    number = "probability" if calibrated else "score"
    parts = []
    if result.model.is_demo:
        parts.append(f"{DEMO_WARNING}.")
    if present:
        names = ", ".join(
            f"{f.code_meaning}{' (CRITICAL)' if f.critical else ''} {number} {f.score:.2f}"
            f" (threshold {f.threshold:.2f})"
            for f in present
        )
        parts.append(f"AI flags: {names}.")
    else:
        checked = ", ".join(f.code_meaning for f in result.findings)
        parts.append(f"AI flags nothing above threshold (checked: {checked}).")
    rule = f"rule {result.priority_rule}" if result.priority_rule else "no triage rule matched"
    parts.append(f"Priority {result.priority.name.upper()} ({rule}).")
    flagged = [f for f in result.findings if f.critical and not f.escalates]
    if flagged:
        parts.append(
            "Critical finding flagged but not escalated: its threshold is not site-calibrated."
        )
    images = len(unique_images(result.images_used))
    failed = f", {len(result.images_failed)} unreadable" if result.images_failed else ""
    parts.append(
        f"{images} image(s) of {result.label_set.replace('_', ' ')} analysed{failed}; "
        f"{result.aggregation}."
    )
    if calibrated:
        parts.append("Site-calibrated probabilities; AI triage, not a diagnosis.")
    else:
        parts.append("Scores are not probabilities; AI triage, not a diagnosis.")
    return " ".join(parts)


def qualitative_evaluations(result: StudyResult) -> ContainerContentItem:
    """TID 1500 document-level evaluations: the summary text first, then the triage
    priority and the critical flag."""
    container = ContainerContentItem(
        name=tn_codes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = ContentSequence(
        [
            TextContentItem(
                name=tn_codes.SUMMARY,
                value=summary_text(result),
                relationship_type=RelationshipTypeValues.CONTAINS,
            ),
            CodeContentItem(
                name=tn_codes.PRIORITY,
                value=tn_codes.priority_concept(result.priority),
                relationship_type=RelationshipTypeValues.CONTAINS,
            ),
            CodeContentItem(
                name=tn_codes.CRITICAL_FINDING,
                value=tn_codes.YES if result.flagged else tn_codes.NO,
                relationship_type=RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    return container
