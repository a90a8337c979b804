"""TID 1500 SRs: valid for dciodvfy, dsrdump and dsr2html, and read back the same."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests import factory, peers
from tests.sr_cases import ct_result, demo_cr_result
from triagenode.domain import DEMO_WARNING, Priority, StudyResult
from triagenode.errors import DicomInputError
from triagenode.reports import (
    SR_SERIES_NUMBER,
    build_sr,
    device_uid,
    summarize_sr,
    write_sr,
)
from triagenode.reports.content import unique_images

CASES = {"demo-cr": demo_cr_result, "ct-critical": ct_result}


@pytest.fixture(params=sorted(CASES))
def written(request: pytest.FixtureRequest, make_settings) -> tuple[StudyResult, Path, object]:
    settings = make_settings()
    result, source = CASES[request.param]()
    path = write_sr(build_sr(result, source, settings, run=1), settings, result=result)
    return result, path, source


def test_dciodvfy_reports_no_errors(written) -> None:
    _result, path, _source = written
    run = peers.run_tool("dciodvfy", str(path))
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], "\n".join(lines)
    assert "Comprehensive3DSR" in run.stdout + run.stderr
    # The only warning expected is dciodvfy not knowing our declared private scheme.
    warnings = [line for line in lines if line.startswith("Warning")]
    assert all("99TRIAGENODE" in line for line in warnings), warnings


def test_dsrdump_reads_without_errors(written) -> None:
    result, path, _source = written
    run = peers.run_tool("dsrdump", "+Pl", str(path))
    assert run.returncode == 0, run.stderr
    assert "E:" not in run.stderr, run.stderr
    assert "Imaging Measurement Report" in run.stdout
    for finding in result.findings:
        assert finding.code_meaning in run.stdout
    assert "Completion Flag     : COMPLETE" in run.stdout
    assert "Verification Flag   : UNVERIFIED" in run.stdout


def test_dsr2html_renders(written, tmp_path: Path) -> None:
    result, path, _source = written
    html = tmp_path / "sr.html"
    run = peers.run_tool("dsr2html", str(path), str(html))
    assert run.returncode == 0, run.stderr
    text = html.read_text(encoding="utf-8", errors="replace")
    assert "AI triage, not a diagnosis" in text
    for finding in result.findings:
        assert finding.code_meaning in text
    assert (DEMO_WARNING in text) == result.model.is_demo


def test_srread_reads_back_findings_scores_and_references(written) -> None:
    result, path, _source = written
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    summary = summarize_sr(sr)
    assert [f.name for f in summary.findings] == [f.name for f in result.findings]
    for expected in result.findings:
        got = summary.finding(expected.name)
        assert (got.code_scheme, got.code_value, got.code_meaning) == (
            expected.code_scheme,
            expected.code_value,
            expected.code_meaning,
        )
        assert got.present is expected.present
        assert got.score == pytest.approx(expected.score, abs=1e-6)
        assert got.calibrated is expected.calibrated
        refs = expected.images or result.images_used
        assert got.images == tuple(
            (uid, frames) for uid, (_ref, frames) in unique_images(refs).items()
        )
    assert summary.priority is result.priority
    assert summary.critical is result.flagged
    assert summary.library_images == tuple(unique_images(result.images_used))
    assert f"weights_sha256={result.model.weights_sha256}" in summary.algorithm_parameters
    assert f"label_set={result.label_set}" in summary.algorithm_parameters
    assert any(p.startswith("thresholds=") for p in summary.algorithm_parameters)
    assert summary.algorithm_version == result.model.version


def test_header_places_sr_in_source_study_and_new_series(written) -> None:
    result, path, source = written
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == source.StudyInstanceUID == result.study_uid
    assert ds.PatientID == source.PatientID
    assert ds.PatientName == source.PatientName
    assert ds.AccessionNumber == source.AccessionNumber
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SeriesNumber == SR_SERIES_NUMBER
    assert ds.Modality == "SR"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.VerificationFlag == "UNVERIFIED"
    expected = "DEMO, NOT FOR CLINICAL USE" if result.model.is_demo else "not for diagnostic use"
    assert ds.SeriesDescription.endswith(expected)
    assert "99TRIAGENODE" in {
        i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence
    }
    manufacturers = {i.Manufacturer for i in ds.ContributingEquipmentSequence}
    assert "triagenode" in manufacturers
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert set(unique_images(result.images_used)) <= referenced


def test_json_twin_beside_sr(written) -> None:
    result, path, _source = written
    data = json.loads(path.with_suffix(".json").read_text())
    ds = pydicom.dcmread(path)
    assert data["sr"]["sop_instance_uid"] == ds.SOPInstanceUID == path.stem
    assert path.parent.name == result.study_uid
    assert [f["score"] for f in data["findings"]] == [f.score for f in result.findings]
    assert [f["calibrated"] for f in data["findings"]] == [f.calibrated for f in result.findings]
    assert data["model"]["weights_sha256"] == result.model.weights_sha256
    assert data["priority"] == result.priority.name
    assert len(data["images_failed"]) == len(result.images_failed)
    assert ("warning" in data) == result.model.is_demo
    text = path.with_suffix(".json").read_text()
    assert factory.PATIENT_ID not in text and "Quokkafeather" not in text
    assert not list(path.parent.glob(".*tmp"))


def test_uids_are_deterministic_per_study_model_and_run(make_settings) -> None:
    settings = make_settings()
    result, source = ct_result()
    first = build_sr(result, source, settings, run=1)
    again = build_sr(result, source, settings, run=1)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    assert summarize_sr(first).findings == summarize_sr(again).findings  # same tracking UIDs
    rerun = build_sr(result, source, settings, run=2)
    other_model = build_sr(
        replace(result, model=replace(result.model, weights_sha256="c" * 64)),
        source,
        settings,
        run=1,
    )
    uids = {first.SOPInstanceUID, rerun.SOPInstanceUID, other_model.SOPInstanceUID}
    assert len(uids) == 3
    # runs of one model are instances of one series, numbered by run
    assert rerun.SeriesInstanceUID == first.SeriesInstanceUID != other_model.SeriesInstanceUID
    assert (first.InstanceNumber, rerun.InstanceNumber) == (1, 2)
    assert first.SOPInstanceUID.startswith(settings.node.uid_root + ".")


def test_device_uid_is_stable_per_installation(make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    assert device_uid(settings) == device_uid(settings)
    other = make_settings(node={"data_dir": str(tmp_path / "other")})
    assert device_uid(other) != device_uid(settings)
    result, source = demo_cr_result()
    assert summarize_sr(build_sr(result, source, settings, run=1)).device_uid == device_uid(
        settings
    )


def test_critical_and_priority_are_coded(make_settings) -> None:
    settings = make_settings()
    result, source = ct_result()
    summary = summarize_sr(build_sr(result, source, settings, run=1))
    assert summary.critical is True and summary.priority is Priority.stat
    text = summary.summary or ""
    assert "AI flags: Intracranial hemorrhage (CRITICAL) probability 0.93 (threshold 0.40)" in text
    assert f"Priority STAT (rule {result.priority_rule})" in text
    calm = replace(
        result,
        findings=tuple(replace(f, critical=False, escalates=False) for f in result.findings),
        priority=Priority.low,
        priority_rule=None,
    )
    calm_summary = summarize_sr(build_sr(calm, source, settings, run=1))
    assert calm_summary.critical is False and calm_summary.priority is Priority.low
    assert "Priority LOW (no triage rule matched)" in (calm_summary.summary or "")


def test_summary_reads_as_scores_until_calibrated(make_settings) -> None:
    settings = make_settings()
    result, source = demo_cr_result()
    text = summarize_sr(build_sr(result, source, settings, run=1)).summary or ""
    assert text.startswith("DEMO, NOT FOR CLINICAL USE. AI flags: Pleural effusion score 0.64")
    assert "Cardiomegaly score 0.57 (threshold 0.50)" in text
    assert "Scores are not probabilities; AI triage, not a diagnosis." in text
    assert "probability" not in text
    nothing = replace(result, findings=tuple(replace(f, present=False) for f in result.findings))
    quiet = summarize_sr(build_sr(nothing, source, settings, run=1)).summary or ""
    assert "AI flags nothing above threshold (checked: Pneumothorax, Pleural effusion," in quiet


def test_summary_comes_first_in_the_content_tree(written) -> None:
    """Text viewers (dsrdump, dsr2html, Weasis) render the tree in order."""
    _result, path, _source = written
    run = peers.run_tool("dsrdump", str(path))
    assert run.returncode == 0, run.stderr
    tree = run.stdout[run.stdout.index("<CONTAINER:") :]
    summary = tree.index('"Summary")=')
    assert summary < tree.index('"Image Library")') < tree.index('"Imaging Measurements")')
    before = tree[:summary]
    assert '"Qualitative Evaluations")' in before and '"Measurement Group")' not in before


def test_flagged_critical_without_calibrated_threshold_is_not_escalated(make_settings) -> None:
    settings = make_settings()
    result, source = ct_result()
    flagged = replace(
        result,
        findings=tuple(replace(f, escalates=False) for f in result.findings),
        priority=Priority.routine,
        priority_rule=None,
    )
    assert flagged.flagged and not flagged.critical
    summary = summarize_sr(build_sr(flagged, source, settings, run=1))
    assert summary.critical is True and summary.priority is Priority.routine
    assert "flagged but not escalated: its threshold is not site-calibrated" in (
        summary.summary or ""
    )


def test_refuses_result_without_findings_or_source_of_other_study(make_settings) -> None:
    settings = make_settings()
    result, source = demo_cr_result()
    with pytest.raises(DicomInputError, match="no findings"):
        build_sr(replace(result, findings=()), source, settings, run=1)
    with pytest.raises(DicomInputError, match="belongs to study"):
        build_sr(result, factory.cr_image(), settings, run=1)


def test_no_phi_in_logs(make_settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="triagenode")
    settings = make_settings()
    result, source = ct_result()
    write_sr(build_sr(result, source, settings, run=1), settings, result=result)
    assert "built SR" in caplog.text
    for phi in (factory.PATIENT_ID, "Quokkafeather", factory.BIRTH_DATE, "ACC-5521-QX"):
        assert phi not in caplog.text


def test_write_sr_keeps_a_relative_data_dir_relative(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = make_settings(node={"data_dir": "relative-data"})
    result, source = demo_cr_result()
    sr = build_sr(result, source, settings, run=3)
    path = write_sr(sr, settings)
    assert path.relative_to(settings.node.data_dir) == Path(
        "results", result.study_uid, f"{sr.SOPInstanceUID}.dcm"
    )
    assert pydicom.dcmread(path).InstanceNumber == 3
    assert not path.with_suffix(".json").exists()  # no result given: no twin


def test_result_to_json_takes_uids_either_way() -> None:
    from triagenode.reports import SrUids, result_to_json

    result, _source = ct_result()
    uids = SrUids(result.study_uid, "2.25.1", "2.25.2")
    by_object = result_to_json(result, uids)
    by_keywords = result_to_json(result, sr_sop_instance_uid="2.25.2", sr_series_uid="2.25.1")
    assert by_object == by_keywords
    assert by_object["sr"] == {"series_instance_uid": "2.25.1", "sop_instance_uid": "2.25.2"}
    assert result_to_json(result)["sr"] is None
    assert json.loads(json.dumps(by_object)) == by_object


def _all_codes(item: pydicom.Dataset):
    for keyword in (
        "ConceptNameCodeSequence",
        "ConceptCodeSequence",
        "MeasurementUnitsCodeSequence",
    ):
        yield from item.get(keyword) or []
    for keyword in ("ContentSequence", "ContentTemplateSequence"):
        for child in item.get(keyword) or []:
            yield from _all_codes(child)


def test_every_private_scheme_is_declared(make_settings, tmp_path: Path) -> None:
    """PS3.16 8: a "99" designator is private and must be in the Coding Scheme
    Identification Sequence, including a site's own finding codes."""
    settings = make_settings()
    result, source = demo_cr_result()
    site = replace(result.findings[0], code_scheme="99MYSITE", code_value="PTX1")
    result = replace(result, findings=(site, *result.findings[1:]))
    sr = build_sr(result, source, settings, run=1)
    used = {str(c.CodingSchemeDesignator) for c in _all_codes(sr)}
    declared = {str(i.CodingSchemeDesignator) for i in sr.CodingSchemeIdentificationSequence}
    private = {d for d in used if d.startswith("99")}
    assert private == {"99MYSITE", "99TRIAGENODE"}
    assert private <= declared
    path = write_sr(sr, settings)
    lines = peers.run_tool("dciodvfy", str(path)).stderr.splitlines()
    assert not [line for line in lines if line.startswith("Error")], lines


@pytest.mark.parametrize(
    "name",
    [
        "chrH31.dcm",
        "chrH32.dcm",
        "chrI2.dcm",
        "chrKoreanMulti.dcm",
        "chrJapMulti.dcm",
        "chrArab.dcm",
        "chrX2.dcm",
        "chrRuss.dcm",
        "chrGreek.dcm",
        "chrFrenMulti.dcm",
    ],
)
def test_sr_for_sources_in_any_character_set(name: str, make_settings) -> None:
    """ISO 2022 IR 87 (Japanese), IR 149 (Korean), GB18030 and the ISO 8859 sets: the SR is
    written in UTF-8 with the names decoded, and dciodvfy finds no error."""
    settings = make_settings()
    from pydicom.data import get_charset_files

    [file] = get_charset_files(name)  # bundled with pydicom: no download
    source = pydicom.dcmread(file)
    result, _ = demo_cr_result()
    result = replace(result, study_uid=source.StudyInstanceUID)
    sr = build_sr(result, source, settings, run=1)
    path = write_sr(sr, settings, result=result)
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == str(source.PatientName)
    assert b"\x1b$B" not in path.read_bytes()  # no ISO 2022 escape sequences left
    run = peers.run_tool("dciodvfy", str(path))
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], run.stderr


def test_legacy_date_and_time_values_and_timezone(make_settings) -> None:
    settings = make_settings()
    result, source = demo_cr_result()
    source.StudyDate = "2004.01.30"
    source.StudyTime = "14:04:38"
    sr = build_sr(result, source, settings, run=1)
    assert (sr.StudyDate, sr.StudyTime) == ("20040130", "140438")
    assert len(sr.TimezoneOffsetFromUTC) == 5 and sr.TimezoneOffsetFromUTC[0] in "+-"
    source.TimezoneOffsetFromUTC = "+0900"
    assert build_sr(result, source, settings, run=1).TimezoneOffsetFromUTC == "+0900"


def test_a_rerun_supersedes_the_earlier_sr(make_settings) -> None:
    settings = make_settings()
    result, source = ct_result()
    first = build_sr(result, source, settings, run=1)
    write_sr(first, settings, result=result)
    second = build_sr(result, source, settings, run=2, predecessors=[first])
    path = write_sr(second, settings, result=result)
    [study] = second.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert json.loads(path.with_suffix(".json").read_text())["supersedes"] == first.SOPInstanceUID
    lines = peers.run_tool("dciodvfy", str(path)).stderr.splitlines()
    assert not [line for line in lines if line.startswith("Error")], lines
