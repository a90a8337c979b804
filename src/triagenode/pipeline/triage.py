"""Triage: the priority of a study, from the ordered rules of ``[triage]``.

:class:`TriageRules` matches a study's triage inputs (the non-identifying attributes of
:func:`triagenode.dicom_attrs.triage_inputs`) against the configured rules: first match
wins, no match gives ``default_priority``. Every decision carries the rule's name and the
reasons it matched, which the SR, the API and ``triagenode triage explain`` show.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from triagenode.config.triage import TriageRule, TriageSettings
from triagenode.domain import Priority

__all__ = [
    "FIELD_ATTRIBUTES",
    "KEYWORD_ATTRIBUTES",
    "ConditionCheck",
    "RuleCheck",
    "TriageDecision",
    "TriageRules",
]

# Free-text attributes that ``keywords`` searches, in the order reasons name them.
KEYWORD_ATTRIBUTES = (
    "StudyDescription",
    "ReasonForStudy",
    "RequestedProcedureDescription",
    "ReasonForTheRequestedProcedure",
    "ProtocolName",
    "SeriesDescription",
)
# Match field -> the triage-input keys it reads.
FIELD_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "request_priority": ("RequestPriority",),
    "requested_procedure_priority": ("RequestedProcedurePriority",),
    "scheduled_priority": ("ScheduledProcedureStepPriority",),
    "modality": ("Modality",),
    "body_part": ("BodyPartExamined",),
    "keywords": KEYWORD_ATTRIBUTES,
    "calling_aet": ("CallingAETitle",),
    "department": ("InstitutionalDepartmentName",),
}
_WORD_FIELDS = frozenset({"keywords", "department"})


@dataclass(frozen=True)
class TriageDecision:
    """The priority given to a study, and why.

    ``rule`` is None when no rule matched and the default priority applies.
    """

    priority: Priority
    rule: str | None
    label_set: str | None
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConditionCheck:
    """One condition of a rule tested against a study's inputs."""

    field: str
    wanted: tuple[str, ...]
    matched: bool
    reason: str  # e.g. "StudyDescription 'CT HEAD CODE STROKE' contains 'code stroke'"


@dataclass(frozen=True)
class RuleCheck:
    """A rule tested against a study's inputs: every condition and the outcome."""

    rule: TriageRule
    conditions: tuple[ConditionCheck, ...]

    @property
    def matched(self) -> bool:
        return all(c.matched for c in self.conditions)


def _glob(term: str) -> re.Pattern[str]:
    """Whole-value match, ``*`` as wildcard, case-insensitive."""
    body = ".*".join(re.escape(part) for part in term.strip().split("*"))
    return re.compile(rf"^{body}$", re.IGNORECASE)


def _words(term: str) -> re.Pattern[str]:
    """Words or a phrase inside free text; a trailing ``*`` lets the last word run on.

    Only letters and digits make words: DICOM descriptions use ``_``, ``^`` and ``-`` as
    separators ("CT_HEAD^CODE-STROKE"), which ``\\b`` would treat as part of a word.
    """
    prefix = term.strip().endswith("*")
    tokens = re.findall(r"[^\W_]+", term, re.UNICODE)
    body = r"[\W_]+".join(re.escape(t) for t in tokens)
    tail = r"[^\W_]*" if prefix else ""
    return re.compile(rf"(?<![^\W_]){body}{tail}(?![^\W_])", re.IGNORECASE | re.UNICODE)


class _CompiledRule:
    def __init__(self, rule: TriageRule) -> None:
        self.rule = rule
        self.patterns: dict[str, list[tuple[str, re.Pattern[str]]]] = {
            name: [(v, (_words if name in _WORD_FIELDS else _glob)(v)) for v in values]
            for name, values in rule.conditions().items()
        }

    def check(self, inputs: Mapping[str, str]) -> RuleCheck:
        return RuleCheck(
            self.rule,
            tuple(self._condition(name, inputs) for name in self.patterns),
        )

    def _condition(self, name: str, inputs: Mapping[str, str]) -> ConditionCheck:
        wanted = tuple(v for v, _ in self.patterns[name])
        attributes = FIELD_ATTRIBUTES[name]
        present = [(a, inputs[a]) for a in attributes if inputs.get(a)]
        for attribute, value in present:
            for term, pattern in self.patterns[name]:
                if pattern.search(value):
                    verb = "contains" if name in _WORD_FIELDS else "is"
                    reason = f"{attribute} {value!r} {verb} {term!r}"
                    return ConditionCheck(name, wanted, True, reason)
        if not present:
            reason = f"{' / '.join(attributes)} not present (wanted {', '.join(wanted)})"
        else:
            shown = "; ".join(f"{a} {v!r}" for a, v in present)
            reason = f"{shown}: none of {', '.join(wanted)}"
        return ConditionCheck(name, wanted, False, reason)


class TriageRules:
    """The configured triage rules, compiled once.

    Parameters
    ----------
    settings
        The ``[triage]`` section (rules in order, default priority).
    """

    def __init__(self, settings: TriageSettings) -> None:
        self.settings = settings
        self._rules = [_CompiledRule(rule) for rule in settings.rules]

    @property
    def rules(self) -> list[TriageRule]:
        return [c.rule for c in self._rules]

    def evaluate(self, inputs: Mapping[str, str]) -> TriageDecision:
        """The priority of a study with these triage inputs.

        Parameters
        ----------
        inputs
            ``{keyword: text}`` from :func:`triagenode.dicom_attrs.triage_inputs` (or the
            study row's merged ``triage_inputs``).

        Returns
        -------
        TriageDecision
            The first matching rule's priority and label set with the reasons it matched,
            or ``default_priority`` with ``rule=None``.
        """
        for compiled in self._rules:
            check = compiled.check(inputs)
            if check.matched:
                rule = compiled.rule
                return TriageDecision(
                    rule.priority, rule.name, rule.label_set, [c.reason for c in check.conditions]
                )
        default = self.settings.default_priority
        return TriageDecision(
            default, None, None, [f"no rule matched: default priority {default.name}"]
        )

    def prioritize(self, inputs: Mapping[str, str]) -> tuple[Priority, str | None, str | None]:
        """``(priority, rule name, label set)`` of :meth:`evaluate`: the
        :data:`triagenode.pipeline.tracker.Prioritizer` the study tracker calls."""
        decision = self.evaluate(inputs)
        return decision.priority, decision.rule, decision.label_set

    def checks(self, inputs: Mapping[str, str]) -> list[RuleCheck]:
        """Every rule tested against ``inputs``, in order (all of them, not just to the first
        match): the data behind :meth:`explain`."""
        return [compiled.check(inputs) for compiled in self._rules]

    def explain(self, inputs: Mapping[str, str]) -> str:
        """A human-readable account of how ``inputs`` were triaged.

        Lists the inputs, then each rule up to the first match with every condition marked
        ``yes``/``no`` and why, then the decision.
        """
        lines = ["inputs:"]
        lines += [f"  {key} = {value!r}" for key, value in sorted(inputs.items())] or ["  (none)"]
        lines.append("rules:")
        decision = self.evaluate(inputs)
        for index, check in enumerate(self.checks(inputs), start=1):
            verdict = "MATCH" if check.matched else "no match"
            lines.append(f"  {index}. {check.rule.name} -> {check.rule.priority.name}: {verdict}")
            for condition in check.conditions:
                mark = "yes" if condition.matched else "no "
                lines.append(f"       {mark} {condition.field}: {condition.reason}")
            if check.matched:
                break
        label = f", label set {decision.label_set}" if decision.label_set else ""
        source = f"rule {decision.rule!r}" if decision.rule else "default priority"
        lines.append(f"decision: {decision.priority.name} ({source}{label})")
        return "\n".join(lines)

    def describe(self) -> list[dict[str, str]]:
        """The rule table as rows (order, name, priority, label set, conditions)."""
        rows = []
        for index, rule in enumerate(self.rules, start=1):
            conditions = " AND ".join(
                f"{name} in [{', '.join(values)}]" for name, values in rule.conditions().items()
            )
            rows.append(
                {
                    "order": str(index),
                    "name": rule.name,
                    "priority": rule.priority.name,
                    "label_set": rule.label_set or "",
                    "conditions": conditions,
                }
            )
        rows.append(
            {
                "order": "-",
                "name": "(default)",
                "priority": self.settings.default_priority.name,
                "label_set": "",
                "conditions": "no rule matched",
            }
        )
        return rows
