"""ORM models: the node's durable state.

Studies, jobs and exports are rows with a status, so a restart picks up exactly where the
node stopped. No column holds PHI: patients appear only as a keyed hash (``patient_ref``).
Schema changes go through Alembic migrations in ``store/migrations``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from triagenode.domain import ExportState, JobState

__all__ = [
    "ApiToken",
    "AuditEvent",
    "Base",
    "Export",
    "Instance",
    "Job",
    "Result",
    "Series",
    "Study",
    "StudyEvent",
    "utcnow",
]

UID = String(64)
AE = String(16)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime()}


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        # The console's worklist order, whole and per state (migration 0006_console_indexes).
        Index("ix_studies_worklist", "priority", "last_received_at", "id"),
        Index("ix_studies_state_worklist", "state", "priority", "last_received_at", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # domain.StudyState
    state_reason: Mapped[str | None] = mapped_column(Text)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    priority: Mapped[int] = mapped_column(Integer, default=20)  # domain.Priority value
    priority_rule: Mapped[str | None] = mapped_column(String(128))
    label_set: Mapped[str | None] = mapped_column(String(64))
    patient_ref: Mapped[str | None] = mapped_column(String(64), index=True)  # HMAC, never the ID
    modality: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(AE)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    stable_at: Mapped[datetime | None] = mapped_column()
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    byte_count: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bumped when a study is reopened or reprocessed: part of the SR UID derivation, so a
    # retry of the same run reuses its UID and a new run gets a new one.
    run: Mapped[int] = mapped_column(Integer, default=1)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    critical: Mapped[bool] = mapped_column(Boolean, default=False)
    triage_inputs: Mapped[dict[str, Any] | None] = mapped_column(
        JSON
    )  # non-PHI fields rules match on

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all")
    events: Mapped[list[StudyEvent]] = relationship(
        back_populates="study", cascade="all", order_by="StudyEvent.id"
    )


class StudyEvent(Base):
    """One state transition of a study: its history, shown by the API."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="events")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(AE)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    file_path: Mapped[str] = mapped_column(Text)  # relative to node.data_dir
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    # Duplicate policy: the newer copy replaces the older; this counts replacements.
    replaced_count: Mapped[int] = mapped_column(Integer, default=0)
    replaced_at: Mapped[datetime | None] = mapped_column()

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """A unit of work in the persistent priority queue."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "state", "priority", "enqueued_at"),
        Index("ix_jobs_lease", "state", "lease_expires_at"),
        # One active job per (study, run, kind): makes enqueue idempotent (migration 0002).
        Index(
            "uq_jobs_active",
            "study_id",
            "run",
            "kind",
            unique=True,
            sqlite_where=text("state IN ('pending', 'leased')"),
            postgresql_where=text("state IN ('pending', 'leased')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="classify")
    state: Mapped[str] = mapped_column(String(16), default=JobState.pending.value)
    priority: Mapped[int] = mapped_column(Integer, default=20)
    run: Mapped[int] = mapped_column(Integer, default=1)
    enqueued_at: Mapped[datetime] = mapped_column(default=utcnow)
    available_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column()


class Result(Base):
    """A classification of a study by one model run; one SR per row."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("study_id", "run", "weights_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    run: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    is_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    backend: Mapped[str] = mapped_column(String(32))
    label_set: Mapped[str] = mapped_column(String(64))
    top_finding: Mapped[str | None] = mapped_column(String(64))
    critical: Mapped[bool] = mapped_column(Boolean, default=False)
    findings: Mapped[dict[str, Any]] = mapped_column(JSON)  # the JSON twin of the SR
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(UID, unique=True)
    sr_series_uid: Mapped[str | None] = mapped_column(UID)
    sr_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Export(Base):
    """One SR to send to one destination: the outbox."""

    __tablename__ = "exports"
    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid"),
        Index("ix_exports_due", "state", "priority", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id", ondelete="SET NULL"))
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    file_path: Mapped[str] = mapped_column(Text)  # relative to node.data_dir
    priority: Mapped[int] = mapped_column(Integer, default=20)
    state: Mapped[str] = mapped_column(String(16), default=ExportState.pending.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column()


class AuditEvent(Base):
    """One audit record; rows are only ever appended.

    ``row_hash`` is a keyed hash over the row's content and ``prev_hash`` (the previous row's
    ``row_hash``), so editing, deleting, inserting or reordering rows breaks the chain.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int | None] = mapped_column(BigInteger, unique=True)  # position in the chain
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    event_id: Mapped[str] = mapped_column(String(16), index=True)  # DCM code, e.g. "110104"
    event_type: Mapped[str | None] = mapped_column(String(64))  # sub-type, e.g. "received"
    action: Mapped[str] = mapped_column(String(1), default="E")  # C/R/U/D/E (PS3.15 A.5)
    outcome: Mapped[int] = mapped_column(Integer, default=0)  # 0, 4, 8 or 12
    actor: Mapped[str | None] = mapped_column(String(128), index=True)
    actor_address: Mapped[str | None] = mapped_column(String(128))
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    patient_ref: Mapped[str | None] = mapped_column(String(64), index=True)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    row_hash: Mapped[str | None] = mapped_column(String(64))


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # auditor / operator / admin
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()
