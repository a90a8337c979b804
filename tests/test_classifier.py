"""Zero-shot classifier: label sets and domain rules, end-to-end determinism with the demo
model, text-embedding cache, aggregation rule, per-image failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tests.factory import cr_image, ct_slice, write
from triagenode.config.labels import LabelSettings
from triagenode.domain import ImageRef, Priority
from triagenode.errors import ConfigError, TriageNodeError
from triagenode.inference.backends.torch import TorchImageEncoder
from triagenode.inference.batcher import DynamicBatcher
from triagenode.inference.classifier import AGGREGATION, NoUsableImagesError, ZeroShotClassifier
from triagenode.inference.model import LoadedModel, build_demo_model
from triagenode.inference.preprocess import preprocess_file


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return build_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def encoder(demo: LoadedModel) -> TorchImageEncoder:
    return TorchImageEncoder(demo, device="cpu", max_batch=8)


@pytest.fixture
def ct_study(tmp_path: Path) -> tuple[str, list[tuple[ImageRef, Path]]]:
    study, series = generate_uid(), generate_uid()
    images = []
    for index in range(3):
        ds = ct_slice(study, series, index, size=64, seed=7)
        path = write(ds, tmp_path / f"ct{index}.dcm")
        images.append((ImageRef(ds.SOPClassUID, ds.SOPInstanceUID, series), path))
    return study, images


def test_shipped_label_sets_cover_the_domains() -> None:
    labels = LabelSettings()
    assert {"chest_xray", "ct", "mr", "pathology", "dermatology", "ophthalmology"} <= set(
        labels.sets
    )
    for label_set in labels.sets.values():
        for label in label_set.labels:
            assert len(label.prompts) >= 3 and label.code.scheme in ("SCT", "99TRIAGE")
    assert any(label.critical for label in labels.sets["chest_xray"].labels)


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"Modality": "CR", "BodyPartExamined": "CHEST"}, "chest_xray"),
        ({"Modality": "DX", "StudyDescription": "XR Chest PA and lateral"}, "chest_xray"),
        ({"Modality": "CT", "BodyPartExamined": "HEAD"}, "ct"),
        ({"Modality": "MR"}, "mr"),
        ({"Modality": "SM"}, "pathology"),
        ({"Modality": "XC"}, "dermatology"),
        ({"Modality": "OT", "BodyPartExamined": "SKIN"}, "dermatology"),
        ({"Modality": "OP"}, "ophthalmology"),
        ({"Modality": "US"}, "chest_xray"),  # no rule: default_set
    ],
)
def test_domain_rules_choose_the_label_set(
    demo: LoadedModel, encoder: TorchImageEncoder, inputs: dict[str, str], expected: str
) -> None:
    classifier = ZeroShotClassifier(demo, encoder, LabelSettings(), None)
    assert classifier.choose_label_set(inputs) == expected


def test_config_can_replace_the_label_sets(make_settings) -> None:
    label = {"code": {"scheme": "SCT", "value": "1", "meaning": "x"}, "prompts": ["p"]}
    settings = make_settings(
        labels={"sets": {"mine": {"labels": [{**label, "name": "a"}, {**label, "name": "b"}]}}}
    )
    assert set(settings.labels.sets) == {"mine"} and settings.labels.default_set == "mine"
    assert settings.labels.domains == []
    with pytest.raises(ConfigError, match="default_set: unknown set"):
        make_settings(labels={"default_set": "nope"})


def test_classifies_a_study_end_to_end_deterministically(
    demo: LoadedModel, encoder: TorchImageEncoder, ct_study, tmp_path: Path
) -> None:
    study, images = ct_study
    results = []
    for run in range(2):
        model = build_demo_model(tmp_path / f"m{run}")  # a fresh build each run
        classifier = ZeroShotClassifier(
            model, TorchImageEncoder(model, device="cpu"), LabelSettings(), None
        )
        results.append(
            classifier.classify_study(
                study,
                images,
                triage_inputs={"Modality": "CT"},
                priority=Priority.stat,
                priority_rule="stroke",
            )
        )
    first, second = results
    assert first.findings == second.findings
    assert first.label_set == "ct" and first.backend == "torch"
    assert first.model.is_demo and first.aggregation == AGGREGATION
    assert first.priority is Priority.stat and first.priority_rule == "stroke"
    assert len(first.images_used) == 3 and first.images_failed == ()
    assert [f.name for f in first.findings][:2] == ["no finding", "intracranial hemorrhage"]
    assert {"text", "preprocess", "encode", "total"} <= set(first.timings_ms)
    assert first.top_finding is not None


def test_study_probability_is_the_max_over_images(
    demo: LoadedModel, encoder: TorchImageEncoder, ct_study
) -> None:
    study, images = ct_study
    classifier = ZeroShotClassifier(demo, encoder, LabelSettings(), None)
    batch = np.concatenate([preprocess_file(path, demo.preprocess) for _, path in images])
    per_image = classifier.classify_images(batch, "ct")
    np.testing.assert_allclose(per_image.sum(axis=1), 1.0, rtol=1e-5)
    result = classifier.classify_study(study, images, label_set="ct")
    expected = per_image.max(axis=0)
    got = np.array([f.probability for f in result.findings])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for finding in result.findings:
        assert finding.present == (finding.probability >= finding.threshold)


def test_text_embeddings_are_cached_in_memory_and_on_disk(
    demo: LoadedModel, encoder: TorchImageEncoder, tmp_path: Path
) -> None:
    first = ZeroShotClassifier(demo, encoder, LabelSettings(), tmp_path)
    embeddings = first.text_embeddings("chest_xray")
    first.text_embeddings("chest_xray")
    assert first.text_cache_stats == {"computed": 1, "memory": 1}
    files = list((tmp_path / "text-embeddings").glob("*.npy"))
    assert len(files) == 1 and files[0].name.startswith(demo.identity.weights_sha256[:16])
    second = ZeroShotClassifier(demo, encoder, LabelSettings(), tmp_path)
    np.testing.assert_array_equal(second.text_embeddings("chest_xray"), embeddings)
    assert second.text_cache_stats == {"disk": 1}
    assert embeddings.shape == (len(LabelSettings().sets["chest_xray"].labels), demo.embed_dim)


def test_failed_images_are_recorded_not_fatal(
    demo: LoadedModel, encoder: TorchImageEncoder, tmp_path: Path
) -> None:
    good = cr_image(size=64)
    path = write(good, tmp_path / "cr.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    sr = tmp_path / "missing.dcm"
    refs = [
        ImageRef(good.SOPClassUID, good.SOPInstanceUID, "s", None),
        ImageRef("1.2.840.10008.5.1.4.1.1.1", "1.2.3", "s"),
        ImageRef("1.2.840.10008.5.1.4.1.1.1", "1.2.4", "s"),
    ]
    with DynamicBatcher(encoder, max_batch=4, max_wait_ms=1) as batcher:
        classifier = ZeroShotClassifier(demo, encoder, LabelSettings(), None, batcher=batcher)
        result = classifier.classify_study(
            good.StudyInstanceUID,
            [(refs[0], path), (refs[1], junk), (refs[2], sr)],
            triage_inputs={"Modality": "CR", "BodyPartExamined": "CHEST"},
        )
    assert result.label_set == "chest_xray" and result.images_used == (refs[0],)
    reasons = dict(result.images_failed)
    assert reasons[refs[1]] == "junk.dcm: not a DICOM file (no DICM preamble)"
    assert "unreadable DICOM" in reasons[refs[2]]


def test_a_study_with_no_usable_image_raises(
    demo: LoadedModel, encoder: TorchImageEncoder, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"nothing")
    classifier = ZeroShotClassifier(demo, encoder, LabelSettings(), None)
    with pytest.raises(NoUsableImagesError, match="none of its 1 images"):
        classifier.classify_study("1.2.3", [(ImageRef("1.2", "1.2.3.4", "s"), junk)], "ct")
    with pytest.raises(TriageNodeError, match="label set 'nope' is not configured"):
        classifier.text_embeddings("nope")
