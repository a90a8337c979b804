"""Background C-ECHO of every destination, so ``/readyz`` answers from a cache.

``/readyz`` is unauthenticated (load balancers call it). Echoing the destinations on each
call let anyone who could reach it make the node open associations to the PACS at will and
made every call as slow as the slowest destination. One thread probes them every
``export.probe_interval_s`` instead; ``/readyz`` reports the last answers and their age.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

__all__ = ["DestinationProbe"]

log = logging.getLogger(__name__)


class DestinationProbe:
    """Echo the destinations on an interval; keep the last answers.

    Parameters
    ----------
    echo
        One round: C-ECHO every destination, name -> answered with success
        (:meth:`triagenode.scp.exporter.Exporter.echo_destinations`).
    names
        The destinations' names (reported as not yet known until the first round ends).
    interval_s
        Seconds from the start of one round to the start of the next (a round that takes
        longer is followed at once by the next).
    """

    def __init__(
        self,
        echo: Callable[[], Mapping[str, bool]],
        names: Sequence[str],
        interval_s: float,
    ) -> None:
        self._echo = echo
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._reachable: dict[str, bool | None] = {name: None for name in names}
        self._probed_at: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reachable(self) -> dict[str, bool | None]:
        """Name -> answered the last C-ECHO; None before the first round has ended."""
        with self._lock:
            return dict(self._reachable)

    def probed_at(self) -> datetime | None:
        """When the last round ended (UTC); None before the first."""
        with self._lock:
            return self._probed_at

    def probe_now(self) -> dict[str, bool]:
        """Run one round now and keep its answers; logs destinations that went up or down."""
        answers = dict(self._echo())
        finished = datetime.now(UTC)
        with self._lock:
            before = dict(self._reachable)
            self._reachable.update(answers)
            self._probed_at = finished
        for name, ok in answers.items():
            if before.get(name) is not ok:
                if ok:
                    log.info("destination %s answers C-ECHO", name)
                else:
                    log.warning("destination %s does not answer C-ECHO", name)
        return answers

    def _run(self) -> None:
        while not self._stop.is_set():
            started = datetime.now(UTC)
            try:
                self.probe_now()
            except Exception:  # a round must never end the thread
                log.exception("destination probe failed")
            spent = (datetime.now(UTC) - started).total_seconds()
            self._stop.wait(max(0.0, self.interval_s - spent))

    def start(self) -> None:
        """Start probing (the first round at once)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="destination-probe", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current round."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
