"""Zero-shot classification of studies, one decision per finding, with cached text embeddings.

Each finding of a label set is decided on its own, as zero-shot chest X-ray work does
(CheXzero; BiomedCLIP's own evaluation): the image embedding is compared with the mean
embedding of the finding's "present" prompts and with that of its "absent" prompts, and the
softmax over that pair, ``sigmoid(scale * (cos_present - cos_absent))``, is the image's raw
score. So two findings that co-exist do not halve each other, and a score does not move
when labels are added to or removed from a set. The label's calibration (identity unless a
site fitted one) is applied to the logit; until then the number is a *score*.

Per study, the image scores of each finding are aggregated by the label set's rule (the
maximum, or the mean of the top k images) over the images selection chose; the rule is
named in every result. A finding is present at or above its threshold. A present critical
finding flags the study; it raises the priority only when the label's threshold is marked
calibrated for that use.

A study's images are decoded and preprocessed in a small bounded pool while the encoder
works on the ones already prepared (:mod:`triagenode.inference.prefetch`,
``model.prefetch_workers``); 0 workers keeps the serial path (decode every image, then
encode). Both give the same embeddings, failures and reasons.

Text embeddings are computed once per (label set content, model weights hash) and kept in
memory and in ``cache_dir/text-embeddings/`` as ``.npy`` files, so a restart does not run
the text tower again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.config.labels import LabelSet, LabelSettings
from triagenode.domain import ImageRef, LabelFinding, Priority, SkippedSeries, StudyResult
from triagenode.errors import PreprocessError, TriageNodeError
from triagenode.inference.backends.base import ImageEncoder
from triagenode.inference.prefetch import StudyPrefetcher, study_embeddings
from triagenode.inference.preprocess import (
    IMAGE_SUFFIXES,
    preprocess_dataset,
    preprocess_file,
    read_dataset,
)

__all__ = [
    "NoLabelSetError",
    "NoUsableImagesError",
    "ZeroShotClassifier",
    "softmax",
]

log = logging.getLogger(__name__)


class NoUsableImagesError(TriageNodeError):
    """Every selected image of a study failed to preprocess or encode."""


class NoLabelSetError(TriageNodeError):
    """No domain rule fits the study: it is not classified (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable, float32."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    return exp / exp.sum(axis=1, keepdims=True)


def _set_digest(label_set: LabelSet) -> str:
    payload = [[label.name, label.prompts, label.absent_prompts] for label in label_set.labels]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


class ZeroShotClassifier:
    """Classifies images and studies against the configured label sets.

    Parameters
    ----------
    model
        The :class:`~triagenode.inference.model.LoadedModel` (text tower, identity, scale).
    encoder
        The image backend.
    labels
        The ``[labels]`` settings: sets, domain rules, default set.
    cache_dir
        Folder for the on-disk text-embedding cache; None keeps it in memory only.
    batcher
        A :class:`~triagenode.inference.batcher.DynamicBatcher` over ``encoder``; when given,
        images go through it (shared batches, priority order) instead of straight to
        ``encoder``.
    prefetch_workers
        ``model.prefetch_workers``: threads decoding and preprocessing a study's next images
        while the encoder runs; 0 decodes every image first, then encodes (serial).
    prefetch_images
        ``model.prefetch_images``: most preprocessed images waiting for the encoder at once,
        over all studies being classified (bounds the prefetch's memory). A study of up to
        half of this is decoded in parallel, then encoded as one batch, exactly as the serial
        path encodes it; a larger one in batches of that size, the next decoded while one
        is encoded.

    Call :meth:`close` when done, to stop the prefetch threads.
    """

    def __init__(
        self,
        model: Any,
        encoder: ImageEncoder,
        labels: LabelSettings,
        cache_dir: Path | None = None,
        batcher: Any = None,
        prefetch_workers: int = 2,
        prefetch_images: int = 16,
    ) -> None:
        self.model = model
        self.encoder = encoder
        self.labels = labels
        self.cache_dir = Path(cache_dir) / "text-embeddings" if cache_dir is not None else None
        self.batcher = batcher
        self._text: dict[tuple[str, str, str], np.ndarray] = {}
        # workers classify studies concurrently; the text tower runs once per set
        self._text_lock = threading.Lock()
        # where text embeddings came from: "memory", "disk" or "computed" (tests, metrics)
        self.text_cache_stats: Counter[str] = Counter()
        self.prefetcher = (
            StudyPrefetcher(prefetch_workers, prefetch_images) if prefetch_workers > 0 else None
        )

    def close(self) -> None:
        """Stop the prefetch threads (the encoder and the batcher are their owner's to close)."""
        if self.prefetcher is not None:
            self.prefetcher.close()

    @property
    def backend(self) -> str:
        return str(self.encoder.backend)

    # Label sets -------------------------------------------------------------------------

    def label_set(self, name: str) -> LabelSet:
        """The label set called ``name``; raises TriageNodeError naming the known ones."""
        try:
            return self.labels.sets[name]
        except KeyError:
            known = ", ".join(sorted(self.labels.sets)) or "none"
            message = f"label set {name!r} is not configured (known: {known})"
            raise TriageNodeError(message) from None

    def choose_label_set(self, triage_inputs: dict[str, str]) -> str:
        """The label set for a study, by the domain rules on its triage inputs.

        Raises
        ------
        NoLabelSetError
            When no domain rule fits: the study is not classified.
        """
        choice = self.labels.explain_choice(triage_inputs)
        if choice.label_set is None:
            raise NoLabelSetError(choice.reason)
        return choice.label_set

    def text_embeddings(self, name: str) -> np.ndarray:
        """Unit text embeddings ``(labels, 2, embed_dim)`` of a label set, cached: for each
        label the mean of its "present" prompts, then of its "absent" prompts."""
        label_set = self.label_set(name)
        with self._text_lock:
            return self._text_embeddings(name, label_set)

    def _text_embeddings(self, name: str, label_set: LabelSet) -> np.ndarray:
        key = (name, self.model.identity.weights_sha256, _set_digest(label_set))
        cached = self._text.get(key)
        if cached is not None:
            self.text_cache_stats["memory"] += 1
            return cached
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{key[1][:16]}-{key[2][:16]}-pairs.npy"
            if path.is_file():
                try:
                    loaded = np.load(path)
                    if loaded.shape == (len(label_set.labels), 2, self.model.embed_dim):
                        self._text[key] = loaded
                        self.text_cache_stats["disk"] += 1
                        return loaded
                except (OSError, ValueError) as exc:
                    log.warning("text embedding cache %s unreadable (%s); recomputing", path, exc)
        rows = []
        for label in label_set.labels:
            pair = []
            for prompts in (label.prompts, label.absent_prompts):
                mean = self.model.encode_text(list(prompts)).mean(axis=0)
                pair.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
            rows.append(np.stack(pair))
        embeddings = np.stack(rows).astype(np.float32)
        self.text_cache_stats["computed"] += 1
        self._text[key] = embeddings
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".tmp.npy")
            np.save(partial, embeddings)
            partial.replace(path)  # atomic: a concurrent reader never sees half a file
        return embeddings

    # Images -----------------------------------------------------------------------------

    def logits(self, embeddings: np.ndarray, label_set: str) -> np.ndarray:
        """Raw per-finding logits ``(N, labels)`` from unit image embeddings ``(N, dim)``:
        the model's logit scale times (similarity to "present" - similarity to "absent")."""
        text = self.text_embeddings(label_set)  # (labels, 2, dim)
        similarity = np.einsum("nd,lkd->nlk", embeddings.astype(np.float32), text)
        return (similarity[..., 0] - similarity[..., 1]) * np.float32(self.model.logit_scale)

    def scores(self, embeddings: np.ndarray, label_set: str) -> np.ndarray:
        """Per-image, per-finding scores ``(N, labels)`` in (0, 1), each label's calibration
        applied to its own column."""
        return self._calibrated(self.logits(embeddings, label_set), self.label_set(label_set))

    @staticmethod
    def _calibrated(logits: np.ndarray, label_set: LabelSet) -> np.ndarray:
        out = np.empty_like(logits)
        for column, label in enumerate(label_set.labels):
            out[:, column] = label.calibration.apply(logits[:, column])
        return out

    def encode_images(
        self, images: np.ndarray, priority: Priority
    ) -> list[np.ndarray | BaseException]:
        """Unit embeddings of preprocessed images, or the error of each image that failed."""
        if self.batcher is not None:
            futures = [self.batcher.submit(image, priority) for image in images]
            results: list[np.ndarray | BaseException] = []
            for future in futures:
                try:
                    results.append(future.result())
                except Exception as exc:
                    results.append(exc)
            return results
        try:
            return list(self.encoder.encode(images))
        except Exception:
            # one bad image must not fail its neighbours: retry them one at a time
            out: list[np.ndarray | BaseException] = []
            for image in images:
                try:
                    out.append(self.encoder.encode(image[None])[0])
                except Exception as exc:
                    out.append(exc)
            return out

    def classify_images(
        self, images: np.ndarray, label_set: str, priority: Priority = Priority.routine
    ) -> np.ndarray:
        """Per-finding scores ``(N, labels)`` for preprocessed images ``(N, 3, S, S)``.

        Raises the first encoder error when any image fails (use :meth:`classify_study`
        for per-image failure handling).
        """
        encoded = self.encode_images(images, priority)
        for item in encoded:
            if isinstance(item, BaseException):
                raise item
        return self.scores(np.stack(encoded), label_set)  # type: ignore[arg-type]

    def _preprocess(
        self, images: Sequence[tuple[ImageRef, Path]], window: tuple[float, float] | None
    ) -> tuple[list[ImageRef], list[np.ndarray], list[tuple[ImageRef, str]]]:
        config = self.model.preprocess
        by_path: dict[Path, list[ImageRef]] = defaultdict(list)
        for ref, path in images:
            by_path[Path(path)].append(ref)
        refs: list[ImageRef] = []
        arrays: list[np.ndarray] = []
        failed: list[tuple[ImageRef, str]] = []
        for path, path_refs in by_path.items():
            try:
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    datasets = None
                    arrays_here = [preprocess_file(path, config)[0]] * len(path_refs)
                else:
                    datasets = read_dataset(path)  # read once for all of its frames
                    arrays_here = []
            except PreprocessError as exc:
                failed.extend((ref, str(exc)) for ref in path_refs)
                continue
            except Exception as exc:  # unreadable file: that image fails, not the study
                failed.extend((ref, f"unreadable file ({exc})") for ref in path_refs)
                continue
            for index, ref in enumerate(path_refs):
                try:
                    if datasets is None:
                        array = arrays_here[index]
                    else:
                        array = preprocess_dataset(datasets, config, ref.frame, window=window)
                except PreprocessError as exc:
                    failed.append((ref, str(exc)))
                    continue
                except Exception as exc:
                    failed.append((ref, f"preprocessing failed ({type(exc).__name__}: {exc})"))
                    continue
                refs.append(ref)
                arrays.append(array)
        return refs, arrays, failed

    def _embed_serial(
        self,
        images: Sequence[tuple[ImageRef, Path]],
        window: tuple[float, float] | None,
        priority: Priority,
    ) -> tuple[list[ImageRef], list[np.ndarray], list[tuple[ImageRef, str]], float, float]:
        """Decode and preprocess every image, then encode them all: (used, embeddings,
        failed, preprocess ms, encode ms)."""
        started = time.perf_counter()
        refs, arrays, failed = self._preprocess(images, window)
        encode_started = time.perf_counter()
        used: list[ImageRef] = []
        embeddings: list[np.ndarray] = []
        if arrays:
            for ref, item in zip(refs, self.encode_images(np.stack(arrays), priority), strict=True):
                if isinstance(item, BaseException):
                    failed.append((ref, f"encoder failed ({item})"))
                else:
                    used.append(ref)
                    embeddings.append(item)
        encode_ms = (time.perf_counter() - encode_started) * 1000
        return used, embeddings, failed, (encode_started - started) * 1000, encode_ms

    def _embed_overlapped(
        self,
        images: Sequence[tuple[ImageRef, Path]],
        window: tuple[float, float] | None,
        priority: Priority,
    ) -> tuple[list[ImageRef], list[np.ndarray], list[tuple[ImageRef, str]], float, float]:
        """As :meth:`_embed_serial`, the next images decoded while the encoder runs. The
        encode time is the time spent in the encoder; the preprocess time is the rest of the
        step: the decoding the encoder did not hide."""
        assert self.prefetcher is not None
        encode_s = 0.0

        def encode(batch: np.ndarray) -> list[np.ndarray | BaseException]:
            nonlocal encode_s
            began = time.perf_counter()
            try:
                return self.encode_images(batch, priority)
            finally:
                encode_s += time.perf_counter() - began

        started = time.perf_counter()
        used, embeddings, failed = study_embeddings(
            images,
            self.model.preprocess,
            encode,
            self.prefetcher,
            max_batch=max(len(images), 1),  # as the serial path: the encoder splits batches
            window=window,
        )
        step_ms = (time.perf_counter() - started) * 1000
        return used, embeddings, failed, step_ms - encode_s * 1000, encode_s * 1000

    def classify_study(
        self,
        study_uid: str,
        images: Sequence[tuple[ImageRef, Path]],
        label_set: str | None = None,
        priority: Priority = Priority.routine,
        priority_rule: str | None = None,
        triage_inputs: dict[str, str] | None = None,
        *,
        label_set_reason: str = "",
        series_skipped: Sequence[SkippedSeries] = (),
    ) -> StudyResult:
        """Classify a study's selected images into one :class:`StudyResult`.

        Parameters
        ----------
        study_uid
            Study Instance UID.
        images
            ``(reference, file)`` pairs chosen by image selection.
        label_set
            Name of the label set; None chooses it from ``triage_inputs`` by domain rules.
        priority, priority_rule
            The study's triage outcome: orders its images in the batcher, recorded in the result.
        triage_inputs
            The study's triage attributes, used only when ``label_set`` is None.
        label_set_reason, series_skipped
            Why this label set, and the series selection left out: recorded in the result.

        Raises
        ------
        NoLabelSetError
            When ``label_set`` is None and no domain rule fits the study.
        NoUsableImagesError
            When every image failed (the reasons are in the message).
        """
        started = time.perf_counter()
        if label_set is None:
            choice = self.labels.explain_choice(triage_inputs or {})
            if choice.label_set is None:
                raise NoLabelSetError(choice.reason)
            label_set, label_set_reason = choice.label_set, label_set_reason or choice.reason
        name = label_set
        chosen = self.label_set(name)
        text_started = time.perf_counter()
        self.text_embeddings(name)
        text_ms = (time.perf_counter() - text_started) * 1000
        window = (chosen.window.center, chosen.window.width) if chosen.window else None
        if self.prefetcher is not None:
            used, embeddings, failed, preprocess_ms, encode_ms = self._embed_overlapped(
                images, window, priority
            )
        else:
            used, embeddings, failed, preprocess_ms, encode_ms = self._embed_serial(
                images, window, priority
            )
        if not used:
            reasons = "; ".join(sorted({reason for _, reason in failed})[:3]) or "no images given"
            raise NoUsableImagesError(
                f"study {study_uid}: none of its {len(images)} images could be classified "
                f"({reasons})"
            )
        image_logits = self.logits(np.stack(embeddings), name)
        image_scores = self._calibrated(image_logits, chosen)
        study_scores = chosen.aggregate(image_scores)
        study_logits = chosen.aggregate(image_logits)
        findings = []
        for column, label in enumerate(chosen.labels):
            score = float(study_scores[column])
            present = score >= label.threshold
            support = tuple(
                ref
                for ref, s in zip(used, image_scores[:, column], strict=True)
                if s >= label.threshold
            )
            findings.append(
                LabelFinding(
                    name=label.name,
                    code_scheme=label.code.scheme,
                    code_value=label.code.value,
                    code_meaning=label.code.meaning,
                    score=round(score, 6),
                    threshold=label.threshold,
                    present=present,
                    critical=label.critical and present,
                    escalates=label.escalates and present,
                    calibrated=label.calibration.is_calibrated,
                    images=support,
                    logit=round(float(study_logits[column]), 6),
                )
            )
        total_ms = (time.perf_counter() - started) * 1000
        return StudyResult(
            study_uid=study_uid,
            label_set=name,
            findings=tuple(findings),
            model=self.model.identity,
            backend=self.backend,
            aggregation=chosen.aggregation_rule(),
            images_used=tuple(used),
            images_failed=tuple(failed),
            priority=priority,
            priority_rule=priority_rule,
            label_set_reason=label_set_reason,
            calibration=_calibration_summary(chosen),
            series_skipped=tuple(series_skipped),
            timings_ms={
                "text": round(text_ms, 3),
                "preprocess": round(preprocess_ms, 3),
                "encode": round(encode_ms, 3),
                "total": round(total_ms, 3),
            },
        )


def _calibration_summary(label_set: LabelSet) -> str:
    """The calibration of a set's labels in words: "none" while every label is raw."""
    described = {
        label.name: label.calibration.describe()
        for label in label_set.labels
        if label.calibration.is_calibrated
    }
    if not described:
        return "none"
    return "; ".join(f"{name}: {text}" for name, text in described.items())
