"""Render the README's picture of the summary card: ``docs/summary-card.png``.

The result is the demo model's on a synthetic chest radiograph (a phantom drawn here: no
patient image ships with the project), through the same layout and drawing code as the
Secondary Capture the node sends. Usage::

    PYTHONPATH=src python scripts/render_summary_card.py [OUT.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from triagenode.domain import ImageRef, LabelFinding, ModelIdentity, Priority, StudyResult
from triagenode.reports.summary_card import Thumbnail, layout_card, render_card

CR = "1.2.840.10008.5.1.4.1.1.1"


def phantom(size: int = 512) -> np.ndarray:
    """A chest-like picture in [0, 1]: dark lungs in a bright body, a spine, a heart and a
    hazy right base."""
    y, x = np.mgrid[-1 : 1 : complex(size), -1 : 1 : complex(size)]
    body = ((x / 0.9) ** 2 + (y / 1.05) ** 2 < 1).astype(np.float32) * 0.75
    for side in (-1, 1):
        lung = ((x - side * 0.42) / 0.3) ** 2 + ((y + 0.05) / 0.62) ** 2 < 1
        body[lung] = 0.18
    body[np.abs(x) < 0.06] = 0.9
    heart = ((x + 0.12) / 0.3) ** 2 + ((y - 0.3) / 0.25) ** 2 < 1
    body[heart] = 0.7
    haze = ((x + 0.42) / 0.3) ** 2 + ((y - 0.45) / 0.18) ** 2 < 1
    body[haze] = np.maximum(body[haze], 0.55)
    rng = np.random.default_rng(0)
    return np.clip(body + rng.normal(0, 0.03, body.shape).astype(np.float32), 0, 1)


def demo_result() -> tuple[StudyResult, list[Thumbnail]]:
    image = ImageRef(CR, "2.25.1", "2.25.2")
    findings = (
        LabelFinding("pneumothorax", "SCT", "36118008", "Pneumothorax", 0.21, 0.5, False),
        LabelFinding(
            "pleural_effusion",
            "SCT",
            "60046008",
            "Pleural effusion",
            0.68,
            0.5,
            True,
            images=(image,),
        ),
        LabelFinding("pneumonia", "SCT", "233604007", "Pneumonia", 0.44, 0.5, False),
        LabelFinding("cardiomegaly", "SCT", "8186001", "Cardiomegaly", 0.57, 0.55, True),
        LabelFinding("pulmonary_edema", "SCT", "19242006", "Pulmonary edema", 0.12, 0.5, False),
    )
    result = StudyResult(
        study_uid="2.25.3",
        label_set="chest_xray",
        findings=findings,
        model=ModelIdentity("triagenode-demo", "0.1.0", "d" * 64, "demo", is_demo=True),
        backend="torch",
        aggregation="maximum image score per finding",
        images_used=(image,),
        priority=Priority.urgent,
        priority_rule="ed-chest (calling AE ED_CR1)",
        label_set_reason="domain rule 1: Modality CR, BodyPartExamined CHEST",
    )
    return result, [Thumbnail(image, phantom(), "Pleural effusion, Cardiomegaly")]


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/summary-card.png")
    result, thumbnails = demo_result()
    image = render_card(layout_card(result, thumbnails), thumbnails)
    image.save(out, optimize=True)
    print(f"wrote {out} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
