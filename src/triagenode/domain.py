"""Value types shared across the packages.

These are plain, immutable data: the priority scale, a model's identity, and the result of
classifying a study. ``inference`` produces them, ``reports`` writes them into SRs and JSON,
``pipeline`` and ``api`` store and show them. Nothing here imports another triagenode module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "DEMO_WARNING",
    "ImageRef",
    "LabelFinding",
    "ModelIdentity",
    "Priority",
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
    """The study-level outcome for one label of the label set."""

    name: str
    code_scheme: str  # e.g. "SCT"
    code_value: str
    code_meaning: str
    probability: float  # aggregated over images, 0..1
    threshold: float
    present: bool
    critical: bool = False  # the label is critical and its probability passed the threshold
    images: tuple[ImageRef, ...] = ()  # images that support this finding


@dataclass(frozen=True)
class StudyResult:
    """The classification of one study: what ``reports`` turns into an SR and JSON."""

    study_uid: str
    label_set: str
    findings: tuple[LabelFinding, ...]
    model: ModelIdentity
    backend: str
    aggregation: str  # documented rule, e.g. "max probability per label across images"
    images_used: tuple[ImageRef, ...]
    images_failed: tuple[tuple[ImageRef, str], ...] = ()  # (image, reason)
    priority: Priority = Priority.routine
    priority_rule: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def critical(self) -> bool:
        return any(f.critical for f in self.findings)

    @property
    def top_finding(self) -> LabelFinding | None:
        return max(self.findings, key=lambda f: f.probability, default=None)
