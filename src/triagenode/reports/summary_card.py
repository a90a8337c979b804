"""The summary card: one readable picture of a study's result, for every viewer.

What it shows, top to bottom: "AI triage, not a diagnosis" (and "DEMO, NOT FOR CLINICAL
USE" for the demo model) in large type; the priority and why; each finding with its score
as a bar against its threshold; thumbnails of the images that drove the result, windowed as
the model saw them; the model, its version, weights, backend, label set, aggregation and
calibration.

Drawing is in two steps so that both the Secondary Capture and the PDF show the same thing
and tests can check where things are without OCR: :func:`layout_card` turns a result into a
:class:`CardLayout` (text runs, rectangles, bars and thumbnail boxes in pixels), and
:func:`render_card` paints a layout with Pillow and a TrueType font (DejaVu Sans when the
system has it, else Pillow's own scalable font). The PDF writer paints the same layout.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from triagenode import __version__
from triagenode.domain import DEMO_WARNING, ImageRef, Priority, StudyResult

__all__ = [
    "DISCLAIMER",
    "Bar",
    "CardLayout",
    "TextRun",
    "Thumbnail",
    "ThumbnailBox",
    "card_font",
    "font_file",
    "layout_card",
    "render_card",
]

DISCLAIMER = "AI triage, not a diagnosis"
WIDTH = 1024
MARGIN = 32
THUMB = 224
Colour = tuple[int, int, int]
WHITE: Colour = (255, 255, 255)
INK: Colour = (20, 20, 20)
MUTED: Colour = (85, 85, 85)
TRACK: Colour = (222, 222, 222)
# Bars: a critical finding at or above threshold, any other finding at or above threshold,
# a finding below it. Red/orange/blue stay apart for the common colour-vision deficiencies
# by lightness as well as hue.
CRITICAL_COLOUR: Colour = (196, 24, 24)
PRESENT_COLOUR: Colour = (232, 125, 0)
ABSENT_COLOUR: Colour = (45, 105, 170)
BANNER_COLOUR: Colour = (25, 45, 85)
DEMO_BANNER_COLOUR: Colour = (150, 0, 0)
PRIORITY_COLOURS: dict[Priority, Colour] = {
    Priority.stat: CRITICAL_COLOUR,
    Priority.urgent: PRESENT_COLOUR,
    Priority.routine: INK,
    Priority.low: MUTED,
}
_FONT_FOLDERS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))


@dataclass(frozen=True)
class Thumbnail:
    """One image that drove the result, as the model saw it.

    ``pixels`` are display values in [0, 1], ``(H, W)`` grey or ``(H, W, 3)`` colour, after
    the same modality LUT, window and inversion as the model's input.
    """

    ref: ImageRef
    pixels: np.ndarray
    caption: str = ""


@dataclass(frozen=True)
class TextRun:
    """One line of text; ``(x, y)`` is its top-left corner (the font's ascender line)."""

    x: int
    y: int
    text: str
    size: int
    bold: bool = False
    colour: Colour = INK


@dataclass(frozen=True)
class Rect:
    """A filled rectangle ``[x0, x1) x [y0, y1)``."""

    x0: int
    y0: int
    x1: int
    y1: int
    fill: Colour


@dataclass(frozen=True)
class Bar:
    """One finding's score bar: the track spans ``[x0, x1)``, filled up to ``fill_x``;
    the threshold is a mark at ``threshold_x``."""

    finding: str
    x0: int
    y0: int
    x1: int
    y1: int
    fill_x: int
    threshold_x: int
    colour: Colour

    @property
    def filled_centre(self) -> tuple[int, int] | None:
        """A point inside the filled part, away from the threshold mark (None if empty)."""
        if self.fill_x - self.x0 < 4:
            return None
        x = (self.x0 + self.fill_x) // 2
        if abs(x - self.threshold_x) < 6:
            x = self.x0 + 2 if self.threshold_x - self.x0 > 8 else self.fill_x - 3
        return x, (self.y0 + self.y1) // 2


@dataclass(frozen=True)
class ThumbnailBox:
    """Where thumbnail ``index`` of the card's thumbnails goes (a square)."""

    index: int
    x0: int
    y0: int
    size: int


@dataclass
class CardLayout:
    """Everything on the card, in pixels; painted by :func:`render_card` and the PDF."""

    width: int
    height: int
    rects: list[Rect] = field(default_factory=list)
    texts: list[TextRun] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    thumbnails: list[ThumbnailBox] = field(default_factory=list)
    pictures: list[Image.Image] | None = field(default=None, repr=False, compare=False)

    def bar(self, finding: str) -> Bar:
        """The bar of the finding named ``finding`` (its label name)."""
        for bar in self.bars:
            if bar.finding == finding:
                return bar
        raise KeyError(finding)

    @property
    def text(self) -> str:
        """All the card's words, line by line (what a reader sees)."""
        return "\n".join(run.text for run in self.texts)


def font_file(bold: bool = False) -> Path | None:
    """DejaVu Sans (Debian ``fonts-dejavu-core``) when installed, else None."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in _FONT_FOLDERS:
        if (folder / name).is_file():
            return folder / name
    return None


@functools.lru_cache(maxsize=64)
def card_font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The card's font at ``size`` pixels: DejaVu Sans, else Pillow's scalable default."""
    path = font_file(bold)
    if path is not None:
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _width(text: str, size: int, bold: bool = False) -> float:
    return float(card_font(size, bold).getlength(text))


def _wrap(text: str, size: int, width: int, bold: bool = False) -> list[str]:
    """``text`` broken into lines no wider than ``width`` (a too-long word is cut)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if _width(candidate, size, bold) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while _width(word, size, bold) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and _width(word[:cut], size, bold) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines or [""]


class _Cursor:
    """Adds text top to bottom, tracking the next free line."""

    def __init__(self, layout: CardLayout, y: int) -> None:
        self.layout = layout
        self.y = y

    def paragraph(
        self,
        text: str,
        size: int,
        *,
        bold: bool = False,
        colour: Colour = INK,
        x: int = MARGIN,
        width: int = WIDTH - 2 * MARGIN,
        gap: int = 6,
    ) -> None:
        for line in _wrap(text, size, width, bold):
            self.layout.texts.append(TextRun(x, self.y, line, size, bold, colour))
            self.y += round(size * 1.25)
        self.y += gap


def _why(result: StudyResult) -> list[str]:
    rule = f"rule {result.priority_rule}" if result.priority_rule else "no triage rule matched"
    lines = [f"Why: {rule}."]
    flagged = [f for f in result.findings if f.critical and not f.escalates]
    if flagged:
        names = ", ".join(f.code_meaning for f in flagged)
        lines.append(
            f"Critical finding flagged ({names}) but not escalated: "
            "its threshold is not site-calibrated."
        )
    reason = f" ({result.label_set_reason})" if result.label_set_reason else ""
    lines.append(f"Label set {result.label_set}{reason}.")
    return lines


def _bar_colour(critical: bool, present: bool) -> Colour:
    if present and critical:
        return CRITICAL_COLOUR
    return PRESENT_COLOUR if present else ABSENT_COLOUR


def layout_card(result: StudyResult, thumbnails: Sequence[Thumbnail] = ()) -> CardLayout:
    """Where everything of ``result``'s card goes; ``thumbnails`` get a box each (≤ 4)."""
    layout = CardLayout(width=WIDTH, height=0)
    calibrated = all(f.calibrated for f in result.findings)

    # Banner: the disclaimer (and the demo warning) in large type.
    banner_lines = [(DEMO_WARNING, 44), (DISCLAIMER, 30)] if result.model.is_demo else []
    if not banner_lines:
        banner_lines = [(DISCLAIMER, 48)]
    y = 20
    for text, size in banner_lines:
        layout.texts.append(TextRun(MARGIN, y, text, size, True, WHITE))
        y += round(size * 1.3)
    banner = DEMO_BANNER_COLOUR if result.model.is_demo else BANNER_COLOUR
    layout.rects.append(Rect(0, 0, WIDTH, y + 12, banner))
    cursor = _Cursor(layout, y + 32)

    # Priority and why.
    colour = PRIORITY_COLOURS.get(result.priority, INK)
    cursor.paragraph(f"Priority: {result.priority.name.upper()}", 36, bold=True, colour=colour)
    for line in _why(result):
        cursor.paragraph(line, 20, gap=2)
    present = sorted((f for f in result.findings if f.present), key=lambda f: -f.score)
    if present:
        flags = ", ".join(
            f"{f.code_meaning}{' (CRITICAL)' if f.critical else ''} {f.score:.2f}" for f in present
        )
        cursor.paragraph(f"AI flags: {flags}", 24, bold=True)
    else:
        cursor.paragraph("AI flags nothing above threshold", 24, bold=True)
    cursor.y += 10

    # Findings: a bar each, the threshold marked.
    heading = (
        "Findings: site-calibrated probability vs threshold"
        if calibrated
        else "Findings: score vs threshold (scores are not probabilities)"
    )
    cursor.paragraph(heading, 20, bold=True, colour=MUTED)
    name_w, value_w = 330, 280
    track_x0 = MARGIN + name_w
    track_x1 = WIDTH - MARGIN - value_w
    for finding in result.findings:
        row_y = cursor.y
        name = finding.code_meaning + (" (critical)" if finding.critical else "")
        for i, line in enumerate(_wrap(name, 22, name_w - 12)[:2]):
            layout.texts.append(TextRun(MARGIN, row_y + i * 26, line, 22))
        score = min(max(float(finding.score), 0.0), 1.0)
        threshold = min(max(float(finding.threshold), 0.0), 1.0)
        span = track_x1 - track_x0
        layout.bars.append(
            Bar(
                finding=finding.name,
                x0=track_x0,
                y0=row_y + 2,
                x1=track_x1,
                y1=row_y + 28,
                fill_x=track_x0 + round(score * span),
                threshold_x=track_x0 + round(threshold * span),
                colour=_bar_colour(finding.critical, finding.present),
            )
        )
        state = "PRESENT" if finding.present else "absent"
        sign = "≥" if finding.present else "<"
        layout.texts.append(
            TextRun(
                track_x1 + 16,
                row_y + 2,
                f"{finding.score:.2f} {sign} {finding.threshold:.2f} {state}",
                20,
                bold=finding.present,
                colour=_bar_colour(finding.critical, finding.present) if finding.present else INK,
            )
        )
        cursor.y = row_y + 52
    cursor.y += 8

    # Thumbnails of the images that drove the result.
    shown = list(thumbnails)[:4]
    if shown:
        cursor.paragraph(
            f"Images that drove the result ({len(shown)}), as the model saw them",
            20,
            bold=True,
            colour=MUTED,
        )
        gap = (WIDTH - 2 * MARGIN - 4 * THUMB) // 3
        top = cursor.y
        for index, thumb in enumerate(shown):
            x = MARGIN + index * (THUMB + gap)
            layout.thumbnails.append(ThumbnailBox(index, x, top, THUMB))
            for j, line in enumerate(_wrap(thumb.caption, 16, THUMB)[:2]):
                layout.texts.append(TextRun(x, top + THUMB + 6 + j * 20, line, 16, colour=MUTED))
        cursor.y = top + THUMB + 66

    # Provenance.
    model = result.model
    cursor.paragraph(
        f"Model {model.display_name}, version {model.version or 'unknown'}, "
        f"weights sha256 {model.weights_sha256[:12]}, backend {result.backend}.",
        16,
        colour=MUTED,
        gap=0,
    )
    cursor.paragraph(
        f"Calibration: {result.calibration}. Aggregation: {result.aggregation}. "
        f"Each finding decided on its own. triagenode {__version__}.",
        16,
        colour=MUTED,
        gap=0,
    )
    layout.height = cursor.y + MARGIN - 8
    return layout


def _thumbnail_image(thumb: Thumbnail, size: int) -> Image.Image:
    """The display pixels as an 8-bit RGB square of ``size``, aspect kept, black borders."""
    pixels = np.asarray(thumb.pixels, dtype=np.float32)
    if pixels.ndim == 3:
        pixels = pixels[..., :3]
    data = np.multiply(np.nan_to_num(pixels, nan=0.0), np.float32(255), dtype=np.float32)
    np.clip(data, 0.0, 255.0, out=data)
    data += np.float32(0.5)
    image = Image.fromarray(data.astype(np.uint8))
    scale = size / max(image.width, image.height)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # resized in its own mode (grey stays one plane), whole-factor reduction first
    image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=1.5).convert("RGB")
    square = Image.new("RGB", (size, size), (0, 0, 0))
    square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return square


def thumbnail_images(layout: CardLayout, thumbnails: Sequence[Thumbnail]) -> list[Image.Image]:
    """Each thumbnail box's picture, in box order (made once per layout: the SC and the PDF
    of one card share them)."""
    if layout.pictures is None:
        layout.pictures = [
            _thumbnail_image(thumbnails[box.index], box.size) for box in layout.thumbnails
        ]
    return layout.pictures


def render_card(layout: CardLayout, thumbnails: Sequence[Thumbnail] = ()) -> Image.Image:
    """Paint ``layout`` (from :func:`layout_card`) as an RGB image."""
    image = Image.new("RGB", (layout.width, layout.height), WHITE)
    draw = ImageDraw.Draw(image)
    for rect in layout.rects:
        draw.rectangle((rect.x0, rect.y0, rect.x1 - 1, rect.y1 - 1), fill=rect.fill)
    for bar in layout.bars:
        draw.rectangle((bar.x0, bar.y0, bar.x1 - 1, bar.y1 - 1), fill=TRACK)
        if bar.fill_x > bar.x0:
            draw.rectangle((bar.x0, bar.y0, bar.fill_x - 1, bar.y1 - 1), fill=bar.colour)
        draw.rectangle((bar.threshold_x - 1, bar.y0 - 5, bar.threshold_x + 1, bar.y1 + 4), fill=INK)
    for box, picture in zip(layout.thumbnails, thumbnail_images(layout, thumbnails), strict=True):
        image.paste(picture, (box.x0, box.y0))
    for run in layout.texts:
        draw.text(
            (run.x, run.y),
            run.text,
            fill=run.colour,
            font=card_font(run.size, run.bold),
            anchor="la",
        )
    return image
