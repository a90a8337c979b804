"""A spool that runs out of space: the instance that does not fit is refused, nothing of it
stays behind, everything acknowledged before is intact, and the node keeps serving.

The spool is a small tmpfs mounted for the test, so the disk really fills (ENOSPC in the
middle of a write), as it would on a hospital's server.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from tests import factory
from tests.receiver_fixtures import Node, echoscu, node_factory
from tests.test_receiver_failures import c_store, incoming, with_meta
from triagenode.scp.status import StoreStatus

__all__ = ["node_factory"]

# 600 KiB holds four 256x256 16-bit slices (about 131 KB each) but not a fifth.
_TMPFS_SIZE = "600k"


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    spool = tmp_path / "data" / "spool"
    spool.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={_TMPFS_SIZE},mode=0755", "tmpfs", str(spool)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "--lazy", str(spool)], check=False)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_full_disk_refuses_the_instance_that_does_not_fit(
    small_spool: Path, node_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    node: Node = node_factory()
    caplog.set_level(logging.INFO, logger="triagenode")
    study_uid, series_uid = generate_uid(), generate_uid()
    slices = [with_meta(factory.ct_slice(study_uid, series_uid, i, size=256)) for i in range(6)]
    statuses = [c_store(node.port, ds) for ds in slices]
    stored = [ds for ds, s in zip(slices, statuses, strict=True) if s == StoreStatus.success]
    refused = [ds for ds, s in zip(slices, statuses, strict=True) if s != StoreStatus.success]
    assert 1 <= len(stored) < len(slices), statuses
    assert {statuses[i] for i in range(len(stored), len(slices))} == {
        StoreStatus.out_of_resources_spool
    }
    # The operator hears of it at ERROR (the node's fault, not the sender's), without PHI.
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("0xA701" in m and "ENOSPC" in m for m in errors), errors
    for secret in (factory.PATIENT_NAME, factory.PATIENT_ID, factory.BIRTH_DATE):
        assert str(secret) not in caplog.text

    # Nothing of the refused instances: no row, no file, no temp file.
    rows = {row.sop_instance_uid: row for row in node.instances()}
    assert set(rows) == {ds.SOPInstanceUID for ds in stored}
    names = {p.stem for p in node.spool_files() if p.suffix == ".dcm"}
    assert names == set(rows)
    assert all(ds.SOPInstanceUID not in names for ds in refused)
    assert incoming(node) == []
    # Everything acknowledged is intact.
    for row in rows.values():
        content = (node.data_dir / row.file_path).read_bytes()
        assert hashlib.sha256(content).hexdigest() == row.sha256

    # Still serving: an echo, and a small instance that fits in what is left.
    assert echoscu(node.port).returncode == 0
    small = with_meta(factory.ct_slice(study_uid, series_uid, 99, size=16))
    assert c_store(node.port, small) == StoreStatus.success
    assert small.SOPInstanceUID in {row.sop_instance_uid for row in node.instances()}
