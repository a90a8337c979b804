"""``triagenode classify PATH...``: batch zero-shot classification of files and folders.

It streams: folders are walked with ``os.scandir`` one directory at a time, files are
read, preprocessed and encoded in batches of ``model.max_batch``, and each image's line is
written as soon as its batch is done. Only per-study running maxima are kept, so memory does
not grow with the number of files. Lines are JSON objects (``--json`` on stdout, or
``--out FILE.json``) or CSV rows (``--out FILE.csv``); a plain summary otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO, get_args

import numpy as np

from triagenode.config.settings import Backend

CSV_COLUMNS = (
    "type",
    "path",
    "study_uid",
    "sop_instance_uid",
    "frame",
    "label_set",
    "status",
    "reason",
    "top_label",
    "top_score",
    "critical",
    "scores",
    "warning",
)


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(
        "classify",
        parents=[parent],
        help="classify DICOM (or PNG/JPEG) files and folders",
        description="Zero-shot classification of files and folders; one JSON line per image "
        "and per study. Research use: results are not a diagnosis.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")
    parser.add_argument("--out", type=Path, metavar="FILE", help="write .json(l) or .csv")
    parser.add_argument("--label-set", metavar="NAME", help="label set for every image")
    parser.add_argument("--backend", choices=get_args(Backend))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16", "int8"])
    parser.add_argument("--batch", type=int, metavar="N", help="images per batch")
    parser.add_argument("--demo-model", action="store_true", help="use the built-in demo model")
    parser.set_defaults(handler=_classify)


def iter_files(paths: list[Path]) -> Iterator[Path]:
    """Files under ``paths`` in sorted order, one directory listing in memory at a time."""
    for path in paths:
        if path.is_file():
            yield path
            continue
        if not path.is_dir():
            print(f"triagenode: warning: {path}: no such file or folder", file=sys.stderr)
            continue
        stack = [path]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as entries:
                    names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
            except OSError as exc:
                print(f"triagenode: warning: {folder}: {exc.strerror}", file=sys.stderr)
                continue
            subfolders = []
            for name, is_dir in names:
                if name.startswith("."):
                    continue
                if is_dir:
                    subfolders.append(folder / name)
                else:
                    yield folder / name
            stack.extend(reversed(subfolders))


class _Writer:
    """JSON lines, CSV rows or a plain summary, to stdout or a file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.handle: TextIO = sys.stdout
        self.mode = "json" if args.json else "text"
        if args.out is not None:
            self.handle = args.out.open("w", encoding="utf-8", newline="")
            self.mode = "csv" if args.out.suffix.lower() == ".csv" else "json"
        self.csv = csv.DictWriter(self.handle, CSV_COLUMNS, extrasaction="ignore")
        if self.mode == "csv":
            self.csv.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        if self.mode == "json":
            self.handle.write(json.dumps(record) + "\n")
        elif self.mode == "csv":
            row = dict(record)
            row["scores"] = json.dumps(record.get("scores") or {})
            self.csv.writerow(row)
        elif record["type"] == "study":
            top = f"{record['top_label']} {record['top_score']:.3f}"
            flag = " CRITICAL" if record["critical"] else ""
            print(
                f"{record['study_uid']}  {record['label_set']}  {top}{flag}  "
                f"images {record['images']} failed {record['failed']}",
                file=self.handle,
            )
        elif record.get("status") != "ok":
            print(f"{record['path']}: {record['status']}: {record.get('reason')}", file=self.handle)
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not sys.stdout:
            self.handle.close()


class _Run:
    """The classification of a stream of files, batch by batch."""

    def __init__(
        self,
        classifier: Any,
        writer: _Writer,
        label_set: str | None,
        slices: int,
        batch: int,
        warning: str | None,
    ) -> None:
        self.classifier = classifier
        self.writer = writer
        self.label_set = label_set
        self.slices = slices
        self.batch = batch
        self.warning = warning
        self.pending: list[tuple[dict[str, Any], np.ndarray]] = []
        self.studies: dict[str, dict[str, Any]] = {}
        self.images = self.failed = 0

    def _emit(self, record: dict[str, Any]) -> None:
        if self.warning:
            record["warning"] = self.warning
        self.writer.write(record)

    def add_file(self, path: Path) -> None:
        from triagenode.inference.preprocess import IMAGE_SUFFIXES, preprocess_file

        config = self.classifier.model.preprocess
        if path.suffix.lower() in IMAGE_SUFFIXES:
            base = {
                "path": str(path),
                "study_uid": None,
                "sop_instance_uid": None,
                "frame": None,
                "label_set": self.label_set,
            }
            if self.label_set is None:
                # a PNG says nothing about its modality or anatomy: no domain rule can fit
                self._result(base, "not_applicable", "an image file needs --label-set")
                return
            self._add(base, lambda: preprocess_file(path, config)[0])
            return
        self._add_dicom(path)

    def _add_dicom(self, path: Path) -> None:
        from triagenode.dicom_attrs import triage_inputs
        from triagenode.errors import PreprocessError
        from triagenode.inference.classifier import NoLabelSetError
        from triagenode.inference.preprocess import (
            number_of_frames,
            preprocess_dataset,
            read_dataset,
        )
        from triagenode.inference.select import evenly_spaced, is_image_sop_class

        base: dict[str, Any] = {
            "path": str(path),
            "study_uid": None,
            "sop_instance_uid": None,
            "frame": None,
            "label_set": None,
        }
        try:
            ds = read_dataset(path)
        except PreprocessError as exc:
            status = "skipped" if "not a DICOM file" in str(exc) else "failed"
            self._result(base, status, str(exc))
            return
        base["study_uid"] = str(ds.get("StudyInstanceUID", "")) or None
        base["sop_instance_uid"] = str(ds.get("SOPInstanceUID", "")) or None
        if not is_image_sop_class(str(ds.get("SOPClassUID", ""))) or "PixelData" not in ds:
            self._result(base, "skipped", "not an image (no pixel data or non-image SOP class)")
            return
        try:
            base["label_set"] = self.label_set or self.classifier.choose_label_set(
                triage_inputs(ds, None, None)
            )
        except NoLabelSetError as exc:
            self._result(base, "not_applicable", exc.reason)
            return
        except Exception as exc:
            self._result(base, "failed", str(exc))
            return
        frames = number_of_frames(ds)
        chosen = [i + 1 for i in evenly_spaced(frames, self.slices)] if frames > 1 else [None]
        config = self.classifier.model.preprocess
        label_set = self.classifier.label_set(base["label_set"])
        window = (label_set.window.center, label_set.window.width) if label_set.window else None
        for frame in chosen:
            record = {**base, "frame": frame}
            self._add(record, lambda f=frame: preprocess_dataset(ds, config, f, window=window))

    def _add(self, record: dict[str, Any], make: Any) -> None:
        from triagenode.errors import TriageNodeError

        try:
            array = make()
        except TriageNodeError as exc:
            self._result(record, "failed", str(exc))
            return
        self.pending.append((record, array))
        if len(self.pending) >= self.batch:
            self.flush()

    def _result(self, record: dict[str, Any], status: str, reason: str) -> None:
        if status == "failed":
            self.failed += 1
            if record.get("study_uid"):
                self._study(record)["failed"] += 1
        self._emit({"type": "image", **record, "status": status, "reason": reason})

    def _study(self, record: dict[str, Any]) -> dict[str, Any]:
        key = f"{record['study_uid']}|{record['label_set']}"
        return self.studies.setdefault(
            key,
            {
                "study_uid": record["study_uid"],
                "label_set": record["label_set"],
                "scores": [],
                "images": 0,
                "failed": 0,
            },
        )

    def flush(self) -> None:
        if not self.pending:
            return
        records = [r for r, _ in self.pending]
        embeddings = self.classifier.encoder.encode(np.stack([a for _, a in self.pending]))
        self.pending.clear()
        for record, embedding in zip(records, embeddings, strict=True):
            label_set = self.classifier.label_set(record["label_set"])
            scores = self.classifier.scores(embedding[None], record["label_set"])[0]
            top = int(np.argmax(scores))
            self.images += 1
            self._emit(
                {
                    "type": "image",
                    **record,
                    "status": "ok",
                    "reason": None,
                    "top_label": label_set.labels[top].name,
                    "top_score": round(float(scores[top]), 6),
                    "scores": {
                        lab.name: round(float(p), 6)
                        for lab, p in zip(label_set.labels, scores, strict=True)
                    },
                }
            )
            if record["study_uid"]:
                study = self._study(record)
                study["scores"].append(scores)
                study["images"] += 1

    def finish(self) -> None:
        self.flush()
        for study in self.studies.values():
            if not study["scores"]:
                continue
            label_set = self.classifier.label_set(study["label_set"])
            labels = label_set.labels
            # the same rule as the node's own study result
            totals = label_set.aggregate(np.stack(study["scores"]))
            top = int(np.argmax(totals))
            findings = [
                {
                    "name": lab.name,
                    "code": [lab.code.scheme, lab.code.value, lab.code.meaning],
                    "score": round(float(p), 6),
                    "threshold": lab.threshold,
                    "present": bool(p >= lab.threshold),
                    "critical": bool(lab.critical and p >= lab.threshold),
                    "calibrated": lab.calibration.is_calibrated,
                }
                for lab, p in zip(labels, totals, strict=True)
            ]
            self._emit(
                {
                    "type": "study",
                    "study_uid": study["study_uid"],
                    "label_set": study["label_set"],
                    "status": "ok",
                    "top_label": labels[top].name,
                    "top_score": round(float(totals[top]), 6),
                    "critical": any(f["critical"] for f in findings),
                    "scores": {f["name"]: f["score"] for f in findings},
                    "findings": findings,
                    "images": study["images"],
                    "failed": study["failed"],
                    "aggregation": label_set.aggregation_rule(),
                    "model": self.classifier.model.identity.display_name,
                    "weights_sha256": self.classifier.model.identity.weights_sha256,
                    "backend": self.classifier.backend,
                }
            )


def _classify(args: argparse.Namespace) -> int:
    from triagenode.cli.common import settings_from_args
    from triagenode.node import build_classifier, close_classifier

    overrides = {
        k: v
        for k, v in (
            ("backend", args.backend),
            ("device", args.device),
            ("precision", args.precision),
            ("max_batch", args.batch),
        )
        if v is not None
    }
    if args.demo_model:
        overrides["source"] = "demo"
    settings = settings_from_args(args, model=overrides)
    classifier = build_classifier(settings, batched=False)
    model = classifier.model
    if args.label_set:
        classifier.label_set(args.label_set)  # fail now, naming the known sets
    if model.warning:
        print(f"triagenode: {model.warning}", file=sys.stderr)
    writer = _Writer(args)
    run = _Run(
        classifier,
        writer,
        args.label_set,
        settings.model.slices_per_series,
        settings.model.max_batch,
        model.warning,
    )
    progress = any(p.is_dir() for p in args.paths)
    started = last = time.monotonic()
    files = 0
    try:
        for path in iter_files(list(args.paths)):
            run.add_file(path)
            files += 1
            now = time.monotonic()
            if progress and now - last >= 1.0:
                last = now
                rate = run.images / max(now - started, 1e-9)
                print(
                    f"\r{files} files, {run.images} images, {run.failed} failed, "
                    f"{rate:.1f} images/s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        run.finish()
    finally:
        writer.close()
        close_classifier(classifier)
    if progress:
        elapsed = time.monotonic() - started
        print(
            f"\r{files} files, {run.images} images, {run.failed} failed in {elapsed:.1f} s",
            file=sys.stderr,
        )
    return 0 if run.images or not files else 1
