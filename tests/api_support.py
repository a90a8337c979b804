"""Helpers for the admin API tests: an app over a seeded database, tokens per role."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlalchemy import select

from tests.factory import PATIENT_ID
from tests.peers import free_port, wait_for
from triagenode.api import ApiServices
from triagenode.api.server import build_server
from triagenode.api.tokens import TokenStore
from triagenode.audit import AuditLog
from triagenode.config.settings import Settings, load_settings
from triagenode.store import migrate
from triagenode.store.db import Database
from triagenode.store.models import (
    AuditEvent,
    Export,
    Instance,
    Job,
    Result,
    Series,
    Study,
    StudyEvent,
    utcnow,
)
from triagenode.web import create_web_app

SECRET = b"api-test-secret-0123456789abcdef"
STUDY_UID = "1.2.826.0.1.3680043.8.498.77"
OTHER_STUDY_UID = "1.2.826.0.1.3680043.8.498.78"
ROLES = ("auditor", "operator", "admin")


@dataclass
class ApiWorld:
    app: FastAPI
    db: Database
    audit: AuditLog
    settings: Settings
    tokens: dict[str, str]  # role -> token
    export_id: int

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def seed(db: Database, audit: AuditLog) -> int:
    """Two studies (one reported with a result and a dead export, one receiving) and jobs.

    Returns the dead export's id.
    """
    now = utcnow()
    with db.write_session() as session:
        reported = Study(
            study_uid=STUDY_UID,
            state="reported",
            priority=40,
            patient_ref=audit.patient_ref(PATIENT_ID),
            modality="CT",
            calling_ae="CT_SCANNER",
            first_received_at=now - timedelta(minutes=10),
            last_received_at=now - timedelta(minutes=9),
            instance_count=2,
            byte_count=2048,
        )
        receiving = Study(
            study_uid=OTHER_STUDY_UID,
            state="receiving",
            priority=20,
            modality="CR",
            first_received_at=now,
            last_received_at=now,
            instance_count=1,
        )
        session.add_all([reported, receiving])
        session.flush()
        series = Series(study_id=reported.id, series_uid=STUDY_UID + ".1", modality="CT")
        session.add(series)
        session.flush()
        for number in (1, 2):
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=f"{STUDY_UID}.1.{number}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    size=1024,
                    sha256="0" * 64,
                    file_path=f"spool/{number}.dcm",
                )
            )
        for before, after in ((None, "receiving"), ("receiving", "stable"), ("stable", "reported")):
            session.add(StudyEvent(study_id=reported.id, from_state=before, to_state=after))
        result = Result(
            study_id=reported.id,
            run=1,
            model_name="triagenode-demo",
            model_version="0",
            weights_sha256="1" * 64,
            is_demo=True,
            backend="torch",
            label_set="chest",
            top_finding="pneumothorax",
            critical=True,
            # PHI planted where a careless writer might put it: the API must drop it.
            findings={
                "top": "pneumothorax",
                "patient": {"PatientID": PATIENT_ID},
                "PatientID": PATIENT_ID,
            },
            sr_sop_instance_uid=STUDY_UID + ".99.1",
            sr_series_uid=STUDY_UID + ".99",
        )
        session.add(result)
        session.flush()
        export = Export(
            result_id=result.id,
            study_uid=STUDY_UID,
            destination="pacs",
            sop_instance_uid=STUDY_UID + ".99.1",
            file_path="results/sr.dcm",
            priority=40,
            state="dead",
            attempts=8,
            last_error="association rejected",
        )
        session.add(export)
        session.add(Job(study_id=receiving.id, state="pending", priority=20))
        session.add(Job(study_id=reported.id, state="leased", priority=40, lease_owner="w1"))
        session.flush()
        export_id = export.id
    audit.record(
        "110104",  # type: ignore[arg-type]
        event_type="received",
        action="C",
        actor="CT_SCANNER",
        actor_address="10.1.2.3",
        study_uid=STUDY_UID,
        patient_id=PATIENT_ID,
        details={"instances": 2},
    )
    return export_id


def build_world(
    settings: Settings, db: Database, services: ApiServices | None = None, **kwargs: Any
) -> ApiWorld:
    audit = AuditLog(db, SECRET)
    export_id = seed(db, audit)
    store = TokenStore(db)
    tokens = {role: store.create(f"{role}-token", role) for role in ROLES}
    app = create_web_app(settings, db, audit, services, **kwargs)
    return ApiWorld(app, db, audit, settings, tokens, export_id)


def shared_world(folder: Path) -> ApiWorld:
    """A SQLite world in ``folder`` with a rate limit no test reaches."""
    settings = load_settings(
        None,
        node={"data_dir": str(folder)},
        audit={"secret": "shared-secret-0123456789"},
        api={"rate_limit_per_minute": 100000},
    )
    database = Database(f"sqlite:///{folder / 'api.sqlite3'}")
    migrate.upgrade(database)
    return build_world(settings, database)


def events(world: ApiWorld, **where: object) -> list[AuditEvent]:
    """Audit rows in chain order whose columns equal ``where``."""
    with world.db.session() as session:
        query = select(AuditEvent).order_by(AuditEvent.seq)
        for column, value in where.items():
            query = query.where(getattr(AuditEvent, column) == value)
        return list(session.scalars(query))


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` served by the node's uvicorn server on a free loopback port: "127.0.0.1:PORT"."""
    port = free_port()
    server = build_server(app, "127.0.0.1", port)
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30, what="uvicorn to start")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
