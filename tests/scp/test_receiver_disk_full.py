"""A spool that runs out of space: the instance that does not fit is refused, nothing of it
stays behind, everything acknowledged before is intact, and the node keeps serving.

The spool is a small tmpfs mounted for the test, so the disk really fills (ENOSPC in the
middle of a write), as it would on a hospital's server.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from tests import factory
from tests.receiver_fixtures import Node, echoscu
from tests.scp.test_receiver_failures import c_store, incoming, with_meta
from triagenode.scp.status import StoreStatus

# 600 KiB holds four 256x256 16-bit slices (about 131 KB each) but not a fifth.
_TMPFS_SIZE = "600k"
_SLICE_BYTES = 256 * 256 * 2


@pytest.fixture
def small_spool(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    size = getattr(request, "param", _TMPFS_SIZE)
    spool = tmp_path / "data" / "spool"
    spool.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(spool)],
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
    node: Node = node_factory(scp={"min_free_bytes": 0})  # no reserve: fill it to the end
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


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("small_spool", ["2m"], indirect=True)
def test_free_space_reserve_refuses_before_the_disk_is_full(
    small_spool: Path, node_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    reserve = 1024 * 1024
    node: Node = node_factory(scp={"min_free_bytes": reserve})
    caplog.set_level(logging.INFO, logger="triagenode")
    study_uid, series_uid = generate_uid(), generate_uid()
    slices = [with_meta(factory.ct_slice(study_uid, series_uid, i, size=256)) for i in range(12)]
    statuses = [c_store(node.port, ds) for ds in slices]
    accepted = statuses.count(StoreStatus.success)
    # 2 MiB less the 1 MiB reserve holds about 8 slices; once below it, every one is refused.
    assert 4 <= accepted < len(slices), statuses
    assert statuses == [StoreStatus.success] * accepted + [StoreStatus.out_of_resources_spool] * (
        len(slices) - accepted
    )
    # Refused by the reserve, not by a full disk: the room for one more slice is still there.
    assert shutil.disk_usage(small_spool).free >= _SLICE_BYTES
    assert len(node.instances()) == accepted and incoming(node) == []
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("free space below scp.min_free_bytes" in m for m in errors), errors
    assert echoscu(node.port).returncode == 0


def test_reserve_larger_than_the_disk_refuses_everything(node_factory: Any) -> None:
    node: Node = node_factory(scp={"min_free_bytes": 1 << 60})  # an exabyte: never there
    ds = with_meta(factory.ct_slice(generate_uid(), generate_uid(), 0))
    assert c_store(node.port, ds) == StoreStatus.out_of_resources_spool
    assert node.instances() == [] and node.studies() == []
    assert incoming(node) == []
    assert echoscu(node.port).returncode == 0
