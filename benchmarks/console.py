"""How fast the operator console answers with a large database.

Fills a fresh SQLite database (the default backend) with ``--studies`` studies (10,000 by
default) in a realistic mix of priorities, states and modalities, each reported study with
a result, five timeline events and an export (2% of them dead letters), plus one audit event
per study; serves the admin API with uvicorn on loopback, signs in to the console as an
operator and times each page ``--repeat`` times over HTTP (every request is also written to
the audit trail, as in production). Prints p50/p95 per page in milliseconds.

Usage::

    python benchmarks/console.py [--studies 10000] [--repeat 40] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import free_port
from tests.console_support import result_json
from tests.peers import wait_for

from triagenode.api.server import build_server
from triagenode.api.tokens import TokenStore
from triagenode.audit import AuditLog
from triagenode.config.settings import load_settings
from triagenode.store import migrate
from triagenode.store.db import Database
from triagenode.store.models import Export, Result, Study, StudyEvent, utcnow
from triagenode.web import create_web_app

SECRET = b"console-benchmark-secret-0123456789"
PRIORITIES = [(40, 0.05), (30, 0.15), (20, 0.7), (10, 0.1)]
STATES = [
    ("reported", 0.8),
    ("not_applicable", 0.05),
    ("failed", 0.03),
    ("queued", 0.05),
    ("receiving", 0.03),
    ("ignored", 0.04),
]
MODALITIES = ["CT", "CR", "DX", "MR", "US"]


def _pick(rng: random.Random, weighted: list[tuple[Any, float]]) -> Any:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


def fill(db: Database, audit: AuditLog, count: int, seed: int = 7) -> list[str]:
    """Write ``count`` studies and what goes with them; returns their UIDs."""
    rng = random.Random(seed)
    now = utcnow()
    uids = []
    study_rows, result_rows, event_rows, export_rows = [], [], [], []
    for n in range(count):
        uid = f"1.2.826.0.1.3680043.8.498.{1000 + n}"
        uids.append(uid)
        state = _pick(rng, STATES)
        first = now - timedelta(minutes=rng.uniform(1, 60 * 24 * 30))
        study_rows.append(
            {
                "id": n + 1,
                "study_uid": uid,
                "state": state,
                "state_reason": "no label set fits" if state == "not_applicable" else None,
                "state_changed_at": first,
                "priority": _pick(rng, PRIORITIES),
                "patient_ref": audit.patient_ref(f"PID-{n % 4000}"),
                "modality": rng.choice(MODALITIES),
                "first_received_at": first,
                "last_received_at": first + timedelta(seconds=30),
                "instance_count": rng.randint(1, 400),
                "byte_count": 0,
                "run": 1,
                "attempts": 0,
                "critical": False,
            }
        )
        steps = ["receiving", "stable", "queued", "processing", state]
        for k, (before, after) in enumerate(zip([None, *steps[:-1]], steps, strict=True)):
            event_rows.append(
                {
                    "study_id": n + 1,
                    "at": first + timedelta(seconds=20 * k),
                    "from_state": before,
                    "to_state": after,
                    "reason": "benchmark",
                }
            )
        if state == "reported":
            result_rows.append(
                {
                    "id": len(result_rows) + 1,
                    "study_id": n + 1,
                    "run": 1,
                    "model_name": "demo",
                    "model_version": "0",
                    "weights_sha256": "1" * 64,
                    "is_demo": True,
                    "backend": "torch",
                    "label_set": "chest",
                    "top_finding": "pneumothorax",
                    "critical": False,
                    "findings": result_json(uid),
                    "sr_sop_instance_uid": uid + ".99.1",
                    "sr_series_uid": uid + ".99",
                    "created_at": first + timedelta(seconds=100),
                }
            )
            export_rows.append(
                {
                    "result_id": len(result_rows),
                    "study_uid": uid,
                    "destination": "pacs",
                    "sop_instance_uid": uid + ".99.1",
                    "file_path": "results/sr.dcm",
                    "priority": 20,
                    "state": "dead" if rng.random() < 0.02 else "sent",
                    "attempts": 1,
                    "next_attempt_at": first,
                    "created_at": first,
                }
            )
    with db.write_session() as session:
        for model, rows in (
            (Study, study_rows),
            (StudyEvent, event_rows),
            (Result, result_rows),
            (Export, export_rows),
        ):
            session.execute(model.__table__.insert(), rows)  # type: ignore[attr-defined]
    with db.write_session() as session:
        for n, uid in enumerate(uids):
            audit.record(
                "110104",  # type: ignore[arg-type]
                event_type="received",
                actor="CT_SCANNER",
                study_uid=uid,
                patient_ref=audit.patient_ref(f"PID-{n % 4000}"),
                session=session,
            )
    return uids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="console-bench-"))
    settings = load_settings(
        None,
        node={"data_dir": str(folder)},
        audit={"secret": SECRET.decode()},
        api={"rate_limit_per_minute": 1_000_000},
    )
    db = Database(f"sqlite:///{folder / 'node.sqlite3'}")
    migrate.upgrade(db)
    audit = AuditLog(db, SECRET)
    started = time.perf_counter()
    uids = fill(db, audit, args.studies)
    print(f"filled {args.studies} studies in {time.perf_counter() - started:.1f} s")
    token = TokenStore(db).create("bench-operator", "operator")
    app = create_web_app(settings, db, audit)
    port = free_port()
    server = build_server(app, "127.0.0.1", port)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30, what="uvicorn to start")
    rng = random.Random(3)
    pages: dict[str, Any] = {
        "worklist": lambda: "/ui",
        "worklist state=reported": lambda: "/ui?state=reported",
        "worklist priority=stat": lambda: "/ui?priority=stat",
        "worklist modality=US": lambda: "/ui?modality=US",
        "worklist page 150": lambda: "/ui?page=150",
        "worklist search patient ID": lambda: f"/ui?q=PID-{rng.randrange(4000)}",
        "worklist search study UID": lambda: f"/ui?q={rng.choice(uids)}",
        "study": lambda: f"/ui/studies/{rng.choice(uids)}",
        "exports (dead letters)": lambda: "/ui/exports",
        "audit": lambda: "/ui/audit",
        "audit by patient ID": lambda: f"/ui/audit?patient_id=PID-{rng.randrange(4000)}",
    }
    report: dict[str, Any] = {"studies": args.studies, "repeat": args.repeat, "pages": {}}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        form = client.get("/ui/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf is not None
        signed = client.post("/ui/login", data={"token": token, "csrf": csrf.group(1)})
        assert signed.status_code == 303 and "triagenode_session" in client.cookies
        print(f"{'page':32} {'p50 ms':>8} {'p95 ms':>8}")
        for name, path in pages.items():
            client.get(path())  # warm
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                answer = client.get(path())
                times.append((time.perf_counter() - t0) * 1000)
                assert answer.status_code == 200, (name, answer.status_code)
            p50, p95 = statistics.median(times), percentile(times, 0.95)
            report["pages"][name] = {"p50_ms": round(p50, 1), "p95_ms": round(p95, 1)}
            print(f"{name:32} {p50:8.1f} {p95:8.1f}")
    server.should_exit = True
    thread.join(timeout=10)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
