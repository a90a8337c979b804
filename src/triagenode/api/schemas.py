"""Request and response models of the admin API.

Responses are built field by field from rows, never from the ORM objects wholesale, so a
token hash or a column added later cannot leak; JSON copied from results passes through
:func:`without_phi` first.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ActionResult",
    "AuditEventOut",
    "BatchPredictRequest",
    "ExportOut",
    "Page",
    "PredictRequest",
    "PredictResponse",
    "QueueJobOut",
    "QueueOut",
    "QueuePriorityOut",
    "ReadyOut",
    "ResultOut",
    "SeriesOut",
    "StudyDetail",
    "StudyEventOut",
    "StudySummary",
    "TokenOut",
    "VerifyOut",
    "without_phi",
]

T = TypeVar("T")

# Keys that must never leave the node in a response, whatever JSON they turn up in.
_PHI_KEYS = {
    "patientname",
    "patient_name",
    "patientid",
    "patient_id",
    "patientbirthdate",
    "patient_birth_date",
    "birth_date",
    "birthdate",
    "accessionnumber",
    "accession_number",
    "accession",
    "otherpatientids",
    "patientaddress",
}


def without_phi(value: Any) -> Any:
    """A copy of JSON-like ``value`` without keys that name patient identifiers."""
    if isinstance(value, dict):
        return {k: without_phi(v) for k, v in value.items() if str(k).lower() not in _PHI_KEYS}
    if isinstance(value, list):
        return [without_phi(v) for v in value]
    return value


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Page(_Out, Generic[T]):
    """One page of a list; pass ``next_cursor`` back as ``cursor`` for the next page."""

    items: list[T]
    total: int
    limit: int
    offset: int
    next_cursor: str | None = None


class StudySummary(_Out):
    study_uid: str
    state: str
    priority: str
    modality: str | None
    calling_ae: str | None
    label_set: str | None
    critical: bool
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    stable_at: datetime | None
    run: int


class StudyEventOut(_Out):
    at: datetime
    from_state: str | None
    to_state: str
    reason: str | None


class SeriesOut(_Out):
    series_uid: str
    modality: str | None
    body_part: str | None
    instance_count: int


class ResultOut(_Out):
    run: int
    model_name: str
    model_version: str
    is_demo: bool
    backend: str
    label_set: str
    top_finding: str | None
    critical: bool
    findings: dict[str, Any]
    sr_sop_instance_uid: str | None
    sr_series_uid: str | None
    created_at: datetime
    current: bool = Field(description="The newest run's result: the one the PACS should show")
    supersedes: str | None = Field(
        default=None, description="SOP Instance UID of the earlier SR this one replaces"
    )


class ExportOut(_Out):
    id: int
    study_uid: str
    destination: str
    sop_instance_uid: str
    priority: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


class StudyDetail(StudySummary):
    state_reason: str | None
    priority_rule: str | None
    byte_count: int
    attempts: int
    series_count: int
    stored_instance_count: int
    history: list[StudyEventOut]
    series: list[SeriesOut]
    results: list[ResultOut]
    sr_sop_instance_uid: str | None = Field(description="The newest result's SR")
    exports: list[ExportOut]


class ActionResult(_Out):
    study_uid: str | None = None
    export_id: int | None = None
    action: str
    changed: bool
    state: str | None = None


class QueuePriorityOut(_Out):
    priority: str
    pending: int
    leased: int


class QueueJobOut(_Out):
    id: int
    study_uid: str | None
    kind: str
    state: str
    priority: str
    run: int
    attempts: int
    enqueued_at: datetime
    available_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None


class QueueOut(_Out):
    by_priority: list[QueuePriorityOut]
    jobs: list[QueueJobOut]


class AuditEventOut(_Out):
    seq: int | None
    at: datetime
    event_id: str
    event_name: str | None
    event_type: str | None
    action: str
    outcome: int
    actor: str | None
    actor_address: str | None
    study_uid: str | None
    patient_ref: str | None = Field(description="HMAC-SHA256 of the patient ID, never the ID")
    details: dict[str, Any] | None
    prev_hash: str | None
    row_hash: str | None


class ChainProblemOut(_Out):
    kind: str
    seq: int | None
    row_id: int | None
    message: str


class VerifyOut(_Out):
    ok: bool
    count: int
    vouched: int
    first_at: datetime | None
    last_at: datetime | None
    head_seq: int | None
    head_hash: str | None
    problem: ChainProblemOut | None
    checkpoints: int | None = Field(
        default=None, description="Signed checkpoints checked; None when the node has none"
    )


class ReadyOut(_Out):
    ready: bool
    checks: dict[str, dict[str, Any]]


class TokenOut(_Out):
    name: str
    role: str
    status: Literal["active", "revoked", "expired"]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class PredictRequest(BaseModel):
    """One image (base64 PNG, JPEG or DICOM Part 10) and what to score it against."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="base64 of a PNG, JPEG or DICOM file")
    queries: list[str] | None = Field(default=None, min_length=1, max_length=64)
    label_set: str | None = Field(default=None, max_length=64)


class BatchPredictRequest(BaseModel):
    """Several images scored against one label set (or one list of queries)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1, max_length=64)
    label_set: str | None = Field(default=None, max_length=64)
    queries: list[str] | None = Field(default=None, min_length=1, max_length=64)


class PredictResponse(_Out):
    results: list[dict[str, Any]]
