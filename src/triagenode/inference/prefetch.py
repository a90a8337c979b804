"""Keep the encoder busy: decode and preprocess a study's next images while it encodes.

Without overlap a study costs ``read + decode + preprocess`` of every image and then the
encoder's time; on a CPU the first part is 10-30 % of the second for an 8-slice CT with
ViT-B/16 (``docs/performance.md``). :class:`StudyPrefetcher` runs the preparation in a small
bounded thread pool (``model.prefetch_workers`` threads, at most ``lookahead`` images
prepared ahead, so memory stays bounded whatever the study's size) and hands the encoder
every prepared image that is ready as soon as the encoder is free, up to ``max_batch``:
the first images are encoded while the next ones are decoded. The backends release the GIL
while they compute (OpenVINO, ONNX Runtime, PyTorch), and pydicom's decoders and numpy
resizing mostly run in C, so the threads do overlap.

:func:`study_embeddings` is the study-level entry point: the same inputs and the same
per-image outcome (embedding, or the reason it failed) as the classifier's preprocessing and
encoding steps, so the classifier can call it in place of those two steps.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from triagenode.errors import PreprocessError

__all__ = ["EncodeFailure", "StudyPrefetcher", "study_embeddings"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Outcome = np.ndarray | BaseException
Prepare = Callable[[T], Sequence[Outcome]]
Encode = Callable[[np.ndarray], np.ndarray]


class EncodeFailure(Exception):
    """The encoder failed on this image (the preparation had succeeded)."""


class StudyPrefetcher:
    """A bounded pool that prepares model inputs ahead of the encoder.

    Parameters
    ----------
    workers : int
        Preparation threads; 0 prepares inline, one item at a time (no overlap).
    lookahead : int
        Most items prepared and not yet encoded at any moment (bounds memory).
    """

    def __init__(self, workers: int = 1, lookahead: int = 8) -> None:
        if workers < 0 or lookahead < 1:
            raise ValueError(f"workers >= 0 and lookahead >= 1 (got {workers}, {lookahead})")
        self.workers = workers
        self.lookahead = lookahead
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="prefetch") if workers else None
        self._lock = threading.Lock()

    def _submit(self, prepare: Prepare[T], item: T) -> Future[Sequence[Outcome]]:
        if self._pool is not None:
            return self._pool.submit(_guarded, prepare, item)
        done: Future[Sequence[Outcome]] = Future()
        done.set_result(_guarded(prepare, item))
        return done

    def run(
        self, items: Sequence[T], prepare: Prepare[T], encode: Encode, max_batch: int = 32
    ) -> list[list[Outcome]]:
        """Prepare ``items`` in the pool and encode their images in order as they are ready.

        Parameters
        ----------
        items : sequence
            Work units (for example one file and the frames wanted from it).
        prepare : callable
            ``item -> [array (3,S,S) or the exception that stopped that image, ...]``.
        encode : callable
            ``(N,3,S,S) -> (N,D)`` embeddings (a backend's ``encode``, or the batcher's).
        max_batch : int
            Most images per ``encode`` call.

        Returns
        -------
        list of list
            Per item, per image: its embedding, or the exception from preparing it, or an
            :class:`EncodeFailure`. A failing batch is retried image by image, so one bad image does
            not fail its neighbours.
        """
        results: list[list[Outcome]] = [[] for _ in items]
        pending: deque[tuple[int, Future[Sequence[Outcome]]]] = deque()
        next_item = 0
        with self._lock:  # one study at a time through this pool keeps the bound honest
            while next_item < len(items) or pending:
                while next_item < len(items) and len(pending) < self.lookahead:
                    pending.append((next_item, self._submit(prepare, items[next_item])))
                    next_item += 1
                # Wait for the oldest item, then take every later one that is already done.
                ready = [pending.popleft()]
                ready[0][1].result()
                while pending and pending[0][1].done():
                    ready.append(pending.popleft())
                for index, future in ready:
                    results[index] = list(future.result())
                slots = [
                    (index, position)
                    for index, _ in ready
                    for position, outcome in enumerate(results[index])
                    if isinstance(outcome, np.ndarray)
                ]
                for start in range(0, len(slots), max_batch):
                    self._encode(results, slots[start : start + max_batch], encode)
        return results

    @staticmethod
    def _encode(results: list[list[Outcome]], slots: list[tuple[int, int]], encode: Encode) -> None:
        if not slots:
            return
        batch = np.stack([results[i][p] for i, p in slots])  # type: ignore[misc]
        try:
            embeddings = encode(batch)
        except Exception:
            for row, (i, p) in enumerate(slots):
                try:
                    results[i][p] = encode(batch[row : row + 1])[0]
                except Exception as exc:
                    results[i][p] = EncodeFailure(str(exc))
            return
        for row, (i, p) in enumerate(slots):
            results[i][p] = embeddings[row]

    def close(self) -> None:
        """Stop the threads (waits for the images being prepared)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _guarded(prepare: Prepare[T], item: T) -> Sequence[Outcome]:
    try:
        return prepare(item)
    except Exception as exc:  # the item's images all fail, the study goes on
        return [exc]


def study_embeddings(
    images: Sequence[tuple[Any, Path]],
    config: Any,
    encode: Encode,
    prefetcher: StudyPrefetcher,
    max_batch: int = 32,
) -> tuple[list[Any], list[np.ndarray], list[tuple[Any, str]]]:
    """Embeddings of a study's selected images, decoding overlapped with encoding.

    Parameters
    ----------
    images : sequence of (ImageRef, pathlib.Path)
        As :func:`~triagenode.inference.select.select_images` gives them; several frames of
        one file are read once.
    config : PreprocessConfig
        The model's preprocessing.
    encode : callable
        ``(N,3,S,S) -> (N,D)`` unit embeddings.
    prefetcher : StudyPrefetcher
        The pool.
    max_batch : int
        Most images per ``encode`` call.

    Returns
    -------
    (used refs, embeddings, failed (ref, reason))
        In the order of ``images``; reasons say whether reading, preprocessing or the
        encoder failed.
    """
    from triagenode.inference.preprocess import (
        IMAGE_SUFFIXES,
        preprocess_dataset,
        preprocess_file,
        read_dataset,
    )

    by_path: dict[Path, list[Any]] = {}
    for ref, path in images:
        by_path.setdefault(Path(path), []).append(ref)
    items = list(by_path.items())

    def prepare(item: tuple[Path, list[Any]]) -> list[Outcome]:
        path, refs = item
        try:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                return [preprocess_file(path, config)[0]] * len(refs)
            dataset = read_dataset(path)
        except PreprocessError as exc:
            return [exc] * len(refs)
        except Exception as exc:
            return [_Unreadable(f"unreadable file ({exc})")] * len(refs)
        out: list[Outcome] = []
        for ref in refs:
            try:
                out.append(preprocess_dataset(dataset, config, ref.frame))
            except PreprocessError as exc:
                out.append(exc)
            except Exception as exc:
                out.append(_Unreadable(f"preprocessing failed ({type(exc).__name__}: {exc})"))
        return out

    outcomes = prefetcher.run(items, prepare, encode, max_batch)
    used: list[Any] = []
    embeddings: list[np.ndarray] = []
    failed: list[tuple[Any, str]] = []
    for (_, refs), item_outcomes in zip(items, outcomes, strict=True):
        if len(item_outcomes) == 1 and len(refs) > 1:  # the whole item failed at once
            item_outcomes = item_outcomes * len(refs)
        for ref, outcome in zip(refs, item_outcomes, strict=True):
            if isinstance(outcome, np.ndarray):
                used.append(ref)
                embeddings.append(outcome)
            elif isinstance(outcome, EncodeFailure):
                failed.append((ref, f"encoder failed ({outcome})"))
            else:
                failed.append((ref, str(outcome)))
    return used, embeddings, failed


class _Unreadable(Exception):
    """A file or frame that could not be read or preprocessed; the message is the reason."""
