"""Label sets: what the zero-shot classifier looks for, per imaging domain.

A label set is data. Each label is one finding, decided on its own: a coded concept
(SNOMED CT where one exists, else a private scheme declared in every SR), prompts that
describe the finding *present* and prompts that describe it *absent* (their text embeddings
are averaged per side), a threshold, and a calibration that maps the model's raw logit to a
score. Until a site calibration is fitted the calibration is the identity and the number is
a *score*, not a probability; a ``critical`` label then flags the study but does not raise
its priority (``threshold_calibrated`` says a site chose the threshold for that use).

Domain rules choose a label set per study from its modality and anatomy (Body Part
Examined, the coded Anatomic Region, words of the study, series and protocol descriptions);
the first rule that matches wins. A study no rule fits is **not classified**: there is no
fallback set, because chest findings on a hand radiograph or an ultrasound are worse than
no result. The defaults below ship with the package; a config that sets ``[labels]``
replaces them (``sets`` and ``domains`` each as a whole).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from triagenode.config.base import Section

__all__ = [
    "DEFAULT_DOMAINS",
    "DEFAULT_SETS",
    "PRIVATE_SCHEME",
    "Calibration",
    "CodedConcept",
    "DomainChoice",
    "DomainRule",
    "Label",
    "LabelSet",
    "LabelSettings",
    "Window",
    "default_label_settings",
]

PRIVATE_SCHEME = "99TRIAGENODE"  # the node's private coding scheme, declared in every SR


class CodedConcept(Section):
    """A code triple as written into the SR (scheme designator, value, meaning)."""

    scheme: str = Field(min_length=1, max_length=16, description="e.g. SCT, DCM, 99MYSITE")
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)


class Calibration(Section):
    """Maps a finding's raw logit ``z`` to its score; identity until a site fits one.

    ``z`` is the model's logit scale times (similarity to the finding's "present" prompts
    minus similarity to its "absent" prompts); the identity score is ``sigmoid(z)``.
    """

    method: Literal["identity", "temperature", "platt", "isotonic"] = "identity"
    temperature: float = Field(default=1.0, gt=0, description="score = sigmoid(z / temperature)")
    slope: float = Field(default=1.0, description="Platt: score = sigmoid(slope * z + intercept)")
    intercept: float = 0.0
    name: str = Field(default="", max_length=128, description="e.g. 'site fit 2026-11-28, n=412'")
    # isotonic: score interpolated between (logit, score) breakpoints, constant outside them
    breakpoints: list[tuple[float, float]] = Field(default_factory=list, max_length=10000)

    @model_validator(mode="after")
    def _isotonic_has_breakpoints(self) -> Calibration:
        if self.method == "isotonic":
            xs = [x for x, _ in self.breakpoints]
            ys = [y for _, y in self.breakpoints]
            if len(xs) < 2 or xs != sorted(xs) or ys != sorted(ys):
                raise ValueError("isotonic needs >= 2 breakpoints, logits and scores ascending")
            if not all(0.0 <= y <= 1.0 for y in ys):
                raise ValueError("isotonic breakpoint scores must lie in [0, 1]")
        return self

    @property
    def is_calibrated(self) -> bool:
        """True when a fitted calibration (not the identity) makes the score a probability."""
        return self.method != "identity"

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Scores in (0, 1) from raw logits, float32, any shape."""
        z = np.asarray(logits, dtype=np.float32)
        if self.method == "isotonic":
            xs, ys = zip(*self.breakpoints, strict=True)
            interpolated: np.ndarray = np.interp(z, xs, ys).astype(np.float32)
            return interpolated
        if self.method == "temperature":
            z = z / np.float32(self.temperature)
        elif self.method == "platt":
            z = z * np.float32(self.slope) + np.float32(self.intercept)
        # 0.5 * (1 + tanh(z / 2)) is the logistic function without exp overflow
        scores: np.ndarray = (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)
        return scores

    def describe(self) -> str:
        if self.method == "temperature":
            text = f"temperature T={self.temperature:g}"
        elif self.method == "platt":
            text = f"Platt a={self.slope:g} b={self.intercept:g}"
        elif self.method == "isotonic":
            text = f"isotonic ({len(self.breakpoints)} breakpoints)"
        else:
            return "none (identity; scores are not probabilities)"
        return f"{text} ({self.name})" if self.name else text


class Label(Section):
    """One finding the classifier decides on its own."""

    name: str = Field(min_length=1, max_length=64)
    code: CodedConcept
    prompts: list[str] = Field(
        min_length=1, description="Texts describing the finding present; embeddings averaged"
    )
    absent_prompts: list[str] = Field(
        min_length=1, description="Texts describing the finding absent; embeddings averaged"
    )
    threshold: float = Field(default=0.5, ge=0, le=1, description="Present at or above this")
    critical: bool = Field(
        default=False, description="A score at or above threshold flags the study critical"
    )
    threshold_calibrated: bool = Field(
        default=False,
        description="The threshold was chosen on site data for critical use: only then does a "
        "critical finding raise the study to stat",
    )
    calibration: Calibration = Field(default_factory=Calibration)

    @property
    def escalates(self) -> bool:
        """Whether this label, when present, may reorder the worklist."""
        return self.critical and self.threshold_calibrated


class Window(Section):
    """A display window in modality units (Hounsfield units for CT)."""

    center: float
    width: float = Field(gt=1)


class LabelSet(Section):
    """The findings of one domain, how its images are shown to the model and aggregated."""

    description: str = ""
    labels: list[Label] = Field(min_length=1)
    window: Window | None = Field(
        default=None,
        description="CT window for this domain (e.g. brain 40/80); else the dataset's window",
    )
    aggregation: Literal["max", "mean_top_k"] = Field(
        default="mean_top_k", description="How image scores become the study's score"
    )
    top_k: int = Field(default=3, ge=1, le=100, description="k of mean_top_k")
    series_keywords: list[str] = Field(
        default_factory=list,
        description="Words that mark the diagnostic series this set is about (e.g. CTA)",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> LabelSet:
        names = [label.name for label in self.labels]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"label names must be unique within a set (repeated: {repeated})")
        return self

    def aggregation_rule(self) -> str:
        """The rule in words, as the SR and the JSON name it."""
        if self.aggregation == "max":
            return "maximum image score per finding"
        return f"mean of the top {self.top_k} image scores per finding"

    def aggregate(self, scores: np.ndarray) -> np.ndarray:
        """Study scores ``(labels,)`` from image scores ``(images, labels)``."""
        if self.aggregation == "max":
            study: np.ndarray = scores.max(axis=0)
            return study
        k = min(self.top_k, scores.shape[0])
        top = np.sort(scores, axis=0)[-k:]
        study = top.mean(axis=0)
        return study


def _word_pattern(words: list[str]) -> re.Pattern[str] | None:
    if not words:
        return None
    alternatives = "|".join(re.escape(w.strip()) for w in words if w.strip())
    return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)


# Free-text triage inputs that describe the anatomy and the protocol of a study.
DESCRIPTION_INPUTS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
)


class DomainRule(Section):
    """Chooses ``label_set`` for studies of these modalities and this anatomy.

    A study matches when its Modality is one of ``modalities`` (any, when empty) and, when
    any anatomy criterion is given, at least one of them holds: Body Part Examined is one
    of ``body_parts``, the Anatomic Region code is one of ``anatomic_codes`` (SNOMED CT
    values), or a word of ``keywords`` appears in the study, series, protocol or requested
    procedure description (whole words, any case). ``exclude_keywords`` veto the rule.
    """

    label_set: str
    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    anatomic_codes: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)
    exclude_keywords: list[str] = Field(default_factory=list)

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [v.strip().upper() for v in values if v.strip()]

    def check(self, inputs: dict[str, str]) -> tuple[bool, str]:
        """Whether the study's triage inputs satisfy this rule, and why in words."""
        modality = inputs.get("Modality", "").strip().upper()
        if self.modalities and modality not in self.modalities:
            return False, f"Modality {modality or '(none)'!r} not in {self.modalities}"
        texts = [(k, inputs[k]) for k in DESCRIPTION_INPUTS if inputs.get(k)]
        veto = _word_pattern(self.exclude_keywords)
        for key, text in texts:
            found = veto.search(text) if veto else None
            if found:
                return False, f"{key} {text!r} contains excluded {found.group(0)!r}"
        what = f"Modality {modality}" if self.modalities else "any modality"
        if not (self.body_parts or self.anatomic_codes or self.keywords):
            return True, what
        body_part = inputs.get("BodyPartExamined", "").strip().upper()
        if body_part and body_part in self.body_parts:
            return True, f"{what}, BodyPartExamined {body_part}"
        region = inputs.get("AnatomicRegion", "")
        code = region.split("^", 1)[0]
        if code and code in self.anatomic_codes:
            return True, f"{what}, Anatomic Region {region!r}"
        words = _word_pattern(self.keywords)
        for key, text in texts:
            found = words.search(text) if words else None
            if found:
                return True, f"{what}, {key} {text!r} contains {found.group(0)!r}"
        return False, f"{what} but no anatomy of {self.label_set} (body part, region, words)"

    def matches(self, inputs: dict[str, str]) -> bool:
        return self.check(inputs)[0]


@dataclass(frozen=True)
class DomainChoice:
    """The label set chosen for a study (None: not classified) and the reason in words."""

    label_set: str | None
    reason: str
    rule_index: int | None = None  # 1-based index of the domain rule that matched


def _label(
    name: str,
    code: tuple[str, str, str],
    image: str,
    *,
    finding: str | None = None,
    critical: bool = False,
    threshold: float = 0.5,
) -> dict[str, Any]:
    finding = finding or name
    return {
        "name": name,
        "code": {"scheme": code[0], "value": code[1], "meaning": code[2]},
        "prompts": _present(finding, image),
        "absent_prompts": _absent(finding, image),
        "critical": critical,
        "threshold": threshold,
    }


def _present(finding: str, image: str) -> list[str]:
    """BiomedCLIP was trained on figure captions; caption-like templates work best."""
    return [f"{image} showing {finding}", f"{finding} seen on {image}", f"{image} with {finding}"]


def _absent(finding: str, image: str) -> list[str]:
    return [
        f"{image} showing no {finding}",
        f"no {finding} seen on {image}",
        f"{image} without {finding}",
    ]


# Codes: each is checked in the tests against pydicom's copy of the PS3.16 concept tables,
# or against the table of SNOMED CT concepts with their source in tests/code_sources.py.
_PNEUMOTHORAX = ("SCT", "36118008", "Pneumothorax")
_EFFUSION = ("SCT", "60046008", "Pleural effusion")
_PNEUMONIA = ("SCT", "233604007", "Pneumonia")
_CARDIOMEGALY = ("SCT", "287272002", "Cardiomegaly")
_EDEMA = ("SCT", "19242006", "Pulmonary edema")
_ICH = ("SCT", "1386000", "Intracranial hemorrhage")
_SKULL_FRACTURE = ("SCT", "71642004", "Fracture of skull")
_INFARCT = ("SCT", "432504007", "Cerebral infarction")
_MASS = ("SCT", "4147007", "Mass")
_NODULE = ("SCT", "27925004", "Nodule")
_PE = ("SCT", "59282003", "Pulmonary embolism")
_NEOPLASM = ("SCT", "108369006", "Neoplasm")
_MS = ("SCT", "24700007", "Multiple sclerosis")
_HYDROCEPHALUS = ("SCT", "230745008", "Hydrocephalus")
_CARCINOMA = ("SCT", "1187425009", "Carcinoma")
_ADENOCARCINOMA = ("SCT", "1187332001", "Adenocarcinoma")
_INFLAMMATION = ("SCT", "409774005", "Inflammation")
_MELANOMA = ("SCT", "1162635006", "Malignant melanoma")
_BCC = ("SCT", "254701007", "Basal cell carcinoma of skin")
_DR = ("SCT", "4855003", "Diabetic retinopathy")
_GLAUCOMA = ("SCT", "23986001", "Glaucoma")
_AMD = ("SCT", "267718000", "Age-related macular degeneration")

_CXR = "a chest x-ray"
_HEAD_CT = "a head CT scan"
_CTPA = "a CT pulmonary angiogram"
_CHEST_CT = "a chest CT scan"
_BRAIN_MR = "a brain MRI scan"
_HP = "an H&E histopathology image"
_DERM = "a dermoscopy image"
_FUNDUS = "a retinal fundus photograph"

DEFAULT_SETS: dict[str, dict[str, Any]] = {
    "chest_xray": {
        "description": "Chest radiographs (CR, DX)",
        # one to three views: a finding seen on one view must not be averaged away
        "aggregation": "max",
        "labels": [
            _label("pneumothorax", _PNEUMOTHORAX, _CXR, critical=True, threshold=0.6),
            _label("pleural effusion", _EFFUSION, _CXR),
            _label("pneumonia", _PNEUMONIA, _CXR),
            _label("cardiomegaly", _CARDIOMEGALY, _CXR),
            _label("pulmonary edema", _EDEMA, _CXR),
        ],
    },
    "ct_head": {
        "description": "Non-contrast head CT",
        "window": {"center": 40, "width": 80},  # brain window
        "series_keywords": ["BRAIN", "HEAD", "AXIAL", "AX"],
        "labels": [
            _label("intracranial hemorrhage", _ICH, _HEAD_CT, critical=True, threshold=0.6),
            _label("cerebral infarction", _INFARCT, _HEAD_CT, finding="an acute infarct"),
            _label("skull fracture", _SKULL_FRACTURE, _HEAD_CT, finding="a skull fracture"),
            _label("intracranial mass", _MASS, _HEAD_CT, finding="an intracranial mass"),
        ],
    },
    "ct_pulmonary_angiogram": {
        "description": "CT pulmonary angiography (suspected pulmonary embolism)",
        "window": {"center": 100, "width": 700},  # vascular window for filling defects
        "series_keywords": ["CTA", "CTPA", "ANGIO", "ARTERIAL", "PE"],
        "labels": [
            _label("pulmonary embolism", _PE, _CTPA, critical=True, threshold=0.6),
            _label("pleural effusion", _EFFUSION, _CTPA),
        ],
    },
    "ct_chest": {
        "description": "Chest CT",
        "window": {"center": -600, "width": 1500},  # lung window
        "series_keywords": ["LUNG", "CHEST", "THORAX"],
        "labels": [
            _label("pulmonary nodule", _NODULE, _CHEST_CT, finding="a pulmonary nodule"),
            _label("lung mass", _MASS, _CHEST_CT, finding="a lung mass"),
            _label("pneumothorax", _PNEUMOTHORAX, _CHEST_CT, critical=True, threshold=0.6),
            _label("pleural effusion", _EFFUSION, _CHEST_CT),
            _label("pneumonia", _PNEUMONIA, _CHEST_CT),
        ],
    },
    "mr_brain": {
        "description": "Brain MRI",
        "series_keywords": ["DWI", "DIFFUSION", "FLAIR", "T2", "T1"],
        "labels": [
            _label(
                "cerebral infarction",
                _INFARCT,
                _BRAIN_MR,
                finding="an acute ischemic stroke",
                critical=True,
                threshold=0.6,
            ),
            _label("brain tumor", _NEOPLASM, _BRAIN_MR, finding="a brain tumor"),
            _label(
                "multiple sclerosis",
                _MS,
                _BRAIN_MR,
                finding="demyelinating lesions of multiple sclerosis",
            ),
            _label("hydrocephalus", _HYDROCEPHALUS, _BRAIN_MR),
        ],
    },
    "pathology": {
        "description": "Whole-slide and microscopy images (SM)",
        "labels": [
            _label("carcinoma", _CARCINOMA, _HP),
            _label("adenocarcinoma", _ADENOCARCINOMA, _HP),
            _label("inflammation", _INFLAMMATION, _HP),
        ],
    },
    "dermatology": {
        "description": "Skin photographs and dermoscopy",
        "aggregation": "max",
        "labels": [
            _label("melanoma", _MELANOMA, _DERM, critical=True, threshold=0.6),
            _label("basal cell carcinoma", _BCC, _DERM),
        ],
    },
    "ophthalmology": {
        "description": "Fundus photographs",
        "aggregation": "max",
        "labels": [
            _label("diabetic retinopathy", _DR, _FUNDUS),
            _label("glaucoma", _GLAUCOMA, _FUNDUS),
            _label(
                "macular degeneration", _AMD, _FUNDUS, finding="age-related macular degeneration"
            ),
        ],
    },
}

# SNOMED CT anatomy codes (PS3.16 CID 4031 "Common Anatomic Regions" and its neighbours).
_CHEST_CODES = ["816094009", "51185008", "43799004", "39607008"]  # chest, thorax, cavity, lung
_HEAD_CODES = ["69536005", "12738006", "89546000"]  # head, brain, skull
_CHEST_PARTS = ["CHEST", "THORAX", "LUNG", "CHEST_LAT", "CHESTABDOMEN", "CHESTABDPELVIS"]
_HEAD_PARTS = ["HEAD", "BRAIN", "SKULL", "HEADNECK"]
_CHEST_WORDS = [
    "chest",
    "thorax",
    "thoracic",
    "lung",
    "lungs",
    "cxr",
    "thorax pa",
    "tórax",
    "thorax ap",
]
_HEAD_WORDS = ["head", "brain", "cranial", "cranium", "skull", "stroke", "kopf", "schädel", "neuro"]
_CTPA_WORDS = [
    "ctpa",
    "cta chest",
    "cta pulmonary",
    "pulmonary angio",
    "pulmonary angiogram",
    "pulmonary angiography",
    "pe protocol",
    "pulmonary embolism",
    "pulmonary emboli",
]

DEFAULT_DOMAINS: list[dict[str, Any]] = [
    {
        "label_set": "chest_xray",
        "modalities": ["CR", "DX"],
        "body_parts": _CHEST_PARTS,
        "anatomic_codes": _CHEST_CODES,
        "keywords": _CHEST_WORDS,
        "exclude_keywords": ["rib", "ribs", "sternum", "clavicle", "shoulder", "spine"],
    },
    {"label_set": "ct_pulmonary_angiogram", "modalities": ["CT"], "keywords": _CTPA_WORDS},
    {
        "label_set": "ct_head",
        "modalities": ["CT"],
        "body_parts": _HEAD_PARTS,
        "anatomic_codes": _HEAD_CODES,
        "keywords": _HEAD_WORDS,
        "exclude_keywords": ["angio", "cta", "perfusion", "sinus", "sinuses", "facial", "orbit"],
    },
    {
        "label_set": "ct_chest",
        "modalities": ["CT"],
        "body_parts": _CHEST_PARTS,
        "anatomic_codes": _CHEST_CODES,
        "keywords": _CHEST_WORDS,
    },
    {
        "label_set": "mr_brain",
        "modalities": ["MR"],
        "body_parts": _HEAD_PARTS,
        "anatomic_codes": _HEAD_CODES,
        "keywords": _HEAD_WORDS,
        "exclude_keywords": ["angio", "mra", "spectroscopy", "pituitary", "orbit"],
    },
    {"label_set": "pathology", "modalities": ["SM"]},
    {
        "label_set": "dermatology",
        "modalities": ["XC", "DMS"],
        "body_parts": ["SKIN"],
        "anatomic_codes": ["39937001"],
        "keywords": ["skin", "dermoscopy", "lesion", "nevus", "mole"],
    },
    {
        "label_set": "ophthalmology",
        "modalities": ["OP"],
        "body_parts": ["EYE", "RETINA"],
        "anatomic_codes": ["81745001", "5665001"],
        "keywords": ["fundus", "retina", "retinal"],
    },
]


class LabelSettings(Section):
    """The ``[labels]`` section: label sets by name and the domain rules that choose them."""

    sets: dict[str, LabelSet] = Field(
        default_factory=lambda: {k: LabelSet(**v) for k, v in DEFAULT_SETS.items()}
    )
    domains: list[DomainRule] = Field(
        default_factory=lambda: [DomainRule(**d) for d in DEFAULT_DOMAINS]
    )

    @model_validator(mode="before")
    @classmethod
    def _fit_defaults_to_sets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "default_set" in data:
            raise ValueError(
                "default_set was removed: a study that no domain rule fits is not classified "
                "(add a [[labels.domains]] rule for the studies that set is for)"
            )
        # A config that replaces only ``sets`` keeps the shipped rules that still apply,
        # instead of failing on rules that name sets it removed.
        if isinstance(data, dict) and "sets" in data and "domains" not in data:
            names = set(data["sets"] or {})
            data = {**data, "domains": [d for d in DEFAULT_DOMAINS if d["label_set"] in names]}
        return data

    @model_validator(mode="after")
    def _references_exist(self) -> LabelSettings:
        known = set(self.sets)
        for index, rule in enumerate(self.domains):
            if rule.label_set not in known:
                raise ValueError(
                    f"domains[{index}].label_set: unknown set {rule.label_set!r} "
                    f"(known: {', '.join(sorted(known)) or 'none'})"
                )
        return self

    def explain_choice(self, inputs: dict[str, str]) -> DomainChoice:
        """The label set for a study's triage inputs, with the reason; None when no rule fits."""
        for index, rule in enumerate(self.domains, start=1):
            matched, why = rule.check(inputs)
            if matched:
                return DomainChoice(rule.label_set, f"domain rule {index}: {why}", index)
        modality = inputs.get("Modality") or "(none)"
        body_part = inputs.get("BodyPartExamined") or "(none)"
        return DomainChoice(
            None,
            f"no domain rule fits Modality {modality!r}, BodyPartExamined {body_part!r} "
            "and the descriptions: not classified",
        )


def default_label_settings() -> LabelSettings:
    """The shipped label sets and domain rules."""
    return LabelSettings()
