"""A node's database for the console tests: studies in every state a worklist shows."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from tests.api_support import STUDY_UID, ApiWorld
from tests.factory import PATIENT_ID
from triagenode.store.models import Export, Result, Study, StudyEvent, utcnow

NOT_APPLICABLE_UID = "1.2.826.0.1.3680043.8.498.80"
FAILED_UID = "1.2.826.0.1.3680043.8.498.81"
URGENT_UID = "1.2.826.0.1.3680043.8.498.82"
NA_REASON = "no label set fits modality US, body part HAND"


def result_json(study_uid: str) -> dict:
    """The JSON twin of an SR as the worker stores it (reports.result_json), with PHI planted
    where a careless writer might put it: the console must not show it."""
    finding = {
        "calibrated": False,
        "escalates": True,
        "images": [],
    }
    return {
        "warning": "DEMO, NOT FOR CLINICAL USE",
        "study_uid": study_uid,
        "model": {"name": "demo", "display_name": "triagenode demo model", "is_demo": True},
        "label_set": "chest",
        "label_set_reason": "modality CT, body part CHEST",
        "aggregation": "mean of the top 3 image scores per finding",
        "calibration": "none",
        "top_finding": "pneumothorax",
        "findings": [
            {
                **finding,
                "name": "pneumothorax",
                "code": {"meaning": "Pneumothorax"},
                "score": 0.83,
                "threshold": 0.5,
                "present": True,
                "critical": True,
            },
            {
                **finding,
                "name": "effusion",
                "code": {"meaning": "Pleural effusion"},
                "score": 0.61,
                "threshold": 0.55,
                "present": True,
                "critical": False,
            },
            {
                **finding,
                "name": "nodule",
                "code": {"meaning": "Lung nodule"},
                "score": 0.12,
                "threshold": 0.4,
                "present": False,
                "critical": False,
            },
        ],
        "images_used": [{"sop_instance_uid": f"{study_uid}.1.{n}"} for n in (1, 2)],
        "images_failed": [],
        "series_skipped": [
            {"series_uid": f"{study_uid}.7", "instances": 12, "reason": "localizer images"}
        ],
        "patient": {"PatientID": PATIENT_ID},
        "PatientID": PATIENT_ID,
    }


def seed_console(world: ApiWorld) -> None:
    """Add to the API tests' two studies: a full result, a timeline, and studies that are
    not applicable, failed and urgently queued."""
    now = utcnow()
    with world.db.write_session() as session:
        reported = session.scalar(select(Study).where(Study.study_uid == STUDY_UID))
        assert reported is not None
        reported.critical = True
        reported.label_set = "chest"
        reported.priority_rule = "stroke-ct"
        result = session.scalar(select(Result).where(Result.study_id == reported.id))
        assert result is not None
        result.findings = result_json(STUDY_UID)
        result.created_at = reported.first_received_at + timedelta(seconds=95)
        session.execute(
            StudyEvent.__table__.delete().where(StudyEvent.study_id == reported.id)  # type: ignore[attr-defined]
        )
        start = reported.first_received_at
        for offset, before, after, reason in (
            (0, None, "receiving", "first instance from CT_SCANNER"),
            (62, "receiving", "stable", "quiet for 60 s"),
            (62, "stable", "queued", "priority stat by rule stroke-ct"),
            (70, "queued", "processing", "worker w1"),
            (95, "processing", "reported", "SR written"),
        ):
            session.add(
                StudyEvent(
                    study_id=reported.id,
                    at=start + timedelta(seconds=offset),
                    from_state=before,
                    to_state=after,
                    reason=reason,
                )
            )
        for uid, state, priority, modality, reason, age in (
            (NOT_APPLICABLE_UID, "not_applicable", 20, "US", NA_REASON, 30),
            (FAILED_UID, "failed", 20, "CR", "all 3 images failed to decode", 50),
            (URGENT_UID, "queued", 30, "CT", None, 2),
        ):
            session.add(
                Study(
                    study_uid=uid,
                    state=state,
                    state_reason=reason,
                    priority=priority,
                    modality=modality,
                    first_received_at=now - timedelta(minutes=age),
                    last_received_at=now - timedelta(minutes=age),
                    instance_count=3,
                )
            )
        sent = Export(
            study_uid=STUDY_UID,
            destination="archive",
            sop_instance_uid=STUDY_UID + ".99.1",
            file_path="results/sr.dcm",
            priority=40,
            state="sent",
            attempts=1,
            sent_at=now,
        )
        session.add(sent)
