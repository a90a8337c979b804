"""Which images of a study to classify, and why the others are not.

:func:`choose_images` applies these rules, in this order, and records a reason in words for
every series (or image) it leaves out:

1. From the database rows alone: never SR, PR, KO, RT, waveforms, encapsulated documents,
   raw data, nor the node's own output (Manufacturer or SeriesDescription marker: a study
   must not feed its own report back in); never the *For Processing* SOP classes of DX, MG,
   IO and breast projection X-ray.
2. From one header per series (the middle instance; every instance of a projection
   series), read with :func:`~triagenode.inference.image_header.read_image_header`:
   localizers and scouts (ImageType value 3 LOCALIZER, or a description word such as SCOUT
   or TOPOGRAM), Presentation Intent Type FOR PROCESSING, the node's own output.
3. Dose reports and screen captures (Secondary Capture SOP classes, ImageType SCREEN SAVE
   or DOSE, or a secondary image whose description has the word DOSE: a "Low dose chest"
   scan is not a report) are skipped when other images exist; a study of nothing but
   captures (a digitised film, say) keeps them.
4. Derived or secondary series (ImageType DERIVED or SECONDARY) are skipped when an
   original series of the same modality exists (reformats, MIPs, ADC maps).
5. With a :class:`SeriesPreference` naming modalities, series of other modalities are
   skipped when a series of a preferred modality exists.
6. Cross-sectional series (CT, MR, PT, NM, and enhanced multi-frame volumes) compete: ONE
   is chosen per study, ranked by (a) original over derived, (b) how many of the
   preference's modality, body part and keyword tests it passes, (c) more slices or frames,
   (d) lower Series Number, (e) Series Instance UID. Up to ``slices_per_series`` evenly
   spaced slices (frames of a multi-frame object count as slices) of it are taken, and
   their headers read to drop any localizer or unreadable file among them.
7. Projection series (CR, DX, MG, US, XA, SC, ...) keep every for-presentation image;
   a multi-frame one contributes up to ``slices_per_series`` evenly spaced frames.
8. The total is capped at ``max_images``: the cross-sectional series first, then the
   projection series, most preferred first.

Everything is deterministic: the same rows and files give the same selection.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import UID

from triagenode.domain import ImageRef, SkippedSeries
from triagenode.inference.image_header import (
    CAPTURE_IMAGE_TYPES,
    DOSE_WORDS,
    ENHANCED_VOLUME_SOP_CLASSES,
    FOR_PROCESSING_SOP_CLASSES,
    LOCALIZER_WORDS,
    NON_IMAGE_MODALITIES,
    SECONDARY_CAPTURE_PREFIX,
    ImageHeader,
    is_image_sop_class,
    read_image_header,
    words,
)

__all__ = [
    "DEFAULT_MAX_IMAGES",
    "FOR_PROCESSING_SOP_CLASSES",
    "NODE_MANUFACTURER",
    "NODE_SERIES_MARKER",
    "VOLUME_MODALITIES",
    "InstanceRecord",
    "SelectedImage",
    "Selection",
    "SeriesPreference",
    "SkippedSeries",
    "choose_images",
    "evenly_spaced",
    "is_image_sop_class",
    "select_images",
]

log = logging.getLogger(__name__)

NODE_MANUFACTURER = "triagenode"  # Manufacturer the SR writer puts into the node's own SRs
NODE_SERIES_MARKER = "TRIAGENODE"  # SeriesDescription prefix of the node's own output
VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})
DEFAULT_MAX_IMAGES = 32  # per study, for callers that do not say


@dataclass(frozen=True)
class InstanceRecord:
    """What selection needs to know about one stored instance (built from DB rows)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    modality: str | None
    instance_number: int | None
    number_of_frames: int
    path: Path
    manufacturer: str | None = None
    series_description: str | None = None


@dataclass(frozen=True)
class SeriesPreference:
    """What a label set is about, to choose its diagnostic series.

    Attributes
    ----------
    modalities
        Modalities the label set reads (e.g. ``("CR", "DX")``); series of other modalities
        are left out when one of these exists.
    body_parts
        Body Part Examined values (e.g. ``("CHEST",)``), compared whole, case-insensitive.
    keywords
        Words or phrases (e.g. ``("LUNG", "CTPA")``) looked for, case-insensitive and as
        whole words, in Series Description, Protocol Name and Body Part Examined.
    """

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class SelectedImage:
    """One image to classify: its reference (frame set for multi-frame) and its file."""

    ref: ImageRef
    path: Path


@dataclass(frozen=True)
class Selection:
    """The images chosen for a study, the series they come from, and what was left out."""

    images: tuple[SelectedImage, ...]
    series_used: tuple[str, ...]
    skipped: tuple[SkippedSeries, ...]


def _is_own_output(record: InstanceRecord) -> bool:
    manufacturer = (record.manufacturer or "").strip().lower()
    description = (record.series_description or "").strip().upper()
    return manufacturer == NODE_MANUFACTURER or description.startswith(NODE_SERIES_MARKER)


def evenly_spaced(count: int, k: int) -> list[int]:
    """``min(k, count)`` indices in ``range(count)`` spread evenly, centre of each stratum.

    >>> evenly_spaced(10, 3)
    [1, 5, 8]
    """
    if count <= 0 or k <= 0:
        return []
    if count <= k:
        return list(range(count))
    # the centre of each of k equal strata: avoids always picking the first/last slice,
    # which are the likeliest to be outside the organ of interest
    return [int((i + 0.5) * count / k) for i in range(k)]


Unit = tuple[InstanceRecord, int | None]  # an instance, and its 1-based frame when multi-frame


@dataclass
class _Series:
    """One series under consideration (internal, mutable while the rules run)."""

    uid: str
    records: list[InstanceRecord]
    modality: str
    header: ImageHeader
    cross_sectional: bool
    units: list[Unit]
    dropped: Counter[str] = field(default_factory=Counter)  # per-image reason -> count

    def score(self, prefer: SeriesPreference) -> int:
        text = self.header.text
        return (
            int(self.modality in {m.strip().upper() for m in prefer.modalities})
            + int(self.header.body_part in {b.strip().upper() for b in prefer.body_parts})
            + int(any(words(k).strip() and words(k) in text for k in prefer.keywords))
        )


def _modality(record: InstanceRecord) -> str:
    return (record.modality or "").strip().upper()


def _sop_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else f"SOP class {uid}"


def _row_reason(records: list[InstanceRecord]) -> str | None:
    """A reason to skip the series from its database rows alone, or None."""
    first = records[0]
    if _modality(first) in NON_IMAGE_MODALITIES or not is_image_sop_class(first.sop_class_uid):
        return f"not an image ({_sop_name(first.sop_class_uid)})"
    if any(_is_own_output(r) for r in records):
        return "the node's own output"
    if all(r.sop_class_uid in FOR_PROCESSING_SOP_CLASSES for r in records):
        return f"{_modality(first) or 'X-ray'} FOR PROCESSING"
    return None


def _image_reason(header: ImageHeader) -> str | None:
    """A reason to skip one image from its own header, or None."""
    if header.image_type[2:3] == ("LOCALIZER",):
        return "localizer (ImageType LOCALIZER)"
    if header.presentation_intent == "FOR PROCESSING":
        return "FOR PROCESSING (Presentation Intent Type)"
    return None


def _series_reason(series: _Series) -> str | None:
    """A reason to skip the whole series from its representative header, or None."""
    header = series.header
    reason = _image_reason(header)
    if reason is not None:
        return reason
    text = header.text
    for word in LOCALIZER_WORDS:
        if f" {word} " in text:
            return f"localizer (description word {word})"
    if header.manufacturer.lower() == NODE_MANUFACTURER or header.series_description.startswith(
        NODE_SERIES_MARKER
    ):
        return "the node's own output"
    return None


def _capture_reason(series: _Series) -> str | None:
    """Why the series looks like a dose report or a screen capture, or None."""
    header = series.header
    capture_class = series.records[0].sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX)
    # a description's DOSE counts only for a secondary image: "Low dose chest" is a scan
    described = (capture_class or header.derived) and any(
        f" {word} " in header.text for word in DOSE_WORDS
    )
    if described or any("DOSE" in value for value in header.image_type):
        return "dose report screen capture"
    for value in CAPTURE_IMAGE_TYPES:
        if value in header.image_type:
            return f"screen capture (ImageType {value})"
    if capture_class:
        return f"screen capture ({_sop_name(series.records[0].sop_class_uid)})"
    return None


def _units(records: list[InstanceRecord]) -> list[Unit]:
    units: list[Unit] = []
    for record in records:
        if record.number_of_frames > 1:
            units.extend((record, frame) for frame in range(1, record.number_of_frames + 1))
        else:
            units.append((record, None))
    return units


def _unreadable(exc: BaseException) -> str:
    return f"header unreadable ({type(exc).__name__})"


def _read_series(uid: str, records: list[InstanceRecord]) -> _Series | SkippedSeries:
    """Read the series' headers: one representative for a volume, every instance otherwise.

    Projection images whose own header is unreadable or disqualifying are dropped here
    (counted in ``dropped``); a volume's chosen slices are checked after it is chosen.
    """
    first = records[0]
    modality = _modality(first)
    cross_sectional = modality in VOLUME_MODALITIES or any(
        r.sop_class_uid in ENHANCED_VOLUME_SOP_CLASSES for r in records
    )
    dropped: Counter[str] = Counter()
    header: ImageHeader | None = None
    kept = records
    if cross_sectional:
        middle = len(records) // 2
        failure: BaseException | None = None
        for index in dict.fromkeys((middle, 0, len(records) - 1)):
            try:
                header = read_image_header(records[index].path)
                break
            except Exception as exc:  # any unreadable file: skip it with its reason
                failure = failure or exc
        if header is None:
            assert failure is not None
            return SkippedSeries(uid, len(records), _unreadable(failure))
    else:
        readable: list[tuple[InstanceRecord, ImageHeader]] = []
        for record in records:
            try:
                readable.append((record, read_image_header(record.path)))
            except Exception as exc:
                dropped[_unreadable(exc)] += 1
        if not readable:
            return SkippedSeries(uid, len(records), next(iter(dropped)))
        good = [(r, h) for r, h in readable if _image_reason(h) is None]
        if good:
            # the first usable header speaks for the series; other images fail on their own
            header, kept = good[0][1], [r for r, _ in good]
            for _, own in readable:
                reason = _image_reason(own)
                if reason is not None:
                    dropped[reason] += 1
        else:  # every image disqualified: the series reason says why
            header, kept = readable[0][1], [r for r, _ in readable]
    return _Series(uid, kept, modality, header, cross_sectional, _units(kept), dropped)


def _check_chosen(series: _Series, units: list[Unit]) -> list[Unit]:
    """Read the headers of a volume's chosen slices; drop localizers and unreadable files."""
    verdicts: dict[str, str | None] = {}
    out: list[Unit] = []
    for record, frame in units:
        uid = record.sop_instance_uid
        if uid not in verdicts:
            try:
                verdicts[uid] = _image_reason(read_image_header(record.path))
            except Exception as exc:
                verdicts[uid] = _unreadable(exc)
            if verdicts[uid] is not None:
                series.dropped[verdicts[uid]] += 1  # type: ignore[index]
        if verdicts[uid] is None:
            out.append((record, frame))
    return out


def _rank(series: _Series, prefer: SeriesPreference) -> tuple[int, int, int, float, str]:
    number = series.header.series_number
    return (
        int(series.header.derived),
        -series.score(prefer),
        -len(series.units),
        float(number) if number is not None else float("inf"),
        series.uid,
    )


def choose_images(
    instances: list[InstanceRecord],
    *,
    slices_per_series: int,
    max_images: int,
    prefer: SeriesPreference | None = None,
) -> Selection:
    """The images of a study to classify, by the rules in this module's docstring.

    Parameters
    ----------
    instances
        All stored instances of the study (from the database rows); headers are read from
        their files.
    slices_per_series
        At most this many slices (or frames) of the chosen volume, and frames of each
        multi-frame projection object.
    max_images
        At most this many images for the whole study.
    prefer
        What the label set is about; None ranks volumes by slices alone.

    Returns
    -------
    Selection
        The images (the chosen volume first, then projection series, each in instance and
        frame order), the series they come from, and every skipped series with its reason.

    Raises
    ------
    ValueError
        When ``slices_per_series`` or ``max_images`` is below 1.
    """
    if slices_per_series < 1 or max_images < 1:
        raise ValueError(
            f"slices_per_series ({slices_per_series}) and max_images ({max_images}) must be >= 1"
        )
    prefer = prefer or SeriesPreference()
    by_series: dict[str, list[InstanceRecord]] = defaultdict(list)
    for record in instances:
        by_series[record.series_uid].append(record)
    skipped: list[SkippedSeries] = []
    candidates: list[_Series] = []
    for uid in sorted(by_series):
        records = sorted(
            by_series[uid],
            key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop_instance_uid),
        )
        reason = _row_reason(records)
        if reason is None:
            processing = [r for r in records if r.sop_class_uid in FOR_PROCESSING_SOP_CLASSES]
            if processing:
                what = f"{_modality(processing[0]) or 'X-ray'} FOR PROCESSING"
                skipped.append(SkippedSeries(uid, len(processing), what))
                records = [r for r in records if r not in processing]
            read = _read_series(uid, records)
            if isinstance(read, SkippedSeries):
                skipped.append(read)
                continue
            reason = _series_reason(read)
            if reason is None:
                candidates.append(read)
                continue
        skipped.append(SkippedSeries(uid, len(records), reason))

    def drop(series: _Series, why: str) -> None:
        skipped.append(SkippedSeries(series.uid, len(series.records), why))

    captures = {s.uid: r for s in candidates if (r := _capture_reason(s)) is not None}
    if len(captures) < len(candidates):
        for series in [s for s in candidates if s.uid in captures]:
            drop(series, captures[series.uid])
        candidates = [s for s in candidates if s.uid not in captures]

    originals = {s.modality for s in candidates if not s.header.derived}
    for series in [s for s in candidates if s.header.derived and s.modality in originals]:
        drop(series, "derived reformat; an original series exists")
    candidates = [s for s in candidates if not (s.header.derived and s.modality in originals)]

    wanted = tuple(m.strip().upper() for m in prefer.modalities)
    if any(s.modality in wanted for s in candidates):
        for series in [s for s in candidates if s.modality not in wanted]:
            drop(series, f"modality {series.modality or 'unknown'} is not the label set's")
        candidates = [s for s in candidates if s.modality in wanted]

    volumes = sorted((s for s in candidates if s.cross_sectional), key=lambda s: _rank(s, prefer))
    for series in volumes[1:]:
        drop(series, "not the preferred diagnostic series")
    projections = sorted(
        (s for s in candidates if not s.cross_sectional), key=lambda s: _rank(s, prefer)[1:]
    )
    chosen: list[tuple[_Series, list[Unit]]] = []
    if volumes:
        volume = volumes[0]
        picks = evenly_spaced(len(volume.units), min(slices_per_series, max_images))
        chosen.append((volume, _check_chosen(volume, [volume.units[i] for i in picks])))
    for series in projections:
        units: list[Unit] = []
        for record in series.records:
            if record.number_of_frames > 1:
                spread = evenly_spaced(record.number_of_frames, slices_per_series)
                units.extend((record, index + 1) for index in spread)
            else:
                units.append((record, None))
        chosen.append((series, units))

    images: list[SelectedImage] = []
    used: list[str] = []
    for series, units in chosen:
        room = max_images - len(images)
        if len(units) > room:
            series.dropped[f"over the per-study image cap ({max_images})"] += len(units) - room
            units = units[:room]
        images.extend(SelectedImage(_ref(record, frame), record.path) for record, frame in units)
        if units:
            used.append(series.uid)
        skipped.extend(SkippedSeries(series.uid, n, why) for why, n in series.dropped.items())
    log.debug("selected %d images from %d series, skipped %d", len(images), len(used), len(skipped))
    return Selection(tuple(images), tuple(used), tuple(skipped))


def select_images(
    instances: list[InstanceRecord],
    slices_per_series: int,
    max_images: int = DEFAULT_MAX_IMAGES,
    prefer: SeriesPreference | None = None,
) -> list[SelectedImage]:
    """The images of :func:`choose_images`, as a list (the earlier interface)."""
    selection = choose_images(
        instances, slices_per_series=slices_per_series, max_images=max_images, prefer=prefer
    )
    return list(selection.images)


def _ref(record: InstanceRecord, frame: int | None) -> ImageRef:
    return ImageRef(
        sop_class_uid=record.sop_class_uid,
        sop_instance_uid=record.sop_instance_uid,
        series_uid=record.series_uid,
        frame=frame,
    )
