"""A folder of DICOM studies and the CSV of their reference labels.

Files are grouped into studies by the Study Instance UID in their headers (pixel data is not
read here), whatever the folder layout. A study's *folder* is the deepest folder that holds
all of its files, so a labels CSV may name studies by that folder or by their UID.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from triagenode.errors import TriageNodeError

if TYPE_CHECKING:
    from triagenode.inference.select import InstanceRecord

__all__ = ["LabelTable", "StudyFiles", "iter_files", "read_labels", "scan_studies"]

KEY_COLUMNS = ("StudyInstanceUID", "study_uid", "study", "folder")


@dataclass
class StudyFiles:
    """One study of the data folder: its instances and triage inputs, from headers."""

    study_uid: str
    folder: str
    records: list[InstanceRecord]
    triage_inputs: dict[str, str] = field(default_factory=dict)


def iter_files(paths: Iterable[Path]) -> Iterator[tuple[Path, Path]]:
    """(root, file) for every file under ``paths``, sorted, skipping hidden names."""
    for root in paths:
        if root.is_file():
            yield root.parent, root
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    yield root, Path(folder) / name


def _common_folder(root: Path, parents: list[Path]) -> str:
    parts = [p.relative_to(root).parts for p in parents]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return common[-1] if common else root.name


def scan_studies(paths: list[Path]) -> tuple[list[StudyFiles], list[tuple[str, str]]]:
    """Studies found under ``paths`` (headers only), and files that are not DICOM images.

    Returns
    -------
    studies, skipped
        Studies in order of Study Instance UID; ``(file, reason)`` for files left out.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from triagenode.dicom_attrs import merge_triage_inputs, triage_inputs
    from triagenode.inference.select import InstanceRecord

    by_uid: dict[str, StudyFiles] = {}
    parents: dict[str, tuple[Path, list[Path]]] = {}
    skipped: list[tuple[str, str]] = []
    for root, path in iter_files(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            skipped.append((str(path), f"not a readable DICOM file ({type(exc).__name__})"))
            continue
        uid = str(ds.get("StudyInstanceUID", "") or "")
        if not uid:
            skipped.append((str(path), "no StudyInstanceUID"))
            continue
        frames = ds.get("NumberOfFrames") or 1
        number = ds.get("InstanceNumber")
        record = InstanceRecord(
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            modality=str(ds.get("Modality", "")) or None,
            instance_number=int(number) if number not in (None, "") else None,
            number_of_frames=int(frames),
            path=path,
            manufacturer=str(ds.get("Manufacturer", "")) or None,
            series_description=str(ds.get("SeriesDescription", "")) or None,
        )
        study = by_uid.setdefault(uid, StudyFiles(uid, "", []))
        study.records.append(record)
        study.triage_inputs = merge_triage_inputs(
            study.triage_inputs, triage_inputs(ds, None, None)
        )
        parents.setdefault(uid, (root, []))[1].append(path.parent)
    for uid, (root, folders) in parents.items():
        by_uid[uid].folder = _common_folder(root, folders)
    return [by_uid[uid] for uid in sorted(by_uid)], skipped


@dataclass(frozen=True)
class LabelTable:
    """Reference labels: ``labels[key][finding]`` is 0 or 1 (unknown ones are absent)."""

    path: Path
    findings: list[str]
    labels: dict[str, dict[str, int]]

    def for_study(self, study_uid: str, folder: str) -> tuple[str | None, dict[str, int]]:
        """The row key that names this study (UID first, then folder) and its labels."""
        for key in (study_uid, folder):
            if key and key in self.labels:
                return key, self.labels[key]
        return None, {}


def read_labels(path: Path, known_findings: Iterable[str]) -> LabelTable:
    """Read a labels CSV: a study column (UID or folder) and one 0/1 column per finding.

    Raises
    ------
    TriageNodeError
        Naming unknown finding columns (with the known ones), a missing study column,
        repeated studies, or a cell that is not 0, 1 or blank.
    """
    known = set(known_findings)
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise TriageNodeError(f"labels {path}: {exc.strerror or exc}") from None
    with handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        key_column = next((c for c in columns if c in KEY_COLUMNS), None)
        if key_column is None:
            raise TriageNodeError(
                f"labels {path}: no study column (one of {', '.join(KEY_COLUMNS)})"
            )
        findings = [c for c in columns if c != key_column]
        unknown = [c for c in findings if c not in known]
        if unknown:
            raise TriageNodeError(
                f"labels {path}: unknown finding columns: {', '.join(map(repr, unknown))} "
                f"(findings of the label sets: {', '.join(sorted(known))})"
            )
        labels: dict[str, dict[str, int]] = {}
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            key = row.get(key_column, "")
            if not key:
                raise TriageNodeError(f"labels {path}, line {line}: empty {key_column}")
            if key in labels:
                raise TriageNodeError(f"labels {path}, line {line}: study {key!r} repeated")
            values: dict[str, int] = {}
            for finding in findings:
                cell = row.get(finding, "")
                if cell == "":
                    continue
                if cell not in ("0", "1"):
                    raise TriageNodeError(
                        f"labels {path}, line {line}, column {finding!r}: {cell!r} "
                        "(allowed: 0, 1 or blank for unknown)"
                    )
                values[finding] = int(cell)
            labels[key] = values
    return LabelTable(path, findings, labels)
