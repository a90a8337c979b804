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
a 1-image CR and a CT with 8 selected slices. The anchor, the encoder alone on the same
images preprocessed beforehand, is measured in the same run, interleaved with the studies.
The study time is ``classify_study`` of the node's classifier (through a DynamicBatcher, as
the node builds it) serial (``model.prefetch_workers = 0``: decode and preprocess every
image, then encode) and overlapped (``--prefetch-workers``, default 2) side by side; then the
sustained CR throughput of one worker process against the encoder bound, with one and two
worker threads::

    python benchmarks/pipeline.py --encoder-ratio --random-biomedclip --backend auto

``--workers N`` starts 1, then 2, ... N worker processes (multiprocessing, spawn), each with
its own model, backend and classifier and ``cores / N`` threads (``--threads`` to choose),
classifying studies from one shared list (``--studies-per-worker`` each; ``--ct-every K``
makes every Kth an 8-slice CT), and prints studies/hour for each count and its scaling
against one worker (goal: at least 0.8 x N)::

    python benchmarks/pipeline.py --workers 2 --random-biomedclip --backend auto
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
            f"  {'+'.join(map(str, run['per_worker']))}  {verdict}"
        )
    return results


def _median_s(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(statistics.median(times))


def _open_model(args: argparse.Namespace, work: Path, threads: int):
    """(loaded model, model settings, artifacts folder): random-weight BiomedCLIP or the demo
    model, its image tower exported to ONNX once for the ONNX Runtime / OpenVINO backends."""
    from triagenode.config.settings import ModelSettings
    from triagenode.inference import model as models
    from triagenode.optimization.onnx_export import export_onnx

    cache = work / "model-cache"
    if args.random_biomedclip:
        loaded = models.build_biomedclip(random_weights=True, cache_dir=cache)
    else:
        loaded = models.build_demo_model(cache)
    artifacts = args.artifacts or work / "engines"
    wants_onnx = args.backend in ("auto", "onnxruntime", "openvino")
    if wants_onnx and not (artifacts / "image.onnx").exists():
        export_onnx(loaded, artifacts, text=False, n_images=8)
    settings = ModelSettings(
        source="demo",
        backend=args.backend,
        precision=args.precision,
        threads=threads,
        prefetch_workers=args.prefetch_workers,
        prefetch_images=args.prefetch_images,
    )
    return loaded, settings, artifacts


def _classifiers(loaded, settings, encoder, cache: Path) -> dict:
    """The node's classifier (through a DynamicBatcher, as ``node.build_classifier``), serial
    (prefetch_workers 0) and overlapped (``settings.prefetch_workers``), one encoder."""
    from triagenode.config.labels import LabelSettings
    from triagenode.inference.batcher import DynamicBatcher
    from triagenode.inference.classifier import ZeroShotClassifier

    built = {}
    for name, workers in (("serial", 0), ("overlapped", settings.prefetch_workers)):
        batcher = DynamicBatcher(encoder, settings.max_batch, settings.max_wait_ms)
        built[name] = ZeroShotClassifier(
            loaded,
            encoder,
            LabelSettings(),
            cache,
            batcher=batcher,
            prefetch_workers=workers,
            prefetch_images=settings.prefetch_images,
        )
    return built


def _close(classifiers: dict) -> None:
    for classifier in classifiers.values():
        classifier.close()
        classifier.batcher.close()


def _refs(paths: list[Path]) -> list[tuple[ImageRef, Path]]:
    refs = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        refs.append((ImageRef(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID), path))
    return refs


def encoder_ratio(args: argparse.Namespace) -> dict:
    """Study time / encoder-only time, serial and overlapped side by side; CR throughput of
    one worker against the encoder bound."""
    import threading

    import numpy as np

    from triagenode.inference.backends.select import select_backend
    from triagenode.inference.preprocess import preprocess_file
    from triagenode.optimization.builder import OptimizationBuilder

    work = Path(tempfile.mkdtemp(prefix="triagenode-bench-ratio-"))
    loaded, settings, artifacts = _open_model(args, work, args.threads)
    encoder = select_backend(settings, artifacts, loaded, builder=OptimizationBuilder())
    classifiers = _classifiers(loaded, settings, encoder, work / "text-cache")
    studies = {
        "cr_1_image": ("chest_xray", make_cr_study(work / "cr", size=args.cr_size, seed=1)[1]),
        "ct_8_slices": ("ct_chest", make_ct_study(work / "ct", 8, args.size)[1]),
    }
    out: dict = {
        "backend": f"{encoder.backend}/{encoder.precision}",
        "model": loaded.identity.display_name,
        "threads": args.threads,
        "prefetch_workers": settings.prefetch_workers,
        "prefetch_images": settings.prefetch_images,
        "repeats": args.repeats,
        "load_average_start": list(os.getloadavg()),
    }
    try:
        for name, (label_set, paths) in studies.items():
            refs = _refs(paths)
            chosen = classifiers["serial"].label_set(label_set)
            window = (chosen.window.center, chosen.window.width) if chosen.window else None
            for classifier in classifiers.values():
                classifier.classify_study("1.2.3", refs, label_set)  # warm-up, text cached
            arrays = np.concatenate(
                [preprocess_file(p, loaded.preprocess, window=window) for p in paths]
            )
            encoder.encode(arrays)
            timed: dict[str, list[float]] = {
                "encoder": [],
                "decode": [],
                "serial": [],
                "overlapped": [],
            }
            runs = {
                "encoder": lambda a=arrays: encoder.encode(a),
                "decode": lambda ps=paths, w=window: [
                    preprocess_file(p, loaded.preprocess, window=w) for p in ps
                ],
                "serial": lambda r=refs, ls=label_set: classifiers["serial"].classify_study(
                    "1.2.3", r, ls
                ),
                "overlapped": lambda r=refs, ls=label_set: classifiers["overlapped"].classify_study(
                    "1.2.3", r, ls
                ),
            }
            for _ in range(args.repeats):  # interleaved, so load drift hits all four alike
                for key, run in runs.items():
                    timed[key].append(_median_s(run, 1))
            medians = {key: statistics.median(values) for key, values in timed.items()}
            out[name] = {
                "images": len(paths),
                "label_set": label_set,
                **{f"{key}_s": round(value, 4) for key, value in medians.items()},
                **{f"{key}_all_s": [round(v, 4) for v in values] for key, values in timed.items()},
                "ratio_serial": round(medians["serial"] / medians["encoder"], 3),
                "ratio_overlapped": round(medians["overlapped"] / medians["encoder"], 3),
                # the least disturbed run of each: on a shared machine the better estimate
                "ratio_serial_min": round(min(timed["serial"]) / min(timed["encoder"]), 3),
                "ratio_overlapped_min": round(min(timed["overlapped"]) / min(timed["encoder"]), 3),
            }
        # Sustained CR stream, one worker process: n one-image studies back to back, by one
        # worker thread (the node's default) and by two (node workers = 2: the next study
        # decodes while this one encodes, which prefetching within a 1-image study cannot do).
        stream = [
            _refs(make_cr_study(work / f"crs{i}", size=args.cr_size, seed=i)[1])
            for i in range(args.cr_stream)
        ]
        one = preprocess_file(stream[0][0][1], loaded.preprocess)
        bound_s = statistics.median(_median_s(lambda: encoder.encode(one), 1) for _ in range(3))

        def stream_s(classifier, threads: int) -> float:
            todo = list(range(len(stream)))
            lock = threading.Lock()

            def work_loop() -> None:
                while True:
                    with lock:
                        if not todo:
                            return
                        index = todo.pop(0)
                    classifier.classify_study("1.2.3", stream[index], "chest_xray")

            started = time.perf_counter()
            pool = [threading.Thread(target=work_loop) for _ in range(threads)]
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
            return time.perf_counter() - started

        n = len(stream)
        cr_stream: dict = {"studies": n, "encoder_bound_per_hour": round(3600 / bound_s)}
        for label, classifier, threads in (
            ("serial_1_thread", classifiers["serial"], 1),
            ("overlapped_1_thread", classifiers["overlapped"], 1),
            ("serial_2_threads", classifiers["serial"], 2),
            ("overlapped_2_threads", classifiers["overlapped"], 2),
        ):
            elapsed = stream_s(classifier, threads)
            cr_stream[label] = {
                "per_hour": round(3600 * n / elapsed),
                "ratio": round(elapsed / (n * bound_s), 3),
            }
        out["cr_stream"] = cr_stream
    finally:
        _close(classifiers)
        encoder.close()
        out["load_average_end"] = list(os.getloadavg())
        shutil.rmtree(work, ignore_errors=True)
    return out


def print_ratio(result: dict) -> None:
    print(
        f"{result['model']} on {result['backend']}, threads {result['threads'] or 'auto'}, "
        f"prefetch {result['prefetch_workers']} threads / {result['prefetch_images']} images; "
        f"load average {result['load_average_start'][0]:.1f}-{result['load_average_end'][0]:.1f}"
        f"; medians (and minima) of {result['repeats']} interleaved runs"
    )
    print(
        f"{'study':<12}{'encoder s':>10}{'decode s':>10}{'serial s':>10}{'overlap s':>10}"
        f"{'ratio serial':>14}{'ratio overlap':>15}   goal"
    )
    goals = {"cr_1_image": "-", "ct_8_slices": "<= 1.2"}
    for name in ("cr_1_image", "ct_8_slices"):
        r = result[name]
        print(
            f"{name:<12}{r['encoder_s']:>10.3f}{r['decode_s']:>10.3f}"
            f"{r['serial_s']:>10.3f}{r['overlapped_s']:>10.3f}"
            f"{r['ratio_serial']:>14.2f}{r['ratio_overlapped']:>15.2f}   {goals[name]}"
        )
        keys = ("encoder", "decode", "serial", "overlapped")
        mins = {key: min(r[f"{key}_all_s"]) for key in keys}
        print(
            f"{'  (min)':<12}{mins['encoder']:>10.3f}{mins['decode']:>10.3f}"
            f"{mins['serial']:>10.3f}{mins['overlapped']:>10.3f}"
            f"{r['ratio_serial_min']:>14.2f}{r['ratio_overlapped_min']:>15.2f}"
        )
    s = result["cr_stream"]
    print(
        f"CR stream, {s['studies']} studies, one worker process: encoder bound "
        f"{s['encoder_bound_per_hour']}/h (goal: within 1.3x)"
    )
    for label, row in s.items():
        if isinstance(row, dict):
            print(f"  {label:<22}{row['per_hour']:>8}/h   x{row['ratio']:.2f} of the bound")


# --workers N: worker processes -----------------------------------------------------------


def _process_worker(args, work, threads, todo, done, ready, go) -> None:
    """One worker process: its own model, backend and classifier; classifies studies from the
    shared list until it is empty."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    from triagenode.inference.backends.select import select_backend
    from triagenode.optimization.builder import OptimizationBuilder

    loaded, settings, artifacts = _open_model(args, work, threads)
    encoder = select_backend(settings, artifacts, loaded, builder=OptimizationBuilder())
    classifier = _classifiers(loaded, settings, encoder, work / "text-cache")["overlapped"]
    studies = json.loads((work / "studies.json").read_text())
    try:
        first = studies[0]
        classifier.classify_study("1.2.3", _refs([Path(p) for p in first[1]]), first[0])
        ready.put(os.getpid())
        go.wait()
        cpu_started = time.process_time()
        count = 0
        while True:
            # get_nowait() is no test for an empty list: it raises Empty while another
            # process holds the queue's read lock. The parent ends the list with one None
            # per worker.
            index = todo.get(timeout=600)
            if index is None:
                break
            label_set, paths = studies[index]
            classifier.classify_study("1.2.3", _refs([Path(p) for p in paths]), label_set)
            count += 1
        done.put((count, time.monotonic(), time.process_time() - cpu_started))
    finally:
        classifier.close()
        classifier.batcher.close()
        encoder.close()


def scaling(args: argparse.Namespace) -> dict:
    """Studies/hour with 1..N worker processes on one shared list of studies."""
    import multiprocessing

    from triagenode.inference.backends.select import select_backend
    from triagenode.optimization.builder import OptimizationBuilder

    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.workers)
    work = Path(tempfile.mkdtemp(prefix="triagenode-bench-workers-"))
    out: dict = {
        "cores": cores,
        "workers_max": args.workers,
        "threads_per_worker": threads,
        "prefetch_workers": args.prefetch_workers,
        "studies_per_worker": args.studies_per_worker,
        "load_average_start": list(os.getloadavg()),
        "runs": {},
    }
    try:
        # Export and cache the backend's artefacts once, before the workers open them.
        loaded, settings, artifacts = _open_model(args, work, threads)
        encoder = select_backend(settings, artifacts, loaded, builder=OptimizationBuilder())
        out["backend"] = f"{encoder.backend}/{encoder.precision}"
        out["model"] = loaded.identity.display_name
        encoder.close()
        del loaded, encoder
        total = args.studies_per_worker * args.workers
        studies = []
        for i in range(total):
            if args.ct_every and i % args.ct_every == args.ct_every - 1:
                _, paths = make_ct_study(work / f"s{i}", 8, args.size, seed=i)
                studies.append(("ct_chest", [str(p) for p in paths]))
            else:
                _, paths = make_cr_study(work / f"s{i}", size=args.cr_size, seed=i)
                studies.append(("chest_xray", [str(p) for p in paths]))
        (work / "studies.json").write_text(json.dumps(studies))
        context = multiprocessing.get_context("spawn")
        for k in range(1, args.workers + 1):
            todo, done, ready = context.Queue(), context.Queue(), context.Queue()
            go = context.Event()
            n = args.studies_per_worker * k
            for index in [*range(n), *([None] * k)]:
                todo.put(index)
            procs = [
                context.Process(
                    target=_process_worker, args=(args, work, threads, todo, done, ready, go)
                )
                for _ in range(k)
            ]
            for proc in procs:
                proc.start()
            for _ in procs:
                ready.get(timeout=900)
            started = time.monotonic()
            go.set()
            finished = [done.get(timeout=3600) for _ in procs]
            for proc in procs:
                proc.join(60)
            wall = max(end for _, end, _ in finished) - started
            counted = sum(count for count, _, _ in finished)
            out["runs"][k] = {
                "studies": counted,
                "wall_s": round(wall, 3),
                "per_hour": round(3600 * counted / wall),
                "per_worker": [count for count, _, _ in finished],
                # CPU seconds the workers spent per study: independent of other load, it
                # shows whether workers slow each other down beyond sharing the cores
                "cpu_s_per_study": round(sum(cpu for _, _, cpu in finished) / counted, 3),
            }
        one = out["runs"][1]["per_hour"]
        for k, run in out["runs"].items():
            run["scaling"] = round(run["per_hour"] / one, 3)
            run["goal_scaling"] = round(0.8 * k, 2)
    finally:
        out["load_average_end"] = list(os.getloadavg())
        shutil.rmtree(work, ignore_errors=True)
    return out


def print_scaling(result: dict) -> None:
    print(
        f"{result['model']} on {result['backend']}; {result['cores']} cores, "
        f"{result['threads_per_worker']} thread(s) per worker, prefetch "
        f"{result['prefetch_workers']}; {result['studies_per_worker']} studies per worker; "
        f"load average {result['load_average_start'][0]:.1f}-{result['load_average_end'][0]:.1f}"
    )
    free = result["cores"] - result["load_average_start"][0]
    if free < result["workers_max"]:
        print(
            f"NOTE: about {max(free, 0):.1f} of {result['cores']} cores were free at the start "
            f"(load average): {result['workers_max']} workers cannot scale beyond that here"
        )
    print(
        f"{'workers':>8}{'studies':>9}{'wall s':>9}{'studies/h':>11}{'x one':>8}{'goal':>7}"
        f"{'CPU s/study':>13}  per worker"
    )
    for k, run in result["runs"].items():
        verdict = "ok" if run["scaling"] >= run["goal_scaling"] else "MISSED"
        print(
            f"{k:>8}{run['studies']:>9}{run['wall_s']:>9.2f}{run['per_hour']:>11}"
            f"{run['scaling']:>8.2f}{run['goal_scaling']:>7.2f}{run['cpu_s_per_study']:>13.3f}"
            f"  {'+'.join(map(str, run['per_worker']))}  {verdict}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder-ratio", action="store_true", help="study / encoder-only time")
    parser.add_argument("--random-biomedclip", action="store_true")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--prefetch-workers", type=int, default=2, help="model.prefetch_workers")
    parser.add_argument("--prefetch-images", type=int, default=16, help="model.prefetch_images")
    parser.add_argument(
        "--workers", type=int, default=0, help="N worker processes: studies/hour for 1..N"
    )
    parser.add_argument("--studies-per-worker", type=int, default=8)
    parser.add_argument(
        "--ct-every", type=int, default=0, help="--workers: every Kth study an 8-slice CT"
    )
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

    if args.workers:
        result = scaling(args)
        print_scaling(result)
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2))
        return 0

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
