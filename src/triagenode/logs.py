"""Logging set-up: one line per event, control characters escaped, never PHI.

Lines are ``time level logger: message``. Library code passes only UIDs, AE titles, counts
and sizes, but many of those come from peers: a calling AE title with ``\\x1b[31m`` or a URL
path with ``%0a`` must not forge or colour a line. Two pieces keep every record safe:

- :class:`PhiGuard`, a filter on the node's handler, masks what other libraries copy into
  their messages from DICOM data (pydicom's validation warnings quote element values, which
  can be patient names) and values passed in ``extra`` under PHI-looking names;
- :class:`SafeFormatter` writes every record on one line: control characters in the message
  become visible ``\\xNN`` escapes, and the lines of a traceback are indented, so nothing a
  peer sends can start a line of its own.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import TextIO

from triagenode.audit.encoding import escape_controls

__all__ = ["PhiGuard", "SafeFormatter", "build_handler", "configure_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers whose messages may quote DICOM element values.
_DICOM_LOGGERS = ("pydicom", "pynetdicom")
# A quoted value as repr() or an f-string with quotes writes it.
_QUOTED = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")
_PHI_NAMES = re.compile(r"patient|birth|accession|(^|_)name$|(^|_)pid$", re.IGNORECASE)
MASK = "<withheld>"


def _mask_quoted(text: str) -> str:
    return _QUOTED.sub(f"'{MASK}'", text)


class PhiGuard(logging.Filter):
    """Masks PHI that other code may put into a record (never drops a record).

    - Records of pydicom and pynetdicom, and Python warnings raised from them (routed into
      logging by :func:`configure_logging`), have every quoted value replaced by
      ``'<withheld>'``: "Invalid value for VR PN: 'Doe^John'" keeps its shape, not the name.
    - Attributes given in ``extra`` whose names look like PHI (patient..., ...birth...,
      accession..., ..._name) are replaced by ``<withheld>``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if self._from_dicom_library(record):
            record.msg = _mask_quoted(record.getMessage())
            record.args = None
        for name in list(vars(record)):
            if name not in _STANDARD_ATTRIBUTES and _PHI_NAMES.search(name):
                setattr(record, name, MASK)
        return True

    @staticmethod
    def _from_dicom_library(record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in _DICOM_LOGGERS:
            return True
        if record.name == "py.warnings":
            return any(f"{lib}/" in record.getMessage() for lib in _DICOM_LOGGERS)
        return False


_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class SafeFormatter(logging.Formatter):
    """One record, one line: control characters in the message are escaped; the lines of
    a traceback or stack are indented (and their control characters escaped too)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.splitlines())


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler writing to whatever ``sys.stderr`` is when a record comes, not the
    one there when it was made (a test runner or a daemoniser may have replaced and closed
    that one while threads still log)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def build_handler(stream: TextIO | None = None) -> logging.Handler:
    """The node's log handler: :class:`SafeFormatter` and :class:`PhiGuard` on ``stream``
    (default: the current stderr)."""
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(SafeFormatter(_FORMAT))
    handler.addFilter(PhiGuard())
    return handler


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_triagenode", False) for h in root.handlers):
        handler = build_handler()
        handler._triagenode = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU and the datasets' contents at DEBUG/INFO, which can include
    # patient names: keep it at WARNING whatever the node's level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # pydicom sends each validation warning to its logger *and* to warnings.warn, which
    # would print the raw text on stderr past every filter: route warnings into logging,
    # where PhiGuard masks them, and show pydicom's only once (its logger already has it).
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
