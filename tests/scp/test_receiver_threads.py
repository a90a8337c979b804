"""The receiver's two ways of hashing an instance give the same results and failures.

With a core to spare, an association hands the hashing of arriving fragments to a helper
thread; with every core busy it hashes them itself (``PendingInstance``). Which one
runs depends on the machine and the load, so each test here forces both.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests import factory
from tests.databases import on_database
from tests.receiver_fixtures import Node, echoscu, storescu
from tests.scp.test_receiver_failures import assert_still_serving, c_store, incoming, with_meta
from triagenode.scp import association
from triagenode.scp.status import StoreStatus


@pytest.fixture(params=["hashing helper", "one thread"])
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    # The helper is used while fewer associations than cores are open.
    monkeypatch.setattr(association, "_CORES", 64 if request.param == "hashing helper" else 0)
    return str(request.param)


def test_rows_describe_the_stored_files(threads: str, node: Node, tmp_path: Path) -> None:
    _, study = factory.ct_study(tmp_path / "study", slices=6)
    assert storescu(node.port, study).returncode == 0
    rows = node.instances()
    assert len(rows) == 6
    for row in rows:
        stored = node.data_dir / row.file_path
        content = stored.read_bytes()
        assert row.size == len(content)
        assert row.sha256 == hashlib.sha256(content).hexdigest()
    assert incoming(node) == []  # no temp file left; only the next instance's spare is gone too


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_file_that_cannot_be_placed_is_refused(threads: str, node: Node, tmp_path: Path) -> None:
    study_uid = generate_uid()
    ds = with_meta(factory.ct_slice(study_uid, generate_uid(), 0))
    # A file where the study's folder must go: rename into it fails after the data arrived.
    (node.data_dir / "spool" / study_uid).write_text("in the way")
    assert c_store(node.port, ds) == StoreStatus.out_of_resources_spool
    assert node.instances() == [] and node.studies() == []
    assert incoming(node) == []
    (node.data_dir / "spool" / study_uid).unlink()
    node.receiver.storage.spool.forget_dirs()
    assert c_store(node.port, ds) == StoreStatus.success
    assert len(node.instances()) == 1
    assert_still_serving(node, tmp_path)


@on_database("postgres")
def test_database_gone_leaves_no_file(threads: str, node: Node, tmp_path: Path) -> None:
    # A first instance makes the study known, so the next one takes the early-commit path.
    study_uid, series_uid = generate_uid(), generate_uid()
    first = with_meta(factory.ct_slice(study_uid, series_uid, 0))
    assert c_store(node.port, first) == StoreStatus.success
    url = make_url(node.settings.database_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{url.database}" WITH (FORCE)'))
    admin.dispose()
    second = with_meta(factory.ct_slice(study_uid, series_uid, 1))
    assert c_store(node.port, second) == StoreStatus.out_of_resources_database
    # Only the first instance's file remains: the second was taken back.
    files = [p for p in node.spool_files() if p.suffix == ".dcm"]
    assert [p.stem for p in files] != [] and second.SOPInstanceUID not in {p.stem for p in files}
    assert incoming(node) == []
    assert echoscu(node.port).returncode == 0


def test_spool_removed_while_serving(threads: str, node: Node, tmp_path: Path) -> None:
    spool = node.data_dir / "spool"
    shutil.rmtree(spool)  # an operator's mistake: the node recreates what it needs
    node.receiver.storage.spool.forget_dirs()
    assert_still_serving(node, tmp_path)
    [row] = node.instances()
    assert (node.data_dir / row.file_path).is_file()
