"""Shared pieces of the benchmark scripts: DCMTK peers, ports, synthetic studies.

The scripts run from the repository root as ``python benchmarks/<name>.py``; Python puts
this folder on ``sys.path``, so they import this module as ``common``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

T = TypeVar("T")

# DCMTK_BIN points at DCMTK's tools where they are not installed, e.g. on a machine without
# network: `apt-get download dcmtk libdcmtk17`, `dpkg -x` each into a folder, then set
# DCMTK_BIN=<folder>/usr/bin, LD_LIBRARY_PATH=<folder>/usr/lib/x86_64-linux-gnu and
# DCMDICTPATH=<folder>/usr/share/libdcmtk17/dicom.dic.
DCMTK_BIN = os.environ.get("DCMTK_BIN", "/usr/bin")
STORESCU = f"{DCMTK_BIN}/storescu"
STORESCP = f"{DCMTK_BIN}/storescp"
# DCMTK's tools are 30x slower without TCP_NODELAY (Nagle's algorithm).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    def is_open() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(is_open, timeout, what=f"port {port}")


def wait_for(predicate: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def send(ae_title: str, port: int, paths: list[Path]) -> float:
    """Send ``paths`` with DCMTK ``storescu`` over one association; returns the moment the
    last instance was acknowledged (``time.perf_counter``)."""
    subprocess.run(
        [STORESCU, "-aec", ae_title, "127.0.0.1", str(port), *map(str, paths)],
        env=DCMTK_ENV,
        check=True,
        capture_output=True,
    )
    return time.perf_counter()


def _write(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _header(sop_class: str, study: str, series: str, modality: str, **extra: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientID, ds.PatientName = modality, "BENCH-1", "Bench^Mark"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20261126", "120000", ""
    ds.ReferringPhysicianName, ds.StudyID, ds.SeriesNumber = "", "1", 1
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def _pixels(ds: Dataset, image: np.ndarray, bits_stored: int) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = image.astype(np.uint16).tobytes()


def make_ct_study(
    folder: Path, slices: int = 200, size: int = 512, seed: int = 0, **extra: Any
) -> tuple[str, list[Path]]:
    """A synthetic CT series (12-bit stored, rescaled to HU); random pixels so nothing
    compresses by accident. Returns (study UID, file paths)."""
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(slices):
        ds = _header(CTImageStorage, study, series, "CT", **extra)
        ds.InstanceNumber = i + 1
        ds.BodyPartExamined = extra.get("BodyPartExamined", "CHEST")
        ds.ImagePositionPatient = [0.0, 0.0, i * 1.25]
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        _pixels(ds, rng.integers(0, 4096, size=(size, size), dtype=np.uint16), 12)
        paths.append(_write(ds, folder / f"{i:04d}.dcm"))
    return study, paths


def make_cr_study(
    folder: Path, size: int = 512, seed: int = 0, **extra: Any
) -> tuple[str, list[Path]]:
    """A one-image chest CR study."""
    study = generate_uid()
    ds = _header(CR_IMAGE_STORAGE, study, generate_uid(), "CR", **extra)
    ds.InstanceNumber, ds.BodyPartExamined = 1, "CHEST"
    rng = np.random.default_rng(seed)
    _pixels(ds, rng.integers(0, 4096, size=(size, size), dtype=np.uint16), 12)
    return study, [_write(ds, folder / "cr.dcm")]


def node_settings(
    work: Path, destination: Destination, study: dict[str, Any], model_source: str = "demo"
) -> Any:
    """Settings of a benchmarked node: data in ``work/node``, a free port, no API, SRs to
    ``destination``."""
    from triagenode.config.settings import load_settings

    return load_settings(
        None,
        node={"data_dir": str(work / "node")},
        scp={"port": free_port(), "host": "127.0.0.1"},
        api={"enabled": False},
        study=study,
        model={"source": model_source},
        destinations=[destination.as_setting()],
    )


class Destination:
    """DCMTK ``storescp`` as the PACS that receives the node's SRs."""

    def __init__(self, folder: Path, ae_title: str = "BENCHPACS") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [STORESCP, "-aet", self.ae_title, "-od", str(self.folder), "+xa", str(self.port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)

    def count(self) -> int:
        return sum(1 for _ in self.folder.iterdir())

    def files(self) -> list[Path]:
        return sorted(self.folder.iterdir())

    def as_setting(self) -> dict[str, Any]:
        return {
            "name": "bench-pacs",
            "ae_title": self.ae_title,
            "host": "127.0.0.1",
            "port": self.port,
        }
