"""Keep the encoder busy: decode and preprocess a study's next images while it encodes.

Without overlap a study costs ``read + decode + preprocess`` of every image and then the
encoder's time; on a CPU the first part is 10-30 % of the second for an 8-slice CT with
ViT-B/16 (``docs/performance.md``). :class:`StudyPrefetcher` runs the preparation in a small
bounded thread pool (``model.prefetch_workers`` threads): a batch's images are decoded in
parallel, and the next batch is decoded while the encoder works on this one. The batches are
cut before anything runs (at most half of ``model.prefetch_images`` images each), so what the
encoder sees, and so every result, never depends on timing. At most
``model.prefetch_images`` prepared images wait for the encoder at any moment, summed over
every study classified at once through the same pool, so memory stays bounded by
configuration whatever the studies' sizes. The backends release the GIL
while they compute (OpenVINO, ONNX Runtime, PyTorch), and pydicom's decoders and numpy
resizing mostly run in C, so the threads do overlap.

:func:`study_embeddings` is the study-level entry point: the same inputs and the same
per-image outcome (embedding, or the reason it failed, in the same order) as the classifier's
serial preprocessing and encoding steps, so the classifier calls it in their place when
``model.prefetch_workers`` is above 0.
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
# A backend's ``encode`` ((N,3,S,S) -> (N,D)), or one that gives per image its embedding or
# the exception that stopped it (the classifier's ``encode_images``, through the batcher).
Encode = Callable[[np.ndarray], "np.ndarray | Sequence[Outcome]"]


class EncodeFailure(Exception):
    """The encoder failed on this image (the preparation had succeeded)."""


class _Budget:
    """Counts prepared images not yet encoded, across every study using one pool."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._changed = threading.Condition()

    def take(self, count: int, wait: bool) -> bool:
        """Reserve ``count`` places; without ``wait``, only when they are free now."""
        with self._changed:
            if wait:
                self._changed.wait_for(lambda: self.free >= count)
            elif self.free < count:
                return False
            self.free -= count
            return True

    def give(self, count: int) -> None:
        with self._changed:
            self.free += count
            self._changed.notify_all()


class StudyPrefetcher:
    """A bounded pool that prepares model inputs ahead of the encoder.

    Several threads may call :meth:`run` at once (one per study being classified); they
    share the pool and the bound.

    Parameters
    ----------
    workers : int
        Preparation threads; 0 prepares inline, one item at a time (no overlap).
    lookahead : int
        Most prepared images not yet encoded at any moment, over all concurrent runs (an
        item larger than this is prepared alone).
    """

    def __init__(self, workers: int = 1, lookahead: int = 8) -> None:
        if workers < 0 or lookahead < 1:
            raise ValueError(f"workers >= 0 and lookahead >= 1 (got {workers}, {lookahead})")
        self.workers = workers
        self.lookahead = lookahead
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="prefetch") if workers else None
        self._budget = _Budget(lookahead)

    def _submit(self, prepare: Prepare[T], item: T) -> Future[Sequence[Outcome]]:
        if self._pool is not None:
            return self._pool.submit(_guarded, prepare, item)
        done: Future[Sequence[Outcome]] = Future()
        done.set_result(_guarded(prepare, item))
        return done

    def run(
        self,
        items: Sequence[T],
        prepare: Prepare[T],
        encode: Encode,
        max_batch: int = 32,
        size: Callable[[T], int] | None = None,
    ) -> list[list[Outcome]]:
        """Prepare ``items`` in the pool a batch ahead of the encoder; encode them in order.

        Parameters
        ----------
        items : sequence
            Work units (for example one file and the frames wanted from it).
        prepare : callable
            ``item -> [array (3,S,S) or the exception that stopped that image, ...]``.
        encode : callable
            ``(N,3,S,S) -> (N,D)`` embeddings (a backend's ``encode``), or a callable giving
            per image its embedding or its exception (the classifier's, over the batcher).
        max_batch : int
            Most images per ``encode`` call.
        size : callable, optional
            ``item -> number of images it prepares`` (counted against ``lookahead``); 1 each
            when not given.

        Returns
        -------
        list of list
            Per item, per image: its embedding, or the exception from preparing it, or an
            :class:`EncodeFailure`. A failing batch is retried image by image, so one bad
            image does not fail its neighbours. An exception that is not an ``Exception``
            (KeyboardInterrupt, SystemExit) propagates, the items not started are cancelled.

        Notes
        -----
        The items are cut into batches of consecutive items, at most ``min(max_batch,
        lookahead // 2)`` images each, before anything runs; each batch's items are prepared
        in parallel, and the batch is encoded once all of them are ready, while the next
        batch is being prepared. So the batches the encoder sees never depend on timing and
        the results are the same at every run (a backend's last bits can depend on the batch
        size); a study that fits in one batch is encoded exactly as the serial path does.
        """
        results: list[list[Outcome]] = [[] for _ in items]
        batches = self._batches(items, min(max_batch, max(self.lookahead // 2, 1)), size)
        pending: deque[tuple[int, list[tuple[int, Future[Sequence[Outcome]]]]]] = deque()
        next_batch = 0
        try:
            while next_batch < len(batches) or pending:
                while next_batch < len(batches):
                    members, count = batches[next_batch]
                    # Wait for room only with nothing of ours in flight: what we hold is freed
                    # by our own encoding, so waiting while holding some could deadlock.
                    if not self._budget.take(count, wait=not pending):
                        break
                    futures: list[tuple[int, Future[Sequence[Outcome]]]] = []
                    pending.append((count, futures))
                    for index in members:
                        futures.append((index, self._submit(prepare, items[index])))
                    next_batch += 1
                count, futures = pending.popleft()
                try:
                    for index, future in futures:
                        results[index] = list(future.result())
                    slots = [
                        (index, position)
                        for index, _ in futures
                        for position, outcome in enumerate(results[index])
                        if isinstance(outcome, np.ndarray)
                    ]
                    for start in range(0, len(slots), max_batch):
                        self._encode(results, slots[start : start + max_batch], encode)
                finally:
                    for _, future in futures:
                        future.cancel()  # only after an exception: the others are done
                    self._budget.give(count)
        finally:
            for count, futures in pending:  # only after an exception
                for _, future in futures:
                    future.cancel()
                self._budget.give(count)
        return results

    def _batches(
        self, items: Sequence[T], most: int, size: Callable[[T], int] | None
    ) -> list[tuple[list[int], int]]:
        """Consecutive items in batches of at most ``most`` images (an item larger than that
        alone), each with the places it takes in the bound."""
        batches: list[tuple[list[int], int]] = []
        members: list[int] = []
        images = 0
        for index, item in enumerate(items):
            count = max(size(item) if size else 1, 1)
            if members and images + count > most:
                batches.append((members, min(images, self.lookahead)))
                members, images = [], 0
            members.append(index)
            images += count
        if members:
            batches.append((members, min(images, self.lookahead)))
        return batches

    @staticmethod
    def _encode(results: list[list[Outcome]], slots: list[tuple[int, int]], encode: Encode) -> None:
        if not slots:
            return
        batch = np.stack([results[i][p] for i, p in slots])  # type: ignore[misc]
        try:
            embeddings = encode(batch)
            if len(embeddings) != len(slots):
                raise RuntimeError(f"encoder gave {len(embeddings)} results for {len(slots)}")
        except Exception:
            for row, (i, p) in enumerate(slots):
                try:
                    results[i][p] = _embedding(encode(batch[row : row + 1])[0])
                except Exception as exc:
                    results[i][p] = EncodeFailure(str(exc))
            return
        for row, (i, p) in enumerate(slots):
            results[i][p] = _embedding(embeddings[row])

    def close(self) -> None:
        """Stop the threads (waits for the images being prepared); idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _embedding(outcome: Outcome) -> Outcome:
    return EncodeFailure(str(outcome)) if isinstance(outcome, BaseException) else outcome


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
    window: tuple[float, float] | None = None,
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
        ``(N,3,S,S) -> (N,D)`` unit embeddings, or per image the embedding or its exception.
    prefetcher : StudyPrefetcher
        The pool.
    max_batch : int
        Most images per ``encode`` call.
    window : (center, width), optional
        The label set's display window for DICOM images (CT head, for example).

    Returns
    -------
    (used refs, embeddings, failed (ref, reason))
        Used in the order of ``images`` grouped by file, as the classifier's serial path
        gives them; the failures that happened before the encoder first (reading or
        preprocessing), then those of the encoder, each in that order.
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
            dataset = read_dataset(path)  # read once for all of its frames
        except PreprocessError as exc:
            return [exc] * len(refs)
        except Exception as exc:
            return [_Unreadable(f"unreadable file ({exc})")] * len(refs)
        out: list[Outcome] = []
        for ref in refs:
            try:
                out.append(preprocess_dataset(dataset, config, ref.frame, window=window))
            except PreprocessError as exc:
                out.append(exc)
            except Exception as exc:
                out.append(_Unreadable(f"preprocessing failed ({type(exc).__name__}: {exc})"))
        return out

    outcomes = prefetcher.run(items, prepare, encode, max_batch, size=lambda item: len(item[1]))
    used: list[Any] = []
    embeddings: list[np.ndarray] = []
    failed: list[tuple[Any, str]] = []
    encoder_failed: list[tuple[Any, str]] = []
    for (_, refs), item_outcomes in zip(items, outcomes, strict=True):
        if len(item_outcomes) == 1 and len(refs) > 1:  # the whole item failed at once
            item_outcomes = item_outcomes * len(refs)
        for ref, outcome in zip(refs, item_outcomes, strict=True):
            if isinstance(outcome, np.ndarray):
                used.append(ref)
                embeddings.append(outcome)
            elif isinstance(outcome, EncodeFailure):
                encoder_failed.append((ref, f"encoder failed ({outcome})"))
            else:
                failed.append((ref, str(outcome)))
    return used, embeddings, failed + encoder_failed


class _Unreadable(Exception):
    """A file or frame that could not be read or preprocessed; the message is the reason."""
