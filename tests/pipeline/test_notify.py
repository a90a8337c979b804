"""Critical-finding notifications: the log line, a real local webhook, a dead webhook."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.factory import PATIENT_ID, PATIENT_NAME
from tests.peers import free_port, wait_for
from triagenode.config.triage import NotifySettings, TriageSettings
from triagenode.domain import LabelFinding, ModelIdentity, Priority, StudyResult
from triagenode.pipeline.notify import CriticalFinding, CriticalFindingNotifier

STUDY_UID = "1.2.826.0.1.3680043.10.77.1"


def result(*, critical: bool = True) -> StudyResult:
    findings = (
        LabelFinding("normal", "SCT", "17621005", "Normal", 0.05, 0.5, False),
        LabelFinding(
            "intracranial_hemorrhage",
            "SCT",
            "1386000",
            "Intracranial hemorrhage",
            0.91,
            0.5,
            True,
            critical=critical,
        ),
    )
    model = ModelIdentity("demo", "0", "ab" * 32, "demo", is_demo=True)
    return StudyResult(
        study_uid=STUDY_UID,
        label_set="ct_head",
        findings=findings,
        model=model,
        backend="torch",
        aggregation="max",
        images_used=(),
        priority=Priority.routine,
        priority_rule=None,
    )


class Hook:
    """A real HTTP server on a free localhost port that records what it receives."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses  # answers in turn; the last one repeats
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                hook.received.append(json.loads(self.rfile.read(length)))
                hook.headers.append(dict(self.headers))
                status = hook.statuses[min(len(hook.received), len(hook.statuses)) - 1]
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/critical"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook_ok() -> Iterator[Hook]:
    hook = Hook([204])
    yield hook
    hook.close()


def notifier(url: str | None, **extra: Any) -> CriticalFindingNotifier:
    return CriticalFindingNotifier(
        TriageSettings(notify=NotifySettings(webhook_url=url, webhook_backoff_s=0.05, **extra))
    )


def test_webhook_receives_the_finding_without_phi(
    hook_ok: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    sender = notifier(hook_ok.url)
    with caplog.at_level(logging.INFO, logger="triagenode"):
        sender.notify(result(), sr_uid="2.25.1234")
        wait_for(lambda: sender.delivered == 1, timeout=10, what="webhook delivery")
    sender.close()
    [body] = hook_ok.received
    assert body["event"] == "critical_finding"
    assert body["study_uid"] == STUDY_UID and body["sr_uid"] == "2.25.1234"
    assert body["finding"] == "intracranial_hemorrhage" and body["score"] == 0.91
    assert body["priority"] == "stat" and body["triage_priority"] == "routine"
    assert body["code"] == {
        "scheme": "SCT",
        "value": "1386000",
        "meaning": "Intracranial hemorrhage",
    }
    assert body["demo"] is True
    assert hook_ok.headers[0]["Content-Type"] == "application/json"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert STUDY_UID in line and "intracranial_hemorrhage" in line and "2.25.1234" in line
    everything = caplog.text + json.dumps(body)
    assert PATIENT_NAME not in everything and PATIENT_ID not in everything


def test_webhook_retries_until_accepted() -> None:
    hook = Hook([503, 500, 200])
    try:
        sender = notifier(hook.url, webhook_attempts=3)
        sender.notify(result(), sr_uid="2.25.1")
        wait_for(lambda: sender.delivered == 1, timeout=10, what="third attempt")
        assert len(hook.received) == 3 and sender.undelivered == 0
        sender.close()
    finally:
        hook.close()


def test_down_webhook_neither_blocks_nor_raises(caplog: pytest.LogCaptureFixture) -> None:
    sender = notifier(f"http://127.0.0.1:{free_port()}/nobody", webhook_attempts=2)
    started = time.monotonic()
    for _ in range(5):
        sender.notify(result(), sr_uid="2.25.9")
    assert time.monotonic() - started < 0.5  # the worker's call returns at once
    wait_for(lambda: sender.undelivered == 5, timeout=20, what="attempts to give up")
    assert sender.delivered == 0
    assert "not delivered after 2 attempt(s)" in caplog.text
    sender.close()


def test_slow_webhook_times_out_without_blocking_the_caller() -> None:
    release = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            release.wait(5)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/slow"
        sender = notifier(url, webhook_attempts=1, webhook_timeout_s=0.2)
        started = time.monotonic()
        sender.notify(result())
        assert time.monotonic() - started < 0.1
        wait_for(lambda: sender.undelivered == 1, timeout=10, what="webhook timeout")
        sender.close()
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_full_queue_drops_and_counts() -> None:
    # Nobody listens: each notice fails fast, but 20 at once overflow a queue of one.
    sender = notifier(f"http://127.0.0.1:{free_port()}/x", webhook_attempts=1, queue_size=1)
    for _ in range(20):
        sender.notify(result())
    wait_for(lambda: sender.undelivered == 20, timeout=20, what="all notices accounted for")
    sender.close()


def test_log_only_and_quiet_modes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="triagenode"):
        notifier(None).notify(result())
        CriticalFindingNotifier(NotifySettings(log=False)).notify(result())
    assert len([r for r in caplog.records if "CRITICAL finding" in r.getMessage()]) == 1


def test_finding_is_the_most_probable_critical_label() -> None:
    finding = CriticalFinding.from_result(result(), sr_uid=None)
    assert (finding.finding, finding.score, finding.label_set) == (
        "intracranial_hemorrhage",
        0.91,
        "ct_head",
    )
    # Without a critical label the top finding is reported (the caller decides to notify).
    assert CriticalFinding.from_result(result(critical=False)).finding == "intracranial_hemorrhage"
