"""Per-token request rate limiting: a sliding one-minute window kept in memory."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``per_minute`` requests per key in any 60-second window.

    Parameters
    ----------
    per_minute
        The limit (``api.rate_limit_per_minute``).
    clock
        Monotonic seconds; replaceable in tests.
    """

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> float:
        """Count one request; 0 when allowed, else the seconds until one is allowed."""
        now = self._clock()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - 60.0:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return max(hits[0] + 60.0 - now, 0.001)
            hits.append(now)
            return 0.0

    @staticmethod
    def retry_after(seconds: float) -> str:
        return str(max(1, math.ceil(seconds)))
