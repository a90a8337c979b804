"""DICOM audit messages (PS3.15 A.5.1, the IHE ATNA format) from audit rows.

Each audit row becomes one ``<AuditMessage>``: the event and its outcome, the actor and the
node as active participants, the node as audit source, and as participant objects the study,
the patient *pseudonym* (the HMAC, never the patient ID) and the audit record itself with its
chain position and hash, so a collector's copy can be checked against the trail.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timezone
from importlib import resources
from types import SimpleNamespace
from typing import Any

from lxml import etree

from triagenode.audit.encoding import xml_safe
from triagenode.config.settings import Settings

__all__ = ["AuditSource", "audit_message", "defanged", "export_document", "schema", "to_bytes"]

_DCM = "DCM"
# HL7's convention for locally defined coding schemes: a "99" prefix.
_LOCAL = "99TRIAGENODE"

_EVENT_MEANINGS = {
    "110100": "Application Activity",
    "110101": "Audit Log Used",
    "110102": "Begin Transferring DICOM Instances",
    "110103": "DICOM Instances Accessed",
    "110104": "DICOM Instances Transferred",
    "110106": "Export",
    "110112": "Query",
    "110113": "Security Alert",
    "110114": "User Authentication",
}
# The node's event_type strings that have a DCM EventTypeCode; others use the local scheme.
_EVENT_TYPES = {
    "start": ("110120", "Application Start"),
    "stop": ("110121", "Application Stop"),
    "login": ("110122", "Login"),
    "logout": ("110123", "Logout"),
    "node_authentication": ("110126", "Node Authentication"),
    "association-rejected": ("110126", "Node Authentication"),
    "rejected_ae": ("110126", "Node Authentication"),
    "security_configuration": ("110129", "Security Configuration"),
    "use_of_restricted_function": ("110132", "Use of a restricted function"),
    "integrity_failure": ("110132", "Use of a restricted function"),
    "user_security_attributes_changed": ("110137", "User security Attributes Changed"),
}
# Who requested the event: the actor for incoming work, the node for what it sends.
_NODE_IS_SOURCE = {"sent", "export", "forwarded"}
_ROLE_SOURCE = ("110153", "Source Role ID")
_ROLE_DESTINATION = ("110152", "Destination Role ID")
_ROLE_APPLICATION = ("110150", "Application")


@dataclass(frozen=True)
class AuditSource:
    """The node as it names itself in audit messages."""

    source_id: str  # AuditSourceID: the node's AE title
    site_id: str | None = None  # AuditEnterpriseSiteID: the institution
    hostname: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditSource:
        return cls(
            source_id=settings.scp.ae_title,
            site_id=settings.node.institution_name or None,
            hostname=os.uname().nodename,
        )


def _sub(parent: etree._Element, tag: str, attributes: dict[str, Any]) -> etree._Element:
    """A child element whose attribute values, from wherever they came, are valid XML."""
    return etree.SubElement(parent, tag, {k: xml_safe(v) for k, v in attributes.items()})


def _set(element: etree._Element, attributes: dict[str, Any]) -> None:
    for name, value in attributes.items():
        element.set(name, xml_safe(value))


def _coded(parent: etree._Element, tag: str, code: str, system: str, meaning: str) -> None:
    _sub(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


def _access_point(address: str | None) -> dict[str, str]:
    if not address:
        return {}
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    try:
        ipaddress.ip_address(host.strip("[]"))
        kind = "2"
    except ValueError:
        kind = "1"
    return {"NetworkAccessPointID": host, "NetworkAccessPointTypeCode": kind}


def _b64(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return base64.b64encode(text.encode("utf-8", "backslashreplace")).decode("ascii")


def defanged(row: Any) -> Any:
    """A copy of an audit row with every string replaced by its ASCII ``repr`` body: the
    fallback rendering of a row that could not be written as it is (never expected, as every
    value is escaped, but one row must not stop an export or the forwarder)."""

    def plain(value: Any) -> Any:
        if isinstance(value, str):
            return ascii(value)[1:-1]
        if isinstance(value, dict):
            return {plain(str(k)): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    names = (
        "seq", "at", "event_id", "event_type", "action", "outcome", "actor", "actor_address",
        "study_uid", "patient_ref", "details", "prev_hash", "row_hash",
    )  # fmt: skip
    return SimpleNamespace(**{name: plain(getattr(row, name)) for name in names})


def audit_message(row: Any, source: AuditSource) -> etree._Element:
    """One ``<AuditMessage>`` element for one audit row.

    Parameters
    ----------
    row
        An :class:`~triagenode.store.models.AuditEvent` (or a row with its columns).
    source
        How the node names itself.
    """
    message = etree.Element("AuditMessage")
    at = row.at.astimezone(timezone.utc).isoformat(timespec="microseconds")
    identification = _sub(
        message,
        "EventIdentification",
        {
            "EventActionCode": row.action or "E",
            "EventDateTime": at.replace("+00:00", "Z"),
            "EventOutcomeIndicator": str(int(row.outcome)),
        },
    )
    _coded(
        identification,
        "EventID",
        row.event_id,
        _DCM,
        _EVENT_MEANINGS.get(row.event_id, row.event_id),
    )
    if row.event_type:
        code, meaning = _EVENT_TYPES.get(row.event_type, (row.event_type, row.event_type))
        system = _DCM if row.event_type in _EVENT_TYPES else _LOCAL
        _coded(identification, "EventTypeCode", code, system, meaning)
    reason = (row.details or {}).get("reason") if isinstance(row.details, dict) else None
    if row.outcome and reason:
        etree.SubElement(identification, "EventOutcomeDescription").text = xml_safe(
            " ".join(str(reason).split())
        )

    node_is_source = row.event_type in _NODE_IS_SOURCE
    if row.actor:
        actor = _sub(
            message,
            "ActiveParticipant",
            {"UserID": row.actor, "UserIsRequestor": "false" if node_is_source else "true"},
        )
        _set(actor, _access_point(row.actor_address))
        role = _ROLE_DESTINATION if node_is_source else _ROLE_SOURCE
        _coded(actor, "RoleIDCode", role[0], _DCM, role[1])
    node = _sub(
        message,
        "ActiveParticipant",
        {
            "UserID": source.source_id,
            "AlternativeUserID": str(os.getpid()),
            "UserIsRequestor": "true" if node_is_source or not row.actor else "false",
        },
    )
    if source.hostname:
        _set(node, {"NetworkAccessPointID": source.hostname, "NetworkAccessPointTypeCode": "1"})
    role = (
        _ROLE_SOURCE if node_is_source else (_ROLE_DESTINATION if row.actor else _ROLE_APPLICATION)
    )
    _coded(node, "RoleIDCode", role[0], _DCM, role[1])

    audit_source = _sub(message, "AuditSourceIdentification", {"AuditSourceID": source.source_id})
    if source.site_id:
        _set(audit_source, {"AuditEnterpriseSiteID": source.site_id})
    # RFC 3881 audit source type 4: application server process.
    _coded(audit_source, "AuditSourceTypeCode", "4", _DCM, "Application Server")

    if row.study_uid:
        study = _sub(
            message,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": row.study_uid,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            },
        )
        _coded(study, "ParticipantObjectIDTypeCode", "110180", _DCM, "Study Instance UID")
    if row.patient_ref:
        patient = _sub(
            message,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": row.patient_ref,
                "ParticipantObjectTypeCode": "1",
                "ParticipantObjectTypeCodeRole": "1",
            },
        )
        _coded(
            patient,
            "ParticipantObjectIDTypeCode",
            "PSEUDONYM",
            _LOCAL,
            "HMAC-SHA256 of the Patient ID",
        )
    record = _sub(
        message,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": f"audit-event-{row.seq}",
            "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "13",  # security resource
        },
    )
    _coded(record, "ParticipantObjectIDTypeCode", "AUDIT-RECORD", _LOCAL, "triagenode audit record")
    extra = row.details if isinstance(row.details, dict) else {"details": row.details}
    details = {
        **extra,
        "seq": row.seq,
        "prev_hash": row.prev_hash,
        "row_hash": row.row_hash,
    }
    for name in sorted(details):
        if details[name] is not None:
            _sub(record, "ParticipantObjectDetail", {"type": name, "value": _b64(details[name])})
    return message


def export_document(rows: Iterable[Any], source: AuditSource) -> etree._Element:
    """An ``<AuditMessages>`` document holding one message per row."""
    root = etree.Element("AuditMessages")
    for row in rows:
        root.append(audit_message(row, source))
    return root


def to_bytes(element: etree._Element, *, declaration: bool = True) -> bytes:
    """Serialise without pretty-printing: one message is one line (syslog needs that)."""
    data: bytes = etree.tostring(element, encoding="UTF-8", xml_declaration=declaration)
    return data


def schema(name: str = "dicom-audit-message.rng") -> etree.RelaxNG:
    """The RELAX NG schema shipped in ``audit/schema`` (``triagenode-audit-export.rng`` for
    file exports)."""
    folder = resources.files("triagenode.audit") / "schema"
    with resources.as_file(folder / name) as path:
        return etree.RelaxNG(etree.parse(str(path)))
