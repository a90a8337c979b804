"""FastStatement writes exactly what SQLAlchemy's execute would, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Table, bindparam, insert, select, text
from sqlalchemy.exc import IntegrityError

from tests.store.test_ingest import record
from triagenode.store.db import Database
from triagenode.store.fast_sql import FastStatement
from triagenode.store.ingest import StudyIngest
from triagenode.store.models import StudyEvent, utcnow

_EVENTS: Table = StudyEvent.__table__  # type: ignore[assignment]


def test_fast_statement_matches_sqlalchemy(db: Database) -> None:
    ingest = StudyIngest(db)
    try:
        study_id = ingest.record(record("1.9.3.1")).study_id
    finally:
        ingest.close()
    now = utcnow()
    statement = insert(_EVENTS).values(
        study_id=bindparam("p_study"),
        at=bindparam("p_at", type_=_EVENTS.c.at.type),
        to_state="stable",
        reason=bindparam("p_reason"),
    )
    fast = FastStatement(statement, db.engine.dialect)
    with db.engine.begin() as conn:
        conn.execute(statement, {"p_study": study_id, "p_at": now, "p_reason": "sqlalchemy"})
        fast.execute(conn, {"p_study": study_id, "p_at": now, "p_reason": "fast"})
        query = select(_EVENTS.c.reason, _EVENTS.c.at).where(_EVENTS.c.to_state == "stable")
        rows = conn.execute(query).all()
        assert {r.reason: r.at for r in rows} == {"sqlalchemy": now, "fast": now}
        # Stored identically, so comparisons in SQL (stability, recovery) see one format.
        stored = conn.execute(text("SELECT at FROM study_events WHERE to_state = 'stable'"))
        assert len({str(r.at) for r in stored}) == 1
        later = conn.execute(query.where(_EVENTS.c.at >= now - timedelta(seconds=1))).all()
        assert len(later) == 2
    with db.engine.begin() as conn, pytest.raises(IntegrityError):
        # Driver errors arrive as SQLAlchemy's, so callers' handlers still apply.
        fast.execute(conn, {"p_study": study_id + 1000, "p_at": now, "p_reason": "x"})
