"""Parity of an optimised model with the PyTorch fp32 reference.

Every artefact the ``optimization`` package writes (ONNX fp32, fp16, INT8, TensorRT engines)
is compared with the reference on the same inputs before it is kept: cosine similarity of
the embeddings, their largest absolute difference, and what a radiologist would actually
see change, the top-1 label of a zero-shot classification over a label set's text
embeddings and the largest change of a label probability.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from triagenode.errors import TriageNodeError

__all__ = [
    "BF16",
    "FP16",
    "FP32",
    "INT8",
    "ParityError",
    "ParityReport",
    "ParityThresholds",
    "compare_embeddings",
    "synthetic_images",
    "zero_shot_probabilities",
]


class ParityError(TriageNodeError):
    """An optimised model disagrees with the reference more than its thresholds allow."""

    def __init__(self, report: ParityReport, what: str) -> None:
        self.report = report
        super().__init__(f"{what}: parity below threshold, not written ({report.summary()})")


@dataclass(frozen=True)
class ParityThresholds:
    """What an artefact must reach to be written.

    ``FP32`` is for a graph that computes the same thing (export, graph optimisation),
    ``FP16`` for half precision, ``INT8`` for quantised models; the INT8 top-1 figure is the
    issue's acceptance goal (99 % agreement with fp32).
    """

    min_cosine: float  # smallest per-image cosine similarity allowed
    min_top1_agreement: float  # fraction of images whose top-1 label is unchanged
    max_abs_diff: float = math.inf  # largest |difference| of one embedding component


FP32 = ParityThresholds(min_cosine=0.9999, min_top1_agreement=1.0, max_abs_diff=1e-3)
FP16 = ParityThresholds(min_cosine=0.999, min_top1_agreement=0.98)
INT8 = ParityThresholds(min_cosine=0.95, min_top1_agreement=0.99)
# bf16 (OpenVINO, PyTorch autocast on CPU): the CPU issue's goal, cosine 0.999 and 99 % top-1.
BF16 = ParityThresholds(min_cosine=0.999, min_top1_agreement=0.99)


@dataclass(frozen=True)
class ParityReport:
    """How closely a candidate's embeddings follow the reference's on the same images."""

    n_images: int
    n_labels: int
    cosine_min: float
    cosine_mean: float
    max_abs_diff: float
    top1_agreement: float
    max_prob_diff: float
    thresholds: ParityThresholds
    # How many different labels the reference's top-1 covers: agreement over a sample where
    # one label wins everywhere says less than over one where many do.
    reference_top1_labels: int = 0
    # The same top-1 agreement after removing the component every image (and every label)
    # shares: random-weight models put almost all of an embedding there, which makes the
    # plain figure easy to reach; this one measures whether the differences between images
    # survive. Reported, not thresholded.
    centred_top1_agreement: float = 1.0

    @property
    def passed(self) -> bool:
        t = self.thresholds
        return (
            self.cosine_min >= t.min_cosine
            and self.top1_agreement >= t.min_top1_agreement
            and self.max_abs_diff <= t.max_abs_diff
        )

    def summary(self) -> str:
        t = self.thresholds
        return (
            f"{self.n_images} images, {self.n_labels} labels: cosine min {self.cosine_min:.5f} "
            f"(need >= {t.min_cosine}), top-1 agreement {self.top1_agreement:.3f} "
            f"(need >= {t.min_top1_agreement}), max abs diff {self.max_abs_diff:.2e} "
            f"(need <= {t.max_abs_diff}), max probability diff {self.max_prob_diff:.4f}, "
            f"{self.reference_top1_labels} distinct reference top-1 labels, "
            f"centred top-1 agreement {self.centred_top1_agreement:.3f}"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["thresholds"] = {
            k: (None if isinstance(v, float) and math.isinf(v) else v)
            for k, v in asdict(self.thresholds).items()
        }
        data["passed"] = self.passed
        return data


def zero_shot_probabilities(
    image_embeds: np.ndarray, text_embeds: np.ndarray, logit_scale: float
) -> np.ndarray:
    """Softmax over labels of ``logit_scale * image · text``, as the classifier computes it.

    Parameters
    ----------
    image_embeds : numpy.ndarray
        ``(N, D)`` unit rows.
    text_embeds : numpy.ndarray
        ``(L, D)`` unit rows, one per label.
    logit_scale : float
        The model's learned temperature (already exponentiated).

    Returns
    -------
    numpy.ndarray
        ``(N, L)`` probabilities, float64.
    """
    logits = logit_scale * (image_embeds.astype(np.float64) @ text_embeds.astype(np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    normalised: np.ndarray = probs / probs.sum(axis=1, keepdims=True)
    return normalised


def compare_embeddings(
    reference: np.ndarray,
    candidate: np.ndarray,
    text_embeds: np.ndarray,
    logit_scale: float,
    thresholds: ParityThresholds = FP32,
) -> ParityReport:
    """Compare a candidate's image embeddings with the reference's on the same images.

    Parameters
    ----------
    reference, candidate : numpy.ndarray
        ``(N, D)`` embeddings of the same images, reference first.
    text_embeds : numpy.ndarray
        ``(L, D)`` label embeddings the top-1 agreement is measured over.
    logit_scale : float
        Temperature of the zero-shot softmax.
    thresholds : ParityThresholds
        What the report's ``passed`` checks.

    Returns
    -------
    ParityReport

    Raises
    ------
    ValueError
        When the shapes differ.
    """
    if reference.shape != candidate.shape:
        raise ValueError(
            f"reference {reference.shape} and candidate {candidate.shape} shapes differ"
        )
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = (ref * cand).sum(axis=1) / np.maximum(norms, 1e-12)
    p_ref = zero_shot_probabilities(reference, text_embeds, logit_scale)
    p_cand = zero_shot_probabilities(candidate, text_embeds, logit_scale)
    return ParityReport(
        n_images=int(ref.shape[0]),
        n_labels=int(text_embeds.shape[0]),
        cosine_min=float(cosine.min()),
        cosine_mean=float(cosine.mean()),
        max_abs_diff=float(np.abs(ref - cand).max()),
        top1_agreement=float((p_ref.argmax(axis=1) == p_cand.argmax(axis=1)).mean()),
        max_prob_diff=float(np.abs(p_ref - p_cand).max()),
        thresholds=thresholds,
        reference_top1_labels=len(set(p_ref.argmax(axis=1).tolist())),
        centred_top1_agreement=_centred_agreement(ref, cand, text_embeds.astype(np.float64)),
    )


def _centred_agreement(ref: np.ndarray, cand: np.ndarray, text: np.ndarray) -> float:
    if len(ref) < 2 or len(text) < 2:
        return 1.0

    def centre(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
        x = x - mean
        unit: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return unit

    mean = ref.mean(axis=0)
    labels = centre(text, text.mean(axis=0))
    top_ref = (centre(ref, mean) @ labels.T).argmax(axis=1)
    top_cand = (centre(cand, mean) @ labels.T).argmax(axis=1)
    return float((top_ref == top_cand).mean())


def synthetic_images(
    n: int,
    image_size: int,
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073),
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711),
    seed: int = 0,
) -> np.ndarray:
    """Preprocessed, DICOM-like test images: grey phantoms of overlapping ellipses with noise.

    Pure noise is a poor parity input (a model sees nothing like it in use, and quantisation
    ranges calibrated on it are wrong); phantoms have the flat regions, edges and windowed
    grey range of a CT slice or radiograph after preprocessing.

    Parameters
    ----------
    n : int
        Number of images.
    image_size : int
        Side in pixels.
    mean, std : tuple of float
        The model's normalisation per channel.
    seed : int
        Same seed, same images.

    Returns
    -------
    numpy.ndarray
        ``(n, 3, image_size, image_size)`` float32, normalised.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / float(image_size)
    m = np.asarray(mean, dtype=np.float64)[:, None, None]
    s = np.asarray(std, dtype=np.float64)[:, None, None]
    out = np.empty((n, 3, image_size, image_size), dtype=np.float32)
    for i in range(n):
        img = np.zeros((image_size, image_size))
        for _ in range(int(rng.integers(2, 7))):
            cx, cy = rng.uniform(0.2, 0.8, size=2)
            a, b = rng.uniform(0.05, 0.45, size=2)
            img += rng.uniform(0.1, 1.0) * ((((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2) < 1)
        img += rng.normal(0.0, 0.04, img.shape)
        img = (img - img.min()) / (np.ptp(img) + 1e-6)
        out[i] = ((np.broadcast_to(img, (3, image_size, image_size)) - m) / s).astype(np.float32)
    return out
