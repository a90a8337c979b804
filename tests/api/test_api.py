"""The admin API through FastAPI's TestClient: views, actions, limits, headers, problems."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from lxml import etree
from sqlalchemy import text

from tests.api_support import (
    OTHER_STUDY_UID,
    STUDY_UID,
    ApiWorld,
    build_world,
    events,
    shared_world,
)
from tests.audit_support import drop_append_only_guard
from tests.factory import PATIENT_ID
from triagenode.api import ApiServices
from triagenode.audit.atna import schema
from triagenode.store import migrate
from triagenode.store.db import Database


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> ApiWorld:
    """One SQLite world for the many checks that change nothing."""
    return shared_world(tmp_path_factory.mktemp("api"))


@pytest.fixture
def world(make_settings, db: Database) -> ApiWorld:
    """A fresh world on each database backend."""
    return build_world(make_settings(), db)


def test_studies_list_filters_and_pages(world: ApiWorld) -> None:
    client = TestClient(world.app)
    headers = world.auth("auditor")
    everything = client.get("/api/v1/studies", headers=headers).json()
    assert everything["total"] == 2
    assert [s["study_uid"] for s in everything["items"]] == [OTHER_STUDY_UID, STUDY_UID]
    stat = client.get("/api/v1/studies?priority=stat", headers=headers).json()
    assert [s["study_uid"] for s in stat["items"]] == [STUDY_UID]
    assert stat["items"][0]["priority"] == "stat"
    receiving = client.get("/api/v1/studies", params={"state": "receiving"}, headers=headers)
    assert receiving.json()["total"] == 1
    first = client.get("/api/v1/studies?limit=1", headers=headers).json()
    assert first["total"] == 2 and first["next_cursor"]
    second = client.get(
        "/api/v1/studies", params={"limit": 1, "cursor": first["next_cursor"]}, headers=headers
    ).json()
    assert [s["study_uid"] for s in second["items"]] == [STUDY_UID]
    recent = client.get(
        "/api/v1/studies", params={"received_from": "2000-01-01T00:00:00"}, headers=headers
    )
    assert recent.status_code == 200 and recent.json()["total"] == 2
    future = {"from": "2999-01-01T00:00:00", "to": "2999-01-02"}
    assert client.get("/api/v1/audit", params=future, headers=headers).json()["total"] == 0
    offset = client.get("/api/v1/studies?limit=1&offset=1", headers=headers).json()
    assert offset["items"] == second["items"]
    assert client.get("/api/v1/studies?cursor=bogus", headers=headers).status_code == 400
    assert client.get("/api/v1/studies?priority=asap", headers=headers).status_code == 422
    queries = events(world, event_id="110112", actor="auditor-token")
    assert queries and queries[0].actor_address == "testclient"


def test_study_detail(world: ApiWorld) -> None:
    client = TestClient(world.app)
    answer = client.get(f"/api/v1/studies/{STUDY_UID}", headers=world.auth("auditor"))
    assert answer.status_code == 200
    study = answer.json()
    assert [h["to_state"] for h in study["history"]] == ["receiving", "stable", "reported"]
    assert (study["series_count"], study["stored_instance_count"]) == (1, 2)
    assert study["results"][0]["findings"] == {"top": "pneumothorax", "patient": {}}
    assert study["sr_sop_instance_uid"] == STUDY_UID + ".99.1"
    assert study["exports"][0]["state"] == "dead"
    assert PATIENT_ID not in answer.text and "patient_ref" not in study
    read = events(world, event_id="110112", study_uid=STUDY_UID)
    assert read[-1].patient_ref == world.audit.patient_ref(PATIENT_ID)
    missing = client.get("/api/v1/studies/1.2.3", headers=world.auth("auditor"))
    assert missing.status_code == 404 and missing.json()["detail"] == "no study 1.2.3"


def test_operator_actions(world: ApiWorld) -> None:
    client = TestClient(world.app)
    headers = world.auth("operator")
    done = client.post(f"/api/v1/studies/{STUDY_UID}/reprocess", headers=headers)
    assert done.status_code == 200 and done.json()["state"] == "stable"
    detail = client.get(f"/api/v1/studies/{STUDY_UID}", headers=headers).json()
    assert detail["run"] == 2 and detail["history"][-1]["to_state"] == "stable"
    complete = client.post(f"/api/v1/studies/{OTHER_STUDY_UID}/complete", headers=headers)
    assert complete.status_code == 200
    again = client.post(f"/api/v1/studies/{OTHER_STUDY_UID}/complete", headers=headers)
    assert again.status_code == 409
    retried = client.post(f"/api/v1/exports/{world.export_id}/retry", headers=headers)
    assert retried.status_code == 200
    exports = client.get("/api/v1/exports?state=pending", headers=headers).json()
    assert exports["total"] == 1 and exports["items"][0]["attempts"] == 0
    assert client.post("/api/v1/exports/999/retry", headers=headers).status_code == 404
    changes = events(world, event_id="110103", actor="operator-token")
    assert {e.event_type for e in changes} == {"reprocess", "complete"}
    assert world.audit.verify().ok


def test_queue(world: ApiWorld) -> None:
    client = TestClient(world.app)
    queue = client.get("/api/v1/queue", headers=world.auth("auditor")).json()
    table = {row["priority"]: row for row in queue["by_priority"]}
    assert table["stat"] == {"priority": "stat", "pending": 0, "leased": 1}
    assert table["routine"]["pending"] == 1
    assert [job["priority"] for job in queue["jobs"]] == ["stat", "routine"]


def test_audit_search_by_patient_id_without_storing_it(world: ApiWorld) -> None:
    client = TestClient(world.app)
    answer = client.get(
        "/api/v1/audit", params={"patient_id": PATIENT_ID}, headers=world.auth("auditor")
    )
    assert answer.status_code == 200
    page = answer.json()
    assert page["total"] == 1
    assert page["items"][0]["event_type"] == "received"
    assert page["items"][0]["patient_ref"] == world.audit.patient_ref(PATIENT_ID)
    other = client.get(
        "/api/v1/audit", params={"patient_id": "someone-else"}, headers=world.auth("auditor")
    )
    assert other.json()["total"] == 0
    by_study = client.get(
        "/api/v1/audit", params={"study_uid": STUDY_UID, "event_id": "110104"},
        headers=world.auth("auditor"),
    ).json()  # fmt: skip
    assert by_study["total"] == 1
    with world.db.engine.connect() as connection:
        dump = repr(connection.execute(text("SELECT * FROM audit_events")).all())
    assert PATIENT_ID not in dump
    searches = events(world, event_id="110101", patient_ref=world.audit.patient_ref(PATIENT_ID))
    assert len(searches) == 1


def test_audit_pages_with_a_cursor(world: ApiWorld) -> None:
    client = TestClient(world.app)
    headers = world.auth("auditor")
    for _ in range(3):
        client.get("/api/v1/queue", headers=headers)
    first = client.get("/api/v1/audit?limit=2", headers=headers).json()
    second = client.get(
        "/api/v1/audit", params={"limit": 2, "cursor": first["next_cursor"]}, headers=headers
    ).json()
    seqs = [e["seq"] for e in first["items"] + second["items"]]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == 4


def test_audit_verify_and_export(world: ApiWorld) -> None:
    client = TestClient(world.app)
    headers = world.auth("auditor")
    clean = client.get("/api/v1/audit/verify", headers=headers).json()
    assert clean["ok"] and clean["count"] >= 1 and clean["problem"] is None
    xml = client.get("/api/v1/audit/export?format=atna-xml", headers=headers)
    assert xml.headers["content-type"].startswith("application/xml")
    validator = schema("triagenode-audit-export.rng")
    assert validator.validate(etree.fromstring(xml.content)), validator.error_log
    lines = client.get("/api/v1/audit/export", params={"format": "jsonl"}, headers=headers)
    assert len(lines.text.splitlines()) >= 2
    anchored = client.get(
        "/api/v1/audit/verify",
        params={"expect_head": f"{clean['head_seq']}:{clean['head_hash']}"},
        headers=headers,
    ).json()
    assert anchored["ok"], anchored["problem"]
    bad_anchor = {"expect_head": "1:nothex"}
    assert client.get("/api/v1/audit/verify", params=bad_anchor, headers=headers).status_code == 422
    with world.db.engine.begin() as connection:
        drop_append_only_guard(connection)
        connection.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 1"))
    broken = client.get("/api/v1/audit/verify", headers=headers).json()
    assert not broken["ok"] and broken["problem"]["kind"] == "edited"
    assert events(world, event_type="integrity_failure")


def test_body_limit(make_settings, tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'limit.sqlite3'}")
    migrate.upgrade(database)
    world = build_world(make_settings(api={"max_body_bytes": 1024}), database)
    client = TestClient(world.app)
    big = {"image": "A" * 4000, "queries": ["x"]}
    answer = client.post("/api/v1/predict", json=big, headers=world.auth("operator"))
    assert answer.status_code == 413
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["x-frame-options"] == "DENY"

    def chunks():
        yield b'{"image": "'
        yield b"A" * 4000
        yield b'"}'

    streamed = client.post(
        "/api/v1/predict",
        content=chunks(),
        headers={**world.auth("operator"), "Content-Type": "application/json"},
    )
    assert streamed.status_code == 413


def test_security_headers_docs_and_cors(shared: ApiWorld, make_settings, tmp_path: Path) -> None:
    client = TestClient(shared.app)
    api = client.get("/api/v1/queue", headers=shared.auth("auditor"))
    assert api.headers["x-content-type-options"] == "nosniff"
    assert api.headers["x-frame-options"] == "DENY"
    assert api.headers["referrer-policy"] == "no-referrer"
    assert api.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in api.headers["content-security-policy"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert "script-src 'self';" in docs.headers["content-security-policy"]
    assert "https:" not in docs.headers["content-security-policy"]
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    preflight = {"Origin": "https://console.example", "Access-Control-Request-Method": "GET"}
    assert (
        "access-control-allow-origin"
        not in client.options("/api/v1/queue", headers=preflight).headers
    )
    database = Database(f"sqlite:///{tmp_path / 'cors.sqlite3'}")
    migrate.upgrade(database)
    cors = build_world(make_settings(api={"cors_origins": ["https://console.example"]}), database)
    allowed = TestClient(cors.app).options("/api/v1/queue", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://console.example"


def test_health_readiness_and_metrics(make_settings, db: Database) -> None:
    state = {"model": True}
    services = ApiServices(
        model_loaded=lambda: state["model"], destinations_reachable=lambda: {"pacs": False}
    )
    world = build_world(make_settings(), db, services)
    client = TestClient(world.app)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"]["ok"] and checks["spool"]["ok"]
    assert checks["destinations"] == {"ok": False, "reachable": {"pacs": False}}
    state["model"] = False
    assert client.get("/readyz").status_code == 503
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    body = metrics.text
    assert 'triagenode_studies{state="reported"} 1.0' in body
    assert 'triagenode_queue_depth{priority="routine"} 1.0' in body
    assert 'triagenode_queue_depth{priority="stat"} 0.0' in body
    assert 'triagenode_exports{state="dead"} 1.0' in body
    assert "triagenode_audit_chain_length " in body
    assert "triagenode_instances_received_total" in body


def test_problems_never_echo_input(shared: ApiWorld) -> None:
    client = TestClient(shared.app)
    answer = client.get(
        "/api/v1/studies", params={"limit": PATIENT_ID}, headers=shared.auth("auditor")
    )
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["errors"][0]["location"] == "query.limit"
    assert PATIENT_ID not in answer.text


def test_predict_without_a_model_is_503(shared: ApiWorld) -> None:
    client = TestClient(shared.app)
    answer = client.post(
        "/api/v1/predict", json={"image": "AAAA", "queries": ["x"]}, headers=shared.auth("operator")
    )
    assert answer.status_code == 503
    assert answer.json()["type"] == "urn:triagenode:problem:no-predictor"


def test_an_answer_that_cannot_be_audited_is_withheld(
    shared: ApiWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database full")

    client = TestClient(shared.app)
    headers = shared.auth("auditor")
    assert client.get("/api/v1/queue", headers=headers).status_code == 200
    monkeypatch.setattr(shared.audit, "record", broken)
    answer = client.get(f"/api/v1/studies/{STUDY_UID}", headers=headers)
    assert answer.status_code == 503
    assert answer.json()["type"] == "urn:triagenode:problem:audit-unavailable"
    assert STUDY_UID + ".99.1" not in answer.text
