"""The JSON twin of an SR: the same result for scripts, the API and the database.

It carries what the SR carries (findings, probabilities, model identity, priority, images)
plus what only machines need (backend, timings, failed images with their reasons). When the
demo model ran it says so at the top, as every output of the demo model must.
"""

from __future__ import annotations

from typing import Any

from triagenode.domain import DEMO_WARNING, ImageRef, StudyResult

__all__ = ["JSON_FORMAT_VERSION", "result_to_json"]

# 2: per-finding "score" (was "probability"), calibration, label set reason, series skipped,
#    the SR this one supersedes.
JSON_FORMAT_VERSION = 2


def _image(ref: ImageRef) -> dict[str, Any]:
    data: dict[str, Any] = {
        "sop_class_uid": ref.sop_class_uid,
        "sop_instance_uid": ref.sop_instance_uid,
        "series_uid": ref.series_uid,
    }
    if ref.frame is not None:
        data["frame"] = ref.frame
    return data


def result_to_json(
    result: StudyResult,
    sr_uids: Any | None = None,
    *,
    sr_sop_instance_uid: str | None = None,
    sr_series_uid: str | None = None,
    supersedes: str | None = None,
) -> dict[str, Any]:
    """``result`` as a JSON-ready dict (no PHI: only UIDs, codes and numbers).

    Parameters
    ----------
    result
        The classification of one study.
    sr_uids
        The SR's UIDs (:class:`~triagenode.reports.content.SrUids` or a mapping with
        ``series_instance_uid`` and ``sop_instance_uid``); ``None`` when no SR was made.
    sr_sop_instance_uid, sr_series_uid
        The same UIDs given one by one, instead of ``sr_uids``.
    supersedes
        SOP Instance UID of the earlier SR this result replaces, if any.

    Returns
    -------
    dict
        Keys: ``format``, ``study_uid``, ``sr``, ``model``, ``backend``, ``label_set``,
        ``label_set_reason``, ``aggregation``, ``calibration``, ``priority``,
        ``priority_rule``, ``critical`` (escalated), ``flagged`` (any critical finding),
        ``top_finding``, ``findings``, ``images_used``, ``images_failed``,
        ``series_skipped``, ``timings_ms``, ``supersedes`` when it replaces an earlier SR
        and, for the demo model, ``warning``.
    """
    sr: dict[str, Any] | None = None
    if sr_uids is None and sr_sop_instance_uid is not None:
        sr_uids = {"series_instance_uid": sr_series_uid, "sop_instance_uid": sr_sop_instance_uid}
    if sr_uids is not None:
        get = sr_uids.get if isinstance(sr_uids, dict) else lambda k: getattr(sr_uids, k)
        sr = {
            "series_instance_uid": get("series_instance_uid"),
            "sop_instance_uid": get("sop_instance_uid"),
        }
    top = result.top_finding
    data: dict[str, Any] = {
        "format": JSON_FORMAT_VERSION,
        "study_uid": result.study_uid,
        "sr": sr,
        "model": {
            "name": result.model.name,
            "display_name": result.model.display_name,
            "version": result.model.version,
            "weights_sha256": result.model.weights_sha256,
            "source": result.model.source,
            "is_demo": result.model.is_demo,
        },
        "backend": result.backend,
        "label_set": result.label_set,
        "aggregation": result.aggregation,
        "priority": result.priority.name,
        "priority_rule": result.priority_rule,
        "critical": result.critical,
        "flagged": result.flagged,
        "calibration": result.calibration,
        "label_set_reason": result.label_set_reason,
        "top_finding": top.name if top is not None else None,
        "findings": [
            {
                "name": f.name,
                "code": {
                    "scheme": f.code_scheme,
                    "value": f.code_value,
                    "meaning": f.code_meaning,
                },
                "score": float(f.score),
                "calibrated": f.calibrated,
                "threshold": float(f.threshold),
                "present": f.present,
                "critical": f.critical,
                "escalates": f.escalates,
                "images": [_image(ref) for ref in f.images],
            }
            for f in result.findings
        ],
        "images_used": [_image(ref) for ref in result.images_used],
        "images_failed": [
            {**_image(ref), "reason": reason} for ref, reason in result.images_failed
        ],
        "series_skipped": [
            {"series_uid": s.series_uid, "instances": s.instances, "reason": s.reason}
            for s in result.series_skipped
        ],
        "timings_ms": {k: float(v) for k, v in result.timings_ms.items()},
    }
    if supersedes is not None:
        data["supersedes"] = supersedes
    if result.model.is_demo:
        data = {"warning": DEMO_WARNING, **data}
    return data
