"""The spool: Part 10 files written atomically, nothing left behind on failure."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
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


def temp_files(spool: Spool) -> list[str]:
    """The temp files of every process's folder under ``spool/.incoming`` (claims aside)."""
    return sorted(
        str(path.relative_to(spool.incoming))
        for path in spool.incoming.rglob("*")
        if path.is_file() and path.name != ".claim"
    )


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
    assert temp_files(spool) == []


def test_discard_and_revert_leave_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    incoming = spool.open_instance()
    incoming.write(b"partial")
    incoming.discard()
    assert temp_files(spool) == []

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
    assert temp_files(spool) == []


def test_leftover_temp_files_removed_at_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    spool.open_instance().write(b"crash")
    del spool  # as if its process ended: nobody holds its temp folder any more
    (tmp_path / "spool" / ".incoming" / "old-layout.part").write_bytes(b"x")
    again = Spool(tmp_path)
    assert again.prepare() == 2
    assert temp_files(again) == []


def test_start_beside_a_live_receiver_keeps_its_temp_files(tmp_path: Path) -> None:
    """Receivers sharing a spool: a restart removes only the temp files of those gone."""
    live = Spool(tmp_path)
    live.prepare()
    receiving = live.open_instance()
    receiving.write(b"arriving")
    assert Spool(tmp_path).prepare() == 0
    assert receiving.temp_path.read_bytes() == b"arriving"
    receiving.commit("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert (tmp_path / "spool/1.2.3/1.2.3.4/1.2.3.4.5.dcm").read_bytes() == b"arriving"
    live.release()
    assert not live.temp.exists()


RECEIVING_PROCESS = """
import sys
from triagenode.store.spool import Spool
spool = Spool(sys.argv[1])
spool.prepare()
spool.open_instance().write(b"in flight")
print("receiving", flush=True)
sys.stdin.read()  # until the test closes stdin or kills it
"""


@pytest.mark.slow
def test_temp_files_of_another_live_process_survive_its_neighbours_start(
    tmp_path: Path,
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", RECEIVING_PROCESS, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "receiving\n"
        (theirs,) = temp_files(Spool(tmp_path))
        assert Spool(tmp_path).prepare() == 0
        assert temp_files(Spool(tmp_path)) == [theirs]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert Spool(tmp_path).prepare() == 1  # its process is gone: its lock went with it
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize("uid", ["../etc", "1.2/3", "", "1.2.3..4", "a.b"])
def test_unsafe_uids_are_refused(tmp_path: Path, uid: str) -> None:
    assert not is_path_safe_uid(uid)
    spool = Spool(tmp_path)
    spool.prepare()
    incoming = spool.open_instance()
    with pytest.raises(SpoolError):
        incoming.commit(uid, "1.2", "1.2.3")
    assert temp_files(spool) == []
