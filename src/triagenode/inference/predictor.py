"""The research endpoints' predictor: the node's own classifier on single images.

``/api/v1/predict`` and ``/api/v1/batch-predict`` score images against free-text queries or
a configured label set. This adapter runs them through the same preprocessing, backend and
batcher as studies, so a research call measures exactly what the pipeline would do.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pydicom

from triagenode.domain import DEMO_WARNING, Priority
from triagenode.errors import PreprocessError
from triagenode.inference.classifier import ZeroShotClassifier, softmax
from triagenode.inference.preprocess import preprocess_dataset, preprocess_pixels

__all__ = ["ClassifierPredictor"]


class ClassifierPredictor:
    """Implements :class:`triagenode.api.services.Predictor` on a :class:`ZeroShotClassifier`.

    Research calls go into the batcher at ``low`` priority, so they never delay a study.
    """

    def __init__(self, classifier: ZeroShotClassifier) -> None:
        self.classifier = classifier

    def _pixels(self, image: np.ndarray | bytes) -> np.ndarray:
        config = self.classifier.model.preprocess
        if isinstance(image, bytes):
            try:
                dataset = pydicom.dcmread(io.BytesIO(image))
            except Exception as exc:
                raise PreprocessError(f"not a readable DICOM file ({exc})") from None
            return preprocess_dataset(dataset, config)
        scale = 65535.0 if image.dtype == np.uint16 else 255.0
        return preprocess_pixels(image.astype(np.float32) / scale, config)

    def predict(
        self, images: list[np.ndarray | bytes], queries: list[str] | None, label_set: str | None
    ) -> list[dict[str, Any]]:
        """One result per image: labels, their scores and how the scores were made.

        With ``queries`` the scores are a softmax over those texts (they compete: which one
        fits best); with a ``label_set`` each finding is scored on its own, as for studies
        (present vs absent prompts, the label's calibration, its threshold). Neither is a
        probability unless the label set's calibration says ``calibrated``.

        Raises
        ------
        PreprocessError
            An image could not be decoded or preprocessed.
        KeyError
            Neither ``queries`` nor a configured ``label_set`` was given.
        """
        model = self.classifier.model
        batch = np.stack([self._pixels(image) for image in images])
        embeddings = self.classifier.encode_images(batch, Priority.low)
        for item in embeddings:
            if isinstance(item, BaseException):
                raise item
        features = np.stack(embeddings)  # type: ignore[arg-type]
        common = {
            "model": model.identity.display_name,
            "weights_sha256": model.identity.weights_sha256,
            "backend": self.classifier.backend,
            "warning": DEMO_WARNING if model.identity.is_demo else None,
        }
        if queries:
            labels = list(queries)
            similarities = features @ model.encode_text(labels).T
            scores = softmax(similarities * np.float32(model.logit_scale))
            return [
                {
                    "labels": labels,
                    "scoring": "softmax over the given queries",
                    "similarities": similarities[i].tolist(),
                    "scores": scores[i].tolist(),
                    **common,
                }
                for i in range(len(images))
            ]
        if label_set is None:
            raise KeyError("give queries or a label_set")
        chosen = self.classifier.label_set(label_set)
        scores = self.classifier.scores(features, label_set)
        return [
            {
                "labels": [label.name for label in chosen.labels],
                "scoring": "each finding on its own: present vs absent prompts",
                "scores": scores[i].tolist(),
                "thresholds": [label.threshold for label in chosen.labels],
                "present": [
                    bool(s >= lab.threshold)
                    for s, lab in zip(scores[i], chosen.labels, strict=True)
                ],
                "calibrated": [label.calibration.is_calibrated for label in chosen.labels],
                **common,
            }
            for i in range(len(images))
        ]
