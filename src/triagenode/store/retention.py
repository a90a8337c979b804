"""Retention: patient data leaves the node's disk once its work is done and a grace period passed.

A study's received images (the spool) are deleted ``retention.spool_days`` after its work is
done: its SR reached every destination, or it was ignored (nothing to classify). Its SR files
are deleted ``retention.results_days`` after they reached every destination. Nothing is
deleted while an export is pending, being sent or dead-lettered, nor for a study that failed:
those wait for an operator. An SR that was never exported (no destination) is the only copy
and is kept.

What stays: the study row and its history, the result row (findings, scores, the model that
made them; no demographics) and the audit trail, so the node can still answer what it did.
Deleting files first and rows second makes a purge safe to repeat after a crash: a file
already gone is skipped, its row is removed the next time.

This module decides and deletes; recording each purge in the audit trail is the caller's
(the store does not depend on the audit package), in the same transaction as the rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from triagenode.domain import ExportState, StudyState
from triagenode.store.db import Database
from triagenode.store.models import Export, Instance, Result, Series, Study, StudyEvent

__all__ = ["PurgeItem", "RetentionPolicy", "execute_purge", "plan_purge"]

log = logging.getLogger(__name__)

_DONE_STATES = (StudyState.reported.value, StudyState.ignored.value)


@dataclass(frozen=True)
class RetentionPolicy:
    """``retention.spool_days`` and ``retention.results_days``; None keeps forever."""

    spool_days: float | None
    results_days: float | None

    @classmethod
    def from_settings(cls, retention: object) -> RetentionPolicy:
        return cls(
            spool_days=retention.spool_days,  # type: ignore[attr-defined]
            results_days=retention.results_days,  # type: ignore[attr-defined]
        )

    def describe(self) -> str:
        def days(value: float | None) -> str:
            return "forever" if value is None else f"{value:g} days"

        return f"spool {days(self.spool_days)}, results {days(self.results_days)}"


@dataclass
class PurgeItem:
    """What the policy allows to delete of one study, and since when its work was done."""

    study_id: int
    study_uid: str
    patient_ref: str | None
    spool_since: datetime | None = None
    results_since: datetime | None = None
    # (instance id, path relative to the data folder, size in bytes)
    spool_files: list[tuple[int, str, int]] = field(default_factory=list)
    # (result id, path relative to the data folder)
    sr_files: list[tuple[int, str]] = field(default_factory=list)

    @property
    def spool_bytes(self) -> int:
        return sum(size for _, _, size in self.spool_files)

    def summary(self) -> dict[str, object]:
        """Counts only: what an audit event or a log line may say (no PHI)."""
        return {
            "spool_files": len(self.spool_files),
            "spool_bytes": self.spool_bytes,
            "sr_files": len(self.sr_files),
        }


def _sent_since(exports: list[Export]) -> datetime | None:
    """When the last of ``exports`` was sent, or None while any is not sent."""
    if any(e.state != ExportState.sent or e.sent_at is None for e in exports):
        return None
    return max((e.sent_at for e in exports if e.sent_at is not None), default=None)


def plan_purge(
    db: Database, policy: RetentionPolicy, now: datetime | None = None
) -> list[PurgeItem]:
    """The studies with something the policy allows to delete at ``now``, oldest first."""
    now = now or datetime.now(timezone.utc)
    items: dict[int, PurgeItem] = {}
    with db.session() as session:
        if policy.spool_days is not None:
            _plan_spool(session, now - timedelta(days=policy.spool_days), items)
        if policy.results_days is not None:
            _plan_results(session, now - timedelta(days=policy.results_days), items)
    return sorted(items.values(), key=lambda i: i.spool_since or i.results_since or now)


def _item(items: dict[int, PurgeItem], study: Study) -> PurgeItem:
    if study.id not in items:
        items[study.id] = PurgeItem(study.id, study.study_uid, study.patient_ref)
    return items[study.id]


def _plan_spool(session: Session, cutoff: datetime, items: dict[int, PurgeItem]) -> None:
    with_files = select(Series.study_id).join(Instance, Instance.series_id == Series.id)
    studies = session.scalars(
        select(Study).where(
            Study.state.in_(_DONE_STATES),
            Study.state_changed_at <= cutoff,
            Study.id.in_(with_files),
        )
    ).all()
    for study in studies:
        exports = list(session.scalars(select(Export).where(Export.study_uid == study.study_uid)))
        since = study.state_changed_at
        if exports:
            sent = _sent_since(exports)
            if sent is None:
                continue  # a destination still waits for (or never got) this study's SR
            since = max(since, sent)
        if since > cutoff:
            continue
        files = session.execute(
            select(Instance.id, Instance.file_path, Instance.size)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study.id)
        ).all()
        item = _item(items, study)
        item.spool_since = since
        item.spool_files = [(i, path, size) for i, path, size in files]


def _plan_results(session: Session, cutoff: datetime, items: dict[int, PurgeItem]) -> None:
    results = session.execute(
        select(Result, Study)
        .join(Study, Result.study_id == Study.id)
        .where(Result.sr_path.is_not(None), Result.created_at <= cutoff)
    ).all()
    for result, study in results:
        exports = list(session.scalars(select(Export).where(Export.result_id == result.id)))
        if not exports:
            continue  # never exported: the node holds the only copy
        sent = _sent_since(exports)
        if sent is None or sent > cutoff:
            continue
        item = _item(items, study)
        item.results_since = max(item.results_since or sent, sent)
        item.sr_files.append((result.id, str(result.sr_path)))


def _remove(data_dir: Path, relative: str) -> bool:
    """Delete one file under ``data_dir`` and the folders it leaves empty; False if gone."""
    path = data_dir / relative
    resolved = path.resolve()
    if not resolved.is_relative_to(data_dir.resolve()):
        raise ValueError(f"refusing to delete {relative!r}: outside the data folder")
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    folder = path.parent
    # study/series folders are named by UIDs: remove them once empty, never the top folders
    while folder.resolve() != data_dir.resolve() and folder.parent.resolve() != data_dir.resolve():
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent
    return True


def execute_purge(
    db: Database,
    data_dir: Path,
    item: PurgeItem,
    policy: RetentionPolicy,
    on_purged: Callable[[Session, PurgeItem], None] | None = None,
) -> dict[str, object]:
    """Delete ``item``'s files, then its instance rows and SR paths, in one transaction that
    also holds ``on_purged`` (the caller's audit event). Returns the counts done."""
    removed = 0
    for _, relative, _ in item.spool_files:
        removed += _remove(data_dir, relative)
    for _, relative in item.sr_files:
        removed += _remove(data_dir, relative)
    # the write lock first: the caller's audit event appends to the chain in this transaction
    with db.write_session() as session:
        if item.spool_files:
            ids = [instance_id for instance_id, _, _ in item.spool_files]
            session.execute(delete(Instance).where(Instance.id.in_(ids)))
        if item.sr_files:
            ids = [result_id for result_id, _ in item.sr_files]
            session.execute(update(Result).where(Result.id.in_(ids)).values(sr_path=None))
        study = session.get(Study, item.study_id)
        if study is not None:
            what = []
            if item.spool_files:
                what.append(f"{len(item.spool_files)} received files")
            if item.sr_files:
                what.append(f"{len(item.sr_files)} SR files")
            session.add(
                StudyEvent(
                    study_id=study.id,
                    from_state=study.state,
                    to_state=study.state,
                    reason=f"retention purge: {' and '.join(what)} deleted ({policy.describe()})",
                )
            )
        if on_purged is not None:
            on_purged(session, item)
    counts = {**item.summary(), "files_deleted": removed}
    log.info("retention purge of study #%d: %s", item.study_id, counts)
    return counts
