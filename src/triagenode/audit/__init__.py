"""Audit trail: events, hash chain, patient pseudonyms, ATNA/syslog export."""

from triagenode.audit.chain import ChainProblem, VerifyReport, verify
from triagenode.audit.events import AuditEventId, AuditLog, Outcome
from triagenode.audit.keys import load_or_create_secret

__all__ = [
    "AuditEventId",
    "AuditLog",
    "ChainProblem",
    "Outcome",
    "VerifyReport",
    "load_or_create_secret",
    "verify",
]
