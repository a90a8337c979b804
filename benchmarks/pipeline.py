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


``--encoder-ratio`` measures instead, in this process and without the network, how close a
study's classification comes to its encoder-only time: ``study time / encoder-only time`` for
a 1-image CR and a CT with 8 selected slices, serial (the classifier's own steps: decode and
preprocess every image, then encode) and overlapped (:mod:`triagenode.inference.prefetch`),
and sustained CR throughput of one worker against the encoder bound::

    python benchmarks/pipeline.py --encoder-ratio --random-biomedclip --backend auto
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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


def _median_s(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(statistics.median(times))


def encoder_ratio(args: argparse.Namespace) -> dict:
    """Study time / encoder-only time, serial and overlapped; CR throughput vs its bound."""
    import numpy as np

    from triagenode.config.labels import LabelSettings
    from triagenode.config.settings import ModelSettings
    from triagenode.domain import ImageRef
    from triagenode.inference import model as models
    from triagenode.inference.backends.select import select_backend
    from triagenode.inference.classifier import ZeroShotClassifier
    from triagenode.inference.prefetch import StudyPrefetcher, study_embeddings
    from triagenode.inference.preprocess import preprocess_file
    from triagenode.optimization.builder import OptimizationBuilder
    from triagenode.optimization.onnx_export import export_onnx

    work = Path(tempfile.mkdtemp(prefix="triagenode-bench-ratio-"))
    cache = work / "cache"
    if args.random_biomedclip:
        loaded = models.build_biomedclip(random_weights=True, cache_dir=cache)
    else:
        loaded = models.build_demo_model(cache)
    artifacts = args.artifacts or work / "engines"
    if (
        args.backend in ("auto", "onnxruntime", "openvino")
        and not (artifacts / "image.onnx").exists()
    ):
        export_onnx(loaded, artifacts, text=False, n_images=8)
    settings = ModelSettings(
        source="demo", backend=args.backend, precision=args.precision, threads=args.threads
    )
    encoder = select_backend(settings, artifacts, loaded, builder=OptimizationBuilder())
    classifier = ZeroShotClassifier(loaded, encoder, LabelSettings(), None)
    prefetcher = StudyPrefetcher(workers=args.prefetch_workers, lookahead=8)
    studies = {}
    _, cr = make_cr_study(work / "cr", size=args.cr_size, seed=1)
    _, ct = make_ct_study(work / "ct", 8, args.size)
    studies["cr_1_image"] = ("chest_xray", cr)
    studies["ct_8_slices"] = ("ct", ct)
    out: dict = {
        "backend": f"{encoder.backend}/{encoder.precision}",
        "model": loaded.identity.display_name,
        "load_average_start": list(os.getloadavg()),
    }
    try:
        for name, (label_set, paths) in studies.items():
            refs = []
            for path in paths:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                refs.append(
                    (ImageRef(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID), path)
                )
            classifier.text_embeddings(label_set)  # cached, as in a running node
            arrays = np.stack([preprocess_file(p, loaded.preprocess)[0] for p in paths])
            encoder.encode(arrays)  # warm-up
            encode_s = _median_s(lambda a=arrays: encoder.encode(a), args.repeats)
            prepare_s = _median_s(
                lambda ps=paths: [preprocess_file(p, loaded.preprocess) for p in ps], args.repeats
            )
            serial_s = _median_s(
                lambda r=refs, ls=label_set: classifier.classify_study("1.2.3", r, ls),
                args.repeats,
            )
            overlapped_s = _median_s(
                lambda r=refs: study_embeddings(
                    r, loaded.preprocess, encoder.encode, prefetcher, settings.max_batch
                ),
                args.repeats,
            )
            out[name] = {
                "images": len(paths),
                "encoder_only_s": round(encode_s, 4),
                "decode_preprocess_s": round(prepare_s, 4),
                "study_serial_s": round(serial_s, 4),
                "study_overlapped_s": round(overlapped_s, 4),
                "ratio_serial": round(serial_s / encode_s, 3),
                "ratio_overlapped": round(overlapped_s / encode_s, 3),
            }
        # Sustained CR stream, one worker: N one-image studies back to back.
        stream = [
            make_cr_study(work / f"crs{i}", size=args.cr_size, seed=i)[1][0]
            for i in range(args.cr_stream)
        ]
        one_cr = np.stack([preprocess_file(stream[0], loaded.preprocess)[0]])
        bound_s = _median_s(lambda: encoder.encode(one_cr), args.repeats)
        started = time.perf_counter()
        for path in stream:
            classifier.classify_study(
                "1.2.3", [(ImageRef("1.2", path.name, "1"), path)], "chest_xray"
            )
        serial_stream_s = time.perf_counter() - started

        def prepare(path: Path) -> list:
            return [preprocess_file(path, loaded.preprocess)[0]]

        started = time.perf_counter()
        # Overlapped across studies: the next study's image decodes while this one encodes
        # (max_batch 1: each study still gets its own encoder call).
        prefetcher.run(stream, prepare, encoder.encode, max_batch=1)
        overlapped_stream_s = time.perf_counter() - started
        n = len(stream)
        out["cr_stream"] = {
            "studies": n,
            "encoder_bound_per_hour": round(3600 / bound_s),
            "serial_per_hour": round(3600 * n / serial_stream_s),
            "overlapped_per_hour": round(3600 * n / overlapped_stream_s),
            "ratio_serial": round(serial_stream_s / (n * bound_s), 3),
            "ratio_overlapped": round(overlapped_stream_s / (n * bound_s), 3),
        }
    finally:
        prefetcher.close()
        encoder.close()
        out["load_average_end"] = list(os.getloadavg())
        shutil.rmtree(work, ignore_errors=True)
    return out


def print_ratio(result: dict) -> None:
    print(
        f"{result['model']} on {result['backend']}; load average "
        f"{result['load_average_start'][0]:.1f}-{result['load_average_end'][0]:.1f}"
    )
    print(
        f"{'study':<12}{'encoder s':>10}{'decode s':>10}{'serial s':>10}{'overlap s':>10}"
        f"{'ratio serial':>14}{'ratio overlap':>15}"
    )
    for name in ("cr_1_image", "ct_8_slices"):
        r = result[name]
        print(
            f"{name:<12}{r['encoder_only_s']:>10.3f}{r['decode_preprocess_s']:>10.3f}"
            f"{r['study_serial_s']:>10.3f}{r['study_overlapped_s']:>10.3f}"
            f"{r['ratio_serial']:>14.2f}{r['ratio_overlapped']:>15.2f}"
        )
    s = result["cr_stream"]
    print(
        f"CR stream ({s['studies']} studies, one worker): "
        f"encoder bound {s['encoder_bound_per_hour']}/h, "
        f"serial {s['serial_per_hour']}/h (x{s['ratio_serial']:.2f}), "
        f"overlapped {s['overlapped_per_hour']}/h (x{s['ratio_overlapped']:.2f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder-ratio", action="store_true", help="study / encoder-only time")
    parser.add_argument("--random-biomedclip", action="store_true")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--prefetch-workers", type=int, default=1)
    parser.add_argument("--cr-size", type=int, default=2048)
    parser.add_argument("--cr-stream", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--artifacts", type=Path, default=None)
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

    if args.encoder_ratio:
        result = encoder_ratio(args)
        print_ratio(result)
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2))
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
