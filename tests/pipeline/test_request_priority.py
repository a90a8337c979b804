"""The C-STORE request Priority through a real association, to the study's triage decision.

PS3.7 section 9.3.1.1 defines Priority (0000,0700) as LOW = 0002H, MEDIUM = 0000H,
HIGH = 0001H. The values here are written from the standard's text, not from the node's
table, and sent by pynetdicom (whose ``priority`` argument is the raw field), so a mapping
slip in the node cannot pass.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from sqlalchemy import select

from tests import factory
from tests.receiver_fixtures import Node
from triagenode.domain import Priority
from triagenode.pipeline.tracker import StudyTracker
from triagenode.pipeline.triage import TriageRules
from triagenode.store.models import Study, utcnow

PS3_7_PRIORITY = {"LOW": 0x0002, "MEDIUM": 0x0000, "HIGH": 0x0001}


def _send(port: int, path: Path, priority: int) -> int:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGENODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path, priority=priority).Status)
    finally:
        assoc.release()


@pytest.mark.parametrize(
    ("name", "rule", "priority"),
    [
        ("HIGH", "sender-high-priority", Priority.urgent),
        ("MEDIUM", None, Priority.routine),
        ("LOW", "sender-low-priority", Priority.low),
    ],
)
def test_request_priority_reaches_the_triage_decision(
    node: Node, tmp_path: Path, name: str, rule: str | None, priority: Priority
) -> None:
    ds = factory.cr_image(StudyDescription="XR CHEST PA")
    path = factory.write(ds, tmp_path / "cr.dcm")
    assert _send(node.port, path, PS3_7_PRIORITY[name]) == 0x0000
    with node.db.session() as session:
        study = session.execute(select(Study)).scalar_one()
        assert study.triage_inputs["RequestPriority"] == name
    tracker = StudyTracker(
        node.settings, node.db, node.audit, TriageRules(node.settings.triage).prioritize
    )
    tracker.poll(utcnow() + timedelta(seconds=3600))
    with node.db.session() as session:
        study = session.execute(select(Study)).scalar_one()
        assert (study.priority_rule, Priority(study.priority)) == (rule, priority)


def test_two_instances_keep_the_most_urgent_request(node: Node, tmp_path: Path) -> None:
    study_uid = factory.cr_image().StudyInstanceUID
    for index, name in enumerate(("LOW", "HIGH", "MEDIUM")):
        ds = factory.cr_image(study_uid, seed=index)
        path = factory.write(ds, tmp_path / f"{index}.dcm")
        assert _send(node.port, path, PS3_7_PRIORITY[name]) == 0x0000
    with node.db.session() as session:
        study = session.execute(select(Study)).scalar_one()
        assert study.triage_inputs["RequestPriority"] == "HIGH"
