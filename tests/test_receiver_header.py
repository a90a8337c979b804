"""The receiver's quick header scan agrees with pydicom on every bundled test file."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest

from triagenode.scp import header
from triagenode.scp.header import HEAD_BYTES, parse_header


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
