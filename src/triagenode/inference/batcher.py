"""Dynamic batching: images from concurrent studies share the encoder's batches.

Callers :meth:`DynamicBatcher.submit` single preprocessed images and get a future. One
thread gathers pending images into a batch until ``max_batch`` are waiting or the oldest
has waited ``max_wait_ms``, whichever comes first; the highest priority goes first (then
arrival order), so a stat study's images overtake a routine back-load queued before them.
When a batch fails, its images are retried one by one, so one bad image fails alone.
An encoder with ``encode_prioritized`` (``PrioritizedImageEncoder``: the ``triton``
backend) is handed the most urgent priority among the batch's images.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from triagenode.domain import Priority
from triagenode.inference.backends.base import ImageEncoder, PrioritizedImageEncoder
from triagenode.metrics import BATCH_SIZE, INFERENCE_SECONDS

__all__ = ["BatcherClosedError", "DynamicBatcher"]

log = logging.getLogger(__name__)


class BatcherClosedError(RuntimeError):
    """The batcher was closed before the image could be encoded."""


@dataclass(order=True)
class _Item:
    rank: int  # -priority: heapq pops the smallest, i.e. the most urgent
    sequence: int  # arrival order within a priority
    arrived: float = field(compare=False)
    image: np.ndarray = field(compare=False)
    future: Future[np.ndarray] = field(compare=False)


class DynamicBatcher:
    """Priority-aware dynamic batcher in front of an :class:`ImageEncoder`.

    Parameters
    ----------
    encoder
        The backend that encodes ``(N, 3, S, S)`` batches.
    max_batch
        Most images per batch.
    max_wait_ms
        Longest time the oldest waiting image waits for company before its batch runs.
    """

    def __init__(self, encoder: ImageEncoder, max_batch: int = 32, max_wait_ms: float = 10.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.encoder = encoder
        self._prioritized = isinstance(encoder, PrioritizedImageEncoder)
        self.max_batch = int(max_batch)
        self.max_wait_s = max(float(max_wait_ms), 0.0) / 1000.0
        self._shape = (3, encoder.image_size, encoder.image_size)
        self._heap: list[_Item] = []
        self._sequence = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="triagenode-batcher", daemon=True)
        self._thread.start()

    def submit(
        self, image: np.ndarray, priority: Priority = Priority.routine
    ) -> Future[np.ndarray]:
        """Queue one image ``(3, S, S)``; the future resolves to its embedding.

        Raises
        ------
        BatcherClosedError
            After :meth:`close`.
        """
        future: Future[np.ndarray] = Future()
        if tuple(image.shape) != self._shape:
            future.set_exception(
                ValueError(f"image shape {tuple(image.shape)} != expected {self._shape}")
            )
            return future
        item = _Item(-int(priority), next(self._sequence), time.monotonic(), image, future)
        with self._cond:
            if self._closed:
                raise BatcherClosedError("the batcher is closed")
            heapq.heappush(self._heap, item)
            self._cond.notify()
        return future

    def _take_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._heap and not self._closed:
                self._cond.wait()
            if not self._heap:
                return None  # closed and drained
            deadline = min(item.arrived for item in self._heap) + self.max_wait_s
            while len(self._heap) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(self.max_batch, len(self._heap))
            return [heapq.heappop(self._heap) for _ in range(count)]

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if live:
                self._encode(live)

    def _encode(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            batch = np.stack([item.image for item in items])
            if self._prioritized:
                # The most urgent image decides: a stat image never waits behind its batch.
                urgent = Priority(-min(item.rank for item in items))
                embeddings = self.encoder.encode_prioritized(batch, urgent)  # type: ignore[attr-defined]
            else:
                embeddings = self.encoder.encode(batch)
        except Exception as exc:
            if len(items) == 1:
                log.warning("image failed in the encoder: %s", exc)
                items[0].future.set_exception(exc)
                return
            log.warning("batch of %d failed (%s); retrying its images one by one", len(items), exc)
            for item in items:
                self._encode([item])
            return
        INFERENCE_SECONDS.labels(self.encoder.backend).observe(time.perf_counter() - started)
        BATCH_SIZE.observe(len(items))
        for item, embedding in zip(items, embeddings, strict=True):
            item.future.set_result(embedding)

    def close(self, timeout: float | None = 30.0) -> None:
        """Encode what is queued, then stop the batching thread (the encoder stays open)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
