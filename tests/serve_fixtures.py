"""The destination PACS of the ``triagenode serve`` process tests: DCMTK ``storescp``."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.peers import dcmtk_env, free_port, tool, wait_for

__all__ = ["StoreScp"]  # and the fixture `pacs`, registered by conftest.py


class StoreScp:
    """DCMTK storescp as the destination; ``-uf`` gives every received object its own file,
    so a second send of the same SR shows up as a second file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        for _attempt in range(3):
            # a free port can be taken again before storescp binds it: then it exits at once
            self.port = free_port()
            self.process = subprocess.Popen(
                [tool("storescp"), "-aet", "PACS", "-od", str(folder), "-uf", str(self.port)],
                env=dcmtk_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if wait_for(self._listening_or_gone, what=f"storescp on port {self.port}") == "up":
                return
        raise AssertionError("storescp could not bind a free port three times")

    def _listening_or_gone(self) -> str | None:
        if self.process.poll() is not None:
            return "gone"
        with socket.socket() as probe:
            probe.settimeout(0.2)
            return "up" if probe.connect_ex(("127.0.0.1", self.port)) == 0 else None

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(self.folder.iterdir())]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreScp]:
    server = StoreScp(tmp_path / "pacs")
    yield server
    server.stop()
