"""triagenode: a DICOM AI node that triages and classifies studies beside a PACS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("triagenode")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
