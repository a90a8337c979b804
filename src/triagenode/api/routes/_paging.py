"""Pagination shared by the list routes: limit/offset, or an opaque keyset cursor."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import Query

from triagenode.api.problems import Problem

__all__ = [
    "MAX_OFFSET",
    "Cursor",
    "Limit",
    "Offset",
    "as_utc",
    "decode_cursor",
    "encode_cursor",
]

# The databases count in signed 64-bit integers: an offset past them is refused (422), not
# handed to the driver to overflow.
MAX_OFFSET = 2**62
_MAX_KEY = 2**63 - 1

Limit = Annotated[int, Query(ge=1, le=500, description="Items per page")]
Offset = Annotated[
    int, Query(ge=0, le=MAX_OFFSET, description="Items to skip (ignored with a cursor)")
]
Cursor = Annotated[
    str | None, Query(max_length=512, description="next_cursor of the previous page")
]


def encode_cursor(*values: Any) -> str:
    raw = json.dumps(values, default=str, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _bad_cursor() -> Problem:
    return Problem(400, "cursor is not one this API gave out", "bad-cursor")


def _key(value: Any, kind: type) -> Any:
    if kind is int:
        # bool is an int to Python, not to a cursor; and the key must fit the database's
        if type(value) is not int or not 0 <= value <= _MAX_KEY:
            raise _bad_cursor()
        return value
    if kind is datetime:
        if not isinstance(value, str) or len(value) > 40:
            raise _bad_cursor()
        try:
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is not None:
                moment = moment.astimezone(timezone.utc)
        except (ValueError, OverflowError):
            raise _bad_cursor() from None
        return moment
    raise TypeError(f"cursor keys are int or datetime, not {kind!r}")


def decode_cursor(cursor: str, *kinds: type) -> list[Any]:
    """The keys of a cursor this API gave out, each checked to be of ``kinds`` (int: a
    64-bit key; datetime: an ISO time), so a crafted cursor is a 400, never a 500.

    Raises
    ------
    Problem
        400 ``bad-cursor``.
    """
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded))
    except ValueError:
        raise _bad_cursor() from None
    if not isinstance(values, list) or len(values) != len(kinds):
        raise _bad_cursor()
    return [_key(value, kind) for value, kind in zip(values, kinds, strict=True)]


def as_utc(value: datetime | None, name: str = "time") -> datetime | None:
    """A query time in UTC; one without a zone is UTC, like every time the node stores.

    Raises
    ------
    Problem
        422 naming the parameter when its zone moves it outside the years 1-9999.
    """
    if value is None:
        return value
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise Problem(
            422,
            f"invalid request: {name} is outside the years 1-9999 once moved to UTC",
            "invalid-request",
        ) from None
