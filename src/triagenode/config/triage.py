"""Triage rules as data: which priority a study gets.

Placeholder structure; the triage work fills in matching fields and defaults.
"""

from __future__ import annotations

from pydantic import Field

from triagenode.config.base import Section
from triagenode.domain import Priority

__all__ = ["TriageRule", "TriageSettings"]


class TriageRule(Section):
    name: str = Field(min_length=1)
    priority: Priority
    label_set: str | None = None


class TriageSettings(Section):
    rules: list[TriageRule] = Field(default_factory=list)
    default_priority: Priority = Priority.routine
    aging_after_s: float = Field(default=3600.0, gt=0)
