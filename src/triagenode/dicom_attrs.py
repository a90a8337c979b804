"""The few non-identifying DICOM attributes the node keeps about a study for triage.

The receiver extracts them from each instance (without touching pixel data) and stores them
on the study row; triage rules and the domain choice of the classifier match on them. None
of them identifies a patient.
"""

from __future__ import annotations

import enum
from typing import Any

from pydicom.dataset import Dataset

__all__ = [
    "C_STORE_PRIORITY",
    "TRIAGE_KEYWORDS",
    "RequestPriority",
    "merge_triage_inputs",
    "triage_inputs",
]


class RequestPriority(enum.IntEnum):
    """The Priority (0000,0700) of a DIMSE request, as PS3.7 section 9.3.1.1 and annex E
    define it: ``LOW = 0002H``, ``MEDIUM = 0000H``, ``HIGH = 0001H``.

    The numbers do not follow urgency (MEDIUM is the zero default), so never compare them:
    compare :attr:`rank`.
    """

    MEDIUM = 0x0000
    HIGH = 0x0001
    LOW = 0x0002

    @property
    def rank(self) -> int:
        """0 for LOW, 1 for MEDIUM, 2 for HIGH: the order of urgency."""
        return {RequestPriority.LOW: 0, RequestPriority.MEDIUM: 1, RequestPriority.HIGH: 2}[self]

    def describe(self) -> str:
        """``"HIGH (0x0001)"``: the name and the number on the wire."""
        return f"{self.name} (0x{int(self):04X})"


# Wire value -> name, for the receiver's triage inputs.
C_STORE_PRIORITY = {int(p): p.name for p in RequestPriority}

# Top-level keywords copied as text (first value for multi-valued attributes).
TRIAGE_KEYWORDS = (
    "Modality",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ReasonForStudy",
    "RequestedProcedureDescription",
    "RequestedProcedurePriority",
    "InstitutionalDepartmentName",
    "ProtocolName",
)
# Found in sequences: Request Attributes (0040,0275) and Scheduled Procedure Steps.
_SEQUENCE_KEYWORDS = {
    "RequestAttributesSequence": (
        "RequestedProcedureDescription",
        "ReasonForTheRequestedProcedure",
    ),
    "ScheduledProcedureStepSequence": ("ScheduledProcedureStepPriority",),
}


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
        if value is None:
            return None
    return str(value).strip() or None


def _anatomic_region(ds: Dataset) -> str | None:
    """The first Anatomic Region Sequence code as ``value^scheme^meaning``, if any."""
    try:
        item = (ds.get("AnatomicRegionSequence") or [None])[0]
        if item is None:
            return None
        value = _text(item.get("CodeValue"))
        scheme = _text(item.get("CodingSchemeDesignator")) or ""
        meaning = _text(item.get("CodeMeaning")) or ""
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    return f"{value}^{scheme}^{meaning}" if value else None


def triage_inputs(
    ds: Dataset, request_priority: int | None, calling_ae: str | None
) -> dict[str, str]:
    """Triage attributes of one instance, as ``{keyword: text}`` without empty values.

    Parameters
    ----------
    ds
        The received dataset (pixel data is not read).
    request_priority
        The C-STORE request's Priority field, or None when not known.
    calling_ae
        The sender's AE title.
    """
    found: dict[str, str] = {}
    for keyword in TRIAGE_KEYWORDS:
        text = _text(ds.get(keyword))
        if text:
            found[keyword] = text
    for sequence, keywords in _SEQUENCE_KEYWORDS.items():
        for item in ds.get(sequence) or []:
            for keyword in keywords:
                text = _text(item.get(keyword))
                if text and keyword not in found:
                    found[keyword] = text
    region = _anatomic_region(ds)
    if region:
        found["AnatomicRegion"] = region
    if request_priority in C_STORE_PRIORITY:
        found["RequestPriority"] = C_STORE_PRIORITY[request_priority]
    if calling_ae:
        found["CallingAETitle"] = calling_ae.strip()
    return found


def _rank(name: str) -> int:
    return RequestPriority[name].rank if name in RequestPriority.__members__ else -1


def merge_triage_inputs(old: dict[str, str] | None, new: dict[str, str]) -> dict[str, str]:
    """Combine a study's stored inputs with a new instance's.

    Values already known are kept (the first instance describes the study) except the
    request priority, which keeps the most urgent one seen.
    """
    old = old or {}
    merged = dict(new)
    merged.update(old)
    if "RequestPriority" in new and "RequestPriority" in old:
        merged["RequestPriority"] = max(new["RequestPriority"], old["RequestPriority"], key=_rank)
    return merged
