"""Coded concepts used in the node's SRs.

Standard codes (DCM, SCT, UCUM) are used wherever PS3.16 has one. Two concepts have no
standard code: the node's triage priority scale and the "critical finding suspected" flag.
They use the private coding scheme :data:`SCHEME`, which is declared, with every other
private scheme a label set uses, in the SR's Coding Scheme Identification Sequence so any
reader can tell who defined them (PS3.16 section 8: designators starting "99" are private).

A finding's number is a **score** (SNOMED CT 246262008 "Score") until its label carries a
fitted calibration; only then is it a **probability** (DCM 122157 "Probability").
"""

from __future__ import annotations

from collections.abc import Iterable

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from triagenode.config.labels import PRIVATE_SCHEME
from triagenode.domain import Priority

__all__ = [
    "ABSENT",
    "CRITICAL_FINDING",
    "IMAGE_LIBRARY",
    "IMAGE_LIBRARY_GROUP",
    "NO",
    "NO_UNITS",
    "PRESENCE",
    "PRESENT",
    "PRIORITY",
    "PROBABILITY",
    "PROCEDURE_REPORTED",
    "QUALITATIVE_EVALUATIONS",
    "SCHEME",
    "SCORE",
    "SOURCE",
    "SUMMARY",
    "YES",
    "coding_scheme",
    "coding_schemes",
    "is_private_scheme",
    "label_concept",
    "priority_concept",
    "priority_from_concept",
]

SCHEME = PRIVATE_SCHEME

# Qualitative evaluation values (CID 240 style present/absent).
PRESENT = CodedConcept.from_code(codes.SCT.Present)
ABSENT = CodedConcept.from_code(codes.SCT.Absent)
# Concept name of the per-label present/absent evaluation. Not the label's own concept: a
# label coded as DCM 121071 "Finding" would then collide with the group's finding type.
PRESENCE = CodedConcept.from_code(codes.DCM.PresenceOfProperty)
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")

# The per-finding number, dimensionless 0..1 (UCUM "1", "no units"): a score until a site
# calibration makes it a probability.
SCORE = CodedConcept("246262008", "SCT", "Score")
PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)
NO_UNITS = CodedConcept("1", "UCUM", "no units")

PROCEDURE_REPORTED = CodedConcept.from_code(codes.SCT.ImagingProcedure)
SUMMARY = CodedConcept.from_code(codes.DCM.Summary)
SOURCE = CodedConcept("260753009", "SCT", "Source")
IMAGE_LIBRARY = CodedConcept.from_code(codes.DCM.ImageLibrary)
IMAGE_LIBRARY_GROUP = CodedConcept("126200", "DCM", "Image Library Group")
# TID 1500 row "Qualitative Evaluations": document-level CODE/TEXT items. The standard codes
# this container with UMLS C0034375; (126010, DCM) is "Imaging Measurements", which readers
# (highdicom's among them) would mistake for the measurement container.
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

# SNOMED CT has "Priority (attribute)" for the concept; its values are the node's own scale.
PRIORITY = CodedConcept.from_code(codes.SCT.Priority)
CRITICAL_FINDING = CodedConcept("CRITICAL", SCHEME, "Critical finding suspected")

_PRIORITY_MEANINGS = {
    Priority.stat: "Stat triage priority",
    Priority.urgent: "Urgent triage priority",
    Priority.routine: "Routine triage priority",
    Priority.low: "Low triage priority",
}


def priority_concept(priority: Priority) -> CodedConcept:
    """The coded value of a triage priority in the private scheme (code value = name)."""
    priority = Priority.parse(priority)
    return CodedConcept(priority.name.upper(), SCHEME, _PRIORITY_MEANINGS[priority])


def priority_from_concept(concept: CodedConcept) -> Priority:
    """Inverse of :func:`priority_concept`.

    Raises
    ------
    ValueError
        When ``concept`` is not one of the node's priority codes.
    """
    if concept.scheme_designator != SCHEME:
        raise ValueError(
            f"not a {SCHEME} priority code: {concept.value}^{concept.scheme_designator}"
        )
    return Priority.parse(concept.value)


def label_concept(scheme: str, value: str, meaning: str) -> CodedConcept:
    """A label's coded concept as configured in its label set."""
    return CodedConcept(value, scheme, meaning)


def coding_scheme() -> CodingSchemeIdentificationItem:
    """The CodingSchemeIdentificationSequence item declaring :data:`SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=SCHEME,
        name="triagenode triage codes",
        version="1",
        responsible_organization="triagenode",
    )


def is_private_scheme(designator: str) -> bool:
    """PS3.16 section 8: designators beginning "99" are private and must be declared."""
    return designator.upper().startswith("99")


def coding_schemes(designators: Iterable[str]) -> list[CodingSchemeIdentificationItem]:
    """Declarations of :data:`SCHEME` and of every other private scheme in ``designators``
    (e.g. a site's own finding codes in a label set)."""
    items = [coding_scheme()]
    for designator in sorted({d for d in designators if is_private_scheme(d)} - {SCHEME}):
        items.append(
            CodingSchemeIdentificationItem(
                designator=designator,
                name=f"site-defined codes ({designator})",
                responsible_organization="the site that configured the label set",
            )
        )
    return items
