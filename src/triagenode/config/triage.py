"""Triage rules as data: which priority a study gets, and how the job queue behaves.

A rule is a named set of conditions on a study's triage inputs
(:func:`triagenode.dicom_attrs.triage_inputs`). All conditions of a rule must hold (AND);
the values listed for one condition are alternatives (OR). Rules are tried in order and the
first that matches sets the priority (and optionally the label set); when none matches, the
study gets ``default_priority``. Example::

    [[triage.rules]]
    name = "code-stroke"
    priority = "stat"
    label_set = "ct_head"            # optional; must name a [labels.sets] entry
    modality = ["CT"]
    keywords = ["code stroke", "hemorrhag*"]

Conditions (each a list of alternatives, matched case-insensitively):

- ``request_priority``: the C-STORE request's Priority, ``HIGH``, ``MEDIUM`` or ``LOW``.
- ``requested_procedure_priority``: Requested Procedure Priority (0040,1003).
- ``scheduled_priority``: Scheduled Procedure Step Priority (0040,4003 / in the SPS sequence).
  Both take ``STAT``, ``HIGH``, ``ROUTINE``, ``MEDIUM`` or ``LOW``.
- ``modality``, ``body_part`` (BodyPartExamined), ``calling_aet``: the whole value; ``*``
  is a wildcard (``calling_aet = ["ED_*"]``).
- ``keywords``: words or phrases found in StudyDescription, ReasonForStudy,
  RequestedProcedureDescription, ReasonForTheRequestedProcedure, ProtocolName or
  SeriesDescription. Words match whole (``stroke`` does not match ``strokes``); punctuation,
  ``_`` and ``^`` separate words; a trailing ``*`` matches any ending (``hemorrhag*``).
- ``department``: a word or phrase in InstitutionalDepartmentName, matched like keywords.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails

from triagenode.config.base import Section
from triagenode.domain import Priority
from triagenode.errors import ConfigError

__all__ = [
    "DEFAULT_RULES",
    "MATCH_FIELDS",
    "ORDER_PRIORITIES",
    "REQUEST_PRIORITIES",
    "NotifySettings",
    "TriageRule",
    "TriageSettings",
    "check_label_sets",
    "label_set_problems",
]

REQUEST_PRIORITIES = ("HIGH", "MEDIUM", "LOW")
# Defined terms of Requested Procedure Priority and Scheduled Procedure Step Priority.
ORDER_PRIORITIES = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")

# Match field -> what it reads, for docs, `triage rules` and error messages.
MATCH_FIELDS = {
    "request_priority": "C-STORE request Priority",
    "requested_procedure_priority": "RequestedProcedurePriority",
    "scheduled_priority": "ScheduledProcedureStepPriority",
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "keywords": "study/series/procedure descriptions and reasons",
    "calling_aet": "calling AE title",
    "department": "InstitutionalDepartmentName",
}


def _parse_priority(value: Any) -> Any:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return Priority.parse(value)
    return value


def _clean_terms(values: list[str]) -> list[str]:
    cleaned = [v.strip() for v in values]
    if any(not v for v in cleaned):
        raise ValueError("values must not be empty")
    return cleaned


class TriageRule(Section):
    """One triage rule: conditions that all must hold, and the priority they give."""

    name: str = Field(min_length=1, max_length=128, description="Shown in the SR, API, logs")
    priority: Priority = Field(description="stat, urgent, routine or low")
    label_set: str | None = Field(
        default=None, description="Label set to classify with; default: chosen by domain"
    )
    request_priority: list[str] = Field(default_factory=list)
    requested_procedure_priority: list[str] = Field(default_factory=list)
    scheduled_priority: list[str] = Field(default_factory=list)
    modality: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)
    calling_aet: list[str] = Field(default_factory=list)
    department: list[str] = Field(default_factory=list)

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_name(cls, value: Any) -> Any:
        return _parse_priority(value)

    @field_validator("modality", "body_part", "keywords", "calling_aet", "department", mode="after")
    @classmethod
    def _not_blank(cls, values: list[str]) -> list[str]:
        return _clean_terms(values)

    @field_validator("request_priority", mode="after")
    @classmethod
    def _request_terms(cls, values: list[str]) -> list[str]:
        return _known_terms(values, REQUEST_PRIORITIES)

    @field_validator("requested_procedure_priority", "scheduled_priority", mode="after")
    @classmethod
    def _order_terms(cls, values: list[str]) -> list[str]:
        return _known_terms(values, ORDER_PRIORITIES)

    @model_validator(mode="after")
    def _has_conditions(self) -> TriageRule:
        if not self.conditions():
            raise ValueError(
                "rule has no conditions and would match every study (use "
                "triage.default_priority for that); give at least one of: "
                + ", ".join(MATCH_FIELDS)
            )
        return self

    def conditions(self) -> dict[str, list[str]]:
        """The rule's non-empty match fields, in :data:`MATCH_FIELDS` order."""
        return {f: getattr(self, f) for f in MATCH_FIELDS if getattr(self, f)}


def _known_terms(values: list[str], allowed: tuple[str, ...]) -> list[str]:
    upper = [v.strip().upper() for v in values]
    unknown = [v for v in upper if v not in allowed]
    if unknown:
        raise ValueError(f"unknown value {unknown[0]!r}; allowed: {', '.join(allowed)}")
    return upper


def _rule(**fields: Any) -> TriageRule:
    return TriageRule(**fields)


# Shipped rules. Research traffic comes first so that retrospective research data carrying
# clinical descriptions ("stroke") never jumps ahead of live patients.
DEFAULT_RULES: tuple[TriageRule, ...] = (
    _rule(name="research-sender", priority="low", calling_aet=["RESEARCH*"]),
    _rule(
        name="code-stroke",
        priority="stat",
        modality=["CT", "MR"],
        keywords=["code stroke", "stroke alert", "stroke protocol"],
    ),
    _rule(
        name="head-ct-emergency",
        priority="stat",
        modality=["CT"],
        body_part=["HEAD", "BRAIN", "SKULL"],
        keywords=["stroke", "trauma", "hemorrhag*", "haemorrhag*", "bleed*", "ICH", "SAH"],
    ),
    _rule(name="sender-high-priority", priority="urgent", request_priority=["HIGH"]),
    _rule(
        name="order-stat",
        priority="urgent",
        requested_procedure_priority=["STAT", "HIGH"],
    ),
    _rule(name="scheduled-stat", priority="urgent", scheduled_priority=["STAT", "HIGH"]),
    _rule(
        name="emergency-department",
        priority="urgent",
        department=["emergency", "ED", "ER", "A&E"],
    ),
    _rule(name="sender-low-priority", priority="low", request_priority=["LOW"]),
)


class NotifySettings(Section):
    """Where a critical finding is announced (beside the SR and the audit event)."""

    log: bool = Field(default=True, description="Log a WARNING line (study UID, no PHI)")
    webhook_url: str | None = Field(
        default=None, description="POST a JSON message here; empty disables the webhook"
    )
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=120)
    webhook_attempts: int = Field(default=3, ge=1, le=20)
    webhook_backoff_s: float = Field(
        default=1.0, ge=0, le=300, description="First retry delay, doubled per attempt"
    )
    queue_size: int = Field(
        default=1000, ge=1, description="Notifications waiting to be sent before new ones drop"
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL (got {value!r})")
        return value


class TriageSettings(Section):
    """``[triage]``: rules, the default priority, and the job queue's timing."""

    rules: list[TriageRule] = Field(
        default_factory=lambda: [rule.model_copy(deep=True) for rule in DEFAULT_RULES]
    )
    default_priority: Priority = Priority.routine
    aging_after_s: float = Field(
        default=3600.0,
        gt=0,
        description="A waiting job counts one priority level higher per this many seconds",
    )
    lease_s: float = Field(
        default=300.0, gt=0, le=86400, description="A claim lapses unless renewed in this time"
    )
    retry_backoff_s: float = Field(
        default=10.0, ge=0, le=86400, description="First retry delay of a failed job, doubled"
    )
    retry_backoff_max_s: float = Field(default=600.0, ge=0, le=86400)
    notify: NotifySettings = Field(default_factory=NotifySettings)

    @field_validator("default_priority", mode="before")
    @classmethod
    def _priority_name(cls, value: Any) -> Any:
        return _parse_priority(value)

    @field_validator("rules", mode="wrap")
    @classmethod
    def _name_rules_in_errors(cls, value: Any, handler: Any) -> list[TriageRule]:
        # Pydantic reports a bad rule by list index; operators know rules by name, so the
        # location becomes `triage.rules.#3 "code-stroke".priority`.
        try:
            return handler(value)  # type: ignore[no-any-return]
        except ValidationError as exc:
            details = []
            for error in exc.errors():
                loc = list(error["loc"])
                if loc and isinstance(loc[0], int):
                    loc[0] = _rule_label(value, loc[0])
                detail = InitErrorDetails(type=error["type"], loc=tuple(loc), input=error["input"])
                if "ctx" in error:
                    detail["ctx"] = error["ctx"]
                details.append(detail)
            raise ValidationError.from_exception_data(cls.__name__, details) from None

    @field_validator("rules", mode="after")
    @classmethod
    def _unique_names(cls, rules: list[TriageRule]) -> list[TriageRule]:
        names = [r.name for r in rules]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"rule names must be unique (repeated: {', '.join(repeated)})")
        return rules

    def rule(self, name: str) -> TriageRule | None:
        """The rule called ``name``, if any."""
        return next((r for r in self.rules if r.name == name), None)


def _rule_label(raw: Any, index: int) -> str:
    name = None
    if isinstance(raw, (list, tuple)) and index < len(raw):
        item = raw[index]
        name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
    return f"#{index + 1} {name!r}" if isinstance(name, str) and name else f"#{index + 1}"


def label_set_problems(triage: TriageSettings, label_sets: Iterable[str]) -> list[str]:
    """Rules whose ``label_set`` is not among ``label_sets``, one message each."""
    known = set(label_sets)
    allowed = ", ".join(sorted(known)) or "(no label sets configured)"
    return [
        f"triage.rules.#{i} {rule.name!r}.label_set: unknown label set {rule.label_set!r}; "
        f"allowed: {allowed}"
        for i, rule in enumerate(triage.rules, start=1)
        if rule.label_set is not None and rule.label_set not in known
    ]


def check_label_sets(triage: TriageSettings, label_sets: Iterable[str]) -> None:
    """Raise :class:`ConfigError` when a rule names a label set that does not exist.

    Parameters
    ----------
    triage
        The ``[triage]`` settings.
    label_sets
        Names of the configured label sets (``settings.labels.sets``).

    Raises
    ------
    ConfigError
        One line per rule at fault, naming the rule and the label sets allowed.
    """
    problems = label_set_problems(triage, label_sets)
    if problems:
        raise ConfigError("\n".join(problems))
