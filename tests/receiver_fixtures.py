"""Fixtures for the receiver tests: a node started on a free port, DCMTK senders, helpers."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.peers import dcmtk_env, free_port, run_tool, tool, wait_for_port
from triagenode.audit.events import AuditLog
from triagenode.config.settings import Settings
from triagenode.scp.receiver import DicomReceiver
from triagenode.store import migrate
from triagenode.store.db import Database
from triagenode.store.models import Instance, Study

AUDIT_SECRET = b"test-secret-0123456789abcdef"


@dataclass
class Node:
    """A running receiver with its database; ``restart()`` builds a fresh one on the same data."""

    settings: Settings
    db: Database
    audit: AuditLog
    receiver: DicomReceiver

    @property
    def port(self) -> int:
        return self.receiver.port

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.node.data_dir)

    def restart(self) -> None:
        self.receiver.stop()
        self.receiver = DicomReceiver(self.settings, self.db, self.audit)
        self.receiver.start()

    def studies(self) -> list[Study]:
        with self.db.session() as session:
            return list(session.execute(select(Study)).scalars())

    def instances(self) -> list[Instance]:
        with self.db.session() as session:
            return list(session.execute(select(Instance).order_by(Instance.id)).scalars())

    def spool_files(self) -> list[Path]:
        """Everything under the spool, temp files included (the receivers' claims on their
        temp folders aside)."""
        root = self.data_dir / "spool"
        if not root.is_dir():
            return []
        return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".claim")

    def temp_files(self) -> list[Path]:
        """Temp files of instances being received, in every receiver's temp folder."""
        return [p for p in self.spool_files() if ".incoming" in p.parts]


@pytest.fixture
def node_factory(make_settings: Any, database_url: str) -> Iterator[Any]:
    """Start receivers on the parametrized database (SQLite and PostgreSQL)."""
    nodes: list[Node] = []

    def start(**sections: Any) -> Node:
        sections.setdefault("database", {"url": database_url})
        settings = make_settings(**sections)
        db = Database(settings.database_url)
        migrate.upgrade(db)
        audit = AuditLog(db, AUDIT_SECRET)
        receiver = DicomReceiver(settings, db, audit)
        receiver.start()
        node = Node(settings, db, audit, receiver)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.receiver.stop()
        node.db.dispose()


@pytest.fixture
def node(node_factory: Any) -> Node:
    return node_factory()


NODE_AE = "TRIAGENODE"  # the node's default scp.ae_title, checked as the called AE title


def _called(options: tuple[str, ...]) -> tuple[str, ...]:
    return options if "-aec" in options else ("-aec", NODE_AE, *options)


def storescu(port: int, files: list[Path], *options: str) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu (TCP_NODELAY=1) sending ``files`` over one association."""
    return run_tool(
        "storescu", *_called(options), "127.0.0.1", str(port), *map(str, files), timeout=120
    )


def echoscu(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return run_tool("echoscu", *_called(options), "127.0.0.1", str(port), timeout=30)


def dataset_part(path: Path) -> bytes:
    """The bytes after a Part 10 file's meta group: the dataset exactly as stored."""
    raw = Path(path).read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a Part 10 file"
    group, element, vr, _, length = struct.unpack_from("<HH2sHI", raw, 132)
    assert (group, element, vr) == (2, 0, b"UL")
    return raw[132 + 12 + length :]


def dcmtk_wire_datasets(
    files: list[Path], workdir: Path, *storescu_options: str
) -> dict[str, bytes]:
    """What storescu actually puts on the wire for ``files``, as ``{SOP UID: dataset}``.

    storescu re-encodes some files while sending (undefined-length sequences become
    explicit-length), so "stored unchanged" is judged against DCMTK ``storescp +B``
    (bit-preserving) receiving the same files over the same kind of association.
    """
    import pydicom

    out = workdir / "dcmtk-received"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [tool("storescp"), "+xa", "+B", "-od", str(out), str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        result = storescu(port, files, *storescu_options)
        assert result.returncode == 0, result.stderr
    finally:
        server.terminate()
        server.wait(10)
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_part(p)
        for p in out.iterdir()
    }
