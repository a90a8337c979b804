"""The console's session, headers and escaping, through the ASGI app (no browser needed)."""

from __future__ import annotations

import re
import time

import pytest
from fastapi.testclient import TestClient

from tests.api_support import STUDY_UID, ApiWorld, build_world, events
from tests.audit_support import drop_append_only_guard
from tests.console_support import seed_console
from tests.factory import PATIENT_ID
from triagenode.console.session import COOKIE, SessionCodec
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent, Study, utcnow

HOSTILE_UID = '1.2.3"><img src=x onerror=alert(1)>'
HOSTILE_REASON = "bad \x01\x1b[31m <script>alert(2)</script> \ufffd reason"


@pytest.fixture
def world(make_settings, db: Database) -> ApiWorld:
    """The console over SQLite and PostgreSQL."""
    world = build_world(make_settings(api={"rate_limit_per_minute": 100000}), db)
    seed_console(world)
    return world


def sign_in(client: TestClient, token: str) -> None:
    form = client.get("/ui/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    assert csrf is not None
    answer = client.post(
        "/ui/login", data={"token": token, "csrf": csrf.group(1)}, follow_redirects=False
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/ui"


def test_session_cookie_is_signed_expires_and_holds_no_token() -> None:
    codec = SessionCodec(lifetime_s=60)
    value, session = codec.issue(7, "night-operator")
    assert codec.read(value) == session
    encoded, signature = value.rsplit(".", 1)
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert codec.read(f"{encoded}.{flipped}") is None
    assert codec.read(value.replace(encoded[:4], "AAAA")) is None
    assert SessionCodec(lifetime_s=60).read(value) is None  # another process's key
    assert codec.read("x" * 600) is None and codec.read("no-dot") is None
    assert codec.csrf_ok(session, codec.csrf(session))
    assert not codec.csrf_ok(session, "") and not codec.csrf_ok(session, "0" * 40)
    late = SessionCodec(lifetime_s=-1)
    expired, _ = late.issue(7, "night-operator")
    assert late.read(expired) is None
    assert time.time() + 58 < session.expires_at <= time.time() + 60


def test_cookie_is_secure_over_https_and_headers_lock_the_page_down(world: ApiWorld) -> None:
    client = TestClient(world.app, base_url="https://testserver")
    login = client.get("/ui/login")
    assert "secure" in login.headers["set-cookie"].lower()
    sign_in(client, world.tokens["auditor"])
    page = client.get("/ui")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    before = len(events(world))
    assert client.get("/ui/static/console.css").status_code == 200
    assert len(events(world)) == before  # a stylesheet is no access to patient data


def test_external_strings_are_escaped_in_every_page(world: ApiWorld) -> None:
    with world.db.write_session() as session:
        session.add(
            Study(
                study_uid=HOSTILE_UID,
                state="not_applicable",
                state_reason=HOSTILE_REASON,
                priority=40,
                modality="<b>",
                first_received_at=utcnow(),
                last_received_at=utcnow(),
            )
        )
    client = TestClient(world.app)
    sign_in(client, world.tokens["operator"])
    for path in ("/ui", "/ui?state=not_applicable", "/ui/studies/" + HOSTILE_UID):
        page = client.get(path)
        assert page.status_code == 200, path
        assert "<script>alert(2)" not in page.text and "<img src=x" not in page.text
        assert "&lt;img src=x" in page.text
    assert client.get("/ui/studies/1.2.3.404").status_code == 404
    searched = client.get("/ui", params={"q": PATIENT_ID, "state": "reported"})
    assert STUDY_UID in searched.text and "1 study" in searched.text
    deep = client.get("/ui", params={"page": 9999})
    assert deep.status_code == 200 and "No studies match" in deep.text
    assert events(world, event_id="110112", study_uid="1.2.3.404")


def test_role_and_session_are_checked_before_any_post(world: ApiWorld) -> None:
    client = TestClient(world.app)
    anonymous = client.post(f"/ui/studies/{STUDY_UID}/reprocess", data={"csrf": "x"})
    assert anonymous.status_code == 401
    login = client.post("/ui/login", data={"token": world.tokens["admin"], "csrf": "guess"})
    assert login.status_code == 403  # the sign-in form's own double-submit token
    client.cookies.set(COOKIE, "forged.value", path="/ui")
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/login"
    assert events(world, event_id="110113", event_type="invalid_session")


def test_audit_chain_verification_page(world: ApiWorld) -> None:
    client = TestClient(world.app)
    sign_in(client, world.tokens["auditor"])
    page = client.get("/ui/audit/verify")
    assert page.status_code == 200 and "The chain is intact" in page.text
    (verified,) = events(world, event_id="110101", event_type="verify")
    assert verified.details and verified.details["ok"] is True and verified.details["count"] >= 2
    with world.db.write_session() as session:  # someone edits an event behind the node's back
        drop_append_only_guard(session.connection())  # as only the table's owner could
        session.execute(
            AuditEvent.__table__.update().where(AuditEvent.seq == 1).values(actor="someone-else")  # type: ignore[attr-defined]
        )
    broken = client.get("/ui/audit/verify")
    assert "The chain is broken at event 1" in broken.text
    assert events(world, event_id="110113", event_type="integrity_failure")
