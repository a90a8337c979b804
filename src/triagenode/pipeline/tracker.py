"""Study tracking: a study is *stable* once no instance arrived for its quiet period.

Stability is computed from ``studies.last_received_at`` in the database, so it survives a
restart: a node that comes back after a crash finds the same studies receiving and marks
them stable when their quiet period has passed. An instance arriving for a stable (or later)
study reopens it; that happens in :mod:`triagenode.store.ingest`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Table, select, update

from triagenode.audit.events import AuditLog
from triagenode.config.settings import Settings
from triagenode.domain import Priority, StudyState
from triagenode.store.db import Database
from triagenode.store.models import Study, StudyEvent, utcnow

__all__ = ["Prioritizer", "StudyTracker"]

log = logging.getLogger(__name__)

# (triage inputs) -> (priority, rule name, label set name)
Prioritizer = Callable[[dict[str, str]], tuple[Priority, str | None, str | None]]

_STUDIES = cast(Table, Study.__table__)
_EVENTS = cast(Table, StudyEvent.__table__)


class StudyTracker:
    """Marks receiving studies stable after their quiet period.

    Parameters
    ----------
    settings
        ``study.quiet_period(priority)`` gives each study's quiet period.
    db
        The node's database.
    audit
        The audit log (studies completed by hand are recorded).
    prioritizer
        Optional triage: called with a study's triage inputs, its answer is stored on the
        study before stability is decided, so a stat study gets its shorter quiet period.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        audit: AuditLog,
        prioritizer: Prioritizer | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._audit = audit
        self._prioritizer = prioritizer
        # When the next receiving study's quiet period ends, as of the last poll: the
        # scheduler polls again right then instead of waiting for its next tick.
        self.next_stable_at: datetime | None = None

    def poll(self, now: datetime | None = None) -> list[int]:
        """Mark every receiving study whose quiet period has passed as stable.

        Parameters
        ----------
        now
            The time to judge by (UTC); the current time when None.

        Returns
        -------
        list of int
            Ids of the studies that became stable in this poll.
        """
        now = now or utcnow()
        with self._db.session() as session:
            rows = session.execute(
                select(
                    _STUDIES.c.id,
                    _STUDIES.c.study_uid,
                    _STUDIES.c.priority,
                    _STUDIES.c.priority_rule,
                    _STUDIES.c.label_set,
                    _STUDIES.c.triage_inputs,
                    _STUDIES.c.last_received_at,
                    _STUDIES.c.instance_count,
                ).where(_STUDIES.c.state == StudyState.receiving.value)
            ).all()
        stable: list[int] = []
        self.next_stable_at = None
        for row in rows:
            priority = Priority(row.priority)
            triaged: dict[str, object] = {}
            if self._prioritizer is not None:
                priority, rule, label_set = self._prioritizer(dict(row.triage_inputs or {}))
                if (int(priority), rule, label_set) != (
                    row.priority,
                    row.priority_rule,
                    row.label_set,
                ):
                    triaged = {
                        "priority": int(priority),
                        "priority_rule": rule,
                        "label_set": label_set,
                    }
            quiet = self._settings.study.quiet_period(priority)
            # The column's UtcDateTime type makes this timezone-aware on every backend.
            due = row.last_received_at + timedelta(seconds=quiet)
            is_quiet = due <= now
            if not is_quiet and (self.next_stable_at is None or due < self.next_stable_at):
                self.next_stable_at = due
            if not (triaged or is_quiet):
                continue
            with self._db.write_session() as session:
                values: dict[str, object] = dict(triaged)
                if is_quiet:
                    values.update(
                        state=StudyState.stable.value,
                        state_reason=f"no new instance for {quiet:g} s",
                        state_changed_at=now,
                        stable_at=now,
                    )
                # Only if nothing arrived since we looked: a newer instance keeps it open.
                result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
                    update(_STUDIES)
                    .where(
                        _STUDIES.c.id == row.id,
                        _STUDIES.c.state == StudyState.receiving.value,
                        _STUDIES.c.last_received_at == row.last_received_at,
                    )
                    .values(**values)
                )
                if result.rowcount and is_quiet:
                    session.execute(
                        _EVENTS.insert().values(
                            study_id=row.id,
                            at=now,
                            from_state=StudyState.receiving.value,
                            to_state=StudyState.stable.value,
                            reason=f"no new instance for {quiet:g} s ({priority.name})",
                        )
                    )
                    stable.append(row.id)
                    log.info(
                        "study stable study_uid=%s instances=%d priority=%s",
                        row.study_uid,
                        row.instance_count,
                        priority.name,
                    )
        return stable

    def mark_complete(self, study_uid: str, actor: str) -> bool:
        """Declare a receiving study complete now, without waiting for its quiet period.

        Returns
        -------
        bool
            True when the study was receiving and is now stable; False otherwise.
        """
        from triagenode.pipeline.actions import mark_study_complete

        return mark_study_complete(self._db, self._audit, study_uid, actor)
