"""Coded concepts used in the node's SRs.

Standard codes (DCM, SCT, UCUM) are used wherever PS3.16 has one. Two concepts have no
standard code: the node's triage priority scale and the "critical finding suspected" flag.
They use the private coding scheme :data:`SCHEME`, declared in the SR's
CodingSchemeIdentificationSequence so any reader can tell who defined them (PS3.16 8.2).
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

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
    "SOURCE",
    "SUMMARY",
    "YES",
    "coding_scheme",
    "label_concept",
    "priority_concept",
    "priority_from_concept",
]

SCHEME = "99TRIAGENODE"

# Qualitative evaluation values (CID 240 style present/absent).
PRESENT = CodedConcept.from_code(codes.SCT.Present)
ABSENT = CodedConcept.from_code(codes.SCT.Absent)
# Concept name of the per-label present/absent evaluation. Not the label's own concept: a
# label coded as DCM 121071 "Finding" would then collide with the group's finding type.
PRESENCE = CodedConcept.from_code(codes.DCM.PresenceOfProperty)
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")

# The per-label probability, a dimensionless fraction 0..1 (UCUM "1", "no units").
PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)
NO_UNITS = CodedConcept("1", "UCUM", "no units")

PROCEDURE_REPORTED = CodedConcept.from_code(codes.SCT.ImagingProcedure)
SUMMARY = CodedConcept.from_code(codes.DCM.Summary)
SOURCE = CodedConcept("260753009", "SCT", "Source")
IMAGE_LIBRARY = CodedConcept.from_code(codes.DCM.ImageLibrary)
IMAGE_LIBRARY_GROUP = CodedConcept("126200", "DCM", "Image Library Group")
# TID 1500 row "Qualitative Evaluations": document-level CODE/TEXT items.
QUALITATIVE_EVALUATIONS = CodedConcept("126010", "DCM", "Qualitative Evaluations")

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
