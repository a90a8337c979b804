"""Critical-finding notifications: a WARNING log line and/or a webhook POST.

When the model finds a ``critical`` label above a threshold the site calibrated for that use
(the label's ``threshold_calibrated``), someone should look now, not when the SR reaches the
top of a worklist. Critical findings over an uncalibrated threshold are flagged in the SR and
the API only: paging people on raw zero-shot scores would train them to ignore the pages.

The log line is written at once; the webhook is posted by a background thread with a
timeout and retries, so a slow or unreachable receiver never holds up a worker. Neither
carries PHI: the study is named by its Study Instance UID, the finding by its name and code.

The webhook body (``Content-Type: application/json``)::

    {"event": "critical_finding", "study_uid": "1.2...", "finding": "intracranial_hemorrhage",
     "code": {"scheme": "SCT", "value": "...", "meaning": "..."}, "score": 0.93,
     "threshold": 0.5, "priority": "stat", "triage_priority": "routine",
     "triage_rule": null, "label_set": "ct_head", "sr_uid": "2.25...",
     "model": "BiomedCLIP-...", "demo": false, "at": "2026-11-26T08:00:00+00:00"}
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from triagenode import __version__
from triagenode.config.triage import NotifySettings, TriageSettings
from triagenode.domain import LabelFinding, Priority, StudyResult

__all__ = ["CriticalFinding", "CriticalFindingNotifier"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CriticalFinding:
    """What a notification says: no PHI, the study only by its UID."""

    study_uid: str
    finding: str
    code: dict[str, str]
    score: float
    threshold: float
    triage_priority: str
    triage_rule: str | None
    label_set: str
    sr_uid: str | None
    model: str
    demo: bool
    priority: str = Priority.stat.name  # a critical finding makes the study stat
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @classmethod
    def from_result(cls, result: StudyResult, sr_uid: str | None = None) -> CriticalFinding:
        """The highest-scoring critical finding of ``result`` (its top finding if none is
        marked critical)."""
        critical = [f for f in result.findings if f.critical]
        top: LabelFinding | None = max(
            critical or result.findings, key=lambda f: f.score, default=None
        )
        if top is None:
            raise ValueError(f"study {result.study_uid}: result has no findings to notify")
        return cls(
            study_uid=result.study_uid,
            finding=top.name,
            code={"scheme": top.code_scheme, "value": top.code_value, "meaning": top.code_meaning},
            score=round(float(top.score), 4),
            threshold=float(top.threshold),
            triage_priority=result.priority.name,
            triage_rule=result.priority_rule,
            label_set=result.label_set,
            sr_uid=sr_uid,
            model=result.model.display_name,
            demo=result.model.is_demo,
        )

    def payload(self) -> dict[str, Any]:
        return {"event": "critical_finding", **asdict(self)}


_STOP = object()


class CriticalFindingNotifier:
    """Announces critical findings without ever blocking or failing the caller.

    Parameters
    ----------
    settings
        ``[triage]`` (its ``notify`` subsection is used) or ``[triage.notify]`` itself.
    """

    def __init__(self, settings: TriageSettings | NotifySettings) -> None:
        self.settings = settings.notify if isinstance(settings, TriageSettings) else settings
        self._queue: queue.Queue[object] = queue.Queue(maxsize=self.settings.queue_size)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.delivered = 0  # webhook messages accepted with a 2xx answer
        self.undelivered = 0  # given up after every attempt, or dropped

    def notify(self, result: StudyResult, *, sr_uid: str | None = None) -> None:
        """Announce ``result``'s critical finding; returns at once, never raises."""
        try:
            self.send(CriticalFinding.from_result(result, sr_uid))
        except Exception:  # a notification problem must never fail the study
            log.exception("study %s: could not build the critical-finding notice", result.study_uid)

    def send(self, finding: CriticalFinding) -> None:
        """Log ``finding`` and queue its webhook POST; returns at once, never raises."""
        if self.settings.log:
            log.warning(
                "CRITICAL finding: study %s %s score=%.3f (threshold %.2f) priority %s, SR %s%s",
                finding.study_uid,
                finding.finding,
                finding.score,
                finding.threshold,
                finding.priority,
                finding.sr_uid or "-",
                " [DEMO, NOT FOR CLINICAL USE]" if finding.demo else "",
            )
        if self.settings.webhook_url is None or self._closing.is_set():
            return
        self._ensure_thread()
        try:
            self._queue.put_nowait(finding)
        except queue.Full:
            self._count(delivered=False)
            log.error(
                "study %s: critical-finding webhook dropped, %d notices already waiting",
                finding.study_uid,
                self._queue.qsize(),
            )

    def close(self, timeout: float = 10.0) -> None:
        """Stop the sender after the notices already queued (waits at most ``timeout``)."""
        self._closing.set()
        thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(queue.Full):  # a full queue: join's timeout still bounds us
            self._queue.put(_STOP, timeout=timeout)
        thread.join(timeout)

    stop = close  # the node stops its parts with stop()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="critical-webhook", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, CriticalFinding)
            self._count(delivered=self._deliver(item))

    def _count(self, *, delivered: bool) -> None:
        with self._lock:
            if delivered:
                self.delivered += 1
            else:
                self.undelivered += 1

    def _deliver(self, finding: CriticalFinding) -> bool:
        url = self.settings.webhook_url
        assert url is not None
        body = json.dumps(finding.payload()).encode("utf-8")
        delay = self.settings.webhook_backoff_s
        attempts = self.settings.webhook_attempts
        for attempt in range(1, attempts + 1):
            request = urllib.request.Request(
                url,
                data=body,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": f"triagenode/{__version__}",
                },
            )
            try:
                with urllib.request.urlopen(
                    request, timeout=self.settings.webhook_timeout_s
                ) as response:
                    status = response.status
                if 200 <= status < 300:
                    log.info("study %s: critical-finding webhook delivered", finding.study_uid)
                    return True
                problem = f"HTTP {status}"
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                problem = str(getattr(exc, "reason", exc))
            log.warning(
                "study %s: critical-finding webhook attempt %d/%d failed: %s",
                finding.study_uid,
                attempt,
                attempts,
                problem,
            )
            # A closing node tries each queued notice once but does not wait to retry.
            if attempt == attempts or self._closing.wait(delay):
                break
            delay *= 2
        log.error(
            "study %s: critical-finding webhook not delivered after %d attempt(s)",
            finding.study_uid,
            attempt,
        )
        return False
