"""Image selection: which instances of a study are classified, and why the others are not."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import triagenode.inference.select as select_module
from tests.factory import (
    DX_FOR_PROCESSING_STORAGE,
    DX_IMAGE_STORAGE,
    ct_slice,
    header_only,
    write,
)
from triagenode.inference.select import (
    InstanceRecord,
    Selection,
    SeriesPreference,
    choose_images,
    evenly_spaced,
    select_images,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
CR = "1.2.840.10008.5.1.4.1.1.1"
MG = "1.2.840.10008.5.1.4.1.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
KEY_OBJECT = "1.2.840.10008.5.1.4.1.1.88.59"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
AXIAL = ["ORIGINAL", "PRIMARY", "AXIAL"]


class Study:
    """A study written to disk instance by instance, with its database-like records."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.uid = generate_uid()
        self.records: list[InstanceRecord] = []

    def add(self, ds: Dataset) -> InstanceRecord:
        path = write(ds, self.folder / f"{ds.SOPInstanceUID}.dcm")
        number = ds.get("InstanceNumber")
        record = InstanceRecord(
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            series_uid=ds.SeriesInstanceUID,
            modality=ds.Modality,
            instance_number=int(number) if number is not None else None,
            number_of_frames=int(ds.get("NumberOfFrames") or 1),
            path=path,
        )
        self.records.append(record)
        return record

    def ct_series(self, slices: int, number: int = 1, **attributes: object) -> str:
        series = generate_uid()
        for i in range(slices):
            self.add(ct_slice(self.uid, series, i, size=4, SeriesNumber=number, **attributes))
        return series

    def image(
        self, sop_class: str, modality: str, series: str | None = None, **attrs: object
    ) -> str:
        series = series or generate_uid()
        self.add(header_only(sop_class, self.uid, series, modality, **attrs))
        return series

    def choose(
        self, k: int = 4, cap: int = 32, prefer: SeriesPreference | None = None
    ) -> Selection:
        return choose_images(self.records, slices_per_series=k, max_images=cap, prefer=prefer)


def _reasons(selection: Selection) -> dict[str, str]:
    return {s.series_uid: s.reason for s in selection.skipped}


def test_evenly_spaced_takes_the_centre_of_each_stratum() -> None:
    assert evenly_spaced(10, 3) == [1, 5, 8]
    assert evenly_spaced(3, 8) == [0, 1, 2]
    assert evenly_spaced(100, 4) == [12, 37, 62, 87]
    assert evenly_spaced(0, 4) == [] and evenly_spaced(5, 0) == []


def test_ct_series_is_subsampled_by_instance_number(tmp_path: Path) -> None:
    study = Study(tmp_path)
    series = study.ct_series(20, ImageType=AXIAL)
    study.records.reverse()  # stored out of order: selection sorts by InstanceNumber
    selection = study.choose(k=4)
    numbers = {r.sop_instance_uid: r.instance_number for r in study.records}
    assert [numbers[i.ref.sop_instance_uid] for i in selection.images] == [3, 8, 13, 18]
    assert all(i.ref.frame is None for i in selection.images)
    assert selection.series_used == (series,) and selection.skipped == ()


def test_localizers_are_skipped_by_image_type_or_description(tmp_path: Path) -> None:
    study = Study(tmp_path)
    scout = study.ct_series(2, number=1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    topogram = study.ct_series(1, number=2, ImageType=AXIAL, SeriesDescription="Topogram 0.6")
    axial = study.ct_series(30, number=3, ImageType=AXIAL)
    selection = study.choose(k=4)
    assert selection.series_used == (axial,)
    reasons = _reasons(selection)
    assert reasons[scout] == "localizer (ImageType LOCALIZER)"
    assert reasons[topogram] == "localizer (description word TOPOGRAM)"


def test_dose_screens_and_captures_are_skipped_when_other_images_exist(tmp_path: Path) -> None:
    study = Study(tmp_path)
    axial = study.ct_series(10, ImageType=AXIAL)
    dose = study.image(
        SC, "CT", ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"], SeriesDescription="Dose Report"
    )
    capture = study.image(SC, "OT", ImageType=["DERIVED", "SECONDARY"])
    selection = study.choose()
    assert selection.series_used == (axial,)
    reasons = _reasons(selection)
    assert reasons[dose] == "dose report screen capture"
    assert reasons[capture] == "screen capture (Secondary Capture Image Storage)"
    # a low-dose scan is a scan, not a dose report
    low_dose = Study(tmp_path / "low")
    scan = low_dose.ct_series(6, ImageType=AXIAL, SeriesDescription="Low Dose Chest 1.25")
    low_dose.image(SC, "CT", ImageType=["DERIVED", "SECONDARY"], SeriesDescription="Dose Info")
    assert low_dose.choose().series_used == (scan,)
    # a study of nothing but a digitised film keeps it
    alone = Study(tmp_path / "alone")
    film = alone.image(SC, "OT", ImageType=["DERIVED", "SECONDARY"])
    assert alone.choose().series_used == (film,)


def test_derived_reformats_are_skipped_when_an_original_series_exists(tmp_path: Path) -> None:
    study = Study(tmp_path)
    # the reformat has more slices: without the rule it would win on slice count
    mpr = study.ct_series(40, number=2, ImageType=["DERIVED", "SECONDARY", "REFORMATTED"])
    axial = study.ct_series(20, number=1, ImageType=AXIAL)
    selection = study.choose()
    assert selection.series_used == (axial,)
    assert _reasons(selection)[mpr] == "derived reformat; an original series exists"
    only = Study(tmp_path / "only")
    mip = only.ct_series(5, ImageType=["DERIVED", "SECONDARY", "MIP"])
    assert only.choose().series_used == (mip,)


def test_for_processing_x_rays_are_skipped(tmp_path: Path) -> None:
    study = Study(tmp_path)
    raw = study.image(DX_FOR_PROCESSING_STORAGE, "DX", PresentationIntentType="FOR PROCESSING")
    intent = study.image(DX_IMAGE_STORAGE, "DX", PresentationIntentType="FOR PROCESSING")
    shown = study.image(DX_IMAGE_STORAGE, "DX", PresentationIntentType="FOR PRESENTATION")
    selection = study.choose()
    assert selection.series_used == (shown,)
    reasons = _reasons(selection)
    assert reasons[raw] == "DX FOR PROCESSING"
    assert reasons[intent] == "FOR PROCESSING (Presentation Intent Type)"


def test_one_diagnostic_series_is_chosen_by_preference_then_slices(tmp_path: Path) -> None:
    study = Study(tmp_path)
    thin = study.ct_series(30, number=2, ImageType=AXIAL, SeriesDescription="Thorax 1.0 B70f")
    soft = study.ct_series(20, number=3, ImageType=AXIAL, SeriesDescription="CTPA arterial")
    # without a preference, the series with more slices
    plain = study.choose()
    assert plain.series_used == (thin,)
    assert _reasons(plain)[soft] == "not the preferred diagnostic series"
    # a keyword of the label set, as a whole word and in any case, wins over slice count
    prefer = SeriesPreference(modalities=("CT",), keywords=("ctpa",))
    assert study.choose(prefer=prefer).series_used == (soft,)
    # a keyword inside a word is no match ("thor" in "Thorax")
    assert study.choose(prefer=SeriesPreference(keywords=("thor",))).series_used == (thin,)
    # body part compared whole
    head = study.ct_series(5, number=4, ImageType=AXIAL, BodyPartExamined="LUNG")
    chosen = study.choose(prefer=SeriesPreference(body_parts=("lung",)))
    assert chosen.series_used == (head,) and len(chosen.images) == 4


def test_series_of_other_modalities_than_the_label_sets_are_skipped(tmp_path: Path) -> None:
    study = Study(tmp_path)
    chest = study.image(CR, "CR")
    ct = study.ct_series(10, ImageType=AXIAL)
    selection = study.choose(prefer=SeriesPreference(modalities=("CR", "DX")))
    assert selection.series_used == (chest,)
    assert _reasons(selection)[ct] == "modality CT is not the label set's"
    # with no series of its modalities, the preference does not empty the study
    assert study.choose(prefer=SeriesPreference(modalities=("MG",))).series_used != ()


def test_projection_images_are_all_kept_then_capped(tmp_path: Path) -> None:
    study = Study(tmp_path)
    chest = generate_uid()
    for n in range(1, 4):
        study.image(CR, "CR", series=chest, InstanceNumber=n)
    breast = study.image(MG, "MG")
    both = study.choose(cap=32)
    assert len(both.images) == 4 and set(both.series_used) == {chest, breast}
    capped = study.choose(cap=3)
    assert len(capped.images) == 3
    over = [s for s in capped.skipped if s.reason == "over the per-study image cap (3)"]
    assert [(s.instances) for s in over] == [1]


def test_the_cap_spreads_a_volumes_slices(tmp_path: Path) -> None:
    study = Study(tmp_path)
    study.ct_series(40, ImageType=AXIAL)
    selection = study.choose(k=16, cap=4)
    numbers = {r.sop_instance_uid: r.instance_number for r in study.records}
    # evenly spaced over the volume, not its first four slices
    assert [numbers[i.ref.sop_instance_uid] for i in selection.images] == [6, 16, 26, 36]


def test_an_unreadable_header_skips_that_image_with_a_reason(tmp_path: Path) -> None:
    study = Study(tmp_path)
    chest = generate_uid()
    good = study.add(header_only(CR, study.uid, chest, "CR", InstanceNumber=1))
    bad = study.add(header_only(CR, study.uid, chest, "CR", InstanceNumber=2))
    bad.path.write_bytes(b"\x00" * 10)
    missing = study.add(header_only(CR, study.uid, chest, "CR", InstanceNumber=3))
    missing.path.unlink()
    selection = study.choose()
    assert [i.ref.sop_instance_uid for i in selection.images] == [good.sop_instance_uid]
    unreadable = [s for s in selection.skipped if s.reason.startswith("header unreadable")]
    assert sum(s.instances for s in unreadable) == 2
    assert {s.series_uid for s in unreadable} == {chest}


def test_a_long_ct_series_costs_few_header_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = Study(tmp_path)
    study.ct_series(60, number=1, ImageType=AXIAL)
    study.ct_series(50, number=2, ImageType=AXIAL)
    reads: list[Path] = []
    real = select_module.read_image_header

    def counting(path: Path):  # type: ignore[no-untyped-def]
        reads.append(path)
        return real(path)

    monkeypatch.setattr(select_module, "read_image_header", counting)
    selection = study.choose(k=4)
    assert len(selection.images) == 4
    assert len(reads) <= 2 + 4  # one per series, then the four chosen slices


def test_a_localizer_slice_inside_the_chosen_series_is_dropped(tmp_path: Path) -> None:
    study = Study(tmp_path)
    series = generate_uid()
    for i in range(8):
        image_type = ["ORIGINAL", "PRIMARY", "LOCALIZER" if i == 1 else "AXIAL"]
        study.add(ct_slice(study.uid, series, i, size=4, ImageType=image_type))
    selection = study.choose(k=4)  # evenly spaced: slices 1, 3, 5, 7 (instance 2 is a scout)
    assert len(selection.images) == 3 and selection.series_used == (series,)
    assert (series, 1, "localizer (ImageType LOCALIZER)") in [
        (s.series_uid, s.instances, s.reason) for s in selection.skipped
    ]


def test_non_images_and_the_nodes_own_output_are_skipped_with_reasons(tmp_path: Path) -> None:
    study = Study(tmp_path)
    chest = study.image(CR, "CR")
    sr = study.image(COMPREHENSIVE_SR, "SR")
    ko = study.image(KEY_OBJECT, "KO")
    pr = study.image(GSPS, "PR")
    rt = study.image(RT_STRUCT, "RTSTRUCT")
    own = study.image(SC, "OT", Manufacturer="triagenode")
    marked = study.image(SC, "OT", SeriesDescription="TRIAGENODE AI findings")
    selection = study.choose()
    assert selection.series_used == (chest,)
    reasons = _reasons(selection)
    assert reasons[sr] == "not an image (Comprehensive SR Storage)"
    assert reasons[ko].startswith("not an image") and reasons[pr].startswith("not an image")
    assert reasons[rt].startswith("not an image")
    assert reasons[own] == reasons[marked] == "the node's own output"


def test_multiframe_objects_contribute_evenly_spaced_frames(tmp_path: Path) -> None:
    study = Study(tmp_path)
    study.image(
        ENHANCED_MR, "MR", NumberOfFrames=40, ImageType=["ORIGINAL", "PRIMARY", "M", "NONE"]
    )
    cine = study.image(US_MULTIFRAME, "US", NumberOfFrames=10)
    selection = study.choose(k=4)
    frames = [(i.ref.series_uid == cine, i.ref.frame) for i in selection.images]
    # the volume first, then the projection cine; frames are 1-based
    assert frames == [(False, 6), (False, 16), (False, 26), (False, 36)] + [
        (True, f) for f in (2, 4, 7, 9)
    ]


def test_selection_is_deterministic_and_the_old_interface_still_works(tmp_path: Path) -> None:
    study = Study(tmp_path)
    study.ct_series(12, number=1, ImageType=AXIAL)
    study.ct_series(12, number=2, ImageType=AXIAL)
    first = study.choose()
    study.records.reverse()
    assert study.choose() == first
    assert select_images(study.records, 4) == list(first.images)
    with pytest.raises(ValueError, match="max_images"):
        choose_images(study.records, slices_per_series=4, max_images=0)
