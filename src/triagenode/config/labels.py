"""Label sets: what the zero-shot classifier looks for, per imaging domain.

Placeholder structure; the inference work fills in the shipped defaults.
"""

from __future__ import annotations

from pydantic import Field

from triagenode.config.base import Section

__all__ = ["CodedConcept", "DomainRule", "Label", "LabelSet", "LabelSettings"]


class CodedConcept(Section):
    scheme: str = Field(min_length=1, description="Coding scheme designator, e.g. SCT")
    value: str = Field(min_length=1)
    meaning: str = Field(min_length=1, max_length=64)


class Label(Section):
    name: str = Field(min_length=1, max_length=64)
    code: CodedConcept
    prompts: list[str] = Field(min_length=1)
    critical: bool = False
    threshold: float = Field(default=0.5, ge=0, le=1)


class LabelSet(Section):
    description: str = ""
    labels: list[Label] = Field(min_length=2)


class DomainRule(Section):
    label_set: str
    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    description_keywords: list[str] = Field(default_factory=list)


class LabelSettings(Section):
    sets: dict[str, LabelSet] = Field(default_factory=dict)
    domains: list[DomainRule] = Field(default_factory=list)
    default_set: str | None = None
