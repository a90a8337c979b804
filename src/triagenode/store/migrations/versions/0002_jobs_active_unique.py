"""jobs: at most one active job per (study, run, kind)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

A partial unique index makes ``JobQueue.enqueue`` idempotent even when two schedulers (two
nodes on one PostgreSQL database) queue the same study at the same moment: the second insert
fails and finds the first job instead of adding a duplicate.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ACTIVE = sa.text("state IN ('pending', 'leased')")


def upgrade() -> None:
    op.create_index(
        "uq_jobs_active",
        "jobs",
        ["study_id", "run", "kind"],
        unique=True,
        sqlite_where=_ACTIVE,
        postgresql_where=_ACTIVE,
    )
    # Expired leases are found by this index without scanning the pending backlog.
    op.create_index("ix_jobs_lease", "jobs", ["state", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_lease", table_name="jobs")
    op.drop_index("uq_jobs_active", table_name="jobs")
