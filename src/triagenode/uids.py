"""Deterministic DICOM UIDs under the node's UID root.

A UID made here depends only on its inputs, so the same work (same study, model and run)
always gets the same SR UID: a retry or a restart cannot produce a second SR.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["UID_PATTERN", "derive_uid", "is_valid_uid"]

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_MAX_UID_LENGTH = 64


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return len(value) <= _MAX_UID_LENGTH and bool(UID_PATTERN.match(value))


def derive_uid(root: str, *parts: str) -> str:
    """A UID under ``root`` whose last component is a hash of ``parts``.

    With the root ``2.25`` the result is a UUID-derived UID (PS3.5 B.2): the hash is cut to
    128 bits. Under an organisational root it uses as many digits as the 64-character limit
    allows (at least 20), so collisions stay negligible.
    """
    if not is_valid_uid(root):
        raise ValueError(f"invalid UID root {root!r}")
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    if root == "2.25":
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"
    room = _MAX_UID_LENGTH - len(root) - 1
    if room < 20:
        raise ValueError(f"UID root {root!r} is too long: at most 43 characters leave room")
    number = str(int.from_bytes(digest, "big"))[:room].lstrip("0") or "1"
    return f"{root}.{number}"
