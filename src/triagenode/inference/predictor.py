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
        """One result per image: labels, cosine similarities and softmax probabilities.

        Raises
        ------
        PreprocessError
            An image could not be decoded or preprocessed.
        KeyError
            ``label_set`` is not configured.
        """
        model = self.classifier.model
        if queries:
            labels = list(queries)
            text = model.encode_text(labels)
        else:
            name = label_set or self.classifier.labels.default_set
            if name is None:
                raise KeyError("no label set given and none configured as default")
            labels = [label.name for label in self.classifier.label_set(name).labels]
            text = self.classifier.text_embeddings(name)
        batch = np.stack([self._pixels(image) for image in images])
        embeddings = self.classifier.encode_images(batch, Priority.low)
        for item in embeddings:
            if isinstance(item, BaseException):
                raise item
        features = np.stack(embeddings)  # type: ignore[arg-type]
        similarities = features @ text.T
        probabilities = softmax(similarities * np.float32(model.logit_scale))
        warning = DEMO_WARNING if model.identity.is_demo else None
        return [
            {
                "labels": labels,
                "similarities": similarities[i].tolist(),
                "probabilities": probabilities[i].tolist(),
                "model": model.identity.display_name,
                "weights_sha256": model.identity.weights_sha256,
                "backend": self.classifier.backend,
                "warning": warning,
            }
            for i in range(len(images))
        ]
