"""The summary card as an Encapsulated PDF, for RIS and EMR systems that take PDFs.

The PDF is the card's layout (:func:`~triagenode.reports.summary_card.layout_card`) painted
with reportlab: real text (searchable, selectable), vector bars, the thumbnails as images.
It is wrapped in an Encapsulated PDF Storage object (1.2.840.10008.5.1.4.1.1.104.1) in the
study of the SR, whose Source Instance Sequence names the SR it summarises.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from datetime import datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from reportlab import rl_config
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas

from triagenode import __version__
from triagenode.config.settings import Settings
from triagenode.domain import StudyResult
from triagenode.errors import DicomInputError
from triagenode.reports.content import DEVICE_MODEL_NAME, MANUFACTURER, SrUids, installation_id
from triagenode.reports.objects import SERIES_NUMBERS, ObjectKind, object_uids
from triagenode.reports.sr import local_utc_offset
from triagenode.reports.summary_card import (
    DISCLAIMER,
    INK,
    TRACK,
    CardLayout,
    Thumbnail,
    font_file,
    layout_card,
    thumbnail_images,
)
from triagenode.reports.summary_sc import patient_and_study, series_description

__all__ = ["ENCAPSULATED_PDF", "build_summary_pdf", "render_pdf"]

log = logging.getLogger(__name__)

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
_SCALE = 0.58  # points per card pixel: the 1024-pixel card fits an A4 width (595 pt)
# Images as binary Flate streams: ASCII85 makes them a quarter larger and, without
# reportlab's optional C accelerator, is slow pure Python (docs/performance.md).
rl_config.useA85 = 0


def _fonts() -> tuple[str, str]:
    """The PDF's regular and bold fonts: DejaVu Sans embedded when the system has it (the
    card's font, and any character), else the standard Helvetica."""
    regular, bold = font_file(False), font_file(True)
    if regular is None or bold is None:
        return "Helvetica", "Helvetica-Bold"
    if "DejaVuSans" not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont("DejaVuSans", str(regular)))
        pdfmetrics.registerFont(TTFont("DejaVuSans-Bold", str(bold)))
    return "DejaVuSans", "DejaVuSans-Bold"


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    r, g, b = colour
    return r / 255, g / 255, b / 255


def render_pdf(layout: CardLayout, thumbnails: Sequence[Thumbnail], title: str) -> bytes:
    """Paint ``layout`` as a one-page PDF; returns its bytes."""
    regular, bold = _fonts()
    width, height = layout.width * _SCALE, layout.height * _SCALE
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=(width, height), invariant=True)
    pdf.setTitle(title)
    pdf.setAuthor(MANUFACTURER)
    pdf.setCreator(f"triagenode {__version__}")

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        # card pixels (origin top-left, y down) to PDF points (origin bottom-left, y up)
        return x0 * _SCALE, height - y1 * _SCALE, (x1 - x0) * _SCALE, (y1 - y0) * _SCALE

    for rect in layout.rects:
        pdf.setFillColorRGB(*_rgb(rect.fill))
        pdf.rect(*box(rect.x0, rect.y0, rect.x1, rect.y1), stroke=0, fill=1)
    for bar in layout.bars:
        pdf.setFillColorRGB(*_rgb(TRACK))
        pdf.rect(*box(bar.x0, bar.y0, bar.x1, bar.y1), stroke=0, fill=1)
        if bar.fill_x > bar.x0:
            pdf.setFillColorRGB(*_rgb(bar.colour))
            pdf.rect(*box(bar.x0, bar.y0, bar.fill_x, bar.y1), stroke=0, fill=1)
        pdf.setFillColorRGB(*_rgb(INK))
        pdf.rect(
            *box(bar.threshold_x - 1, bar.y0 - 5, bar.threshold_x + 2, bar.y1 + 5), stroke=0, fill=1
        )
    for thumb_box, picture in zip(
        layout.thumbnails, thumbnail_images(layout, thumbnails), strict=True
    ):
        x, y, w, h = box(
            thumb_box.x0, thumb_box.y0, thumb_box.x0 + thumb_box.size, thumb_box.y0 + thumb_box.size
        )
        # JPEG goes into the PDF as is (DCTDecode): no Flate pass over the pixels.
        jpeg = io.BytesIO()
        picture.save(jpeg, format="JPEG", quality=90)
        jpeg.seek(0)
        pdf.drawImage(ImageReader(jpeg), x, y, w, h)
    for run in layout.texts:
        font = bold if run.bold else regular
        size = run.size * _SCALE
        pdf.setFont(font, size)
        pdf.setFillColorRGB(*_rgb(run.colour))
        baseline = height - run.y * _SCALE - pdfmetrics.getAscent(font, size)
        pdf.drawString(run.x * _SCALE, baseline, run.text)
    pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def build_summary_pdf(
    result: StudyResult,
    source: Dataset,
    settings: Settings,
    *,
    run: int,
    sr: SrUids | None = None,
    thumbnails: Sequence[Thumbnail] = (),
    layout: CardLayout | None = None,
) -> Dataset:
    """The summary card of ``result`` as an Encapsulated PDF Storage dataset.

    Parameters
    ----------
    sr
        UIDs of the SR this PDF summarises: listed in the Source Instance Sequence.
    thumbnails, layout
        As for :func:`~triagenode.reports.summary_sc.build_summary_sc`.

    Raises
    ------
    DicomInputError
        When ``source`` lacks UIDs or is of another study, or the result has no findings.
    """
    if not result.findings:
        raise DicomInputError(f"study {result.study_uid}: result has no findings; no PDF")
    header = patient_and_study(source, result)
    layout = layout or layout_card(result, thumbnails)
    uids = object_uids(result, settings, run=run, kind=ObjectKind.summary_pdf)
    title = f"AI triage summary ({DISCLAIMER})"
    document = render_pdf(layout, thumbnails, title)
    now = datetime.now()

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for element in header:
        if element.keyword not in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
            ds.add(element)
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = uids.sop_instance_uid
    ds.StudyInstanceUID = result.study_uid
    ds.SeriesInstanceUID = uids.series_instance_uid
    ds.Modality = "DOC"
    ds.SeriesNumber = SERIES_NUMBERS[ObjectKind.summary_pdf]
    ds.SeriesDescription = series_description(result, "summary PDF")
    ds.InstanceNumber = run
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = DEVICE_MODEL_NAME
    ds.SoftwareVersions = __version__
    ds.DeviceSerialNumber = installation_id(settings)
    ds.StationName = settings.node.station_name
    if settings.node.institution_name:
        ds.InstitutionName = settings.node.institution_name
    ds.ConversionType = "SYN"  # synthetic: made by software, not scanned
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.TimezoneOffsetFromUTC = header.get("TimezoneOffsetFromUTC") or local_utc_offset()
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = DicomSequence()
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    if sr is not None:
        item = Dataset()
        item.ReferencedSOPClassUID = SR_CLASS
        item.ReferencedSOPInstanceUID = sr.sop_instance_uid
        ds.SourceInstanceSequence = DicomSequence([item])
    # OB values have even length; the padding byte is not part of the document.
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + (b"\0" if len(document) % 2 else b"")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_PDF)
    meta.MediaStorageSOPInstanceUID = UID(uids.sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    log.info(
        "built summary PDF study=%s sop=%s run=%d bytes=%d",
        result.study_uid,
        uids.sop_instance_uid,
        run,
        len(document),
    )
    return ds
