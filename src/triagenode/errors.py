"""The exception family of triagenode.

Every error the node raises on purpose derives from :class:`TriageNodeError`. Each message
names the input at fault and what would have been accepted.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DicomInputError",
    "ModelLoadError",
    "PreprocessError",
    "StorageError",
    "TriageNodeError",
]


class TriageNodeError(Exception):
    """Base class of every error triagenode raises on purpose."""


class ConfigError(TriageNodeError):
    """A setting is unknown, has the wrong type, or has an impossible value."""


class StorageError(TriageNodeError):
    """The spool or the database could not durably record something."""


class DicomInputError(TriageNodeError):
    """A received or supplied DICOM object is unusable (missing UIDs, wrong SOP, ...)."""


class ModelLoadError(TriageNodeError):
    """A model source could not be loaded (missing files, wrong architecture, ...)."""


class PreprocessError(TriageNodeError):
    """An image could not be turned into a model input; the message says why."""
