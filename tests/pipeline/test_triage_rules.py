"""Triage rules: the schema's validation, matching on every field, order, explanations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from triagenode.config.settings import load_settings
from triagenode.config.triage import (
    DEFAULT_RULES,
    MATCH_FIELDS,
    TriageSettings,
    check_label_sets,
)
from triagenode.dicom_attrs import triage_inputs
from triagenode.domain import Priority
from triagenode.errors import ConfigError
from triagenode.pipeline.triage import FIELD_ATTRIBUTES, TriageRules


def rules(*specs: dict[str, Any], default: str = "routine") -> TriageRules:
    return TriageRules(TriageSettings(rules=list(specs), default_priority=default))


# (field, rule values, inputs that match, inputs that do not)
FIELD_CASES = [
    ("request_priority", ["HIGH"], {"RequestPriority": "HIGH"}, {"RequestPriority": "MEDIUM"}),
    (
        "requested_procedure_priority",
        ["stat"],
        {"RequestedProcedurePriority": "STAT"},
        {"RequestedProcedurePriority": "ROUTINE"},
    ),
    (
        "scheduled_priority",
        ["HIGH", "STAT"],
        {"ScheduledProcedureStepPriority": "high"},
        {"ScheduledProcedureStepPriority": "LOW"},
    ),
    ("modality", ["CT", "MR"], {"Modality": "mr"}, {"Modality": "CR"}),
    ("body_part", ["HEAD"], {"BodyPartExamined": "HEAD"}, {"BodyPartExamined": "HEADNECK"}),
    ("keywords", ["stroke"], {"StudyDescription": "CT Head STROKE"}, {"Modality": "CT"}),
    ("keywords", ["stroke"], {"ReasonForStudy": "r/o stroke"}, {"ReasonForStudy": "strokes"}),
    (
        "keywords",
        ["code stroke"],
        {"RequestedProcedureDescription": "CT_HEAD^CODE-STROKE"},
        {"RequestedProcedureDescription": "stroke code"},
    ),
    (
        "keywords",
        ["hemorrhag*"],
        {"ReasonForTheRequestedProcedure": "Hemorrhagic stroke?"},
        {"ReasonForTheRequestedProcedure": "no bleed"},
    ),
    ("keywords", ["trauma"], {"ProtocolName": "TRAUMA_HEAD"}, {"ProtocolName": "ROUTINE"}),
    ("calling_aet", ["ED_CT1"], {"CallingAETitle": "ed_ct1"}, {"CallingAETitle": "ED_CT12"}),
    ("calling_aet", ["ED_*"], {"CallingAETitle": "ED_CT2"}, {"CallingAETitle": "MED_CT2"}),
    (
        "department",
        ["emergency"],
        {"InstitutionalDepartmentName": "Emergency Radiology"},
        {"InstitutionalDepartmentName": "Emergencyish"},
    ),
    (
        "department",
        ["ED"],
        {"InstitutionalDepartmentName": "ED"},
        {"InstitutionalDepartmentName": "MED SURG"},
    ),
]


def test_every_match_field_is_tested_and_reads_attributes() -> None:
    assert {case[0] for case in FIELD_CASES} == set(MATCH_FIELDS) == set(FIELD_ATTRIBUTES)


@pytest.mark.parametrize(("field", "values", "hit", "miss"), FIELD_CASES)
def test_match_on_each_field(
    field: str, values: list[str], hit: dict[str, str], miss: dict[str, str]
) -> None:
    triage = rules({"name": "r", "priority": "stat", field: values})
    decision = triage.evaluate(hit)
    assert (decision.priority, decision.rule) == (Priority.stat, "r")
    # The reason names the attribute that matched.
    assert any(attr in decision.reasons[0] for attr in FIELD_ATTRIBUTES[field])
    missed = triage.evaluate(miss)
    assert (missed.priority, missed.rule) == (Priority.routine, None)


def test_all_conditions_must_hold() -> None:
    triage = rules(
        {"name": "head-ct", "priority": "stat", "modality": ["CT"], "body_part": ["HEAD"]}
    )
    assert triage.evaluate({"Modality": "CT", "BodyPartExamined": "HEAD"}).rule == "head-ct"
    assert triage.evaluate({"Modality": "CT", "BodyPartExamined": "CHEST"}).rule is None
    assert triage.evaluate({"Modality": "CT"}).rule is None  # a missing attribute never matches


def test_first_matching_rule_wins_and_carries_its_label_set() -> None:
    triage = rules(
        {"name": "research", "priority": "low", "calling_aet": ["RESEARCH*"]},
        {"name": "ct", "priority": "urgent", "modality": ["CT"], "label_set": "ct_head"},
        {"name": "any-ct", "priority": "stat", "modality": ["CT"]},
        default="low",
    )
    decision = triage.evaluate({"Modality": "CT", "CallingAETitle": "CT1"})
    assert decision.rule == "ct" and decision.priority is Priority.urgent
    assert decision.label_set == "ct_head"
    assert triage.evaluate({"Modality": "CT", "CallingAETitle": "RESEARCH_PACS"}).rule == (
        "research"
    )
    default = triage.evaluate({"Modality": "US"})
    assert default.priority is Priority.low and default.label_set is None
    assert default.reasons == ["no rule matched: default priority low"]


@pytest.mark.parametrize(
    ("inputs", "rule", "priority"),
    [
        (
            {"Modality": "CT", "StudyDescription": "CODE STROKE", "CallingAETitle": "CT1"},
            "code-stroke",
            Priority.stat,
        ),
        (
            {"Modality": "CT", "BodyPartExamined": "HEAD", "ReasonForStudy": "fall, trauma"},
            "head-ct-emergency",
            Priority.stat,
        ),
        (
            {"Modality": "CT", "BodyPartExamined": "CHEST", "ReasonForStudy": "trauma"},
            None,
            Priority.routine,
        ),
        ({"Modality": "CR", "RequestPriority": "HIGH"}, "sender-high-priority", Priority.urgent),
        ({"RequestedProcedurePriority": "STAT"}, "order-stat", Priority.urgent),
        (
            {"InstitutionalDepartmentName": "Emergency Department"},
            "emergency-department",
            Priority.urgent,
        ),
        (
            {"CallingAETitle": "RESEARCH_AE", "StudyDescription": "code stroke"},
            "research-sender",
            Priority.low,
        ),
        ({"Modality": "CR", "RequestPriority": "MEDIUM"}, None, Priority.routine),
    ],
)
def test_shipped_default_rules(
    inputs: dict[str, str], rule: str | None, priority: Priority
) -> None:
    decision = TriageRules(TriageSettings()).evaluate(inputs)
    assert (decision.rule, decision.priority) == (rule, priority)


def test_rules_read_what_the_receiver_extracts() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    ds.BodyPartExamined = "HEAD"
    request = Dataset()
    request.RequestedProcedureDescription = "CT HEAD WITHOUT CONTRAST"
    request.ReasonForTheRequestedProcedure = "Sudden aphasia, code stroke"
    ds.RequestAttributesSequence = [request]
    decision = TriageRules(TriageSettings()).evaluate(triage_inputs(ds, 0, "CT_ROOM1"))
    assert (decision.rule, decision.priority) == ("code-stroke", Priority.stat)
    assert "ReasonForTheRequestedProcedure" in decision.reasons[1]


def test_explain_lists_every_rule_up_to_the_match() -> None:
    triage = rules(
        {"name": "mr", "priority": "urgent", "modality": ["MR"]},
        {"name": "stroke", "priority": "stat", "modality": ["CT"], "keywords": ["stroke"]},
        {"name": "never-reached", "priority": "low", "modality": ["CT"]},
    )
    text = triage.explain({"Modality": "CT", "StudyDescription": "Stroke protocol"})
    assert "1. mr -> urgent: no match" in text
    assert "no  modality: Modality 'CT': none of MR" in text
    assert "2. stroke -> stat: MATCH" in text
    assert "yes keywords: StudyDescription 'Stroke protocol' contains 'stroke'" in text
    assert "never-reached" not in text
    assert text.endswith("decision: stat (rule 'stroke')")
    missing = triage.explain({})
    assert "Modality not present (wanted MR)" in missing
    assert missing.endswith("decision: routine (default priority)")


def test_describe_gives_the_rule_table() -> None:
    rows = TriageRules(TriageSettings()).describe()
    assert [r["name"] for r in rows[:-1]] == [r.name for r in DEFAULT_RULES]
    assert rows[-1]["name"] == "(default)" and rows[-1]["priority"] == "routine"
    assert "modality in [CT, MR] AND keywords in [code stroke" in rows[1]["conditions"]


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "triagenode.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n{body}', encoding="utf-8")
    return path


def test_rules_from_toml(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        [triage]
        default_priority = "low"
        aging_after_s = 900
        lease_s = 120
        [[triage.rules]]
        name = "code-stroke"
        priority = "STAT"
        modality = ["CT"]
        keywords = ["code stroke", "hemorrhag*"]
        [[triage.rules]]
        name = "ed"
        priority = "urgent"
        calling_aet = ["ED_*"]
        request_priority = ["high"]
        """,
    )
    settings = load_settings(path)
    assert [r.name for r in settings.triage.rules] == ["code-stroke", "ed"]
    assert settings.triage.rules[0].priority is Priority.stat
    assert settings.triage.rules[1].request_priority == ["HIGH"]
    assert settings.triage.default_priority is Priority.low
    assert (settings.triage.aging_after_s, settings.triage.lease_s) == (900, 120)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            'name = "x"\npriority = "asap"\nmodality = ["CT"]',
            "triage.rules.#1 'x'.priority: unknown priority 'asap'; allowed: low, routine",
        ),
        (
            'name = "x"\npriority = "stat"\ncolour = ["red"]',
            "triage.rules.#1 'x'.colour: unknown key",
        ),
        ('name = "empty"\npriority = "stat"', "triage.rules.#1 'empty': rule has no conditions"),
        (
            'name = "x"\npriority = "stat"\nrequest_priority = ["URGENT"]',
            "triage.rules.#1 'x'.request_priority: unknown value 'URGENT'; allowed: HIGH",
        ),
        (
            'name = "x"\npriority = "stat"\nscheduled_priority = ["SOON"]',
            "triage.rules.#1 'x'.scheduled_priority: unknown value 'SOON'; allowed: STAT",
        ),
        ('priority = "stat"\nmodality = ["CT"]', "triage.rules.#1.name: Field required"),
        ('name = "x"\npriority = "stat"\nmodality = "CT"', "triage.rules.#1 'x'.modality: "),
        ('name = "x"\npriority = "stat"\nkeywords = [" "]', "values must not be empty"),
    ],
)
def test_bad_rule_is_a_start_error_naming_it(tmp_path: Path, rule: str, expected: str) -> None:
    path = write_config(tmp_path, f"[[triage.rules]]\n{rule}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert expected in str(caught.value)


def test_second_bad_rule_is_named_by_its_position(tmp_path: Path) -> None:
    body = (
        '[[triage.rules]]\nname = "ok"\npriority = "stat"\nmodality = ["CT"]\n'
        '[[triage.rules]]\nname = "bad"\npriority = "stat"\nmodalty = ["CT"]\n'
    )
    with pytest.raises(ConfigError, match=r"triage\.rules\.#2 'bad'\.modalty: unknown key"):
        load_settings(write_config(tmp_path, body))


def test_duplicate_rule_names_are_refused(tmp_path: Path) -> None:
    body = (
        '[[triage.rules]]\nname = "dup"\npriority = "stat"\nmodality = ["CT"]\n'
        '[[triage.rules]]\nname = "dup"\npriority = "low"\nmodality = ["MR"]\n'
    )
    with pytest.raises(ConfigError, match=r"triage\.rules: rule names must be unique.*dup"):
        load_settings(write_config(tmp_path, body))


def test_label_set_of_a_rule_must_exist() -> None:
    triage = TriageSettings(
        rules=[
            {"name": "ok", "priority": "stat", "modality": ["CT"], "label_set": "ct_head"},
            {"name": "typo", "priority": "stat", "modality": ["CR"], "label_set": "cxr"},
        ]
    )
    check_label_sets(triage, ["ct_head", "cxr"])
    with pytest.raises(ConfigError) as caught:
        check_label_sets(triage, ["ct_head"])
    assert str(caught.value) == (
        "triage.rules.#2 'typo'.label_set: unknown label set 'cxr'; allowed: ct_head"
    )


def test_notify_webhook_must_be_http(make_settings) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"triage\.notify\.webhook_url: must be an http"):
        make_settings(triage={"notify": {"webhook_url": "file:///etc/passwd"}})
    settings = make_settings(triage={"notify": {"webhook_url": "http://127.0.0.1:9/hook"}})
    assert settings.triage.notify.webhook_url == "http://127.0.0.1:9/hook"


# `triagenode triage ...` ------------------------------------------------------------------


@pytest.fixture
def cli_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_config(tmp_path, "")


def test_cli_explain_a_file(
    tmp_path: Path, cli_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests import factory
    from triagenode.cli import main

    ds = factory.ct_slice("1.2.3.4", "1.2.3.4.1", 0, ReasonForStudy="suspected SAH")
    path = factory.write(ds, tmp_path / "head.dcm")
    assert main(["triage", "explain", str(path), "--config", str(cli_config)]) == 0
    out = capsys.readouterr().out
    assert f"== {path}" in out
    assert "3. head-ct-emergency -> stat: MATCH" in out
    assert "yes keywords: ReasonForStudy 'suspected SAH' contains 'SAH'" in out
    assert "\ndecision: stat (rule 'head-ct-emergency')\n" in out
    assert "request priority: not known" in out
    assert out.rstrip().endswith(
        "label set: ct_head (domain rule 3: Modality CT, BodyPartExamined HEAD)"
    )
    assert factory.PATIENT_NAME not in out and factory.PATIENT_ID not in out


def test_cli_explain_assumed_sender_json_and_bad_file(
    tmp_path: Path, cli_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from tests import factory
    from triagenode.cli import main

    good = factory.write(factory.cr_image(), tmp_path / "cr.dcm")
    bad = tmp_path / "notes.txt"
    bad.write_text("not DICOM", encoding="utf-8")
    argv = ["triage", "explain", str(good), str(bad), "--request-priority", "HIGH", "--json"]
    assert main([*argv, "--calling-aet", "CR_ROOM2", "--config", str(cli_config)]) == 1
    captured = capsys.readouterr()
    [report] = json.loads(captured.out)
    assert report["inputs"]["RequestPriority"] == "HIGH"
    assert report["request_priority"] == {"name": "HIGH", "value": 1}
    assert report["inputs"]["CallingAETitle"] == "CR_ROOM2"
    assert (report["rule"], report["priority"]) == ("sender-high-priority", "urgent")
    assert report["checks"][0] == {
        "rule": "research-sender",
        "priority": "low",
        "matched": False,
        "conditions": [
            {
                "field": "calling_aet",
                "matched": False,
                "reason": "CallingAETitle 'CR_ROOM2': none of RESEARCH*",
            }
        ],
    }
    assert f"{bad}: not a readable DICOM file" in captured.err


def test_cli_rules_table_through_the_console_script(cli_config: Path) -> None:
    import subprocess

    done = subprocess.run(
        ["triagenode", "triage", "rules", "--config", str(cli_config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ORDER", "NAME", "PRIORITY", "LABEL_SET", "CONDITIONS"]
    assert lines[2].split()[:3] == ["2", "code-stroke", "stat"]
    assert "(default)" in done.stdout and "aging: one level up per 3600 s" in done.stdout


def test_triage_settings_from_the_environment(
    make_settings, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TRIAGENODE_TRIAGE__DEFAULT_PRIORITY", "urgent")
    monkeypatch.setenv("TRIAGENODE_TRIAGE__LEASE_S", "30")
    monkeypatch.setenv(
        "TRIAGENODE_TRIAGE__RULES", '[{"name": "ct", "priority": "stat", "modality": ["CT"]}]'
    )
    settings = make_settings()
    assert settings.triage.default_priority is Priority.urgent
    assert settings.triage.lease_s == 30
    assert [r.name for r in settings.triage.rules] == ["ct"]
    assert DEFAULT_RULES[0].name == "research-sender"  # the shipped rules are untouched


def test_cli_queue_lists_jobs_in_claim_order(
    tmp_path: Path, cli_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from triagenode.cli import main
    from triagenode.cli.common import open_database
    from triagenode.pipeline.queue import JobQueue
    from triagenode.store.models import Study

    settings = load_settings(cli_config)
    db = open_database(settings)
    with db.session() as session:
        studies = [Study(study_uid=f"1.2.9.{i}", state="queued") for i in range(3)]
        session.add_all(studies)
        session.flush()
        ids = [s.id for s in studies]
    queue = JobQueue(db, settings)
    for study_id, priority in zip(ids, ["routine", "stat", "low"], strict=True):
        queue.enqueue(study_id, priority, 1)
    db.dispose()
    assert main(["triage", "queue", "--json", "--config", str(cli_config)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["pending"] == {"stat": 1, "urgent": 0, "routine": 1, "low": 1}
    assert [j["study_uid"] for j in listing["jobs"]] == ["1.2.9.1", "1.2.9.0", "1.2.9.2"]
    assert main(["triage", "queue", "--config", str(cli_config)]) == 0
    assert "pending: stat 1, urgent 0, routine 1, low 1; held by workers: 0" in (
        capsys.readouterr().out
    )


def test_unknown_label_set_stops_the_start(make_settings) -> None:  # type: ignore[no-untyped-def]
    rule = {"name": "stroke", "priority": "stat", "modality": ["CT"], "label_set": "ct_brain"}
    with pytest.raises(ConfigError, match=r"'stroke'\.label_set: unknown label set 'ct_brain'"):
        make_settings(triage={"rules": [rule]})
    settings = make_settings(triage={"rules": [{**rule, "label_set": "ct_head"}]})
    assert settings.triage.rules[0].label_set == "ct_head"


def test_cli_explain_names_request_priority_and_label_set(
    tmp_path: Path, cli_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PS3.7 9.3.1.1: HIGH is 0x0001; a hand radiograph gets no chest label set."""
    from tests import factory
    from triagenode.cli import main

    hand_ds = factory.cr_image(BodyPartExamined="HAND", StudyDescription="XR HAND 3 VIEWS")
    hand = factory.write(hand_ds, tmp_path / "hand.dcm")
    argv = ["triage", "explain", str(hand), "--request-priority", "HIGH"]
    assert main([*argv, "--config", str(cli_config)]) == 0
    out = capsys.readouterr().out
    assert "request priority: HIGH (0x0001)" in out
    assert "label set: none, not classified (no domain rule fits Modality 'CR'" in out
