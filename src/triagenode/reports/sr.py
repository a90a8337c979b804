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

What is in it: the observation context names the node as a device observer; each label is
one measurement group (finding type = the label's concept, present/absent, probability with
unit "1", tracking id/UID, source images with frame numbers); a document-level
"Qualitative Evaluations" container holds the triage priority, the critical flag and a
short summary text; the image library lists every source image. The document is COMPLETE
(every label of the set is reported) and UNVERIFIED (no physician signed it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from highdicom.sr import Comprehensive3DSR, MeasurementReport
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
    "read_sr",
    "sr_path",
    "write_sr",
]

log = logging.getLogger(__name__)

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


def _header(source: Dataset, result: StudyResult) -> Dataset:
    """The source's attributes without pixel data, type 2 patient/study attributes present."""
    header = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0:
            header.add(element)
    if "SpecificCharacterSet" in source:
        header.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in header:
            setattr(header, keyword, "")
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
    result: StudyResult, source: Dataset, settings: Settings, *, run: int
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
        same SOP Instance UID.

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
    header = _header(source, result)
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
    # TID 1500 order: ... Procedure Reported, Image Library, Imaging Measurements, then the
    # document-level Qualitative Evaluations.
    position = len(root.ContentSequence) - 1
    if all_refs:
        root.ContentSequence.insert(position, image_library(all_refs))
    root.ContentSequence.append(qualitative_evaluations(result))
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
        coding_schemes=[tn_codes.coding_scheme()],
    )
    # The series description has an em dash and source names may be non-ASCII: UTF-8
    # covers whatever character set the source used, as its values are decoded already.
    sr.SpecificCharacterSet = "ISO_IR 192"
    sr.StationName = settings.node.station_name
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
        text = json.dumps(result_to_json(result, uids), indent=2, sort_keys=True) + "\n"
        _atomic_write(path.with_suffix(".json"), lambda handle: handle.write(text.encode()))
    log.info("wrote SR study=%s sop=%s", dataset.StudyInstanceUID, dataset.SOPInstanceUID)
    return path


def read_sr(path: Path) -> Comprehensive3DSR:
    """Read an SR written by :func:`write_sr` back as a highdicom object."""
    return Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
