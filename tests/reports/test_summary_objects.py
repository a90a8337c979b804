"""The summary objects: card layout, Secondary Capture, Encapsulated PDF, Key Object Selection.

Each is written, read back and compared; checked by dciodvfy; stored in Orthanc, which must
render the SC (its preview PNG has each finding's bar where the layout puts it, in the bar's
colour) and serve the PDF (whose text holds every finding); and skipped by image selection
when the PACS sends the study back.
"""

from __future__ import annotations

import copy
import io
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pypdf
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests import factory, peers
from tests.orthanc import OrthancServer
from tests.sr_cases import ct_result, demo_cr_result
from triagenode.config.settings import Settings
from triagenode.domain import DEMO_WARNING, StudyResult
from triagenode.inference.preprocess import display_dataset
from triagenode.inference.select import InstanceRecord, choose_images
from triagenode.reports import build_sr, sr_uids, write_sr
from triagenode.reports.kos import OF_INTEREST, build_kos
from triagenode.reports.objects import ObjectKind, key_images, object_uids, write_object
from triagenode.reports.summary_card import (
    ABSENT_COLOUR,
    CRITICAL_COLOUR,
    DISCLAIMER,
    PRESENT_COLOUR,
    Thumbnail,
    card_font,
    font_file,
    layout_card,
    render_card,
)
from triagenode.reports.summary_pdf import ENCAPSULATED_PDF, build_summary_pdf
from triagenode.reports.summary_sc import build_summary_sc

CASES = {"demo-cr": demo_cr_result, "ct-critical": ct_result}


def _thumbnails(result: StudyResult, source: pydicom.Dataset) -> list[Thumbnail]:
    """The source image (the one with pixels) as the model saw it, for every key image."""
    if "PixelData" in source:
        ds = copy.deepcopy(source)  # as read from a file: native little endian
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        pixels = display_dataset(ds)
    else:
        pixels = np.zeros((8, 8))
    return [Thumbnail(ref, pixels, "key image") for ref in key_images(result)]


def _errors(path: Path) -> list[str]:
    run = peers.run_tool("dciodvfy", str(path))
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, make_settings):
    settings = make_settings()
    result, source = CASES[request.param]()
    return result, source, settings, _thumbnails(result, source)


# The layout model ------------------------------------------------------------------------


def test_layout_has_a_bar_per_finding_scaled_to_score_and_threshold(case) -> None:
    result, _source, _settings, thumbs = case
    layout = layout_card(result, thumbs)
    assert [b.finding for b in layout.bars] == [f.name for f in result.findings]
    for finding in result.findings:
        bar = layout.bar(finding.name)
        span = bar.x1 - bar.x0
        assert bar.fill_x - bar.x0 == pytest.approx(finding.score * span, abs=1)
        assert bar.threshold_x - bar.x0 == pytest.approx(finding.threshold * span, abs=1)
        expected = (
            CRITICAL_COLOUR
            if finding.present and finding.critical
            else PRESENT_COLOUR
            if finding.present
            else ABSENT_COLOUR
        )
        assert bar.colour == expected
        assert finding.code_meaning in layout.text
    assert DISCLAIMER in layout.text
    assert (DEMO_WARNING in layout.text) is result.model.is_demo
    assert f"Priority: {result.priority.name.upper()}" in layout.text
    assert result.model.version in layout.text and result.calibration in layout.text
    assert len(layout.thumbnails) == min(len(thumbs), 4)
    bottoms = [run.y for run in layout.texts] + [b.y1 for b in layout.bars]
    assert max(bottoms) < layout.height


def test_card_pixels_follow_the_layout(case) -> None:
    result, _source, _settings, thumbs = case
    layout = layout_card(result, thumbs)
    image = render_card(layout, thumbs)
    assert image.size == (layout.width, layout.height)
    for bar in layout.bars:
        point = bar.filled_centre
        assert point is not None
        assert image.getpixel(point) == bar.colour
        assert image.getpixel((bar.threshold_x, bar.y0 - 3)) == (20, 20, 20)  # the mark
    # the thumbnail is the model's view of the image, not a blank box
    box = layout.thumbnails[0]
    region = np.asarray(image.crop((box.x0, box.y0, box.x0 + box.size, box.y0 + box.size)))
    assert region.std() > 10


def test_the_card_uses_a_truetype_font() -> None:
    # DejaVu from fonts-dejavu-core, as installed by scripts/test
    assert font_file() is not None
    assert "DejaVu" in card_font(20).getname()[0]


def test_without_dejavu_the_card_uses_pillows_scalable_font(monkeypatch) -> None:
    from triagenode.reports import summary_card

    monkeypatch.setattr(summary_card, "font_file", lambda bold=False: None)
    card_font.cache_clear()
    try:
        small, large = card_font(16), card_font(48)
        assert large.getlength("Priority") > 2.5 * small.getlength("Priority")
        result, _source = demo_cr_result()
        layout = layout_card(result)
        assert render_card(layout).size == (layout.width, layout.height)
    finally:
        card_font.cache_clear()


# Secondary Capture -----------------------------------------------------------------------


def test_sc_is_valid_in_the_sr_study_and_reads_back(case, tmp_path: Path) -> None:
    result, source, settings, thumbs = case
    sc = build_summary_sc(result, source, settings, run=1, thumbnails=thumbs)
    path = write_object(sc, settings)
    assert _errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.StudyInstanceUID == result.study_uid == source.StudyInstanceUID
    assert back.PatientID == source.PatientID
    assert back.Manufacturer == "triagenode"
    assert back.SeriesDescription.startswith("TRIAGENODE")
    assert back.BurnedInAnnotation == "NO"
    assert back.PhotometricInterpretation == "RGB"
    uids = object_uids(result, settings, run=1, kind=ObjectKind.summary_sc)
    assert back.SOPInstanceUID == uids.sop_instance_uid
    assert back.SeriesInstanceUID not in {sr_uids(result, settings, run=1).series_instance_uid}
    assert [i.ReferencedSOPInstanceUID for i in back.SourceImageSequence] == [
        t.ref.sop_instance_uid for t in thumbs[:4]
    ]
    layout = layout_card(result, thumbs)
    expected = np.asarray(render_card(layout, thumbs))
    assert np.array_equal(back.pixel_array, expected)


def test_uids_replace_on_retry_and_differ_per_kind_and_run(make_settings) -> None:
    settings = make_settings()
    result, _source = demo_cr_result()
    kinds = [ObjectKind.summary_sc, ObjectKind.summary_pdf, ObjectKind.kos]
    first = {k: object_uids(result, settings, run=1, kind=k) for k in kinds}
    again = {k: object_uids(result, settings, run=1, kind=k) for k in kinds}
    later = {k: object_uids(result, settings, run=2, kind=k) for k in kinds}
    assert first == again
    sr = sr_uids(result, settings, run=1)
    instances = {u.sop_instance_uid for u in first.values()} | {sr.sop_instance_uid}
    assert len(instances) == 4
    for kind in kinds:
        assert later[kind].series_instance_uid == first[kind].series_instance_uid
        assert later[kind].sop_instance_uid != first[kind].sop_instance_uid
    other_model = replace(result, model=replace(result.model, weights_sha256="e" * 64))
    assert (
        object_uids(other_model, settings, run=1, kind=ObjectKind.kos).series_instance_uid
        != first[ObjectKind.kos].series_instance_uid
    )


# Encapsulated PDF ------------------------------------------------------------------------


def test_pdf_is_valid_links_the_sr_and_holds_the_findings(case) -> None:
    result, source, settings, thumbs = case
    sr = sr_uids(result, settings, run=1)
    ds = build_summary_pdf(result, source, settings, run=1, sr=sr, thumbnails=thumbs)
    path = write_object(ds, settings)
    assert _errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == ENCAPSULATED_PDF
    assert back.StudyInstanceUID == result.study_uid
    assert back.Manufacturer == "triagenode"
    assert back.SourceInstanceSequence[0].ReferencedSOPInstanceUID == sr.sop_instance_uid
    document = bytes(back.EncapsulatedDocument)[: back.EncapsulatedDocumentLength]
    assert document.startswith(b"%PDF-") and document.rstrip().endswith(b"%%EOF")
    text = pypdf.PdfReader(io.BytesIO(document)).pages[0].extract_text()
    for finding in result.findings:
        assert finding.code_meaning.split()[0] in text
        assert f"{finding.score:.2f}" in text
    assert DISCLAIMER in text
    assert (DEMO_WARNING in text) is result.model.is_demo


# Key Object Selection --------------------------------------------------------------------


def test_kos_flags_the_key_images_and_references_the_sr(case) -> None:
    result, source, settings, _thumbs = case
    sr = build_sr(result, source, settings, run=1)
    kos = build_kos(result, source, settings, run=1, companions=[sr])
    path = write_object(kos, settings)
    assert _errors(path) == []
    back = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    assert back.ConceptNameCodeSequence[0].CodeValue == OF_INTEREST.value == "113000"
    assert back.StudyInstanceUID == result.study_uid
    assert back.Modality == "KO"
    assert back.SeriesDescription.startswith("TRIAGENODE")
    referenced = [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in back.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    ]
    keys = [r.sop_instance_uid for r in key_images(result)]
    assert referenced == [*keys, sr.SOPInstanceUID]
    # the key images are those of the findings above threshold, highest score first
    present = sorted((f for f in result.findings if f.present), key=lambda f: -f.score)
    if present and present[0].images:
        assert keys[0] == present[0].images[0].sop_instance_uid


# The node never classifies its own objects ----------------------------------------------


def test_selection_skips_summary_objects_sent_back_by_the_pacs(make_settings, tmp_path) -> None:
    settings = make_settings()
    result, source = demo_cr_result()
    original = factory.write(source, tmp_path / "cr.dcm")
    sr = build_sr(result, source, settings, run=1)
    thumbs = _thumbnails(result, source)
    sc = build_summary_sc(result, source, settings, run=1, thumbnails=thumbs)
    made = [
        write_sr(sr, settings),
        write_object(sc, settings),
        write_object(build_summary_pdf(result, source, settings, run=1), settings),
        write_object(build_kos(result, source, settings, run=1, companions=[sr]), settings),
    ]
    records = []
    for path in [original, *made]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        records.append(
            InstanceRecord(
                sop_class_uid=ds.SOPClassUID,
                sop_instance_uid=ds.SOPInstanceUID,
                series_uid=ds.SeriesInstanceUID,
                modality=ds.Modality,
                instance_number=ds.get("InstanceNumber"),
                number_of_frames=1,
                path=path,
            )
        )
    selection = choose_images(records, slices_per_series=8, max_images=16)
    assert [i.ref.sop_instance_uid for i in selection.images] == [source.SOPInstanceUID]
    skipped = {s.series_uid: s.reason for s in selection.skipped}
    sc_series = records[2].series_uid
    assert skipped[sc_series] == "the node's own output"
    assert len(skipped) == 4
    # a study holding nothing but the node's card (the PACS sent only that back)
    alone = choose_images([records[2]], slices_per_series=8, max_images=16)
    assert alone.images == ()


# Through a real PACS ---------------------------------------------------------------------


@pytest.mark.slow
def test_orthanc_stores_renders_the_card_and_serves_the_pdf(make_settings, tmp_path) -> None:
    settings: Settings = make_settings()
    result, source = ct_result()
    thumbs = _thumbnails(result, source)
    layout = layout_card(result, thumbs)
    sr = sr_uids(result, settings, run=1)
    sc_path = write_object(
        build_summary_sc(result, source, settings, run=1, thumbnails=thumbs), settings
    )
    pdf_path = write_object(
        build_summary_pdf(result, source, settings, run=1, sr=sr, thumbnails=thumbs), settings
    )
    kos_path = write_object(build_kos(result, source, settings, run=1), settings)
    with OrthancServer(tmp_path / "orthanc") as pacs:
        sc_id = pacs.upload(sc_path)["ID"]
        pdf_id = pacs.upload(pdf_path)["ID"]
        kos_answer = pacs.upload(kos_path)
        assert kos_answer["Status"] == "Success"

        preview = pacs.client.get(f"/instances/{sc_id}/preview")
        assert preview.status_code == 200
        assert preview.headers["content-type"] == "image/png"
        png = Image.open(io.BytesIO(preview.content)).convert("RGB")
        assert png.size == (layout.width, layout.height)
        assert np.asarray(png).std() > 20  # not blank
        for bar in layout.bars:
            point = bar.filled_centre
            assert point is not None
            assert png.getpixel(point) == bar.colour, bar.finding

        served = pacs.client.get(f"/instances/{pdf_id}/pdf")
        assert served.status_code == 200
        assert served.content.startswith(b"%PDF-")
        text = pypdf.PdfReader(io.BytesIO(served.content)).pages[0].extract_text()
        for finding in result.findings:
            assert finding.code_meaning.split()[0] in text
