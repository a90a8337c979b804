"""The spool: Part 10 files written atomically, nothing left behind on failure."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests import factory
from triagenode.store.part10 import file_meta_bytes
from triagenode.store.spool import Spool, SpoolError, is_path_safe_uid


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_commit_writes_a_readable_part10_file(tmp_path: Path) -> None:
    ds = factory.ct_slice(generate_uid(), generate_uid(), 0)
    body = encoded(ds)
    spool = Spool(tmp_path)
    spool.prepare()
    incoming = spool.open_instance()
    incoming.write_meta(
        file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "SENDER")
    )
    for start in range(0, len(body), 1000):  # arrives in fragments
        incoming.write(body[start : start + 1000])
    stored = incoming.commit(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    incoming.settle()

    path = tmp_path / stored.relative_path
    assert stored.relative_path.startswith(f"spool/{ds.StudyInstanceUID}/")
    assert path.read_bytes().endswith(body)
    assert stored.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stored.dataset_size == len(body) and stored.size == path.stat().st_size
    back = pydicom.dcmread(path)
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.SourceApplicationEntityTitle == "SENDER"
    assert back.PatientID == ds.PatientID
    assert list(spool.incoming.iterdir()) == []


def test_discard_and_revert_leave_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    incoming = spool.open_instance()
    incoming.write(b"partial")
    incoming.discard()
    assert list(spool.incoming.iterdir()) == []

    incoming = spool.open_instance()
    incoming.write(b"first")
    first = incoming.commit("1.2.3", "1.2.3.4", "1.2.3.4.5")
    incoming.settle()
    again = spool.open_instance()
    again.write(b"second")
    second = again.commit("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert second.replaced
    again.revert()  # the database refused it: the older copy comes back
    assert (tmp_path / first.relative_path).read_bytes() == b"first"
    assert list(spool.incoming.iterdir()) == []


def test_leftover_temp_files_removed_at_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    spool.open_instance().write(b"crash")
    assert Spool(tmp_path).prepare() == 1


@pytest.mark.parametrize("uid", ["../etc", "1.2/3", "", "1.2.3..4", "a.b"])
def test_unsafe_uids_are_refused(tmp_path: Path, uid: str) -> None:
    assert not is_path_safe_uid(uid)
    spool = Spool(tmp_path)
    spool.prepare()
    incoming = spool.open_instance()
    with pytest.raises(SpoolError):
        incoming.commit(uid, "1.2", "1.2.3")
    assert list(spool.incoming.iterdir()) == []
