"""The admin API on a real uvicorn server, and no PHI in its logs, output or metrics."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator

import httpx
import pytest

from tests.api_support import STUDY_UID, ApiWorld, build_world, serving
from tests.factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME
from triagenode.store.db import Database

PHI = (PATIENT_ID, PATIENT_NAME, PATIENT_NAME.replace("^", " "), BIRTH_DATE)


@pytest.fixture
def served(make_settings, db: Database) -> Iterator[tuple[ApiWorld, str]]:
    world = build_world(make_settings(api={"rate_limit_per_minute": 1000}), db)
    with serving(world.app) as address:
        yield world, f"http://{address}"


def test_real_server_serves_and_records_calls(served: tuple[ApiWorld, str]) -> None:
    world, base = served
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        denied = client.get("/api/v1/studies")
        assert denied.status_code == 401
        assert denied.headers["content-type"] == "application/problem+json"
        studies = client.get("/api/v1/studies", headers=world.auth("auditor"))
        assert studies.status_code == 200 and studies.json()["total"] == 2
        assert "server" not in studies.headers
    events = world.audit.verify()
    assert events.ok and events.count >= 4


def test_no_phi_in_logs_output_or_metrics(
    served: tuple[ApiWorld, str], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    world, base = served
    # The test's own HTTP client logs the URLs it requests; the node is what is under test.
    # (set_level also sets the capturing handler's level: the last call must be DEBUG.)
    caplog.set_level(logging.WARNING, logger="httpx")
    caplog.set_level(logging.WARNING, logger="httpcore")
    caplog.set_level(logging.DEBUG)
    auditor, operator = world.auth("auditor"), world.auth("operator")
    with httpx.Client(base_url=base, timeout=30) as client:
        assert (
            client.get("/api/v1/audit", params={"patient_id": PATIENT_ID}, headers=auditor).json()[
                "total"
            ]
            == 1
        )
        client.get("/api/v1/audit", params={"patient_id": PATIENT_NAME}, headers=auditor)
        client.get(f"/api/v1/studies/{STUDY_UID}", headers=auditor)
        client.get("/api/v1/studies", params={"received_from": BIRTH_DATE}, headers=auditor)
        client.get("/api/v1/studies", params={"limit": PATIENT_ID}, headers=auditor)
        client.get("/api/v1/audit", params={"patient_id": PATIENT_ID})  # no token
        bogus = base64.b64encode(f"{PATIENT_NAME} {PATIENT_ID}".encode()).decode()
        client.post(
            "/api/v1/predict", json={"image": bogus, "queries": [PATIENT_NAME]}, headers=operator
        )
        client.post(f"/api/v1/studies/{STUDY_UID}/reprocess", headers=operator)
        client.get("/api/v1/audit/export", params={"format": "syslog"}, headers=auditor)
        metrics = client.get("/metrics").text
    captured = capfd.readouterr()
    assert "/api/v1/audit" in caplog.text  # the access log is there, without query strings
    assert "patient_id" not in caplog.text
    for value in PHI:
        for where, output in (
            ("logs", caplog.text),
            ("stdout", captured.out),
            ("stderr", captured.err),
            ("metrics", metrics),
        ):
            assert value not in output, f"{value!r} found in {where}"
    with world.db.engine.connect() as connection:
        from sqlalchemy import text

        trail = repr(connection.execute(text("SELECT * FROM audit_events")).all())
    for value in PHI:
        assert value not in trail
