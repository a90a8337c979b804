"""Helpers for audit tests: tamper with the trail the way only the table's owner can."""

from __future__ import annotations

from sqlalchemy import Connection, text

__all__ = ["drop_append_only_guard"]


def drop_append_only_guard(connection: Connection) -> None:
    """Drop the triggers of migration 0003_audit_append_only, as an attacker with the
    table owner's rights would before editing or deleting audit rows."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("DROP TRIGGER IF EXISTS audit_events_no_change ON audit_events"))
        connection.execute(text("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events"))
        return
    connection.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
    connection.execute(text("DROP TRIGGER IF EXISTS audit_events_no_delete"))
