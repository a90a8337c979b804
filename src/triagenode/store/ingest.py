"""Recording received instances: the studies, series and instances rows.

A single writer thread commits the rows of every association in groups (one commit, so one
fsync, for all instances that arrived meanwhile), before the C-STORE success is sent. A new
instance of a known study is committed in parallel with its file's fsync (taken back if the
file fails, see :mod:`triagenode.store.recovery`); any other rows only after the file is
durable. The common case (another
instance of a study already receiving) is three short statements; the ids of known studies
and series are cached so no lookups are needed. Duplicates and reopened studies take
a slower path that also writes a :class:`~triagenode.store.models.StudyEvent`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    Table,
    bindparam,
    select,
    update,
)

from triagenode.dicom_attrs import merge_triage_inputs
from triagenode.domain import Priority, StudyState
from triagenode.store.db import Database
from triagenode.store.fast_sql import FastStatement
from triagenode.store.group_commit import GroupCommitter, PendingWrite
from triagenode.store.models import Export, Instance, Result, Series, Study, StudyEvent
from triagenode.store.recovery import remove_instance_row

__all__ = ["IngestOutcome", "InstanceRecord", "StudyIngest"]

log = logging.getLogger(__name__)

_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)
_EVENTS = cast(Table, StudyEvent.__table__)
_RESULTS = cast(Table, Result.__table__)
_EXPORTS = cast(Table, Export.__table__)
# Structured Report storage SOP classes (PS3.4 B.5): 1.2.840.10008.5.1.4.1.1.88.x
_SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
# The classes of the node's summary objects (Secondary Capture, Encapsulated PDF, KOS):
# such an instance coming back is the node's own when the outbox has sent it.
_SUMMARY_SOP_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.88.59"}
)
_INSTANCE_COLUMNS = (
    "sop_instance_uid",
    "replaced_count",
    "series_id",
    "sop_class_uid",
    "transfer_syntax_uid",
    "size",
    "sha256",
    "calling_ae",
    "received_at",
    "file_path",
    "instance_number",
    "number_of_frames",
)


@dataclass(frozen=True)
class InstanceRecord:
    """Everything recorded about one stored instance (no PHI: ``patient_ref`` is a hash)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    sha256: str
    file_path: str
    calling_ae: str | None
    received_at: datetime
    patient_ref: str | None = None
    modality: str | None = None
    body_part: str | None = None
    instance_number: int | None = None
    number_of_frames: int | None = None
    triage_inputs: dict[str, str] | None = None


@dataclass(frozen=True)
class IngestOutcome:
    study_id: int
    series_id: int
    created_study: bool
    replaced: bool  # an instance row of the same SOP Instance UID was updated
    reopened_from: str | None  # the state a finished study was reopened from
    # the replaced row's file when the new copy lives elsewhere (another study or series):
    # the caller removes it once this outcome is committed, or it would stay on disk untracked
    superseded_path: str | None = None


@dataclass
class _KnownStudy:
    id: int
    triage_inputs: dict[str, str]


def _insert(db: Database, table: Table) -> Any:
    """The dialect's INSERT, which has ON CONFLICT DO NOTHING (both dialects spell it alike)."""
    if db.dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


def _plain_new(outcome: IngestOutcome) -> bool:
    """Rows that may commit before the file is durable: a new instance of a known study.

    Taking such rows back (:meth:`StudyIngest.unrecord`, or the recovery check after a
    crash) restores exactly the previous state; a replacement, a new study or a reopened
    one waits for its file instead.
    """
    return not (outcome.created_study or outcome.replaced or outcome.reopened_from)


class StudyIngest:
    """Writes the rows for received instances.

    Parameters
    ----------
    db
        The node's database.
    default_priority
        Priority of a newly created study until triage decides.
    """

    def __init__(self, db: Database, default_priority: Priority = Priority.routine) -> None:
        self._db = db
        self._default_priority = default_priority
        self._studies: dict[str, _KnownStudy] = {}
        self._series: dict[str, int] = {}
        self._lock = threading.Lock()
        # Built once: the hot statements then hit SQLAlchemy's compiled cache every time.
        self._insert_instance = (
            _insert(db, _INSTANCES)
            .values(
                {
                    name: bindparam(f"p_{name}", type_=_INSTANCES.c[name].type)
                    for name in _INSTANCE_COLUMNS
                }
            )
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(_INSTANCES.c.id)
        )
        self._touch_study = (
            update(_STUDIES)
            .where(
                _STUDIES.c.id == bindparam("p_id"),
                _STUDIES.c.state == StudyState.receiving.value,
            )
            .values(
                instance_count=_STUDIES.c.instance_count + bindparam("p_count", type_=Integer),
                byte_count=_STUDIES.c.byte_count + bindparam("p_bytes", type_=BigInteger),
                last_received_at=bindparam("p_now", type_=_STUDIES.c.last_received_at.type),
            )
        )
        # The two statements of the common case, run on the driver's cursor.
        self._fast_insert_instance = FastStatement(self._insert_instance, db.engine.dialect)
        self._fast_touch_study = FastStatement(self._touch_study, db.engine.dialect)
        self._committer: GroupCommitter[InstanceRecord, IngestOutcome] = GroupCommitter(
            db, self._record, on_failure=self.forget, name="ingest-writer", early=_plain_new
        )

    def forget(self) -> None:
        """Drop cached ids (after a database error the rows may not exist any more)."""
        with self._lock:
            self._studies.clear()
            self._series.clear()

    def record(self, item: InstanceRecord) -> IngestOutcome:
        """Record one instance whose file is already durable; returns once committed.

        Raises
        ------
        StorageError
            When the database did not commit; nothing of this instance is recorded then.
        """
        pending = self.submit(item)
        pending.file_durable(True)
        return pending.wait()

    def submit(
        self, item: InstanceRecord, *, commit_early: bool = False
    ) -> PendingWrite[InstanceRecord, IngestOutcome]:
        """Queue an instance's rows for the next group commit and return at once.

        The rows are written while the caller makes the file durable; the caller then
        calls :meth:`PendingWrite.file_durable` and the commit happens only after that, so
        a row never exists for a file that is not safe on disk.

        With ``commit_early``, a new instance of a known study is committed without
        waiting (:attr:`PendingWrite.committed_early`); if its file then fails the caller
        must call :meth:`unrecord`, and a crash in between is repaired at the next start
        by :func:`~triagenode.store.recovery.remove_rows_without_files`.
        """
        return self._committer.submit(item, commit_early)

    def unrecord(self, item: InstanceRecord) -> None:
        """Take back the rows of an instance committed early whose file then failed.

        If the database refuses, the row stays until the next start's recovery check
        removes it (its file does not exist); the instance was never acknowledged.
        """
        try:
            remove_instance_row(self._db, item.sop_instance_uid, item.sha256)
        except Exception as exc:
            log.error(
                "rows of an unstored instance not taken back (removed at next start): %s",
                type(exc).__name__,
            )

    def close(self, timeout: float = 10.0) -> None:
        """Stop the writer thread after the queued records."""
        self._committer.close(timeout)

    # The steps, in one transaction ---------------------------------------------------------

    def _record(self, conn: Connection, item: InstanceRecord) -> IngestOutcome:
        now = item.received_at
        study, created = self._study(conn, item, now)
        series_id = self._series_id(conn, item, study.id)
        replaced, count_delta, byte_delta, identical, superseded = self._instance(
            conn, item, series_id
        )
        reopened_from = None
        # Row-locks the study (PostgreSQL) so the triage-input merge below cannot race.
        touched = self._fast_touch_study.execute(
            conn, {"p_id": study.id, "p_count": count_delta, "p_bytes": byte_delta, "p_now": now}
        )
        if touched.rowcount == 0:
            if identical or self._is_own_report(conn, item):
                # The same bytes again (a PACS resending a study) or the node's own SR
                # coming back: stored and acknowledged, but the study's work is unchanged,
                # so it is not reopened and no second SR is made.
                conn.execute(
                    update(_STUDIES)
                    .where(_STUDIES.c.id == study.id)
                    .values(
                        instance_count=_STUDIES.c.instance_count + count_delta,
                        byte_count=_STUDIES.c.byte_count + byte_delta,
                    )
                )
            else:
                reopened_from = self._reopen(conn, study.id, now, count_delta, byte_delta)
        new_inputs = item.triage_inputs or {}
        if merge_triage_inputs(study.triage_inputs, new_inputs) != study.triage_inputs:
            stored = conn.execute(
                select(_STUDIES.c.triage_inputs).where(_STUDIES.c.id == study.id)
            ).scalar_one()
            merged = merge_triage_inputs(stored, new_inputs)
            if merged != stored:
                conn.execute(
                    update(_STUDIES).where(_STUDIES.c.id == study.id).values(triage_inputs=merged)
                )
            study.triage_inputs = merged
        return IngestOutcome(study.id, series_id, created, replaced, reopened_from, superseded)

    def _study(
        self, conn: Connection, item: InstanceRecord, now: datetime
    ) -> tuple[_KnownStudy, bool]:
        known = self._studies.get(item.study_uid)
        if known is not None:
            return known, False
        inserted = conn.execute(
            _insert(self._db, _STUDIES)
            .values(
                study_uid=item.study_uid,
                state=StudyState.receiving.value,
                state_changed_at=now,
                priority=int(self._default_priority),
                patient_ref=item.patient_ref,
                modality=item.modality,
                calling_ae=item.calling_ae,
                first_received_at=now,
                last_received_at=now,
                instance_count=0,
                byte_count=0,
                run=1,
                attempts=0,
                critical=False,
                triage_inputs=item.triage_inputs or {},
            )
            .on_conflict_do_nothing(index_elements=["study_uid"])
            .returning(_STUDIES.c.id)
        ).first()
        row = conn.execute(
            select(_STUDIES.c.id, _STUDIES.c.triage_inputs).where(
                _STUDIES.c.study_uid == item.study_uid
            )
        ).one()
        # rowcount is not reliable for ON CONFLICT on every driver; RETURNING is.
        created = inserted is not None
        if created:
            conn.execute(
                _EVENTS.insert().values(
                    study_id=row.id,
                    at=now,
                    from_state=None,
                    to_state=StudyState.receiving.value,
                    reason="first instance received",
                )
            )
        known = _KnownStudy(row.id, dict(row.triage_inputs or {}))
        with self._lock:
            self._studies[item.study_uid] = known
        return known, created

    def _series_id(self, conn: Connection, item: InstanceRecord, study_id: int) -> int:
        cached = self._series.get(item.series_uid)
        if cached is not None:
            return cached
        conn.execute(
            _insert(self._db, _SERIES)
            .values(
                study_id=study_id,
                series_uid=item.series_uid,
                modality=item.modality,
                body_part=item.body_part,
            )
            .on_conflict_do_nothing(index_elements=["series_uid"])
        )
        series_id: int = conn.execute(
            select(_SERIES.c.id).where(_SERIES.c.series_uid == item.series_uid)
        ).scalar_one()
        with self._lock:
            self._series[item.series_uid] = series_id
        return series_id

    def _instance(
        self, conn: Connection, item: InstanceRecord, series_id: int
    ) -> tuple[bool, int, int, bool, str | None]:
        """Insert the instance row; on a duplicate update it.

        Returns (replaced, +count, +bytes, identical, superseded path): ``identical`` when
        the duplicate has the same content as the stored copy and stays in the same study;
        the older copy's file path when the new one is stored at another path.
        """
        values = dict(
            series_id=series_id,
            sop_class_uid=item.sop_class_uid,
            transfer_syntax_uid=item.transfer_syntax_uid,
            size=item.size,
            sha256=item.sha256,
            calling_ae=item.calling_ae,
            received_at=item.received_at,
            file_path=item.file_path,
            instance_number=item.instance_number,
            number_of_frames=item.number_of_frames,
        )
        inserted = self._fast_insert_instance.execute(
            conn,
            {
                f"p_{k}": v
                for k, v in (
                    *values.items(),
                    ("sop_instance_uid", item.sop_instance_uid),
                    ("replaced_count", 0),
                )
            },
        ).fetchone()
        if inserted is not None:
            return False, 1, item.size, False, None
        old = conn.execute(
            select(
                _INSTANCES.c.size,
                _INSTANCES.c.sha256,
                _INSTANCES.c.series_id,
                _INSTANCES.c.file_path,
                _SERIES.c.study_id,
            )
            .join(_SERIES, _SERIES.c.id == _INSTANCES.c.series_id)
            .where(_INSTANCES.c.sop_instance_uid == item.sop_instance_uid)
        ).one()
        conn.execute(
            update(_INSTANCES)
            .where(_INSTANCES.c.sop_instance_uid == item.sop_instance_uid)
            .values(
                replaced_count=_INSTANCES.c.replaced_count + 1,
                replaced_at=item.received_at,
                **values,
            )
        )
        new_study_id = conn.execute(
            select(_SERIES.c.study_id).where(_SERIES.c.id == series_id)
        ).scalar_one()
        superseded = old.file_path if old.file_path != item.file_path else None
        if old.study_id != new_study_id:
            # The same SOP Instance UID was re-sent under another study: move it.
            conn.execute(
                update(_STUDIES)
                .where(_STUDIES.c.id == old.study_id)
                .values(
                    instance_count=_STUDIES.c.instance_count - 1,
                    byte_count=_STUDIES.c.byte_count - old.size,
                )
            )
            return True, 1, item.size, False, superseded
        return True, 0, item.size - old.size, old.sha256 == item.sha256, superseded

    @staticmethod
    def _is_own_report(conn: Connection, item: InstanceRecord) -> bool:
        """True for an SR this node made (its UID is in the results table), or one of its
        summary objects (SC, PDF, KOS: its UID is in the study's export rows)."""
        if item.sop_class_uid in _SUMMARY_SOP_CLASSES:
            sent = conn.execute(
                select(_EXPORTS.c.id)
                .where(
                    _EXPORTS.c.study_uid == item.study_uid,
                    _EXPORTS.c.sop_instance_uid == item.sop_instance_uid,
                )
                .limit(1)
            ).first()
            if sent is not None:
                return True
        if not item.sop_class_uid.startswith(_SR_SOP_CLASS_PREFIX):
            return False
        found = conn.execute(
            select(_RESULTS.c.id).where(_RESULTS.c.sr_sop_instance_uid == item.sop_instance_uid)
        ).first()
        return found is not None

    def _reopen(
        self, conn: Connection, study_id: int, now: datetime, count_delta: int, byte_delta: int
    ) -> str:
        state, run = conn.execute(
            select(_STUDIES.c.state, _STUDIES.c.run).where(_STUDIES.c.id == study_id)
        ).one()
        conn.execute(
            update(_STUDIES)
            .where(_STUDIES.c.id == study_id)
            .values(
                state=StudyState.receiving.value,
                state_reason=f"reopened: instance received while {state}",
                state_changed_at=now,
                stable_at=None,
                run=run + 1,
                instance_count=_STUDIES.c.instance_count + count_delta,
                byte_count=_STUDIES.c.byte_count + byte_delta,
                last_received_at=now,
            )
        )
        conn.execute(
            _EVENTS.insert().values(
                study_id=study_id,
                at=now,
                from_state=state,
                to_state=StudyState.receiving.value,
                reason=f"reopened: new instance after {state}; run {run + 1}",
            )
        )
        log.info("study reopened study_id=%s from=%s run=%s", study_id, state, run + 1)
        return str(state)
