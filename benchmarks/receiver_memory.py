"""Receiver memory benchmark: how much one very large instance raises the node's RSS.

Writes one CT-like instance of about 1 GB (``--megabytes``) and sends it to the node's
:class:`~triagenode.scp.receiver.DicomReceiver`, running in this process, with each sender
setting that changes how the bytes arrive:

- DCMTK ``storescu``, node at its default ``scp.max_pdu`` (PDUs of at most 256 KiB);
- pynetdicom, node at ``scp.max_pdu = 0`` (unlimited): the whole dataset in one PDV;
- pynetdicom, node at 16 KiB: some 65,000 PDUs;
- a scripted peer ignoring the negotiated maximum (one 1 GB P-DATA-TF): aborted at once;
- a scripted peer sending 512 MB of command fragments: aborted at the command cap.

A thread samples this process's resident set every 5 ms; the script prints the peak rise
over the RSS just before each send. The goal (issue 12): under 64 MB for every row.

Usage::

    python benchmarks/receiver_memory.py [--megabytes 1024] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import DCMTK_ENV, STORESCU, free_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

_PAGE = os.sysconf("SC_PAGE_SIZE")
NODE_AE = "TRIAGENODE"


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


class PeakRss:
    """Samples RSS in a thread; ``rise`` is the peak over the RSS at start."""

    def __init__(self) -> None:
        self.start = rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        return self.peak - self.start


def make_instance(path: Path, megabytes: int) -> tuple[str, int]:
    """A CT-like Part 10 file whose Pixel Data is ``megabytes`` MiB; (SOP UID, size)."""
    frames = max(1, megabytes // 512)
    side = int((megabytes * 1024 * 1024 // frames // 2) ** 0.5)
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "MEMBENCH"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    pixels = side * side * frames * 2
    block = os.urandom(1024 * 1024)
    with open(path, "ab") as out:
        out.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", pixels))
        left = pixels
        while left:
            step = min(left, len(block))
            out.write(block[:step])
            left -= step
    return str(ds.SOPInstanceUID), path.stat().st_size


def storescu(port: int, path: Path) -> str:
    done = subprocess.run(
        [STORESCU, "-aec", NODE_AE, "127.0.0.1", str(port), str(path)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return "ok" if done.returncode == 0 else f"storescu failed: {done.stderr[-300:]}"


_PYNETDICOM_SENDER = """
import sys
from pynetdicom import AE, _config
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
_config.STORE_SEND_CHUNKED_DATASET = True  # the sender streams from its file
ae = AE(ae_title="PYNET")
ae.maximum_pdu_size = 0
ae.dimse_timeout = ae.network_timeout = 900
ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="TRIAGENODE")
status = assoc.send_c_store(sys.argv[2]).Status
assoc.release()
print(hex(status))
"""


def pynetdicom(port: int, path: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _PYNETDICOM_SENDER, str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return "ok" if done.stdout.strip() == "0x0" else f"pynetdicom: {done.stdout}{done.stderr}"


def _associate(port: int) -> socket.socket:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.bad_peer import associate_rq

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(associate_rq(calling="HOSTILE"))
    assert sock.recv(6)[:1] == b"\x02"
    return sock


def oversized_pdu(port: int, path: Path) -> str:
    """One P-DATA-TF of the file's size, ignoring the negotiated maximum."""
    sock = _associate(port)
    try:
        sock.recv(65536)
        size = path.stat().st_size
        sock.sendall(struct.pack(">BxI", 0x04, size) + struct.pack(">IBB", size - 4, 1, 0))
        with open(path, "rb") as source:
            while chunk := source.read(1 << 20):
                sock.sendall(chunk)
        return "not aborted"
    except OSError:
        return "ok (aborted)"
    finally:
        sock.close()


def command_flood(port: int, path: Path) -> str:
    """512 MB of command fragments that never end."""
    sock = _associate(port)
    fragment = struct.pack(">BxI", 0x04, 65536 + 6) + struct.pack(">IBB", 65536 + 2, 1, 0x01)
    fragment += bytes(65536)
    try:
        sock.recv(65536)
        for _ in range(512 * 1024 * 1024 // 65536):
            sock.sendall(fragment)
        return "not aborted"
    except OSError:
        return "ok (aborted)"
    finally:
        sock.close()


def run_case(
    name: str,
    work: Path,
    path: Path,
    max_pdu: int,
    sender: Callable[[int, Path], str],
) -> dict[str, object]:
    from triagenode.audit.events import AuditLog
    from triagenode.config.settings import load_settings
    from triagenode.scp.receiver import DicomReceiver
    from triagenode.store import migrate
    from triagenode.store.db import Database

    data = work / f"node-{name}"
    scp: dict[str, object] = {"host": "127.0.0.1", "port": free_port()}
    if max_pdu >= 0:
        scp["max_pdu"] = max_pdu
    settings = load_settings(
        None,
        node={"data_dir": str(data)},
        scp=scp,
        audit={"secret": "benchmark-secret-0123456789"},
    )
    db = Database(settings.database_url)
    migrate.upgrade(db)
    receiver = DicomReceiver(settings, db, AuditLog(db, b"benchmark-secret-0123456789"))
    receiver.start()
    try:
        sampler = PeakRss()
        started = time.perf_counter()
        outcome = sender(receiver.port, path)
        seconds = time.perf_counter() - started
        rise = sampler.stop()
    finally:
        receiver.stop()
        db.dispose()
    stored = sum(1 for _ in (data / "spool").rglob("*.dcm"))
    shutil.rmtree(data)
    return {
        "case": name,
        "node_max_pdu": settings.scp.max_pdu,
        "outcome": outcome,
        "stored": stored,
        "seconds": round(seconds, 1),
        "rss_rise_mb": round(rise / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=1024, help="pixel data, MiB")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="tn-mem-") as tmp:
        work = Path(tmp)
        path = work / "large.dcm"
        _, size = make_instance(path, args.megabytes)
        print(f"instance: {size / 1e6:.0f} MB")
        cases = [
            ("storescu, default max_pdu", -1, storescu),
            ("pynetdicom, max_pdu 0 (one PDV)", 0, pynetdicom),
            ("pynetdicom, max_pdu 16 KiB", 16384, pynetdicom),
            ("hostile: one PDU over the maximum", -1, oversized_pdu),
            ("hostile: 512 MB of command fragments", -1, command_flood),
        ]
        results = []
        for index, (name, max_pdu, sender) in enumerate(cases):
            result = run_case(f"case{index}", work, path, max_pdu, sender)
            result["case"] = name
            results.append(result)
            print(
                f"{name:40s} node max_pdu {result['node_max_pdu']:>7}  {result['outcome']:14s} "
                f"stored {result['stored']}  {result['seconds']:6.1f} s  "
                f"RSS rise {result['rss_rise_mb']:6.1f} MB"
            )
        worst = max(float(r["rss_rise_mb"]) for r in results)  # type: ignore[arg-type]
        print(f"largest RSS rise: {worst:.1f} MB (goal: under 64 MB)")
    if args.json is not None:
        args.json.write_text(json.dumps({"instance_bytes": size, "results": results}, indent=2))
    return 0 if worst < 64 else 1


if __name__ == "__main__":
    sys.exit(main())
