"""Audit trail: events, hash chain, patient pseudonyms, ATNA/syslog export."""

from triagenode.audit.events import AuditEventId, AuditLog, Outcome

__all__ = ["AuditEventId", "AuditLog", "Outcome"]
