"""Label sets: what the zero-shot classifier looks for, per imaging domain.

A label set is data: each label has a name, a coded concept (SNOMED CT where one exists,
else the node's private scheme ``99TRIAGE``), several prompt templates whose text embeddings
are averaged, and optionally ``critical = true`` with a threshold. Domain rules choose a
label set per study from Modality, BodyPartExamined and StudyDescription; the first rule that
matches wins, else ``default_set``. The defaults below ship with the package; a config that
sets ``[labels]`` replaces them (``sets`` and ``domains`` each as a whole).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from triagenode.config.base import Section

__all__ = [
    "DEFAULT_DOMAINS",
    "DEFAULT_SETS",
    "LOCAL_SCHEME",
    "CodedConcept",
    "DomainRule",
    "Label",
    "LabelSet",
    "LabelSettings",
    "default_label_settings",
]

LOCAL_SCHEME = "99TRIAGE"  # private coding scheme for labels SNOMED CT has no code for


class CodedConcept(Section):
    """A code triple as written into the SR (scheme designator, value, meaning)."""

    scheme: str = Field(min_length=1, description="Coding scheme designator, e.g. SCT")
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)


class Label(Section):
    """One finding the classifier scores."""

    name: str = Field(min_length=1, max_length=64)
    code: CodedConcept
    prompts: list[str] = Field(
        min_length=1, description="Prompt texts; their normalised embeddings are averaged"
    )
    critical: bool = Field(
        default=False, description="A probability over threshold flags the study critical"
    )
    threshold: float = Field(default=0.5, ge=0, le=1, description="Present at or above this")


class LabelSet(Section):
    """The labels of one domain; softmax runs over all labels of the set."""

    description: str = ""
    labels: list[Label] = Field(min_length=2)

    @model_validator(mode="after")
    def _unique_names(self) -> LabelSet:
        names = [label.name for label in self.labels]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"label names must be unique within a set (repeated: {repeated})")
        return self


class DomainRule(Section):
    """Chooses ``label_set`` when every non-empty criterion matches (case-insensitive).

    ``modalities`` and ``body_parts`` match whole values; ``description_keywords`` match as
    substrings of StudyDescription (or, when absent, RequestedProcedureDescription).
    """

    label_set: str
    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    description_keywords: list[str] = Field(default_factory=list)

    def matches(self, inputs: dict[str, str]) -> bool:
        """Whether the study's triage inputs satisfy this rule."""
        modality = inputs.get("Modality", "").strip().upper()
        body_part = inputs.get("BodyPartExamined", "").strip().upper()
        description = (
            inputs.get("StudyDescription") or inputs.get("RequestedProcedureDescription") or ""
        ).upper()
        if self.modalities and modality not in {m.upper() for m in self.modalities}:
            return False
        if self.body_parts and body_part not in {b.upper() for b in self.body_parts}:
            return False
        keywords = [k.upper() for k in self.description_keywords]
        return not keywords or any(k in description for k in keywords)


def _label(
    name: str,
    scheme: str,
    value: str,
    meaning: str,
    prompts: list[str],
    *,
    critical: bool = False,
    threshold: float = 0.5,
) -> dict[str, Any]:
    return {
        "name": name,
        "code": {"scheme": scheme, "value": value, "meaning": meaning},
        "prompts": prompts,
        "critical": critical,
        "threshold": threshold,
    }


def _prompts(finding: str, image: str) -> list[str]:
    """BiomedCLIP was trained on figure captions; caption-like templates work best."""
    return [
        f"{image} showing {finding}",
        f"this is a {image} with {finding}",
        f"{finding} seen on {image}",
    ]


_CXR = "a chest x-ray"
_CT = "a CT scan"
_MR = "an MRI scan"
_HP = "an H&E histopathology image"
_DERM = "a dermoscopy image"
_FUNDUS = "a retinal fundus photograph"
_NORMAL = ("SCT", "17621005", "Normal")

DEFAULT_SETS: dict[str, dict[str, Any]] = {
    "chest_xray": {
        "description": "Chest radiographs (CR, DX)",
        "labels": [
            _label("no finding", *_NORMAL, _prompts("no acute abnormality", _CXR)),
            _label(
                "pneumothorax",
                "SCT",
                "36118008",
                "Pneumothorax",
                _prompts("pneumothorax", _CXR),
                critical=True,
                threshold=0.6,
            ),
            _label(
                "pleural effusion",
                "SCT",
                "60046008",
                "Pleural effusion",
                _prompts("pleural effusion", _CXR),
            ),
            _label("pneumonia", "SCT", "233604007", "Pneumonia", _prompts("pneumonia", _CXR)),
            _label(
                "cardiomegaly", "SCT", "8186001", "Cardiomegaly", _prompts("cardiomegaly", _CXR)
            ),
            _label(
                "pulmonary edema",
                "SCT",
                "19242006",
                "Pulmonary edema",
                _prompts("pulmonary edema", _CXR),
            ),
        ],
    },
    "ct": {
        "description": "Computed tomography",
        "labels": [
            _label("no finding", *_NORMAL, _prompts("no acute abnormality", _CT)),
            _label(
                "intracranial hemorrhage",
                "SCT",
                "1386000",
                "Intracranial hemorrhage",
                _prompts("intracranial hemorrhage", _CT),
                critical=True,
                threshold=0.6,
            ),
            _label(
                "pulmonary embolism",
                "SCT",
                "59282003",
                "Pulmonary embolism",
                _prompts("pulmonary embolism", _CT),
                critical=True,
                threshold=0.6,
            ),
            _label("fracture", "SCT", "125605004", "Fracture of bone", _prompts("a fracture", _CT)),
            _label("mass", "SCT", "300848003", "Mass of body structure", _prompts("a mass", _CT)),
        ],
    },
    "mr": {
        "description": "Magnetic resonance imaging",
        "labels": [
            _label("no finding", *_NORMAL, _prompts("no abnormality", _MR)),
            _label(
                "cerebral infarction",
                "SCT",
                "432504007",
                "Cerebral infarction",
                _prompts("an acute ischemic stroke", _MR),
                critical=True,
                threshold=0.6,
            ),
            _label(
                "brain tumor",
                "SCT",
                "126952004",
                "Neoplasm of brain",
                _prompts("a brain tumor", _MR),
            ),
            _label(
                "multiple sclerosis",
                "SCT",
                "24700007",
                "Multiple sclerosis",
                _prompts("demyelinating lesions of multiple sclerosis", _MR),
            ),
            _label(
                "hydrocephalus", "SCT", "230745008", "Hydrocephalus", _prompts("hydrocephalus", _MR)
            ),
        ],
    },
    "pathology": {
        "description": "Whole-slide and microscopy images (SM)",
        "labels": [
            _label("normal tissue", *_NORMAL, _prompts("normal tissue", _HP)),
            _label("carcinoma", "SCT", "68453008", "Carcinoma", _prompts("carcinoma", _HP)),
            _label(
                "adenocarcinoma",
                "SCT",
                "35917007",
                "Adenocarcinoma",
                _prompts("adenocarcinoma", _HP),
            ),
            _label(
                "inflammation", "SCT", "23583003", "Inflammation", _prompts("inflammation", _HP)
            ),
        ],
    },
    "dermatology": {
        "description": "Skin photographs and dermoscopy (XC, DMS)",
        "labels": [
            _label(
                "benign nevus",
                LOCAL_SCHEME,
                "NEVUS",
                "Benign melanocytic nevus",
                _prompts("a benign melanocytic nevus", _DERM),
            ),
            _label(
                "melanoma",
                "SCT",
                "372244006",
                "Malignant melanoma of skin",
                _prompts("melanoma", _DERM),
                critical=True,
                threshold=0.6,
            ),
            _label(
                "basal cell carcinoma",
                "SCT",
                "254701007",
                "Basal cell carcinoma of skin",
                _prompts("basal cell carcinoma", _DERM),
            ),
        ],
    },
    "ophthalmology": {
        "description": "Fundus photographs (OP)",
        "labels": [
            _label("normal retina", *_NORMAL, _prompts("a normal retina", _FUNDUS)),
            _label(
                "diabetic retinopathy",
                "SCT",
                "4855003",
                "Diabetic retinopathy",
                _prompts("diabetic retinopathy", _FUNDUS),
            ),
            _label("glaucoma", "SCT", "23986001", "Glaucoma", _prompts("glaucoma", _FUNDUS)),
            _label(
                "macular degeneration",
                "SCT",
                "267718000",
                "Age-related macular degeneration",
                _prompts("age-related macular degeneration", _FUNDUS),
            ),
        ],
    },
}

DEFAULT_DOMAINS: list[dict[str, Any]] = [
    {"label_set": "chest_xray", "modalities": ["CR", "DX"], "body_parts": ["CHEST"]},
    {"label_set": "chest_xray", "modalities": ["CR", "DX"], "description_keywords": ["CHEST"]},
    {"label_set": "ct", "modalities": ["CT"]},
    {"label_set": "mr", "modalities": ["MR"]},
    {"label_set": "pathology", "modalities": ["SM"]},
    {"label_set": "dermatology", "modalities": ["XC", "DMS"]},
    {"label_set": "dermatology", "body_parts": ["SKIN"]},
    {"label_set": "ophthalmology", "modalities": ["OP", "OPT"]},
    {"label_set": "ophthalmology", "body_parts": ["EYE", "RETINA"]},
    {"label_set": "chest_xray", "modalities": ["CR", "DX"]},
]


class LabelSettings(Section):
    """The ``[labels]`` section: label sets by name, domain rules, the fallback set."""

    sets: dict[str, LabelSet] = Field(
        default_factory=lambda: {k: LabelSet(**v) for k, v in DEFAULT_SETS.items()}
    )
    domains: list[DomainRule] = Field(
        default_factory=lambda: [DomainRule(**d) for d in DEFAULT_DOMAINS]
    )
    default_set: str | None = Field(
        default="chest_xray", description="Used when no domain rule matches"
    )

    @model_validator(mode="before")
    @classmethod
    def _fit_defaults_to_sets(cls, data: Any) -> Any:
        # A config that replaces only ``sets`` keeps the shipped rules that still apply,
        # instead of failing on rules that name sets it removed.
        if isinstance(data, dict) and "sets" in data:
            names = set(data["sets"] or {})
            if "domains" not in data:
                data = {**data, "domains": [d for d in DEFAULT_DOMAINS if d["label_set"] in names]}
            if "default_set" not in data:
                fallback = "chest_xray" if "chest_xray" in names else next(iter(data["sets"]), None)
                data = {**data, "default_set": fallback}
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
        if self.default_set is not None and self.default_set not in known:
            raise ValueError(
                f"default_set: unknown set {self.default_set!r} "
                f"(known: {', '.join(sorted(known)) or 'none'})"
            )
        return self

    def choose(self, inputs: dict[str, str]) -> str | None:
        """Name of the label set for a study's triage inputs, or None when nothing fits."""
        for rule in self.domains:
            if rule.matches(inputs):
                return rule.label_set
        return self.default_set


def default_label_settings() -> LabelSettings:
    """The shipped label sets and domain rules."""
    return LabelSettings()
