"""Per-token request rate limiting: a sliding one-minute window kept in memory."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["RateLimiter"]

_MAX_KEYS = 10_000


class RateLimiter:
    """At most ``per_minute`` requests per key in any 60-second window.

    Parameters
    ----------
    per_minute
        The limit (``api.rate_limit_per_minute``).
    clock
        Monotonic seconds; replaceable in tests.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> float:
        """Count one request; 0 when allowed, else the seconds until one is allowed."""
        now = self._clock()
        with self._lock:
            if len(self._hits) > _MAX_KEYS:
                self._forget_idle(now)
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - 60.0:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return max(hits[0] + 60.0 - now, 0.001)
            hits.append(now)
            return 0.0

    def _forget_idle(self, now: float) -> None:
        # Keys are token names and client addresses; drop those quiet for a minute so a
        # scan from many addresses cannot grow the table without bound.
        idle = [k for k, hits in self._hits.items() if not hits or hits[-1] <= now - 60.0]
        for key in idle:
            del self._hits[key]

    @staticmethod
    def retry_after(seconds: float) -> str:
        return str(max(1, math.ceil(seconds)))
