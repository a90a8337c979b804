"""The receiver's quick header scan agrees with pydicom on every bundled test file."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from triagenode.scp import header
from triagenode.scp.header import HEAD_BYTES, parse_header
from triagenode.scp.structure import IncompleteDataset, check_complete


def _part10_files() -> list[Path]:
    # The files shipped inside pydicom's package only: nothing is downloaded.
    folder = Path(pydicom.data.__file__).parent / "test_files"
    return [p for p in sorted(folder.rglob("*.dcm")) if p.read_bytes()[128:132] == b"DICM"]


def _expected(path: Path) -> tuple[object, ...] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            return None
    text = header._str
    return (
        text(ds.get("StudyInstanceUID")),
        text(ds.get("SeriesInstanceUID")),
        text(ds.get("SOPInstanceUID")),
        text(ds.get("PatientID")),
        text(ds.get("Modality")),
        header._int(ds.get("InstanceNumber")),
        header._int(ds.get("NumberOfFrames")),
        header.triage_inputs(ds, 2, "CT1"),
    )


def test_scan_agrees_with_pydicom() -> None:
    compared = 0
    for path in _part10_files():
        expected = _expected(path)
        if expected is None:
            continue
        raw = path.read_bytes()
        meta_end = 144 + struct.unpack_from("<I", raw, 140)[0]
        meta, body = raw[:meta_end], raw[meta_end:]
        meta_ds = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        if "TransferSyntaxUID" not in meta_ds:
            continue
        syntax = str(meta_ds.TransferSyntaxUID)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = parse_header(
                meta, body[:HEAD_BYTES], len(body) <= HEAD_BYTES, syntax, path, 2, "CT1"
            )
        assert (
            got.study_uid,
            got.series_uid,
            got.sop_instance_uid,
            got.patient_id,
            got.modality,
            got.instance_number,
            got.number_of_frames,
            got.triage_inputs,
        ) == expected, path.name
        compared += 1
    assert compared > 50


def test_scan_refuses_what_it_does_not_handle() -> None:
    with pytest.raises(header._NeedsPydicom):
        header._scan(b"\x08\x00\x16\x00\x1a\x00\x00\x00", "1.2.840.10008.1.2.1")  # no VR
    with pytest.raises(header._NeedsPydicom):
        header._scan(b"", "1.2.840.10008.1.2.2")  # big endian


def _syntax(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_completeness_check_passes_whole_files_and_refuses_every_cut_one(tmp_path: Path) -> None:
    checked = 0
    for path in _part10_files():
        raw = path.read_bytes()
        if raw[132:136] != b"\x02\x00\x00\x00":  # no group length: no simple meta end
            continue
        try:
            syntax = _syntax(path)
        except Exception:
            continue
        meta_end = 144 + struct.unpack_from("<I", raw, 140)[0]
        body = raw[meta_end:]
        if "truncated" in path.name:  # pydicom's deliberately cut files
            with pytest.raises(IncompleteDataset):
                check_complete(body[:HEAD_BYTES], len(body), syntax, path, meta_end)
            continue
        check_complete(body[:HEAD_BYTES], len(body), syntax, path, meta_end)
        # The last byte gone: the last element (or the deflate stream) ends early.
        cut = tmp_path / "cut.dcm"
        cut.write_bytes(
            raw[:-1] if syntax != DeflatedExplicitVRLittleEndian else raw[: meta_end + 100]
        )
        size = cut.stat().st_size - meta_end
        with pytest.raises(IncompleteDataset):
            check_complete(body[: min(HEAD_BYTES, size)], size, syntax, cut, meta_end)
        checked += 1
    assert checked > 50


def test_large_deflated_dataset_header_is_read_by_streaming(tmp_path: Path) -> None:
    """Compressed far beyond the kept 64 KiB, header beyond it too once inflated."""
    import numpy as np
    from pydicom.uid import generate_uid

    from tests import factory

    ds = factory.ct_slice(generate_uid(), generate_uid(), 0, size=400)
    rng = np.random.default_rng(1)
    ds.add_new(0x00091010, "OB", rng.bytes(300_000))  # a large private element first
    path = factory.write(ds, tmp_path / "dfl.dcm", DeflatedExplicitVRLittleEndian)
    raw = path.read_bytes()
    meta_end = 144 + struct.unpack_from("<I", raw, 140)[0]
    body = raw[meta_end:]
    assert len(body) > 4 * HEAD_BYTES
    syntax = str(DeflatedExplicitVRLittleEndian)
    check_complete(body[:HEAD_BYTES], len(body), syntax, path, meta_end)
    got = parse_header(raw[:meta_end], body[:HEAD_BYTES], False, syntax, path, None, "CT1")
    assert (got.sop_instance_uid, got.study_uid) == (ds.SOPInstanceUID, ds.StudyInstanceUID)
    assert got.modality == "CT"
