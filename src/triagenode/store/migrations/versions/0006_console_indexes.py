"""studies: indexes for the console's worklist order and its state filter

Revision ID: 0006_console_indexes
Revises: 0002
Create Date: 2026-11-28

The worklist lists studies stat first, newest first within a priority, a page at a time,
optionally for one state. These indexes serve that order directly, so a page reads its 50
rows from the index instead of sorting every study (measured in ``benchmarks/console.py``).
"""

from __future__ import annotations

from alembic import op

revision = "0006_console_indexes"
down_revision = "0003_audit_append_only"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_studies_worklist", "studies", ["priority", "last_received_at", "id"])
    op.create_index(
        "ix_studies_state_worklist", "studies", ["state", "priority", "last_received_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_studies_state_worklist", table_name="studies")
    op.drop_index("ix_studies_worklist", table_name="studies")
