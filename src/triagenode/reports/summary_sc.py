"""The summary card as a Secondary Capture image, in the study of the SR.

Every viewer shows an SC image (Orthanc's Stone and OHIF included, which do not render a
TID 1500 SR), so the card (:mod:`~triagenode.reports.summary_card`) is stored as one RGB
Secondary Capture (1.2.840.10008.5.1.4.1.1.7) built with highdicom. It lists the key images
it was made from in its Source Image Sequence, says how it was made in Derivation
Description, and is marked as the node's own output (Manufacturer ``triagenode``, a Series
Description starting with ``TRIAGENODE``) so the node never classifies it when the PACS
sends the study back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from triagenode import __version__
from triagenode.config.settings import Settings
from triagenode.domain import DEMO_WARNING, StudyResult
from triagenode.errors import DicomInputError
from triagenode.reports.content import DEVICE_MODEL_NAME, MANUFACTURER, installation_id
from triagenode.reports.objects import SERIES_NUMBERS, ObjectKind, object_uids
from triagenode.reports.sr import local_utc_offset, source_header
from triagenode.reports.summary_card import (
    DISCLAIMER,
    CardLayout,
    Thumbnail,
    layout_card,
    render_card,
)

__all__ = ["SC_SERIES_DESCRIPTION", "build_summary_sc", "series_description"]

log = logging.getLogger(__name__)

SC_SERIES_DESCRIPTION = f"TRIAGENODE summary — {DISCLAIMER}"


def series_description(result: StudyResult, what: str) -> str:
    """The Series Description of a summary object: the node's marker first (image
    selection skips it), then the disclaimer or the demo warning."""
    tail = DEMO_WARNING if result.model.is_demo else DISCLAIMER
    return f"TRIAGENODE {what} — {tail}"[:64]


def _source_images(thumbnails: Sequence[Thumbnail]) -> DicomSequence:
    items = []
    for thumb in thumbnails:
        item = Dataset()
        item.ReferencedSOPClassUID = thumb.ref.sop_class_uid
        item.ReferencedSOPInstanceUID = thumb.ref.sop_instance_uid
        if thumb.ref.frame is not None:
            item.ReferencedFrameNumber = thumb.ref.frame
        items.append(item)
    return DicomSequence(items)


def patient_and_study(source: Dataset, result: StudyResult) -> Dataset:
    """The source's patient and study attributes, decoded (as the SR copies them)."""
    return source_header(source, result)


def build_summary_sc(
    result: StudyResult,
    source: Dataset,
    settings: Settings,
    *,
    run: int,
    thumbnails: Sequence[Thumbnail] = (),
    layout: CardLayout | None = None,
) -> hd.sc.SCImage:
    """The summary card of ``result`` as a Secondary Capture image.

    Parameters
    ----------
    result
        The study's classification.
    source
        A header of one of the study's instances (patient and study attributes).
    settings
        UID root, station and institution names.
    run
        The processing run: part of the UIDs, and the Instance Number.
    thumbnails
        The key images as the model saw them (:class:`~.summary_card.Thumbnail`).
    layout
        A layout already made for these thumbnails (e.g. shared with the PDF).

    Raises
    ------
    DicomInputError
        When ``source`` lacks UIDs or is of another study, or the result has no findings.
    """
    if not result.findings:
        raise DicomInputError(f"study {result.study_uid}: result has no findings; no card")
    header = patient_and_study(source, result)
    layout = layout or layout_card(result, thumbnails)
    pixels = np.asarray(render_card(layout, thumbnails), dtype=np.uint8)
    uids = object_uids(result, settings, run=run, kind=ObjectKind.summary_sc)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        # highdicom wants a frame of reference; a card has none, so the orientation it
        # needs is emptied below (Patient Orientation is type 2: present, may be empty).
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),
        study_instance_uid=result.study_uid,
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBERS[ObjectKind.summary_sc],
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=run,
        manufacturer=MANUFACTURER,
        patient_id=header.get("PatientID"),
        patient_name=header.get("PatientName"),
        patient_birth_date=header.get("PatientBirthDate"),
        patient_sex=header.get("PatientSex") or None,
        accession_number=header.get("AccessionNumber"),
        study_id=header.get("StudyID"),
        study_date=header.get("StudyDate") or None,
        study_time=header.get("StudyTime") or None,
        referring_physician_name=header.get("ReferringPhysicianName"),
        series_description=series_description(result, "summary"),
        manufacturer_model_name=DEVICE_MODEL_NAME,
        software_versions=__version__,
        device_serial_number=installation_id(settings),
        institution_name=settings.node.institution_name or None,
    )
    sc.PatientOrientation = ""  # type: ignore[assignment]
    sc.Laterality = ""  # type 2C; a card is of no side
    sc.SpecificCharacterSet = "ISO_IR 192"
    sc.StationName = settings.node.station_name
    sc.TimezoneOffsetFromUTC = header.get("TimezoneOffsetFromUTC") or local_utc_offset()
    for keyword in ("IssuerOfPatientID", "PatientAge", "StudyDescription"):
        if keyword in header:
            setattr(sc, keyword, header.get(keyword))
    # The card holds scores and model details, no patient identifiers.
    sc.BurnedInAnnotation = "NO"
    sc.ImageComments = (
        f"{DEMO_WARNING}. " if result.model.is_demo else ""
    ) + f"{DISCLAIMER}: summary card of the node's result"
    sc.DerivationDescription = (
        f"Summary card of AI triage by {result.model.display_name}; thumbnails of the key "
        "images windowed as the model saw them"
    )[:1024]
    if thumbnails:
        sc.SourceImageSequence = _source_images(list(thumbnails)[: len(layout.thumbnails)])
    log.info(
        "built summary SC study=%s sop=%s run=%d size=%dx%d",
        result.study_uid,
        uids.sop_instance_uid,
        run,
        layout.width,
        layout.height,
    )
    return sc
