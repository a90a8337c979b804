"""Study results to report in tests: a demo CR result and a multi-label CT result."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests import factory
from triagenode.domain import ImageRef, LabelFinding, ModelIdentity, Priority, StudyResult

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"

DEMO_MODEL = ModelIdentity(
    name="demo", version="0.1.0", weights_sha256="d" * 64, source="demo", is_demo=True
)
BIOMEDCLIP = ModelIdentity(
    name="BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    version="9f341de",
    weights_sha256="b" * 64,
    source="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
)


def _ref(ds: Dataset, frame: int | None = None) -> ImageRef:
    return ImageRef(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, frame)


def demo_cr_result() -> tuple[StudyResult, Dataset]:
    """A one-image chest CR classified by the demo model: routine, nothing critical."""
    source = factory.cr_image()
    image = _ref(source)
    findings = (
        LabelFinding("pneumothorax", "SCT", "36118008", "Pneumothorax", 0.18, 0.5, False),
        LabelFinding("pleural_effusion", "SCT", "60046008", "Pleural effusion", 0.64, 0.5, True),
        LabelFinding("cardiomegaly", "SCT", "287272002", "Cardiomegaly", 0.57, 0.5, True),
    )
    result = StudyResult(
        study_uid=source.StudyInstanceUID,
        label_set="chest-xray",
        findings=findings,
        model=DEMO_MODEL,
        backend="torch",
        aggregation="maximum image score per finding",
        images_used=(image,),
        priority=Priority.routine,
        timings_ms={"preprocess": 3.5, "encode": 41.0},
    )
    return result, source


def ct_result() -> tuple[StudyResult, Dataset]:
    """A CT head study with a critical hemorrhage, single- and multi-frame references."""
    study_uid, series_uid, mf_series = generate_uid(), generate_uid(), generate_uid()
    slices = [factory.ct_slice(study_uid, series_uid, i) for i in range(3)]
    multiframe_uid = generate_uid()
    frames = tuple(ImageRef(ENHANCED_CT, multiframe_uid, mf_series, f) for f in (3, 7, 12))
    singles = tuple(_ref(ds) for ds in slices)
    failed = (ImageRef(slices[0].SOPClassUID, generate_uid(), series_uid), "undecodable pixels")
    findings = (
        LabelFinding(
            "hemorrhage",
            "SCT",
            "1386000",
            "Intracranial hemorrhage",
            0.93,
            0.4,
            True,
            critical=True,
            escalates=True,
            calibrated=True,
            images=(singles[1], frames[0], frames[2]),
        ),
        LabelFinding(
            "infarct", "SCT", "432504007", "Cerebral infarction", 0.41, 0.6, False, calibrated=True
        ),
        LabelFinding(
            "mass",
            "SCT",
            "4147007",
            "Mass",
            0.55,
            0.5,
            True,
            calibrated=True,
            images=(singles[2], frames[1]),
        ),
    )
    result = StudyResult(
        study_uid=study_uid,
        label_set="ct-head",
        findings=findings,
        model=BIOMEDCLIP,
        backend="onnxruntime",
        aggregation="mean of the top 3 image scores per finding",
        calibration="site fit 2026-11 (Platt)",
        images_used=singles + frames,
        images_failed=(failed,),
        priority=Priority.stat,
        priority_rule="critical finding: hemorrhage",
        timings_ms={"encode": 812.0},
    )
    return result, slices[0]
