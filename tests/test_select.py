"""Image selection: which instances of a study are classified."""

from __future__ import annotations

from pathlib import Path

from triagenode.inference.select import InstanceRecord, evenly_spaced, select_images

CT = "1.2.840.10008.5.1.4.1.1.2"
CR = "1.2.840.10008.5.1.4.1.1.1"
MG = "1.2.840.10008.5.1.4.1.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
KEY_OBJECT = "1.2.840.10008.5.1.4.1.1.88.59"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def _record(
    sop_class: str,
    uid: str,
    series: str,
    modality: str,
    number: int | None = 1,
    frames: int = 1,
    **extra: str,
) -> InstanceRecord:
    return InstanceRecord(
        sop_class, uid, series, modality, number, frames, Path(f"/{uid}"), **extra
    )


def test_evenly_spaced_takes_the_centre_of_each_stratum() -> None:
    assert evenly_spaced(10, 3) == [1, 5, 8]
    assert evenly_spaced(3, 8) == [0, 1, 2]
    assert evenly_spaced(100, 4) == [12, 37, 62, 87]
    assert evenly_spaced(0, 4) == [] and evenly_spaced(5, 0) == []


def test_ct_series_is_subsampled_by_instance_number() -> None:
    # stored out of order: selection sorts by InstanceNumber first
    records = [_record(CT, f"ct{n:02d}", "s1", "CT", n) for n in reversed(range(1, 21))]
    chosen = select_images(records, 4)
    assert [c.ref.sop_instance_uid for c in chosen] == ["ct03", "ct08", "ct13", "ct18"]
    assert all(c.ref.frame is None for c in chosen)


def test_projection_images_are_all_kept_and_non_images_skipped() -> None:
    records = [
        _record(CR, "cr1", "s1", "CR"),
        _record(CR, "cr2", "s1", "CR", 2),
        _record(MG, "mg1", "s2", "MG"),
        _record(SC, "sc1", "s3", "OT"),
        _record(COMPREHENSIVE_SR, "sr1", "s4", "SR"),
        _record(KEY_OBJECT, "ko1", "s5", "KO"),
        _record(GSPS, "pr1", "s6", "PR"),
        _record(RT_STRUCT, "rt1", "s7", "RTSTRUCT"),
    ]
    uids = [c.ref.sop_instance_uid for c in select_images(records, 2)]
    assert uids == ["cr1", "cr2", "mg1", "sc1"]


def test_the_nodes_own_output_is_never_reingested() -> None:
    records = [
        _record(SC, "own1", "s1", "OT", manufacturer="triagenode"),
        _record(SC, "own2", "s2", "OT", series_description="TRIAGENODE AI findings"),
        _record(SC, "other", "s3", "OT", manufacturer="ACME"),
    ]
    assert [c.ref.sop_instance_uid for c in select_images(records, 2)] == ["other"]


def test_multiframe_objects_contribute_evenly_spaced_frames() -> None:
    records = [_record(ENHANCED_MR, "mf", "s1", "MR", frames=40)]
    chosen = select_images(records, 4)
    assert [c.ref.frame for c in chosen] == [6, 16, 26, 36]
    assert {c.path for c in chosen} == {Path("/mf")}
