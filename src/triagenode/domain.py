"""Value types shared across the packages.

These are plain, immutable data: the priority scale, the states of a study, a job and an
export (stored in the database as their text), a model's identity, and the result of
classifying a study. ``inference`` produces them, ``reports`` writes them into SRs and JSON,
``pipeline`` and ``api`` store and show them. Nothing here imports another triagenode module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "DEMO_WARNING",
    "ExportState",
    "ImageRef",
    "JobState",
    "LabelFinding",
    "ModelIdentity",
    "Priority",
    "SkippedSeries",
    "StudyResult",
    "StudyState",
]

DEMO_WARNING = "DEMO, NOT FOR CLINICAL USE"


class Priority(enum.IntEnum):
    """How urgently a study must be processed; a higher value is served first.

    - ``stat``: life-threatening suspicion (stroke, trauma); processed before anything else.
    - ``urgent``: needs a result within the hour (emergency department, inpatients).
    - ``routine``: scheduled outpatient and inpatient work.
    - ``low``: research, teaching, back-loads and re-processing.
    """

    low = 10
    routine = 20
    urgent = 30
    stat = 40

    @classmethod
    def parse(cls, value: str | int | Priority) -> Priority:
        """Accept a name (any case), a number of the scale, or a member."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().lower()]
        except KeyError:
            allowed = ", ".join(p.name for p in cls)
            raise ValueError(f"unknown priority {value!r}; allowed: {allowed}") from None


class StudyState(str, enum.Enum):
    """Where a study is in the node's pipeline; every transition is recorded."""

    receiving = "receiving"  # instances are arriving; not yet quiet for long enough
    stable = "stable"  # quiet period passed; waiting to be queued
    queued = "queued"  # a classification job is waiting in the queue
    processing = "processing"  # a worker holds the job
    reported = "reported"  # an SR was written and its exports are queued
    failed = "failed"  # processing failed; ``state_reason`` says why
    ignored = "ignored"  # nothing to classify (e.g. only SR/PR objects, or our own SR)
    # images, but no label set is made for them (e.g. ultrasound, a hand radiograph):
    # recorded with the reason, never guessed with another domain's findings
    not_applicable = "not_applicable"


class JobState(str, enum.Enum):
    """Where a job is; compares equal to its text (``JobState.failed == "failed"``)."""

    pending = "pending"  # waiting (possibly in retry back-off until available_at)
    leased = "leased"  # a worker holds it until lease_expires_at
    done = "done"
    failed = "failed"  # no attempts left
    cancelled = "cancelled"  # superseded, e.g. by a reprocess of the study


class ExportState(str, enum.Enum):
    """Where an outbox row is."""

    pending = "pending"  # waiting for next_attempt_at
    sending = "sending"  # claimed by an exporter; next_attempt_at is the lease's end
    sent = "sent"  # the destination answered the C-STORE with success
    dead = "dead"  # max_attempts failed; waits for `triagenode exports retry`


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a result: recorded in every result, SR and audit event."""

    name: str  # e.g. "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" or "demo"
    version: str  # source revision or package version
    weights_sha256: str  # hash of the weights actually loaded
    source: str  # the model.source setting it was loaded from
    is_demo: bool = False

    @property
    def display_name(self) -> str:
        return f"{self.name} (DEMO)" if self.is_demo else self.name


@dataclass(frozen=True)
class ImageRef:
    """One source image (or one frame of it) that a result refers to."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    frame: int | None = None  # 1-based frame number for multi-frame objects


@dataclass(frozen=True)
class LabelFinding:
    """The study-level outcome for one finding of the label set, decided on its own.

    ``score`` is in [0, 1]; it is a probability only when ``calibrated`` (a site calibration
    was applied), and is never called one otherwise.
    """

    name: str
    code_scheme: str  # e.g. "SCT"
    code_value: str
    code_meaning: str
    score: float  # the study's score for this finding, by the result's aggregation rule
    threshold: float
    present: bool  # score >= threshold
    critical: bool = False  # a critical finding is present: flagged in the SR and API
    escalates: bool = False  # ... and its threshold is calibrated: the study becomes stat
    calibrated: bool = False  # the score went through a fitted calibration
    images: tuple[ImageRef, ...] = ()  # images whose own score reached the threshold
    # the study's raw logit: the set's aggregation rule over the images' uncalibrated logits
    # (what a site calibration is fitted on); None where not known
    logit: float | None = None


@dataclass(frozen=True)
class SkippedSeries:
    """A series the image selection left out, and why (in words)."""

    series_uid: str
    instances: int
    reason: str


@dataclass(frozen=True)
class StudyResult:
    """The classification of one study: what ``reports`` turns into an SR and JSON."""

    study_uid: str
    label_set: str
    findings: tuple[LabelFinding, ...]
    model: ModelIdentity
    backend: str
    aggregation: str  # the rule in words, e.g. "mean of the top 3 image scores per finding"
    images_used: tuple[ImageRef, ...]
    images_failed: tuple[tuple[ImageRef, str], ...] = ()  # (image, reason)
    priority: Priority = Priority.routine
    priority_rule: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    label_set_reason: str = ""  # why this label set (the domain rule, or the triage rule)
    calibration: str = "none"  # the calibration in use, in words ("none" = raw scores)
    series_skipped: tuple[SkippedSeries, ...] = ()

    @property
    def critical(self) -> bool:
        """A critical finding whose calibrated threshold lets it raise the priority."""
        return any(f.escalates for f in self.findings)

    @property
    def flagged(self) -> bool:
        """Any critical finding at or above its threshold (calibrated or not)."""
        return any(f.critical for f in self.findings)

    @property
    def top_finding(self) -> LabelFinding | None:
        return max(self.findings, key=lambda f: f.score, default=None)
