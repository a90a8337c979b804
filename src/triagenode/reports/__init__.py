"""Results as DICOM SR (TID 1500) and JSON.

``build_sr`` turns a :class:`~triagenode.domain.StudyResult` into a Comprehensive 3D SR,
``write_sr`` stores it (and its JSON twin) under ``data_dir/results``, ``summarize_sr``
reads one back into plain values.
"""

from triagenode.reports.content import SrUids, device_uid, installation_id, sr_uids
from triagenode.reports.reader import SrFinding, SrSummary, summarize_sr
from triagenode.reports.result_json import result_to_json
from triagenode.reports.sr import SR_SERIES_NUMBER, build_sr, read_sr, sr_path, write_sr

__all__ = [
    "SR_SERIES_NUMBER",
    "SrFinding",
    "SrSummary",
    "SrUids",
    "build_sr",
    "device_uid",
    "installation_id",
    "read_sr",
    "result_to_json",
    "sr_path",
    "sr_uids",
    "summarize_sr",
    "write_sr",
]
