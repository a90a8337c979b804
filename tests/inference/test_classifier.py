"""Zero-shot classifier: label sets and domain rules, end-to-end determinism with the demo
model, text-embedding cache, aggregation rule, per-image failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tests.factory import cr_image, ct_slice, write
from triagenode.config.labels import Calibration, LabelSettings
from triagenode.domain import ImageRef, Priority
from triagenode.errors import ConfigError, TriageNodeError
from triagenode.inference.backends.torch import TorchImageEncoder
from triagenode.inference.batcher import DynamicBatcher
from triagenode.inference.classifier import (
    NoLabelSetError,
    NoUsableImagesError,
    ZeroShotClassifier,
)
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
    assert {
        "chest_xray",
        "ct_head",
        "ct_pulmonary_angiogram",
        "ct_chest",
        "mr_brain",
        "pathology",
        "dermatology",
        "ophthalmology",
    } == set(labels.sets)
    for label_set in labels.sets.values():
        for label in label_set.labels:
            assert len(label.prompts) >= 3 and len(label.absent_prompts) >= 3
            # "normal" / "no finding" is derived (nothing present), never a competing label
            assert label.code.value != "17621005" and "no finding" not in label.name
            assert not label.calibration.is_calibrated and not label.threshold_calibrated
    assert any(label.critical for label in labels.sets["chest_xray"].labels)


def _known_codes() -> dict[tuple[str, str], list[tuple[str, tuple[int, ...]]]]:
    """Every (scheme, value) of pydicom's PS3.16 dictionary with all its (meaning, CIDs)."""
    from pydicom.sr import _concepts_dict

    known: dict[tuple[str, str], list[tuple[str, tuple[int, ...]]]] = {}
    for scheme, concepts in _concepts_dict.concepts.items():
        for entries in concepts.values():
            for value, (meaning, cids) in entries.items():
                known.setdefault((scheme, value), []).append((meaning, tuple(cids)))
    return known


def test_every_shipped_code_is_current_in_ps3_16_or_a_documented_snomed_finding() -> None:
    """Checked against pydicom's copy of the PS3.16 tables, not against the node's own table:
    a code is accepted when a PS3.16 context group lists it with the same meaning, or when
    tests/code_sources.py names its SNOMED CT concept. Morphology codes are refused."""
    from tests.code_sources import SNOMED_FINDINGS

    known = _known_codes()
    problems = []
    for set_name, label_set in LabelSettings().sets.items():
        for label in label_set.labels:
            key = (label.code.scheme, label.code.value)
            in_a_cid = any(
                cids and meaning.lower() == label.code.meaning.lower()
                for meaning, cids in known.get(key, [])
            )
            if in_a_cid:
                continue
            if key in SNOMED_FINDINGS:
                meaning, full_name = SNOMED_FINDINGS[key]
                if meaning != label.code.meaning or "(morphologic" in full_name:
                    problems.append(f"{set_name}/{label.name}: {full_name!r}")
            else:
                problems.append(f"{set_name}/{label.name}: {key} has no PS3.16 or SNOMED source")
    assert problems == []
    # codes PS3.16 has replaced (or morphology codes) must not come back
    used = {lab.code.value for s in LabelSettings().sets.values() for lab in s.labels}
    assert not used & {"8186001", "68453008", "35917007", "23583003", "372244006", "2092003"}


def test_domain_anatomy_codes_are_snomed_anatomy() -> None:
    known = _known_codes()
    for rule in LabelSettings().domains:
        for code in rule.anatomic_codes:
            assert known[("SCT", code)], code


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"Modality": "CR", "BodyPartExamined": "CHEST"}, "chest_xray"),
        ({"Modality": "DX", "StudyDescription": "XR Chest PA and lateral"}, "chest_xray"),
        ({"Modality": "DX", "AnatomicRegion": "816094009^SCT^Chest"}, "chest_xray"),
        ({"Modality": "CT", "BodyPartExamined": "HEAD"}, "ct_head"),
        ({"Modality": "CT", "StudyDescription": "CT BRAIN WO CONTRAST"}, "ct_head"),
        ({"Modality": "CT", "StudyDescription": "CTA CHEST PE PROTOCOL"}, "ct_pulmonary_angiogram"),
        ({"Modality": "CT", "BodyPartExamined": "CHEST"}, "ct_chest"),
        ({"Modality": "MR", "BodyPartExamined": "BRAIN"}, "mr_brain"),
        ({"Modality": "SM"}, "pathology"),
        ({"Modality": "XC", "BodyPartExamined": "SKIN"}, "dermatology"),
        ({"Modality": "OP", "StudyDescription": "Fundus photo"}, "ophthalmology"),
        # what no set is made for is not classified, never the chest X-ray set
        ({"Modality": "US", "StudyDescription": "US CHEST"}, None),
        ({"Modality": "MG", "BodyPartExamined": "BREAST"}, None),
        ({"Modality": "CR", "BodyPartExamined": "HAND"}, None),
        ({"Modality": "DX", "StudyDescription": "XR RIBS LEFT 2 VIEWS"}, None),
        ({"Modality": "CT", "BodyPartExamined": "ABDOMEN"}, None),
        ({"Modality": "MR", "BodyPartExamined": "KNEE"}, None),
        ({"Modality": "NM"}, None),
        ({"Modality": "XA"}, None),
        ({}, None),
    ],
)
def test_domain_rules_choose_the_label_set(
    demo: LoadedModel, encoder: TorchImageEncoder, inputs: dict[str, str], expected: str | None
) -> None:
    classifier = ZeroShotClassifier(demo, encoder, LabelSettings(), None)
    if expected is None:
        with pytest.raises(NoLabelSetError, match="no domain rule fits"):
            classifier.choose_label_set(inputs)
    else:
        assert classifier.choose_label_set(inputs) == expected


def test_config_can_replace_the_label_sets(make_settings) -> None:
    label = {
        "code": {"scheme": "SCT", "value": "1", "meaning": "x"},
        "prompts": ["p"],
        "absent_prompts": ["no p"],
    }
    settings = make_settings(labels={"sets": {"mine": {"labels": [{**label, "name": "a"}]}}})
    assert set(settings.labels.sets) == {"mine"}
    assert settings.labels.domains == []
    with pytest.raises(ConfigError, match="default_set was removed"):
        make_settings(labels={"default_set": "chest_xray"})


def _two_label_sets(demo: LoadedModel) -> LabelSettings:
    """One finding alone, and the same finding beside an identical twin and a third label."""
    shipped = LabelSettings().sets["chest_xray"].labels
    effusion = shipped[1]
    twin = effusion.model_copy(update={"name": "effusion twin"})
    return LabelSettings(
        sets={
            "alone": {"labels": [effusion.model_dump()]},
            "crowded": {
                "labels": [effusion.model_dump(), twin.model_dump(), shipped[0].model_dump()]
            },
        },
        domains=[],
    )


def test_each_finding_is_decided_on_its_own(
    demo: LoadedModel, encoder: TorchImageEncoder, ct_study
) -> None:
    """Two findings that fit equally well do not halve each other, and a finding's score
    does not move when labels are added to its set (one softmax over the set did both)."""
    _study, images = ct_study
    classifier = ZeroShotClassifier(demo, encoder, _two_label_sets(demo), None)
    batch = np.concatenate([preprocess_file(path, demo.preprocess) for _, path in images])
    alone = classifier.classify_images(batch, "alone")
    crowded = classifier.classify_images(batch, "crowded")
    np.testing.assert_allclose(crowded[:, 0], alone[:, 0], atol=1e-6)
    np.testing.assert_allclose(crowded[:, 1], crowded[:, 0], atol=1e-6)
    # the score is the softmax over "present" vs "absent" prompts, computed here by hand
    embeddings = np.stack(classifier.encode_images(batch, Priority.routine))  # type: ignore[arg-type]
    label = classifier.label_set("alone").labels[0]
    present = demo.encode_text(label.prompts).mean(axis=0)
    absent = demo.encode_text(label.absent_prompts).mean(axis=0)
    present /= np.linalg.norm(present)
    absent /= np.linalg.norm(absent)
    z = demo.logit_scale * (embeddings @ present - embeddings @ absent)
    np.testing.assert_allclose(alone[:, 0], 1 / (1 + np.exp(-z)), atol=1e-5)


def test_calibration_and_the_critical_rule(
    demo: LoadedModel, encoder: TorchImageEncoder, ct_study
) -> None:
    study, images = ct_study
    raw_set = _two_label_sets(demo).sets["alone"]
    label = raw_set.labels[0]
    platt = label.model_copy(
        update={
            "calibration": Calibration(method="platt", slope=0.5, intercept=2.0, name="t"),
            "critical": True,
            "threshold": 0.01,
        }
    )
    settings = LabelSettings(
        sets={
            "raw": raw_set.model_dump(),
            "flagged": {"labels": [platt.model_dump()]},
            "escalating": {
                "labels": [platt.model_copy(update={"threshold_calibrated": True}).model_dump()]
            },
        },
        domains=[],
    )
    classifier = ZeroShotClassifier(demo, encoder, settings, None)
    batch = np.concatenate([preprocess_file(path, demo.preprocess) for _, path in images])
    embeddings = np.stack(classifier.encode_images(batch, Priority.routine))  # type: ignore[arg-type]
    z = classifier.logits(embeddings, "raw")[:, 0]
    np.testing.assert_allclose(
        classifier.scores(embeddings, "flagged")[:, 0],
        1 / (1 + np.exp(-(0.5 * z + 2.0))),
        atol=1e-5,
    )
    flagged = classifier.classify_study(study, images, label_set="flagged")
    assert flagged.findings[0].calibrated and flagged.findings[0].critical
    assert flagged.flagged and not flagged.critical  # flagged, but the worklist keeps its order
    assert "Platt a=0.5 b=2" in flagged.calibration
    escalating = classifier.classify_study(study, images, label_set="escalating")
    assert escalating.critical and escalating.findings[0].escalates
    raw = classifier.classify_study(study, images, label_set="raw")
    assert raw.calibration == "none" and not raw.findings[0].calibrated


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
                triage_inputs={"Modality": "CT", "BodyPartExamined": "HEAD"},
                priority=Priority.stat,
                priority_rule="stroke",
            )
        )
    first, second = results
    assert first.findings == second.findings
    assert first.label_set == "ct_head" and first.backend == "torch"
    assert first.label_set_reason == "domain rule 3: Modality CT, BodyPartExamined HEAD"
    assert first.model.is_demo and first.aggregation == "mean of the top 3 image scores per finding"
    assert first.priority is Priority.stat and first.priority_rule == "stroke"
    assert len(first.images_used) == 3 and first.images_failed == ()
    assert [f.name for f in first.findings][:2] == [
        "intracranial hemorrhage",
        "cerebral infarction",
    ]
    assert {"text", "preprocess", "encode", "total"} <= set(first.timings_ms)
    assert first.top_finding is not None
    with pytest.raises(NoLabelSetError, match="Modality 'US'"):
        classifier.classify_study(study, images, triage_inputs={"Modality": "US"})


@pytest.mark.parametrize(("rule", "k"), [("max", 1), ("mean_top_k", 2), ("mean_top_k", 3)])
def test_study_score_follows_the_label_sets_aggregation_rule(
    demo: LoadedModel, encoder: TorchImageEncoder, ct_study, rule: str, k: int
) -> None:
    study, images = ct_study
    head = LabelSettings().sets["ct_head"].model_copy(update={"aggregation": rule, "top_k": k})
    settings = LabelSettings(sets={"head": head.model_dump()}, domains=[])
    classifier = ZeroShotClassifier(demo, encoder, settings, None)
    window = (40.0, 80.0)  # the head CT set's brain window, which classify_study applies
    batch = np.concatenate(
        [preprocess_file(path, demo.preprocess, window=window) for _, path in images]
    )
    per_image = classifier.classify_images(batch, "head")
    result = classifier.classify_study(study, images, label_set="head")
    expected = np.sort(per_image, axis=0)[-k:].mean(axis=0)
    got = np.array([f.score for f in result.findings])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for finding in result.findings:
        assert finding.present == (finding.score >= finding.threshold)


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
    assert embeddings.shape == (len(LabelSettings().sets["chest_xray"].labels), 2, demo.embed_dim)


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
        classifier.classify_study("1.2.3", [(ImageRef("1.2", "1.2.3.4", "s"), junk)], "ct_head")
    with pytest.raises(TriageNodeError, match="label set 'nope' is not configured"):
        classifier.text_embeddings("nope")


def test_the_research_predictor_scores_findings_like_studies(
    demo: LoadedModel, encoder: TorchImageEncoder, ct_study
) -> None:
    """/predict with a label set: the node's per-finding scores; with queries: a softmax
    over the queries, which compete by design."""
    from triagenode.inference.predictor import ClassifierPredictor

    _study, images = ct_study
    classifier = ZeroShotClassifier(demo, encoder, LabelSettings(), None)
    predictor = ClassifierPredictor(classifier)
    raw = images[0][1].read_bytes()
    [by_set] = predictor.predict([raw], None, "chest_xray")
    batch = preprocess_file(images[0][1], demo.preprocess)
    np.testing.assert_allclose(
        by_set["scores"], classifier.classify_images(batch, "chest_xray")[0], atol=1e-5
    )
    assert by_set["present"] == [
        s >= t for s, t in zip(by_set["scores"], by_set["thresholds"], strict=True)
    ]
    assert by_set["calibrated"] == [False] * len(by_set["labels"])
    [by_queries] = predictor.predict([raw], ["a chest x-ray", "a brain MRI"], None)
    assert sum(by_queries["scores"]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(KeyError, match="give queries or a label_set"):
        predictor.predict([raw], None, None)


def test_label_set_reasons_quote_outside_text_safely() -> None:
    """Descriptions and coded meanings come from the sender: the reason that reaches the
    SR, the database and the logs holds them escaped, never raw control characters."""
    hostile = "\x1b[31mCHEST\x00\n\udcff"
    labels = LabelSettings()
    for inputs in (
        {"Modality": "CR", "StudyDescription": f"XR {hostile}"},
        {"Modality": "CT", "AnatomicRegion": f"816094009^SCT^{hostile}"},
        {"Modality": f"U{hostile}"},
    ):
        reason = labels.explain_choice(inputs).reason
        assert not any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in reason), reason
