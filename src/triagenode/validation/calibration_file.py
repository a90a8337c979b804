"""The versioned site calibration file: written by ``calibrate``, loaded by the node.

JSON, one object::

    {"format": "triagenode-calibration", "version": 1, "name": ..., "created": ISO time,
     "label_set": ..., "model": {"name": ..., "weights_sha256": ...},
     "data_sha256": ..., "operating_rule": ..., "method": "platt" | "temperature",
     "findings": {finding: {"method", "slope", "intercept", "temperature", "threshold",
                            "rule", "n", "positives"}}}

The node (``model.calibration``) refuses a file made for other weights, and applies it to its
label set's labels: their calibration, their threshold, and ``threshold_calibrated = true``
(only a site-fitted threshold lets a critical finding raise the priority). The file's name
and the first characters of its SHA-256 become each calibration's ``name``, so every result,
SR and API response says which file decided.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from triagenode.config.labels import Calibration, LabelSettings
from triagenode.errors import ConfigError

__all__ = [
    "CALIBRATION_FORMAT",
    "CalibrationFile",
    "apply_calibration",
    "load_calibration",
    "write_calibration",
]

CALIBRATION_FORMAT = "triagenode-calibration"
CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class CalibrationFile:
    """A loaded calibration file and the SHA-256 of its bytes."""

    path: Path
    sha256: str
    data: dict[str, Any]

    @property
    def label_set(self) -> str:
        return str(self.data["label_set"])

    @property
    def weights_sha256(self) -> str:
        return str(self.data["model"]["weights_sha256"])

    @property
    def tag(self) -> str:
        """How results name it: file name and hash prefix."""
        name = str(self.data.get("name") or self.path.name)[:100]  # Calibration.name <= 128
        return f"{name} sha256:{self.sha256[:16]}"


def write_calibration(path: Path, data: dict[str, Any]) -> str:
    """Write ``data`` (format and version added) to ``path``; returns the file's SHA-256."""
    document = {
        "format": CALIBRATION_FORMAT,
        "version": CALIBRATION_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **data,
    }
    payload = (json.dumps(document, indent=2, sort_keys=False) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(payload)
    partial.replace(path)
    return hashlib.sha256(payload).hexdigest()


def load_calibration(path: Path) -> CalibrationFile:
    """Read and check a calibration file.

    Raises
    ------
    ConfigError
        Naming the file and what is wrong with it.
    """
    try:
        payload = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"model.calibration: {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise ConfigError(f"model.calibration: {path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise ConfigError(f"model.calibration: {path}: not a {CALIBRATION_FORMAT} file")
    if data.get("version") != CALIBRATION_VERSION:
        raise ConfigError(
            f"model.calibration: {path}: version {data.get('version')!r} "
            f"(this node reads version {CALIBRATION_VERSION})"
        )
    for key in ("label_set", "model", "findings"):
        if key not in data:
            raise ConfigError(f"model.calibration: {path}: missing {key!r}")
    return CalibrationFile(Path(path), hashlib.sha256(payload).hexdigest(), data)


def apply_calibration(
    labels: LabelSettings, calibration: CalibrationFile, weights_sha256: str
) -> LabelSettings:
    """``labels`` with the file's calibration and thresholds on its label set's labels.

    Raises
    ------
    ConfigError
        When the file was fitted for other model weights, names a label set or a finding
        this configuration does not have.
    """
    where = f"model.calibration: {calibration.path}"
    if calibration.weights_sha256 != weights_sha256:
        raise ConfigError(
            f"{where}: fitted for model weights sha256 {calibration.weights_sha256}, but the "
            f"loaded model's weights are sha256 {weights_sha256}; refit it for these weights"
        )
    name = calibration.label_set
    if name not in labels.sets:
        known = ", ".join(sorted(labels.sets))
        raise ConfigError(f"{where}: label set {name!r} is not configured (known: {known})")
    label_set = labels.sets[name]
    by_name = {label.name: label for label in label_set.labels}
    unknown = sorted(set(calibration.data["findings"]) - set(by_name))
    if unknown:
        raise ConfigError(f"{where}: findings not in label set {name!r}: {', '.join(unknown)}")
    new_labels = []
    for label in label_set.labels:
        fitted = calibration.data["findings"].get(label.name)
        if fitted is None:
            new_labels.append(label)
            continue
        method = fitted["method"]
        params: dict[str, Any] = {"method": method, "name": calibration.tag}
        if method == "platt":
            params.update(slope=float(fitted["slope"]), intercept=float(fitted["intercept"]))
        elif method == "isotonic":
            params.update(breakpoints=[(float(x), float(y)) for x, y in fitted["breakpoints"]])
        else:
            params.update(temperature=float(fitted["temperature"]))
        new_labels.append(
            label.model_copy(
                update={
                    "calibration": Calibration(**params),
                    "threshold": float(fitted["threshold"]),
                    "threshold_calibrated": True,
                }
            )
        )
    sets = {**labels.sets, name: label_set.model_copy(update={"labels": new_labels})}
    return labels.model_copy(update={"sets": sets})
