"""Read one of the node's SRs back into plain values, through highdicom.

Used by the tests (write, read back, compare) and by anyone who fetches the SR from a PACS
and wants to check what it says without walking the content tree by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import CodedConcept, ValueTypeValues
from pydicom.dataset import Dataset

from triagenode.domain import Priority
from triagenode.reports import codes as tn_codes

__all__ = ["SrFinding", "SrSummary", "summarize_sr"]


@dataclass(frozen=True)
class SrFinding:
    """One measurement group of the SR."""

    name: str  # the tracking identifier, which is the label's name
    tracking_uid: str
    code_scheme: str
    code_value: str
    code_meaning: str
    present: bool
    score: float
    calibrated: bool  # written as "Probability" (calibrated) rather than "Score"
    images: tuple[tuple[str, tuple[int, ...]], ...]  # (SOP Instance UID, frame numbers)


@dataclass(frozen=True)
class SrSummary:
    """What an SR of the node says, in plain values."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    series_description: str
    findings: tuple[SrFinding, ...]
    priority: Priority | None
    critical: bool | None
    summary: str | None
    device_uid: str | None
    algorithm_name: str | None
    algorithm_version: str | None
    algorithm_parameters: tuple[str, ...]
    library_images: tuple[str, ...]  # SOP Instance UIDs in the image library

    def finding(self, name: str) -> SrFinding:
        """The finding of label ``name``; KeyError when the SR has none."""
        for finding in self.findings:
            if finding.name == name:
                return finding
        raise KeyError(name)


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in getattr(item, "ContentSequence", []):
        yield child
        yield from _walk(child)


def _concept(item: Dataset) -> CodedConcept:
    return CodedConcept.from_dataset(item.ConceptNameCodeSequence[0])


def _code_value(item: Dataset) -> CodedConcept:
    return CodedConcept.from_dataset(item.ConceptCodeSequence[0])


def _is(concept: CodedConcept, other: CodedConcept) -> bool:
    return concept.value == other.value and concept.scheme_designator == other.scheme_designator


def _group_finding(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> SrFinding:
    finding_type = group.finding_type
    evaluations = group.get_qualitative_evaluations(name=tn_codes.PRESENCE)
    probability = group.get_measurements(name=tn_codes.PROBABILITY)
    measured = probability or group.get_measurements(name=tn_codes.SCORE)
    if finding_type is None or not evaluations or not measured:
        raise ValueError(f"measurement group {group.tracking_identifier} is incomplete")
    images = tuple(
        (
            ref.referenced_sop_instance_uid,
            tuple(int(f) for f in (ref.referenced_frame_numbers or ())),
        )
        for ref in group.source_images
    )
    value = evaluations[0].value
    return SrFinding(
        name=str(group.tracking_identifier),
        tracking_uid=str(group.tracking_uid),
        code_scheme=finding_type.scheme_designator,
        code_value=finding_type.value,
        code_meaning=finding_type.meaning,
        present=isinstance(value, CodedConcept) and _is(value, tn_codes.PRESENT),
        score=float(measured[0].value),
        calibrated=bool(probability),
        images=images,
    )


def summarize_sr(dataset: Dataset) -> SrSummary:
    """Parse an SR made by :func:`~triagenode.reports.sr.build_sr`.

    Parameters
    ----------
    dataset
        The SR as read from a file or a PACS.

    Returns
    -------
    SrSummary

    Raises
    ------
    ValueError
        When ``dataset`` is not a TID 1500 report with the node's structure.
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=True)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        report = hd.sr.MeasurementReport.from_sequence(sr.content)
    findings = tuple(_group_finding(g) for g in report.get_image_measurement_groups())
    priority: Priority | None = None
    critical: bool | None = None
    summary: str | None = None
    device: str | None = None
    algorithm_name = algorithm_version = None
    parameters: list[str] = []
    library: list[str] = []
    root = dataset
    for item in _walk(root):
        value_type = item.ValueType
        if value_type == ValueTypeValues.CONTAINER.value or "ConceptNameCodeSequence" not in item:
            continue
        name = _concept(item)
        if value_type == "CODE" and _is(name, tn_codes.PRIORITY):
            priority = tn_codes.priority_from_concept(_code_value(item))
        elif value_type == "CODE" and _is(name, tn_codes.CRITICAL_FINDING):
            critical = _is(_code_value(item), tn_codes.YES)
        elif value_type == "TEXT" and _is(name, tn_codes.SUMMARY):
            summary = str(item.TextValue)
        elif value_type == "UIDREF" and name.value == "121012":  # Device Observer UID
            device = str(item.UID)
        elif value_type == "TEXT" and name.value == "111001" and algorithm_name is None:
            algorithm_name = str(item.TextValue)
        elif value_type == "TEXT" and name.value == "111003" and algorithm_version is None:
            algorithm_version = str(item.TextValue)
        elif value_type == "TEXT" and name.value == "111002":
            parameters.append(str(item.TextValue))
        elif value_type == "IMAGE" and _is(name, tn_codes.SOURCE):
            library.append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return SrSummary(
        sop_instance_uid=str(dataset.SOPInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        study_instance_uid=str(dataset.StudyInstanceUID),
        series_description=str(dataset.get("SeriesDescription", "")),
        findings=findings,
        priority=priority,
        critical=critical,
        summary=summary,
        device_uid=device,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        # Every group repeats the algorithm; its parameters once are enough.
        algorithm_parameters=tuple(dict.fromkeys(parameters)),
        library_images=tuple(dict.fromkeys(library)),
    )
