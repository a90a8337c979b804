"""The DICOM objects the node makes per classified study, their UIDs and where they go.

Besides the TID 1500 SR, a study's result can be sent as a summary Secondary Capture (a
card every viewer shows), the same card as an Encapsulated PDF (for RIS/EMR that take
PDFs) and a Key Object Selection document (the images that scored highest). Which of them
a destination receives is its ``send`` list (:class:`~triagenode.config.settings.Destination`).

UIDs follow the SR's scheme (:func:`~triagenode.reports.content.sr_uids`): each kind has its
own series per (study, model) and one instance per run, all derived from (study, model,
run), so a retry rewrites the same objects and the PACS replaces them instead of adding
copies.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from triagenode.config.settings import Settings
from triagenode.domain import ImageRef, StudyResult
from triagenode.errors import StorageError
from triagenode.reports.content import SrUids, _model_key, unique_images
from triagenode.reports.sr import sr_path
from triagenode.uids import derive_uid

__all__ = [
    "ObjectKind",
    "key_images",
    "object_uids",
    "write_object",
    "write_objects",
]

log = logging.getLogger(__name__)


class ObjectKind(str, enum.Enum):
    """What one export row carries; the values are those of ``destinations[].send``."""

    sr = "sr"
    summary_sc = "summary-sc"
    summary_pdf = "summary-pdf"
    kos = "kos"


# Series numbers next to the SR's 9901, so the node's series sort together in a viewer.
SERIES_NUMBERS = {
    ObjectKind.summary_sc: 9902,
    ObjectKind.summary_pdf: 9903,
    ObjectKind.kos: 9904,
}


def object_uids(result: StudyResult, settings: Settings, *, run: int, kind: ObjectKind) -> SrUids:
    """Series and SOP Instance UIDs of one summary object of ``result`` (deterministic).

    The SR keeps :func:`~triagenode.reports.content.sr_uids`; every other kind has a series
    per (study, model) and an instance per run, like the SR.
    """
    if kind is ObjectKind.sr:
        raise ValueError("the SR's UIDs come from reports.content.sr_uids")
    root = settings.node.uid_root
    model = (result.study_uid, *_model_key(result))
    return SrUids(
        study_instance_uid=result.study_uid,
        series_instance_uid=derive_uid(root, f"{kind.value}-series", *model),
        sop_instance_uid=derive_uid(root, f"{kind.value}-instance", *model, str(run)),
    )


def key_images(result: StudyResult, limit: int = 4) -> list[ImageRef]:
    """The images that drove the result, most telling first, at most ``limit``.

    The images of the findings at or above their threshold (highest score first); when none
    is, those of the top-scoring finding; failing that, the first images analysed. One per
    SOP instance (its first frame that counts).
    """
    present = sorted((f for f in result.findings if f.present), key=lambda f: -f.score)
    refs = [ref for f in present for ref in f.images]
    if not refs and result.top_finding is not None:
        refs = list(result.top_finding.images)
    if not refs:
        refs = list(result.images_used)
    chosen: list[ImageRef] = []
    seen: set[str] = set()
    for ref in refs:
        if ref.sop_instance_uid in seen:
            continue
        seen.add(ref.sop_instance_uid)
        frames = unique_images([r for r in refs if r.sop_instance_uid == ref.sop_instance_uid])
        first_frame = next(iter(frames.values()))[1]
        chosen.append(
            ImageRef(
                ref.sop_class_uid,
                ref.sop_instance_uid,
                ref.series_uid,
                first_frame[0] if first_frame else ref.frame,
            )
        )
        if len(chosen) >= limit:
            break
    return chosen


def write_object(dataset: Dataset, settings: Settings) -> Path:
    """Write a summary object atomically beside the study's SR
    (``data_dir/results/<study>/<sop>.dcm``); writing it again replaces it."""
    return write_objects([dataset], settings)[0]


def write_objects(datasets: Sequence[Dataset], settings: Settings) -> list[Path]:
    """Write several objects as :func:`write_object` does, syncing each folder once.

    Each file is written to a temporary name, fsynced and renamed into place; the folders'
    entries are fsynced after the last rename, so all are durable when this returns.

    Raises
    ------
    StorageError
        When a file cannot be written (none is left half-written).
    """
    paths = []
    for dataset in datasets:
        path = sr_path(settings, dataset.StudyInstanceUID, dataset.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                dataset.save_as(handle, enforce_file_format=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        paths.append(path)
        log.info(
            "wrote %s study=%s sop=%s",
            dataset.get("Modality", "object"),
            dataset.StudyInstanceUID,
            dataset.SOPInstanceUID,
        )
    for folder in {p.parent for p in paths}:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return paths
