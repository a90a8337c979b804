"""Optional dependencies: imported where they are used, named with their pip extra if missing.

Receiving, storing, classifying with PyTorch and reporting need none of them. ONNX export,
ONNX Runtime, OpenVINO, TensorRT, PostgreSQL and Triton each come with an extra of the
``triagenode`` distribution (``pyproject.toml``). :func:`require` imports such a module and,
when it cannot, raises :class:`MissingDependency`, whose message ends with the command that
installs it::

    >>> onnx = require("onnx", "onnx", "ONNX export")  # doctest: +SKIP
    MissingDependency: ONNX export needs the 'onnx' package, which cannot be imported (No
    module named 'onnx'); install it with: pip install 'triagenode[onnx]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

from triagenode.errors import TriageNodeError

__all__ = ["MissingDependency", "install_hint", "require"]


class MissingDependency(TriageNodeError, ImportError):
    """An optional package cannot be imported; the message names the extra that installs it.

    Also an :class:`ImportError`, so code that already expects one keeps working.
    """


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'triagenode[EXTRA]'``."""
    return f"pip install 'triagenode[{extra}]'"


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` (dotted names allowed) or raise :class:`MissingDependency`.

    Parameters
    ----------
    module : str
        The module to import, e.g. ``"onnxruntime.quantization"``.
    extra : str
        The ``triagenode`` extra that installs it, e.g. ``"onnx"``.
    purpose : str
        What needs it, as the start of a sentence, e.g. ``"ONNX export"``.

    Raises
    ------
    MissingDependency
        When the import fails, for whatever reason the import gives.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise MissingDependency(
            f"{purpose} needs the {package!r} package, which cannot be imported ({exc}); "
            f"install it with: {install_hint(extra)}",
            name=package,
        ) from exc
