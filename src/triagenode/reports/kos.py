"""A Key Object Selection document flagging the images that scored highest.

Viewers that support KOS (OHIF, Weasis, dcm4chee's, most PACS workstations) list it as the
study's key images and jump to them. The title is (113000, DCM, "Of Interest") from CID 7010,
the title those viewers know; the description names the findings and says it is AI triage.
Besides the key images it references the study's SR (and the summary card and PDF when they
were made), so the selection leads back to the full result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept, DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from triagenode import __version__
from triagenode.config.settings import Settings
from triagenode.domain import DEMO_WARNING, ImageRef, StudyResult
from triagenode.errors import DicomInputError
from triagenode.reports.content import (
    DEVICE_MODEL_NAME,
    MANUFACTURER,
    device_uid,
    installation_id,
)
from triagenode.reports.objects import SERIES_NUMBERS, ObjectKind, key_images, object_uids
from triagenode.reports.sr import local_utc_offset
from triagenode.reports.summary_card import DISCLAIMER
from triagenode.reports.summary_sc import patient_and_study, series_description

__all__ = ["OF_INTEREST", "build_kos"]

log = logging.getLogger(__name__)

OF_INTEREST = CodedConcept("113000", "DCM", "Of Interest")


def _reference(
    sop_class_uid: str, sop_instance_uid: str, series_uid: str, study_uid: str, *, image: bool
) -> Dataset:
    item = Dataset()
    item.SOPClassUID = sop_class_uid
    item.SOPInstanceUID = sop_instance_uid
    item.SeriesInstanceUID = series_uid
    item.StudyInstanceUID = study_uid
    if image:  # highdicom makes an IMAGE item of a dataset with Rows and Columns
        item.Rows = item.Columns = 1
    return item


def _description(result: StudyResult, images: Sequence[ImageRef]) -> str:
    present = sorted((f for f in result.findings if f.present), key=lambda f: -f.score)
    if present:
        what = ", ".join(f"{f.code_meaning} {f.score:.2f}" for f in present)
        text = f"Images that scored highest for {what}."
    else:
        text = "Images analysed; no finding above threshold."
    prefix = f"{DEMO_WARNING}. " if result.model.is_demo else ""
    return f"{prefix}{text} {DISCLAIMER}; by {result.model.display_name}."[:1024]


def build_kos(
    result: StudyResult,
    source: Dataset,
    settings: Settings,
    *,
    run: int,
    companions: Sequence[Dataset] = (),
    limit: int = 4,
) -> hd.ko.KeyObjectSelectionDocument:
    """The Key Object Selection document of ``result``.

    Parameters
    ----------
    result
        The study's classification; its key images (:func:`~.objects.key_images`) are
        flagged.
    source
        A header of one of the study's instances (patient and study attributes).
    settings
        UID root, station and institution names.
    run
        The processing run: part of the UIDs, and the Instance Number.
    companions
        The node's other objects of this run (the SR, and the SC and PDF when made): each
        needs SOPClassUID, SOPInstanceUID and SeriesInstanceUID; referenced after the images.
    limit
        At most this many images.

    Raises
    ------
    DicomInputError
        When ``source`` lacks UIDs or is of another study, or no image was analysed.
    """
    images = key_images(result, limit=limit)
    if not images:
        raise DicomInputError(f"study {result.study_uid}: no analysed image to select")
    header = patient_and_study(source, result)
    study_uid = result.study_uid
    referenced = [
        _reference(r.sop_class_uid, r.sop_instance_uid, r.series_uid, study_uid, image=True)
        for r in images
    ]
    referenced += [
        _reference(
            str(c.SOPClassUID),
            str(c.SOPInstanceUID),
            str(c.SeriesInstanceUID),
            study_uid,
            image="Rows" in c,
        )
        for c in companions
    ]
    header_as_evidence = Dataset()
    for element in header:
        header_as_evidence.add(element)
    evidence = [header_as_evidence, *referenced]
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(settings),
            name=settings.node.station_name,
            manufacturer_name=MANUFACTURER,
            model_name=DEVICE_MODEL_NAME,
            serial_number=installation_id(settings),
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=referenced,
        observer_device_context=device,
        description=_description(result, images),
    )
    uids = object_uids(result, settings, run=run, kind=ObjectKind.kos)
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBERS[ObjectKind.kos],
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=run,
        manufacturer=MANUFACTURER,
        institution_name=settings.node.institution_name or None,
        series_description=series_description(result, "key images"),
        manufacturer_model_name=DEVICE_MODEL_NAME,
        software_versions=__version__,
        device_serial_number=installation_id(settings),
    )
    kos.SpecificCharacterSet = "ISO_IR 192"
    kos.StationName = settings.node.station_name
    kos.TimezoneOffsetFromUTC = header.get("TimezoneOffsetFromUTC") or local_utc_offset()
    log.info(
        "built KOS study=%s sop=%s run=%d images=%d",
        study_uid,
        uids.sop_instance_uid,
        run,
        len(images),
    )
    return kos
