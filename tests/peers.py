"""Real DICOM peers for the tests: DCMTK and dicom3tools binaries, free ports, polling."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# pynetdicom installs its own `storescu`/`echoscu` scripts into Python's bin folder, which can
# shadow DCMTK's on PATH: always take DCMTK's from the system folders.
_SYSTEM_BIN = ("/usr/bin", "/usr/local/bin", "/usr/sbin")


def tool(name: str) -> str:
    """Absolute path of a DCMTK / dicom3tools / Orthanc binary."""
    for folder in _SYSTEM_BIN:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed; scripts/test installs dcmtk and dicom3tools")
    return found


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: without TCP_NODELAY they are 30x slower (Nagle)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def run_tool(
    name: str, *args: str, check: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(name), *args],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=timeout,
        check=check,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    def is_open() -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            return sock.connect_ex((host, port)) == 0

    wait_for(is_open, timeout, what=f"port {port}")
