"""Pipeline benchmark: a study's last instance to its SR stored in the destination.

Starts the whole node in this process (demo model on the CPU unless ``--model-source`` says
otherwise, SQLite in a temp folder) with DCMTK ``storescp`` as the destination PACS, sends a
1-image CR study and a 200-slice CT study with DCMTK ``storescu``, and measures, per study:

- ``latency``: from ``storescu`` returning (the last instance acknowledged) to the SR file
  appearing in the destination's folder;
- ``quiet``: the study's quiet period (``study.stable_after_s``), which the node waits by
  design;
- ``model``: time spent encoding images and text in the model (from the result's timings);
- ``overhead = latency - quiet - model``: everything else (tracking, queueing, reading and
  preprocessing the selected images, SR writing, export). Goal: under 1 s per study.

Usage::

    python benchmarks/pipeline.py [--ct-slices 200] [--size 512] [--quiet 1.0] [--json-out F]
    python benchmarks/pipeline.py --summary-objects [--size 512] [--repeat 20]

``--summary-objects`` measures only what the summary objects add to a study (issue 15): the
key images' thumbnails read and windowed, the card laid out and drawn, the Secondary
Capture, the Encapsulated PDF and the Key Object Selection built and written, with the
worker's own functions, for a 1-image CR and a CT whose 4 key slices are 512x512. Goal:
under 150 ms per study.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from common import (
    Destination,
    make_cr_study,
    make_ct_study,
    node_settings,
    send,
    wait_for,
)
from sqlalchemy import select

from triagenode.config.settings import load_settings
from triagenode.domain import ImageRef, LabelFinding, ModelIdentity, StudyResult
from triagenode.node import Node
from triagenode.pipeline.worker import build_summary_objects
from triagenode.reports import build_sr
from triagenode.reports.objects import ObjectKind, write_objects
from triagenode.store.models import Result, Study


def run_study(node: Node, destination: Destination, paths: list[Path], study_uid: str) -> dict:
    settings = node.settings
    before = destination.count()
    started = time.perf_counter()
    acknowledged = send(settings.scp.ae_title, settings.scp.port, paths)
    wait_for(lambda: destination.count() > before, timeout=600, what="SR in destination")
    arrived = time.perf_counter()
    with node.db.session() as session:
        study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
        result = session.execute(select(Result).where(Result.study_id == study.id)).scalar_one()
        timings = result.findings.get("timings_ms", {})
        priority = study.priority
    quiet = settings.study.stable_after_s
    model_s = (timings.get("encode", 0.0) + timings.get("text", 0.0)) / 1000
    preprocess_s = timings.get("preprocess", 0.0) / 1000
    latency = arrived - acknowledged
    return {
        "instances": len(paths),
        "send_s": round(acknowledged - started, 3),
        "latency_s": round(latency, 3),
        "quiet_s": quiet,
        "model_s": round(model_s, 3),
        "preprocess_s": round(preprocess_s, 3),
        "overhead_s": round(latency - quiet - model_s, 3),
        "overhead_without_preprocess_s": round(latency - quiet - model_s - preprocess_s, 3),
        "priority": priority,
        "timings_ms": timings,
    }


def _summary_result(study_uid: str, paths: list[Path]) -> StudyResult:
    """A result whose findings point at ``paths`` (4 key images at most), as the worker's."""
    refs = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        refs.append(ImageRef(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID))
    key = tuple(refs[len(refs) // 2 : len(refs) // 2 + 4])
    findings = (
        LabelFinding("finding_a", "SCT", "50960005", "Hemorrhage", 0.81, 0.5, True, images=key),
        LabelFinding("finding_b", "SCT", "432102000", "Infarction", 0.32, 0.6, False),
        LabelFinding("finding_c", "SCT", "4147007", "Mass", 0.55, 0.5, True, images=key[:2]),
    )
    model = ModelIdentity("demo", "0.1.0", "d" * 64, "demo", is_demo=True)
    return StudyResult(
        study_uid=study_uid,
        label_set="bench",
        findings=findings,
        model=model,
        backend="torch",
        aggregation="maximum image score per finding",
        images_used=tuple(refs),
    )


def summary_objects(size: int, repeat: int) -> dict:
    """Milliseconds the summary SC, PDF and KOS add per study (median, p90, max)."""
    work = Path(tempfile.mkdtemp(prefix="triagenode-bench-summary-"))
    try:
        settings = load_settings(
            None, node={"data_dir": str(work / "data")}, model={"source": "demo"}
        )
        kinds = [ObjectKind.summary_sc, ObjectKind.summary_pdf, ObjectKind.kos]
        studies = {
            "cr_1_image": make_cr_study(work / "cr", size=size),
            "ct_4_key_slices": make_ct_study(work / "ct", 40, size),
        }
        results = {}
        for name, (uid, paths) in studies.items():
            result = _summary_result(uid, paths)
            source = pydicom.dcmread(paths[0], stop_before_pixels=True)
            sr = build_sr(result, source, settings, run=1)
            files = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
            window = (40.0, 80.0) if name.startswith("ct") else None
            times = []
            for run in range(repeat + 1):  # the first run loads fonts and codecs
                started = time.perf_counter()
                objects = build_summary_objects(
                    result, source, sr, settings, kinds, run=1, paths=files, window=window
                )
                write_objects([dataset for _kind, dataset in objects], settings)
                if run:
                    times.append((time.perf_counter() - started) * 1000)
            times.sort()
            results[name] = {
                "median_ms": round(statistics.median(times), 1),
                "p90_ms": round(times[int(0.9 * (len(times) - 1))], 1),
                "max_ms": round(times[-1], 1),
                "objects": len(objects),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'study':<18}{'median ms':>10}{'p90 ms':>9}{'max ms':>9}  goal: < 150 ms per study")
    for name, row in results.items():
        verdict = "ok" if row["median_ms"] < 150 else "MISSED"
        print(
            f"{name:<18}{row['median_ms']:>10.1f}{row['p90_ms']:>9.1f}{row['max_ms']:>9.1f}"
            f"  {verdict}"
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=1.0, help="study.stable_after_s")
    parser.add_argument("--model-source", default="demo")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--summary-objects",
        action="store_true",
        help="measure only what the summary SC, PDF and KOS add per study",
    )
    parser.add_argument("--repeat", type=int, default=20, help="runs per study (summary)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.summary_objects:
        measured = summary_objects(args.size, args.repeat)
        if args.json_out:
            args.json_out.write_text(json.dumps(measured, indent=2))
        return 0

    work = Path(tempfile.mkdtemp(prefix="triagenode-bench-pipeline-"))
    destination = Destination(work / "pacs")
    destination.start()
    try:
        settings = node_settings(
            work,
            destination,
            {"stable_after_s": args.quiet, "stable_after_by_priority": {}},
            args.model_source,
        )
        node = Node(settings)
        node.start()
        try:
            # Warm-up: the first study pays for text embeddings and lazy imports.
            uid, paths = make_cr_study(work / "warm", seed=99)
            run_study(node, destination, paths, uid)
            results = {}
            uid, paths = make_cr_study(work / "cr", seed=1)
            results["cr_1_image"] = run_study(node, destination, paths, uid)
            uid, paths = make_ct_study(work / "ct", args.ct_slices, args.size)
            results[f"ct_{args.ct_slices}_slices"] = run_study(node, destination, paths, uid)
        finally:
            node.stop()
    finally:
        destination.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"{'study':<16}{'latency s':>10}{'quiet s':>9}{'model s':>9}{'preproc s':>10}"
        f"{'overhead s':>11}  goal: overhead < 1 s"
    )
    for name, row in results.items():
        verdict = "ok" if row["overhead_s"] < 1.0 else "MISSED"
        print(
            f"{name:<16}{row['latency_s']:>10.3f}{row['quiet_s']:>9.2f}{row['model_s']:>9.3f}"
            f"{row['preprocess_s']:>10.3f}{row['overhead_s']:>11.3f}  {verdict}"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
