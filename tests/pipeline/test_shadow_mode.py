"""Shadow mode with a real node and Orthanc as the PACS: every study is classified and its SR
and result kept, nothing reaches Orthanc; ``triagenode studies`` shows what would have been
sent, and ``evaluate --from-node`` measures the stored results against labels given later."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests import factory
from tests.orthanc import OrthancServer
from tests.peers import run_tool, wait_for
from triagenode.cli import main
from triagenode.node import Node
from triagenode.store.models import AuditEvent, Export, Result, Study

pytestmark = pytest.mark.slow


def _scored(label_set: str, finding: str) -> float:
    from triagenode.metrics import REGISTRY

    value = REGISTRY.get_sample_value(
        "triagenode_finding_score_count", {"label_set": label_set, "finding": finding}
    )
    return value or 0.0


def test_shadow_mode_sends_nothing_and_records_everything(
    make_settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pacs = OrthancServer(tmp_path / "orthanc").start()
    node: Node | None = None
    try:
        settings = make_settings(
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": pacs.ae_title,
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                }
            ],
            export={"mode": "shadow", "backoff_initial_s": 0.2},
            api={"enabled": False},
        )
        scored_before = _scored("chest_xray", "pneumothorax")
        node = Node.build(settings)
        node.start()
        uids = []
        paths = []
        for index in range(3):
            uid = generate_uid()
            uids.append(uid)
            paths.append(
                factory.write(factory.cr_image(uid, seed=index), tmp_path / f"{index}.dcm")
            )
        sent = run_tool(
            "storescu",
            "-aec",
            settings.scp.ae_title,
            "127.0.0.1",
            str(settings.scp.port),
            *map(str, paths),
        )
        assert sent.returncode == 0, sent.stderr

        def all_reported() -> bool:
            with node.db.session() as session:
                states = session.execute(select(Study.state)).scalars().all()
                return len(states) == 3 and all(s == "reported" for s in states)

        wait_for(all_reported, timeout=120, what="3 studies reported")
        with node.db.session() as session:
            assert session.execute(select(Export)).scalars().all() == []
            results = session.execute(select(Result)).scalars().all()
            held = (
                session.execute(
                    select(AuditEvent).where(AuditEvent.event_type == "shadow-not-sent")
                )
                .scalars()
                .all()
            )
        assert len(results) == 3 and len(held) == 3
        # /metrics: the score histogram of each finding counted the three studies
        assert _scored("chest_xray", "pneumothorax") - scored_before == 3
        for result in results:
            assert result.findings["delivery"] == {
                "mode": "shadow",
                "destinations": ["pacs"],
                "sent": False,
            }
            assert (settings.node.data_dir / result.sr_path).is_file()
        stored = {
            r.findings["study_uid"]: {f["name"]: f["score"] for f in r.findings["findings"]}
            for r in results
        }
    finally:
        if node is not None:
            node.stop()
        count = pacs.instance_count()
        pacs.stop()
    assert count == 0  # nothing reached the PACS

    config = tmp_path / "triagenode.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.node.data_dir}"\n'
        f'[audit]\nsecret = "test-secret-0123456789abcdef"\n'
    )
    capsys.readouterr()
    assert main(["studies", "--json", "--config", str(config)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {row["delivery"] for row in listed} == {"shadow: would send to pacs"}

    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["StudyInstanceUID", "pneumothorax", "pleural effusion"])
        writer.writerow([uids[0], 1, 0])
        writer.writerow([uids[1], 0, ""])
        writer.writerow([uids[2], 1, 1])
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--from-node",
                "--labels",
                str(labels),
                "--out",
                str(out),
                "--config",
                str(config),
                "--resamples",
                "100",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    by_name = {f["finding"]: f for f in metrics["findings"]}
    assert by_name["pneumothorax"]["n"] == 3 and by_name["pneumothorax"]["positives"] == 2
    assert by_name["pleural effusion"]["n"] == 2
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        assert float(row["score"]) == pytest.approx(stored[row["study_uid"]][row["finding"]])
        assert row["logit"] != ""  # the raw logit is stored, so a calibration can be fitted
