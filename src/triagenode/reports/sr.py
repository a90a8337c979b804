"""The node's result as a DICOM Structured Report: a TID 1500 Imaging Measurement Report.

Which SR IOD, and why
---------------------
The SR is a **Comprehensive 3D SR** (1.2.840.10008.5.1.4.1.1.88.34). TID 1500 may be carried
by Enhanced SR, Comprehensive SR or Comprehensive 3D SR; we choose Comprehensive 3D SR
because

- it is the IOD highdicom builds and validates TID 1500 documents for, and the one the
  quantitative-imaging tools (dcmqi, 3D Slicer, OHIF's measurement tracking) read and write;
- Enhanced SR forbids SCOORD3D and by-reference relationships: a later version that points
  at a region (a heat map's peak, a segmentation) in patient coordinates would need a new
  SOP class, which a PACS may not be configured to accept; Comprehensive 3D SR is the
  superset, so the SOP class stays the same as the content grows;
- PACS and viewers that store "any SR" (Orthanc, dcm4chee) accept it like the others.

What is in it: the observation context names the node as a device observer; a document-level
"Qualitative Evaluations" container comes first among the report's contents and opens with
the summary a radiologist reads in two seconds, then the triage priority and the critical
flag (TID 1500 is extensible; text viewers render the tree in order, so the summary must
come before the image library and the measurement groups); each finding is one measurement
group (finding type = the label's concept, present/absent, score with unit "1" -- a
probability only once a site calibration is applied --, tracking id/UID, source images with
frame numbers); the image library lists every source image. The document is COMPLETE
(every finding of the set is reported) and UNVERIFIED (no physician signed it).

Character sets: the patient and study attributes are taken from the source *decoded*
(pydicom applies its Specific Character Set, e.g. ISO 2022 IR 87 Japanese or IR 149
Korean), and the SR is written in UTF-8 (ISO_IR 192), which holds any of them. Legacy date
and time values (``2004.01.30``, ``14:04:38``) are rewritten in the current DA/TM form.

Re-processing: every run of the same model on a study is an instance of one SR series,
numbered by run; a later run's SR lists the one it supersedes in its Predecessor Documents
Sequence.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from highdicom.sr import Comprehensive3DSR, MeasurementReport, RelationshipTypeValues
from pydicom.dataset import Dataset

from triagenode import __version__
from triagenode.config.settings import Settings
from triagenode.domain import DEMO_WARNING, ImageRef, StudyResult
from triagenode.errors import DicomInputError, StorageError
from triagenode.reports import codes as tn_codes
from triagenode.reports.content import (
    DEVICE_MODEL_NAME,
    MANUFACTURER,
    SrUids,
    algorithm_identification,
    image_library,
    installation_id,
    measurement_group,
    observation_context,
    qualitative_evaluations,
    sr_uids,
    unique_images,
)
from triagenode.reports.result_json import result_to_json

__all__ = [
    "DEMO_SERIES_DESCRIPTION",
    "SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "build_sr",
    "local_utc_offset",
    "read_sr",
    "source_header",
    "sr_path",
    "superseded_uid",
    "write_sr",
]

log = logging.getLogger(__name__)

# highdicom warns about single-component person names by quoting the name: that is PHI in
# whatever handles warnings (logs), and the name is the source's, not ours to change.
warnings.filterwarnings(
    "ignore", message=r"The string .* is unlikely to represent the intended person name"
)

SR_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "AI triage — BiomedCLIP — not for diagnostic use"
DEMO_SERIES_DESCRIPTION = f"AI triage — BiomedCLIP — {DEMO_WARNING}"
# Patient and study attributes highdicom needs from the first evidence item (type 2: may be
# empty, but must be present).
_TYPE2_FROM_SOURCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# What the SR copies from its source: its identity and the patient and study modules.
_FROM_SOURCE = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    *_TYPE2_FROM_SOURCE,
    "IssuerOfPatientID",
    "PatientAge",
    "StudyDescription",
    "TimezoneOffsetFromUTC",
)
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_TZ = re.compile(r"^[+-]\d{4}$")


def _current_form(keyword: str, value: object) -> object:
    """DA/TM values in today's form: ACR-NEMA ``2004.01.30`` and ``14:04:38`` rewritten;
    anything that still is not a valid value becomes empty (the attributes are type 2)."""
    if keyword.endswith("Date"):
        text = str(value or "").strip().replace(".", "")
        return text if _DA.match(text) else ""
    if keyword.endswith("Time"):
        text = str(value or "").strip().replace(":", "")
        return text if _TM.match(text) else ""
    return value


def source_header(source: Dataset, result: StudyResult) -> Dataset:
    """The source's identity, patient and study attributes, decoded to Unicode.

    Only these are copied (never private or unknown elements), each value decoded with the
    source's own character set, so they can be written in UTF-8 whatever the source used.
    """
    decoded = Dataset()
    for keyword in _FROM_SOURCE:
        if keyword in source:
            decoded.add(source.data_element(keyword))  # type: ignore[arg-type]
    decoded.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 6")
    try:
        decoded.decode()
    except (LookupError, UnicodeError, ValueError) as exc:
        raise DicomInputError(f"source header cannot be decoded ({exc})") from None
    header = Dataset()
    for element in decoded:
        if element.keyword != "SpecificCharacterSet":
            header.add(element)
    for keyword in _TYPE2_FROM_SOURCE:
        value = header.get(keyword, "")
        setattr(header, keyword, _current_form(keyword, value) if value else "")
    if "TimezoneOffsetFromUTC" in header and not _TZ.match(str(header.TimezoneOffsetFromUTC)):
        del header.TimezoneOffsetFromUTC
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
        if keyword not in header:
            raise DicomInputError(
                f"source header has no {keyword}; give one of the study's instances"
            )
    if header.get("StudyInstanceUID") != result.study_uid:
        raise DicomInputError(
            f"source header belongs to study {header.get('StudyInstanceUID')!r}, "
            f"the result to {result.study_uid!r}"
        )
    return header


def local_utc_offset() -> str:
    """This machine's current offset from UTC as DICOM writes it, e.g. ``+0100``."""
    return time.strftime("%z") or "+0000"


def _evidence(header: Dataset, refs: Sequence[ImageRef], study_uid: str) -> list[Dataset]:
    evidence = [header]
    for uid, (ref, _frames) in unique_images(refs).items():
        if uid == header.SOPInstanceUID:
            continue
        item = Dataset()
        item.SOPClassUID = ref.sop_class_uid
        item.SOPInstanceUID = uid
        item.SeriesInstanceUID = ref.series_uid
        item.StudyInstanceUID = study_uid
        evidence.append(item)
    return evidence


def build_sr(
    result: StudyResult,
    source: Dataset,
    settings: Settings,
    *,
    run: int,
    predecessors: Sequence[Dataset] = (),
) -> Comprehensive3DSR:
    """Build the Comprehensive 3D SR (TID 1500) of ``result``.

    Parameters
    ----------
    result
        The classification of one study; every finding becomes a measurement group.
    source
        The header of one instance of the study: its patient and study attributes are copied
        so the SR lands in the same patient and study. Never logged.
    settings
        The node's settings (UID root, station and institution names, data folder).
    run
        The study's processing run; part of the SR UIDs, so the same run always gives the
        same SOP Instance UID, and the SR's Instance Number.
    predecessors
        Earlier SRs of the node for this study that this one supersedes (read from their
        files); listed in the Predecessor Documents Sequence.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        A pydicom Dataset, ready for :func:`write_sr`.

    Raises
    ------
    DicomInputError
        When ``source`` lacks its UIDs, belongs to another study, or ``result`` has no
        findings (an SR must not claim a classification that did not happen).
    """
    if not result.findings:
        raise DicomInputError(f"study {result.study_uid}: result has no findings; no SR is made")
    uids = sr_uids(result, settings, run=run)
    header = source_header(source, result)
    algorithm = algorithm_identification(result)
    groups = [
        measurement_group(f, result, settings, run=run, algorithm=algorithm)
        for f in result.findings
    ]
    report = MeasurementReport(
        observation_context=observation_context(settings),
        procedure_reported=tn_codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    all_refs = [*result.images_used, *(ref for f in result.findings for ref in f.images)]
    root = report[0]
    # The document-level evaluations, with the summary first, before everything else the
    # report contains: text viewers show the tree in order (see the module docstring).
    first = next(
        i
        for i, item in enumerate(root.ContentSequence)
        if item.RelationshipType == RelationshipTypeValues.CONTAINS.value
    )
    root.ContentSequence.insert(first, qualitative_evaluations(result))
    if all_refs:
        # TID 1500 order: ... Procedure Reported, Image Library, Imaging Measurements
        root.ContentSequence.insert(len(root.ContentSequence) - 1, image_library(all_refs))
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=hd.sr.CodedConcept("109102", "DCM", "Processing Equipment"),
        manufacturer_model_name=DEVICE_MODEL_NAME,
        software_versions=__version__,
        device_serial_number=installation_id(settings),
        station_name=settings.node.station_name,
        institution_name=settings.node.institution_name or None,
        contribution_description=f"AI triage by {result.model.display_name}"[:64],
    )
    sr = Comprehensive3DSR(
        evidence=_evidence(header, all_refs, result.study_uid),
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=run,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        is_verified=False,
        institution_name=settings.node.institution_name or None,
        contributing_equipment=[equipment],
        series_description=(
            DEMO_SERIES_DESCRIPTION if result.model.is_demo else SERIES_DESCRIPTION
        ),
        manufacturer_model_name=DEVICE_MODEL_NAME,
        software_versions=__version__,
        device_serial_number=installation_id(settings),
        coding_schemes=tn_codes.coding_schemes(f.code_scheme for f in result.findings),
        previous_versions=list(predecessors) or None,
    )
    # The series description has an em dash and source names may be non-ASCII: UTF-8
    # covers whatever character set the source used, as its values are decoded already.
    sr.SpecificCharacterSet = "ISO_IR 192"
    sr.StationName = settings.node.station_name
    sr.TimezoneOffsetFromUTC = header.get("TimezoneOffsetFromUTC") or local_utc_offset()
    log.info(
        "built SR study=%s sop=%s run=%d findings=%d demo=%s",
        result.study_uid,
        uids.sop_instance_uid,
        run,
        len(result.findings),
        result.model.is_demo,
    )
    return sr


def sr_path(settings: Settings, study_uid: str, sop_instance_uid: str) -> Path:
    """Where the SR of ``sop_instance_uid`` lives: ``data_dir/results/<study>/<sop>.dcm``."""
    return settings.results_dir / study_uid / f"{sop_instance_uid}.dcm"


def _atomic_write(path: Path, write: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)  # type: ignore[operator]
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        # The rename is durable only once the folder's entry is on disk.
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_sr(dataset: Dataset, settings: Settings, *, result: StudyResult | None = None) -> Path:
    """Write ``dataset`` atomically to ``data_dir/results/<study>/<sop>.dcm``.

    With ``result`` the JSON twin (:func:`~triagenode.reports.result_json.result_to_json`)
    is written beside it as ``<sop>.json``, also atomically. Writing the same SR again
    replaces the file with identical UIDs.

    Returns
    -------
    pathlib.Path
        The ``.dcm`` file, under ``node.data_dir`` as configured (absolute when it is), so
        ``path.relative_to(settings.node.data_dir)`` always works.

    Raises
    ------
    StorageError
        When the file cannot be written.
    """
    path = sr_path(settings, dataset.StudyInstanceUID, dataset.SOPInstanceUID)
    _atomic_write(path, lambda handle: dataset.save_as(handle, enforce_file_format=True))
    if result is not None:
        uids = SrUids(
            study_instance_uid=dataset.StudyInstanceUID,
            series_instance_uid=dataset.SeriesInstanceUID,
            sop_instance_uid=dataset.SOPInstanceUID,
        )
        data = result_to_json(result, uids, supersedes=superseded_uid(dataset))
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        _atomic_write(path.with_suffix(".json"), lambda handle: handle.write(text.encode()))
    log.info("wrote SR study=%s sop=%s", dataset.StudyInstanceUID, dataset.SOPInstanceUID)
    return path


def superseded_uid(dataset: Dataset) -> str | None:
    """SOP Instance UID of the newest SR listed in ``dataset``'s Predecessor Documents."""
    uids = [
        str(sop.ReferencedSOPInstanceUID)
        for study in dataset.get("PredecessorDocumentsSequence") or []
        for series in study.get("ReferencedSeriesSequence") or []
        for sop in series.get("ReferencedSOPSequence") or []
    ]
    return uids[-1] if uids else None


def read_sr(path: Path) -> Comprehensive3DSR:
    """Read an SR written by :func:`write_sr` back as a highdicom object."""
    return Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
