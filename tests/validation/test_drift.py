"""Drift monitoring: PSI and KS of a shifted synthetic score stream against the validation
reference; ``triagenode monitor`` warns, audits and exits 1 only when the stream drifted; the
worker's Prometheus histogram and positive-call counter."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from triagenode.cli import main
from triagenode.cli.common import open_database
from triagenode.store.models import AuditEvent, Result, Study
from triagenode.validation.drift import compare, psi, reference_distribution

KEY = "chest_xray/pneumothorax"


def _reference(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    body = {
        "reference": {KEY: reference_distribution(rng.normal(0, 1, 2000))},
        "inputs": {"Modality": {"CR": 1.0}},
        "inputs_n": 2000,
    }
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(body))
    return path


def test_psi_and_ks_separate_a_shifted_stream_from_a_stable_one(tmp_path: Path) -> None:
    reference = json.loads(_reference(tmp_path).read_text())
    rng = np.random.default_rng(2)
    stable = rng.normal(0, 1, 500)
    shifted = rng.normal(1, 1, 500)
    assert psi(reference["reference"][KEY], stable) < 0.1
    assert psi(reference["reference"][KEY], shifted) > 0.25
    rows = compare(reference, {KEY: list(shifted)}, psi_limit=0.2)
    assert rows[0].drifted and rows[0].ks is not None and rows[0].ks > 0.3
    rows = compare(reference, {KEY: list(stable)}, psi_limit=0.2)
    assert not rows[0].drifted and rows[0].ks is not None and rows[0].ks < 0.1
    few = compare(reference, {KEY: list(shifted[:5])}, psi_limit=0.2)
    assert not few[0].drifted and "fewer than" in few[0].note


@pytest.mark.parametrize("shift, expected", [(0.0, 0), (1.5, 1)])
def test_monitor_warns_and_audits_only_a_drifted_window(
    make_settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, shift: float, expected: int
) -> None:
    settings = make_settings()
    db = open_database(settings)
    rng = np.random.default_rng(3)
    with db.write_session() as session:
        for index, logit in enumerate(rng.normal(shift, 1, 200)):
            study = Study(
                study_uid=f"1.2.3.{index}", state="reported", triage_inputs={"Modality": "CR"}
            )
            session.add(study)
            session.flush()
            session.add(
                Result(
                    study_id=study.id,
                    run=1,
                    model_name="demo",
                    model_version="0",
                    weights_sha256="a" * 64,
                    backend="torch",
                    label_set="chest_xray",
                    findings={"findings": [{"name": "pneumothorax", "score": 0.5, "logit": logit}]},
                )
            )
    config = tmp_path / "triagenode.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.node.data_dir}"\n'
        '[audit]\nsecret = "test-secret-0123456789abcdef"\n'
    )
    reference = _reference(tmp_path)
    with caplog.at_level(logging.WARNING, logger="triagenode.monitor"):
        code = main(["monitor", "--reference", str(reference), "--config", str(config)])
    assert code == expected
    with db.session() as session:
        events = (
            session.execute(select(AuditEvent).where(AuditEvent.event_type == "score-drift"))
            .scalars()
            .all()
        )
    db.dispose()
    warned = [r for r in caplog.records if "drift: chest_xray/pneumothorax" in r.getMessage()]
    assert len(events) == expected and len(warned) == expected


def test_worker_metrics_count_scores_and_positive_calls() -> None:
    from triagenode.metrics import FINDING_POSITIVE, FINDING_SCORE, REGISTRY

    before = REGISTRY.get_sample_value(
        "triagenode_finding_positive_total", {"label_set": "s", "finding": "f"}
    )
    FINDING_SCORE.labels("s", "f").observe(0.7)
    FINDING_POSITIVE.labels("s", "f").inc()
    after = REGISTRY.get_sample_value(
        "triagenode_finding_positive_total", {"label_set": "s", "finding": "f"}
    )
    assert (after or 0) - (before or 0) == 1
    bucket = REGISTRY.get_sample_value(
        "triagenode_finding_score_bucket", {"label_set": "s", "finding": "f", "le": "0.7"}
    )
    assert bucket is not None and bucket >= 1
