"""Logging set-up: one structured line per event, never PHI.

Lines are ``time level logger: message key=value ...``. Library code passes only UIDs, AE
titles, counts and sizes; :class:`PhiGuard` is a last line of defence that masks any value
logged under a PHI-looking key in ``extra``.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_triagenode", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._triagenode = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU and the datasets' contents at DEBUG/INFO, which can include
    # patient names: keep it at WARNING whatever the node's level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
