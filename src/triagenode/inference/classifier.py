"""Zero-shot classification of studies with cached text embeddings.

Per image: cosine similarity of the image embedding with each label's text embedding (the
normalised mean of its prompts' embeddings), times the model's logit scale, softmax over
the label set. Per study the rule is :data:`AGGREGATION`: a label's study probability is its
highest per-image probability (not renormalised, so the values need not sum to one: each
says how strongly the most suggestive image supports that label). A label is present at or
above its threshold; a present critical label makes the study critical.

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
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.config.labels import LabelSet, LabelSettings
from triagenode.domain import ImageRef, LabelFinding, Priority, StudyResult
from triagenode.errors import PreprocessError, TriageNodeError
from triagenode.inference.backends.base import ImageEncoder
from triagenode.inference.preprocess import (
    IMAGE_SUFFIXES,
    preprocess_dataset,
    preprocess_file,
    read_dataset,
)

__all__ = ["AGGREGATION", "NoUsableImagesError", "ZeroShotClassifier", "softmax"]

log = logging.getLogger(__name__)

AGGREGATION = (
    "max probability per label across images (per-image softmax over the label set, "
    "study value not renormalised)"
)


class NoUsableImagesError(TriageNodeError):
    """Every selected image of a study failed to preprocess or encode."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable, float32."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    return exp / exp.sum(axis=1, keepdims=True)


def _set_digest(label_set: LabelSet) -> str:
    payload = [[label.name, label.prompts] for label in label_set.labels]
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
    """

    def __init__(
        self,
        model: Any,
        encoder: ImageEncoder,
        labels: LabelSettings,
        cache_dir: Path | None = None,
        batcher: Any = None,
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
        TriageNodeError
            When no rule matches and no ``default_set`` is configured.
        """
        chosen = self.labels.choose(triage_inputs)
        if chosen is None:
            modality = triage_inputs.get("Modality", "?")
            raise TriageNodeError(
                f"no label set for modality {modality!r}: no domain rule matches and "
                "labels.default_set is empty"
            )
        return chosen

    def text_embeddings(self, name: str) -> np.ndarray:
        """Unit text embeddings ``(labels, embed_dim)`` of a label set, cached."""
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
            path = self.cache_dir / f"{key[1][:16]}-{key[2][:16]}.npy"
            if path.is_file():
                try:
                    loaded = np.load(path)
                    if loaded.shape == (len(label_set.labels), self.model.embed_dim):
                        self._text[key] = loaded
                        self.text_cache_stats["disk"] += 1
                        return loaded
                except (OSError, ValueError) as exc:
                    log.warning("text embedding cache %s unreadable (%s); recomputing", path, exc)
        rows = []
        for label in label_set.labels:
            prompts = self.model.encode_text(list(label.prompts))
            mean = prompts.mean(axis=0)
            rows.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
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

    def probabilities(self, embeddings: np.ndarray, label_set: str) -> np.ndarray:
        """Per-image label probabilities ``(N, labels)`` from unit image embeddings."""
        text = self.text_embeddings(label_set)
        return softmax(embeddings @ text.T * np.float32(self.model.logit_scale))

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
        """Label probabilities ``(N, labels)`` for preprocessed images ``(N, 3, S, S)``.

        Raises the first encoder error when any image fails (use :meth:`classify_study`
        for per-image failure handling).
        """
        encoded = self.encode_images(images, priority)
        for item in encoded:
            if isinstance(item, BaseException):
                raise item
        return self.probabilities(np.stack(encoded), label_set)  # type: ignore[arg-type]

    def _preprocess(
        self, images: list[tuple[ImageRef, Path]]
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
                        array = preprocess_dataset(datasets, config, ref.frame)
                except PreprocessError as exc:
                    failed.append((ref, str(exc)))
                    continue
                except Exception as exc:
                    failed.append((ref, f"preprocessing failed ({type(exc).__name__}: {exc})"))
                    continue
                refs.append(ref)
                arrays.append(array)
        return refs, arrays, failed

    def classify_study(
        self,
        study_uid: str,
        images: list[tuple[ImageRef, Path]],
        label_set: str | None = None,
        priority: Priority = Priority.routine,
        priority_rule: str | None = None,
        triage_inputs: dict[str, str] | None = None,
    ) -> StudyResult:
        """Classify a study's selected images into one :class:`StudyResult`.

        Parameters
        ----------
        study_uid
            Study Instance UID.
        images
            ``(reference, file)`` pairs from :func:`~triagenode.inference.select.select_images`.
        label_set
            Name of the label set; None chooses it from ``triage_inputs`` by domain rules.
        priority, priority_rule
            The study's triage outcome: orders its images in the batcher, recorded in the result.
        triage_inputs
            The study's triage attributes, used only when ``label_set`` is None.

        Raises
        ------
        NoUsableImagesError
            When every image failed (the reasons are in the message).
        """
        started = time.perf_counter()
        name = label_set or self.choose_label_set(triage_inputs or {})
        chosen = self.label_set(name)
        text_started = time.perf_counter()
        self.text_embeddings(name)
        text_ms = (time.perf_counter() - text_started) * 1000
        refs, arrays, failed = self._preprocess(images)
        preprocess_ms = (time.perf_counter() - started) * 1000 - text_ms
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
        if not used:
            reasons = "; ".join(sorted({reason for _, reason in failed})[:3]) or "no images given"
            raise NoUsableImagesError(
                f"study {study_uid}: none of its {len(images)} images could be classified "
                f"({reasons})"
            )
        probs = self.probabilities(np.stack(embeddings), name)
        findings = []
        for column, label in enumerate(chosen.labels):
            values = probs[:, column]
            probability = float(values.max())
            present = probability >= label.threshold
            support = tuple(
                ref for ref, p in zip(used, values, strict=True) if p >= label.threshold
            )
            findings.append(
                LabelFinding(
                    name=label.name,
                    code_scheme=label.code.scheme,
                    code_value=label.code.value,
                    code_meaning=label.code.meaning,
                    probability=round(probability, 6),
                    threshold=label.threshold,
                    present=present,
                    critical=label.critical and present,
                    images=support,
                )
            )
        total_ms = (time.perf_counter() - started) * 1000
        return StudyResult(
            study_uid=study_uid,
            label_set=name,
            findings=tuple(findings),
            model=self.model.identity,
            backend=self.backend,
            aggregation=AGGREGATION,
            images_used=tuple(used),
            images_failed=tuple(failed),
            priority=priority,
            priority_rule=priority_rule,
            timings_ms={
                "text": round(text_ms, 3),
                "preprocess": round(preprocess_ms, 3),
                "encode": round(encode_ms, 3),
                "total": round(total_ms, 3),
            },
        )
