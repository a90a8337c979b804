"""Background C-ECHO of every destination, so ``/readyz`` answers from a cache.

``/readyz`` is unauthenticated (load balancers call it). Echoing the destinations on each
call let anyone who could reach it make the node open associations to the PACS at will, and
made every call as slow as the slowest destination. Instead each destination is echoed by a
thread of its own every ``export.probe_interval_s`` (so one that does not answer never holds
up another's result), and ``/readyz`` reports the last answers with their age.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from triagenode.config.settings import Destination

__all__ = ["DestinationProbe"]

log = logging.getLogger(__name__)


class DestinationProbe:
    """Echo each destination on an interval; keep the last answer and when it came.

    Parameters
    ----------
    destinations
        The destinations to probe.
    echo
        C-ECHO one destination: True when it answered with success
        (:meth:`triagenode.delivery.exporter.Exporter.echo`).
    interval_s
        Seconds from the start of one probe of a destination to the start of the next (a
        probe that takes longer is followed at once by the next).
    """

    def __init__(
        self,
        destinations: Sequence[Destination],
        echo: Callable[[Destination], bool],
        interval_s: float,
    ) -> None:
        self.destinations = list(destinations)
        self._echo = echo
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._reachable: dict[str, bool | None] = {d.name: None for d in self.destinations}
        self._probed_at: dict[str, datetime | None] = {d.name: None for d in self.destinations}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def reachable(self) -> dict[str, bool | None]:
        """Name -> answered its last C-ECHO; None before its first probe has ended."""
        with self._lock:
            return dict(self._reachable)

    def probed_at(self) -> dict[str, datetime | None]:
        """Name -> when its last probe ended (UTC); None before the first."""
        with self._lock:
            return dict(self._probed_at)

    def probe(self, destination: Destination) -> bool:
        """C-ECHO ``destination`` now and keep the answer; logs when it goes up or down."""
        try:
            ok = bool(self._echo(destination))
        except Exception:  # a probe must never end its thread
            log.exception("probe of destination %s failed", destination.name)
            ok = False
        with self._lock:
            before = self._reachable.get(destination.name)
            self._reachable[destination.name] = ok
            self._probed_at[destination.name] = datetime.now(UTC)
        if before is not ok:
            if ok:
                log.info("destination %s answers C-ECHO", destination.name)
            else:
                log.warning("destination %s does not answer C-ECHO", destination.name)
        return ok

    def _run(self, destination: Destination) -> None:
        while not self._stop.is_set():
            started = datetime.now(UTC)
            self.probe(destination)
            spent = (datetime.now(UTC) - started).total_seconds()
            self._stop.wait(max(0.0, self.interval_s - spent))

    def start(self) -> None:
        """Start probing every destination (the first probes at once)."""
        if self._threads:
            return
        self._stop.clear()
        for destination in self.destinations:
            thread = threading.Thread(
                target=self._run,
                args=(destination,),
                name=f"probe-{destination.name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the probes in progress."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
