"""What the admin API needs from the rest of the node, injected by the composition root.

Every member is optional: without them the API still serves the database views, reports the
check as not configured in ``/readyz``, and answers the research endpoints with 503.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["ApiServices", "Predictor"]


@runtime_checkable
class Predictor(Protocol):
    """Zero-shot classification of images for ``/api/v1/predict`` and ``batch-predict``."""

    def predict(
        self,
        images: list[np.ndarray | bytes],
        queries: list[str] | None,
        label_set: str | None,
    ) -> list[dict[str, Any]]:
        """One result per image.

        Parameters
        ----------
        images
            Decoded PNG/JPEG pixels (``H x W`` or ``H x W x 3``), or the bytes of a DICOM file.
        queries
            Free-text prompts to score; None to use ``label_set``.
        label_set
            Name of a configured label set; None to use ``queries``.

        Returns
        -------
        list of dict
            JSON-able results, e.g. ``{"labels": [...], "scores": [...], "scoring": "..."}``
            (with a label set also ``thresholds``, ``present`` and ``calibrated``).
        """
        ...


@dataclass
class ApiServices:
    """Optional collaborators of the API (see the module docstring)."""

    predictor: Predictor | None = None
    model_loaded: Callable[[], bool] | None = None
    # Destination name -> reachable (a C-ECHO or a TCP connect, the caller decides; None while
    # not yet known). Must answer from a cache: /readyz is unauthenticated.
    destinations_reachable: Callable[[], Mapping[str, bool | None]] | None = None
    # Destination name -> when its answer above was found (UTC; None before the first), for
    # the answer's age in /readyz.
    destinations_probed_at: Callable[[], Mapping[str, datetime | None]] | None = None
