"""Orthanc as the PACS in tests: a real server on free ports, driven through its REST API.

Usage::

    node = {"node": ("TRIAGENODE", "127.0.0.1", 11112)}
    with OrthancServer(tmp_path / "orthanc", modalities=node) as pacs:
        pacs.upload(path)
        pacs.store_to_modality("node", study_id)
        wait_for(lambda: pacs.study_instances(study_uid))

Each server gets its own folder (config, storage, index, log), free HTTP and DICOM ports, no
authentication (bound to 127.0.0.1 only), no plugins, and accepts any calling AE title.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.peers import free_port, tool, wait_for

__all__ = ["OrthancServer", "orthanc_server"]

DEFAULT_AE_TITLE = "ORTHANC"


class OrthancServer:
    """One Orthanc process with a generated configuration in ``folder``.

    Parameters
    ----------
    folder
        Where config, storage and log go; created if missing.
    ae_title
        Orthanc's own DICOM AE title (the called AE title a sender must use).
    modalities
        ``name -> (AE title, host, port)`` of peers Orthanc may send to (``DicomModalities``).
    dicom_port, http_port
        Fixed ports, e.g. to restart on the same ports; free ports by default.
    """

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = DEFAULT_AE_TITLE,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.modalities = dict(modalities or {})
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.host = "127.0.0.1"
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    # Lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def config_path(self) -> Path:
        return self.folder / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    def config(self) -> dict[str, Any]:
        return {
            "Name": f"triagenode-test-{self.dicom_port}",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomScuTimeout": 10,
            "StableAge": 1,
            "HttpTimeout": 30,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "StorageCompression": False,
            "OverwriteInstances": True,
        }

    def start(self, timeout: float = 30.0) -> OrthancServer:
        """Write the config, start Orthanc, and wait until ``/system`` answers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        try:
            self._process = subprocess.Popen(
                [tool("Orthanc"), f"--logfile={self.log_path}", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self._client = httpx.Client(base_url=self.url, timeout=30.0)

        def ready() -> bool:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._process.returncode}: {self.log_tail()}"
                )
            try:
                return self.client.get("/system").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=timeout, interval=0.1, what=f"Orthanc at {self.url}")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL if it does not exit in time)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise RuntimeError("Orthanc is not started")
        return self._client

    # REST ---------------------------------------------------------------------------------

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise AssertionError(
                f"Orthanc {response.request.method} {response.request.url.path} -> "
                f"{response.status_code}: {response.text[:500]}"
            )
        return response

    def upload(self, path: Path | bytes) -> dict[str, Any]:
        """POST one Part 10 file to ``/instances``; returns Orthanc's answer (ID, Status...)."""
        data = path if isinstance(path, bytes) else Path(path).read_bytes()
        return self._check(self.client.post("/instances", content=data)).json()

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc's study ID for a StudyInstanceUID, or None when it has no such study."""
        answer = self._check(
            self.client.post(
                "/tools/lookup", content=study_uid, headers={"Content-Type": "text/plain"}
            )
        ).json()
        for item in answer:
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Instances of the study (each with ``ID`` and ``MainDicomTags``); [] when absent."""
        study_id = self.find_study(study_uid)
        if study_id is None:
            return []
        return self._check(self.client.get(f"/studies/{study_id}/instances")).json()

    def instance_uids(self, study_uid: str) -> list[str]:
        """SOP Instance UIDs of the study's instances."""
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.study_instances(study_uid)]

    def instance_count(self) -> int:
        """Instances stored in total."""
        return int(self._check(self.client.get("/statistics")).json()["CountInstances"])

    def find_instance(self, sop_instance_uid: str) -> str | None:
        answer = self._check(
            self.client.post(
                "/tools/lookup", content=sop_instance_uid, headers={"Content-Type": "text/plain"}
            )
        ).json()
        for item in answer:
            if item.get("Type") == "Instance":
                return str(item["ID"])
        return None

    def download(self, instance_id: str) -> bytes:
        """The stored Part 10 file of an instance (Orthanc ID)."""
        return self._check(self.client.get(f"/instances/{instance_id}/file")).content

    def download_by_uid(self, sop_instance_uid: str) -> bytes:
        instance_id = self.find_instance(sop_instance_uid)
        if instance_id is None:
            raise AssertionError(f"Orthanc holds no instance {sop_instance_uid}")
        return self.download(instance_id)

    def store_to_modality(
        self, modality: str, resources: str | list[str], *, synchronous: bool = True
    ) -> dict[str, Any]:
        """C-STORE Orthanc resources (study/series/instance IDs) to a configured modality."""
        body = {
            "Resources": [resources] if isinstance(resources, str) else resources,
            "Synchronous": synchronous,
        }
        return self._check(self.client.post(f"/modalities/{modality}/store", json=body)).json()

    def echo(self, modality: str) -> bool:
        """C-ECHO from Orthanc to a configured modality."""
        return self.client.post(f"/modalities/{modality}/echo", content="{}").status_code == 200


@contextmanager
def orthanc_server(folder: Path, **kwargs: Any) -> Iterator[OrthancServer]:
    """Context manager form of :class:`OrthancServer` (started, stopped afterwards)."""
    server = OrthancServer(folder, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()
