"""Strings from outside, made safe for each place the audit trail writes them.

AE titles, UIDs, URL paths, user names and dataset values reach audit rows as peers sent
them. They are stored as received (only what a database cannot hold at all is changed, see
:func:`storable`) and escaped where they are written:

- :func:`xml_safe` for ATNA XML: XML 1.0 cannot carry most control characters even as
  character references, so they become visible ``\\xNN`` escapes;
- :func:`sd_param_value` for RFC 5424 structured data, and :func:`printusascii` for the
  header fields of a syslog message;
- :func:`escape_controls` for log lines (used by :mod:`triagenode.logs`).

Every function is total: any ``str`` (lone surrogates included) gives a result, never an
exception, so one hostile value cannot stop an export or the forwarder.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "escape_controls",
    "printusascii",
    "sd_param_value",
    "storable",
    "storable_details",
    "xml_safe",
]

# XML 1.0 section 2.2: Char ::= #x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] |
# [#x10000-#x10FFFF]. Everything else (C0 controls, lone surrogates, U+FFFE/U+FFFF) is
# refused by conforming parsers, so it cannot be written at all, not even as &#1;.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# Controls that are legal XML but change how a value reads (a collector that shows text
# one line per message, a terminal that obeys escape sequences): C0 incl. tab/newline, DEL,
# C1, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Lone surrogates (from invalid UTF-8 decoded with surrogateescape) and NUL are the only
# characters that SQLite's and PostgreSQL's text columns cannot hold.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character, DEL, C1 control, line/paragraph separator and
    lone surrogate written as a visible ``\\xNN`` / ``\\uNNNN`` escape: one line, always."""
    return _CONTROLS.sub(_escape, text)


def xml_safe(value: Any) -> str:
    """``value`` as text that XML 1.0 accepts in an attribute or element, one line long.

    Characters XML cannot carry and line-breaking controls become ``\\xNN`` escapes, so a
    reader sees that something odd was sent and what it was.
    """
    text = value if isinstance(value, str) else str(value)
    return _NOT_XML_CHAR.sub(_escape, escape_controls(text))


def sd_param_value(value: Any) -> str:
    """A PARAM-VALUE of RFC 5424 structured data (section 6.3.3): ``"``, ``\\`` and ``]``
    escaped with a backslash, controls written as visible escapes (the value stays on one
    line and valid UTF-8)."""
    text = value if isinstance(value, str) else str(value)
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return escape_controls(text)


def printusascii(value: str | None, limit: int) -> str:
    """A syslog header field (HOSTNAME, APP-NAME, PROCID, MSGID): 1 to ``limit`` printable
    US-ASCII characters other than space (RFC 5424 section 6), else the NILVALUE ``-``."""
    if not value:
        return "-"
    text = "".join(c if "\x21" <= c <= "\x7e" else "?" for c in value)[:limit]
    return text or "-"


def storable(value: str | None, limit: int | None = None) -> str | None:
    """``value`` as the database can hold it: NUL and lone surrogates (invalid UTF-8 bytes)
    become visible escapes, and a value longer than the column's ``limit`` is cut with a
    marker. Everything else, control characters included, is kept as received."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    text = _UNSTORABLE.sub(_escape, value)
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."[:limit]
    return text


def storable_details(value: Any) -> Any:
    """:func:`storable` applied to every string (keys included) of a JSON-able value."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(str(k)): storable_details(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable_details(v) for v in value]
    return value
