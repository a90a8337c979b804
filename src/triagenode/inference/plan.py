"""The steps before classification that ``serve`` and ``evaluate`` share.

A study is given a label set (forced, or by the domain rules on its triage inputs) and its
images are chosen for that set. The worker calls :func:`plan_study` on database rows and
``triagenode evaluate`` on headers read from a folder, so both see the same images and the
same label set for the same study.
"""

from __future__ import annotations

from dataclasses import dataclass

from triagenode.config.labels import LabelSettings
from triagenode.inference.select import InstanceRecord, Selection, SeriesPreference, choose_images

__all__ = ["StudyPlan", "plan_study", "series_preference"]


@dataclass(frozen=True)
class StudyPlan:
    """The label set of a study (None: no domain rule fits), why, and the chosen images."""

    label_set: str | None
    reason: str
    selection: Selection


def series_preference(labels: LabelSettings, label_set: str | None) -> SeriesPreference | None:
    """What the label set's diagnostic series looks like, for image selection."""
    if label_set is None or label_set not in labels.sets:
        return None
    rules = [r for r in labels.domains if r.label_set == label_set]
    return SeriesPreference(
        modalities=tuple(m for r in rules for m in r.modalities),
        body_parts=tuple(b for r in rules for b in r.body_parts),
        keywords=tuple(labels.sets[label_set].series_keywords),
    )


def plan_study(
    labels: LabelSettings,
    records: list[InstanceRecord],
    triage_inputs: dict[str, str],
    *,
    slices_per_series: int,
    max_images: int,
    label_set: str | None = None,
    label_set_reason: str = "",
) -> StudyPlan:
    """Choose a study's label set and images as the node does.

    Parameters
    ----------
    labels
        The ``[labels]`` settings.
    records
        Every instance of the study.
    triage_inputs
        The study's triage attributes (modality, body part, descriptions).
    slices_per_series, max_images
        The ``model`` settings of the same names.
    label_set, label_set_reason
        A label set forced by a triage rule (or ``--label-set``) and why; None lets the
        domain rules choose.
    """
    if label_set is not None:
        reason = label_set_reason or f"label set {label_set!r} given"
    else:
        choice = labels.explain_choice(triage_inputs)
        label_set, reason = choice.label_set, choice.reason
    selection = choose_images(
        records,
        slices_per_series=slices_per_series,
        max_images=max_images,
        prefer=series_preference(labels, label_set),
    )
    return StudyPlan(label_set, reason, selection)
