"""``/readyz`` reports destinations from a background C-ECHO probe, never opening associations.

The destination is Orthanc behind a counting relay (:class:`tests.tcp_tap.TcpTap`): every
association the node opens to it is one connection the relay counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests import peers
from tests.orthanc import OrthancServer
from tests.tcp_tap import TcpTap
from triagenode.api import ApiServices
from triagenode.api.app import create_app
from triagenode.audit.events import AuditLog
from triagenode.delivery.exporter import Exporter, ExportOutbox
from triagenode.delivery.probe import DestinationProbe
from triagenode.node import Node
from triagenode.store import migrate
from triagenode.store.db import Database

SECRET = b"test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def relay(pacs: OrthancServer) -> Iterator[TcpTap]:
    with TcpTap(forward_to=(pacs.host, pacs.dicom_port)) as tap:
        yield tap


def _destination(pacs: OrthancServer, relay: TcpTap) -> dict[str, object]:
    return {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": relay.port}


@pytest.mark.slow
def test_many_readyz_calls_open_no_association(
    pacs: OrthancServer, relay: TcpTap, make_settings
) -> None:
    port = peers.free_port()
    settings = make_settings(
        destinations=[_destination(pacs, relay)],
        export={"probe_interval_s": 3600},
        api={"enabled": True, "port": port},
    )
    node = Node.build(settings)
    node.start()
    try:
        url = f"http://127.0.0.1:{port}/readyz"

        def probed() -> dict[str, Any] | None:
            try:
                answer = httpx.get(url, timeout=10)
            except httpx.TransportError:
                return None
            checks = answer.json()["checks"]["destinations"]
            return checks if checks["probed_at"]["pacs"] else None

        first = peers.wait_for(probed, timeout=60, what="the first probe in /readyz")
        assert first["reachable"] == {"pacs": True} and first["ok"] is True
        assert relay.accepted == 1  # the probe's one C-ECHO association
        with httpx.Client() as client:
            answers = [client.get(url) for _ in range(200)]
        assert {a.status_code for a in answers} == {200}
        assert relay.accepted == 1, f"{relay.accepted - 1} associations opened by /readyz"
        last = answers[-1].json()["checks"]["destinations"]
        assert last["reachable"] == {"pacs": True}
        assert last["probed_at"] == first["probed_at"]  # the same cached answer ...
        assert last["age_s"]["pacs"] >= first["age_s"]["pacs"]  # ... growing older
        probed_at = datetime.fromisoformat(last["probed_at"]["pacs"])
        assert abs((datetime.now(UTC) - probed_at).total_seconds() - last["age_s"]["pacs"]) < 5
    finally:
        node.stop()


def test_a_destination_going_down_is_reported_after_the_next_probe(
    pacs: OrthancServer, relay: TcpTap, make_settings, tmp_path: Path
) -> None:
    # Beside the PACS, one that accepts and never answers: it must not hold up the PACS's
    # answers (each destination is probed by its own thread).
    timeout = 20.0
    with TcpTap() as hole:
        silent = {"name": "silent", "ae_title": "SILENT", "host": "127.0.0.1", "port": hole.port}
        settings = make_settings(
            destinations=[_destination(pacs, relay), silent], export={"timeout_s": timeout}
        )
        db = Database(f"sqlite:///{tmp_path / 'node.sqlite3'}")
        migrate.upgrade(db)
        audit = AuditLog(db, SECRET)
        exporter = Exporter(ExportOutbox(db, audit, settings), settings, audit)
        probe = DestinationProbe(
            settings.destinations, lambda d: exporter.echo(d, timeout), interval_s=0.3
        )
        services = ApiServices(
            destinations_reachable=probe.reachable, destinations_probed_at=probe.probed_at
        )
        client = TestClient(create_app(settings, db, audit, services))

        def destinations() -> dict[str, Any]:
            return client.get("/readyz").json()["checks"]["destinations"]

        before = destinations()
        assert before["reachable"] == {"pacs": None, "silent": None} and before["ok"] is False
        assert before["age_s"] == {"pacs": None, "silent": None}
        probe.start()
        try:
            up = peers.wait_for(
                lambda: (d := destinations())["reachable"]["pacs"] and d,
                timeout=timeout / 2,
                what="pacs up while the silent destination holds its probe",
            )
            assert up["reachable"]["silent"] is None and up["age_s"]["silent"] is None
            relay.refuse()  # the PACS stops answering
            down = peers.wait_for(
                lambda: (d := destinations())["reachable"]["pacs"] is False and d,
                timeout=timeout / 2,
                what="pacs reported down",
            )
            assert down["ok"] is False and down["age_s"]["pacs"] < 5
            assert client.get("/readyz").status_code == 200  # a PACS down is not "not ready"
        finally:
            hole.close()  # ends the silent probe at once
            probe.stop()
            db.dispose()
