"""Pagination shared by the list routes: limit/offset, or an opaque keyset cursor."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import Query

from triagenode.api.problems import Problem

__all__ = ["Cursor", "Limit", "Offset", "as_utc", "decode_cursor", "encode_cursor"]

Limit = Annotated[int, Query(ge=1, le=500, description="Items per page")]
Offset = Annotated[int, Query(ge=0, description="Items to skip (ignored with a cursor)")]
Cursor = Annotated[
    str | None, Query(max_length=512, description="next_cursor of the previous page")
]


def encode_cursor(*values: Any) -> str:
    raw = json.dumps(values, default=str, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(values, list) or len(values) != arity:
            raise ValueError
        return values
    except ValueError:
        raise Problem(400, "cursor is not one this API gave out", "bad-cursor") from None


def as_utc(value: datetime | None) -> datetime | None:
    """Query times without a zone are UTC, like every time the node stores."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)
