"""The operator console in a real browser: Debian's headless Chromium driven by Playwright,
against the admin API served by uvicorn over a database with studies in several states.

Screenshots of the pages go to a temporary folder, or to the folder named by
``TRIAGENODE_TEST_SCREENSHOTS`` (``TRIAGENODE_TEST_SCREENSHOTS=docs scripts/test -k console``
refreshes the ones the README shows), so a test run leaves the working tree as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.api_support import STUDY_UID, ApiWorld, events, serving, shared_world
from tests.console_support import NA_REASON, NOT_APPLICABLE_UID, URGENT_UID, seed_console
from tests.factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME
from triagenode.store.models import AuditEvent, Export, Study

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
)
DOCS = Path(
    os.environ.get("TRIAGENODE_TEST_SCREENSHOTS") or tempfile.mkdtemp(prefix="console-screens-")
)
LAPTOP = {"width": 1366, "height": 768}


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: the tests run as root in a container, where Chromium's sandbox cannot
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[ApiWorld, str]]:
    world = shared_world(tmp_path)
    seed_console(world)
    with serving(world.app) as address:
        yield world, f"http://{address}"


def signed_in(browser, base: str, token: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport=LAPTOP, base_url=base)
    page = context.new_page()
    page.goto("/ui")
    assert page.url.endswith("/ui/login"), "an anonymous visitor is sent to the sign-in form"
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/ui")
    return context, page


def test_worklist_and_study_page_as_operator_then_reprocess(
    browser, node: tuple[ApiWorld, str]
) -> None:
    world, base = node
    context, page = signed_in(browser, base, world.tokens["operator"])
    lanes = page.locator("section.lane h2").all_inner_texts()
    assert [lane.split()[0] for lane in lanes] == ["STAT", "URGENT", "ROUTINE"]
    stat = page.locator("section.lane-stat tbody tr").first
    assert STUDY_UID in stat.inner_text()
    assert "Pneumothorax 0.83" in stat.inner_text() and "Pleural effusion 0.61" in stat.inner_text()
    assert "Lung nodule" not in stat.inner_text()  # below its threshold
    assert "1 min" in stat.locator("td").nth(4).inner_text()  # time to SR: 95 s
    na_row = page.locator("tr", has_text=NOT_APPLICABLE_UID)
    assert "not applicable" in na_row.inner_text() and NA_REASON in na_row.inner_text()
    assert URGENT_UID in page.locator("section.lane-urgent").inner_text()
    cookie = next(c for c in context.cookies() if c["name"] == "triagenode_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert world.tokens["operator"] not in cookie["value"]
    page.screenshot(path=str(DOCS / "console-worklist.png"), full_page=True)

    page.get_by_role("link", name=STUDY_UID).click()
    page.wait_for_url(f"**/ui/studies/{STUDY_UID}")
    assert page.get_by_role("heading", level=1).inner_text().endswith(STUDY_UID)
    rows = page.locator("table.findings tbody tr")
    assert rows.count() == 3 and page.locator("table.findings svg.bar").count() == 3
    assert "present" in rows.first.inner_text() and "Pneumothorax" in rows.first.inner_text()
    body = page.locator("main").inner_text()
    for text in ("modality CT, body part CHEST", "mean of the top 3", "localizer images"):
        assert text in body
    assert page.locator("ol.timeline li").count() == 5
    html = page.content()
    for phi in (PATIENT_ID, PATIENT_NAME, BIRTH_DATE):
        assert phi not in html  # planted in the result JSON; never shown
    page.screenshot(path=str(DOCS / "console-study.png"), full_page=True)

    page.get_by_role("button", name="Reprocess").click()
    page.wait_for_url("**notice=reprocess")
    assert "classified again" in page.get_by_role("status").inner_text()
    with world.db.session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == STUDY_UID))
        assert study is not None and study.state == "stable" and study.run == 2
    viewed = events(world, actor="operator-token", event_id="110112", study_uid=STUDY_UID)
    assert any(e.details and e.details.get("view") == "study" for e in viewed)
    changed = events(world, actor="operator-token", event_id="110103", event_type="reprocess")
    assert any(e.details and e.details.get("path", "").startswith("/ui/") for e in changed)
    context.close()


def test_exports_page_retries_a_dead_letter(browser, node: tuple[ApiWorld, str]) -> None:
    world, base = node
    context, page = signed_in(browser, base, world.tokens["operator"])
    page.get_by_role("link", name="Exports").click()
    assert page.get_by_role("heading", name="Dead letters (1)").is_visible()
    assert "association rejected" in page.locator("main table").inner_text()
    page.screenshot(path=str(DOCS / "console-exports.png"), full_page=True)
    page.get_by_role("button", name=f"Retry export {world.export_id} to pacs").click()
    page.wait_for_url("**notice=retry")
    assert page.get_by_role("heading", name="Dead letters (0)").is_visible()
    with world.db.session() as session:
        export = session.get(Export, world.export_id)
        assert export is not None and export.state == "pending"
    assert events(world, event_id="110106", event_type="retry", actor="operator-token")
    context.close()


def test_auditor_sees_no_operator_buttons_and_forged_posts_are_refused(
    browser, node: tuple[ApiWorld, str]
) -> None:
    world, base = node
    context, page = signed_in(browser, base, world.tokens["auditor"])
    page.goto(f"/ui/studies/{STUDY_UID}")
    assert page.get_by_role("button", name="Reprocess").count() == 0
    assert page.get_by_role("button", name="Retry").count() == 0
    page.goto("/ui/exports")
    assert page.get_by_role("button", name="Retry").count() == 0
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    # the auditor's own valid CSRF token does not lift the role check
    denied = context.request.post(f"/ui/studies/{STUDY_UID}/reprocess", form={"csrf": csrf})
    assert denied.status == 403
    context.close()

    context, page = signed_in(browser, base, world.tokens["operator"])
    for form in ({}, {"csrf": "0" * 40}, {"csrf": csrf}):  # none, wrong, another session's
        forged = context.request.post(
            f"/ui/studies/{STUDY_UID}/reprocess", form=form, max_redirects=0
        )
        assert forged.status == 403, form
        retry = context.request.post(
            f"/ui/exports/{world.export_id}/retry", form=form, max_redirects=0
        )
        assert retry.status == 403, form
    with world.db.session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == STUDY_UID))
        assert study is not None and study.state == "reported" and study.run == 1
        export = session.get(Export, world.export_id)
        assert export is not None and export.state == "dead"
    assert len(events(world, event_id="110113", event_type="csrf_failure")) == 6
    assert events(world, event_id="110113", event_type="use_of_restricted_function")
    context.close()


def test_sign_in_failures_and_sessions_are_audited(browser, node: tuple[ApiWorld, str]) -> None:
    world, base = node
    context = browser.new_context(viewport=LAPTOP, base_url=base)
    page = context.new_page()
    page.goto("/ui/login")
    page.get_by_label("API token").fill("tn_not-a-real-token")
    page.get_by_role("button", name="Sign in").click()
    assert "not valid" in page.get_by_role("alert").inner_text()
    (refused,) = events(world, event_id="110113", event_type="unknown_token")
    assert refused.outcome == 4 and refused.details and refused.details["status"] == 401
    # a cookie someone altered is no session: back to the form, and an alert in the trail
    context.add_cookies(
        [{"name": "triagenode_session", "value": "eyJ4IjoxfQ.00", "url": f"{base}/ui"}]
    )
    page.goto("/ui")
    assert page.url.endswith("/ui/login")
    assert events(world, event_id="110113", event_type="invalid_session")
    context.close()

    context, page = signed_in(browser, base, world.tokens["admin"])
    assert events(world, event_id="110114", event_type="login", actor="admin-token")
    world.app.state.tokens.revoke("admin-token")
    page.goto("/ui/exports")  # a revoked token ends its console sessions at once
    assert page.url.endswith("/ui/login")
    assert events(world, event_id="110113", event_type="revoked_token", actor="admin-token")
    context.close()

    context, page = signed_in(browser, base, world.tokens["operator"])
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/ui/login")
    page.goto("/ui")
    assert page.url.endswith("/ui/login")
    assert events(world, event_id="110114", event_type="logout", actor="operator-token")
    context.close()


def test_search_by_patient_id_is_hashed_and_audited(
    browser, node: tuple[ApiWorld, str], caplog: pytest.LogCaptureFixture
) -> None:
    world, base = node
    caplog.set_level(logging.DEBUG)
    context, page = signed_in(browser, base, world.tokens["auditor"])
    page.get_by_label("Study UID or patient ID").fill(PATIENT_ID)
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**q=*")
    assert page.locator("p.summary").inner_text().startswith("1 study")
    assert STUDY_UID in page.locator("main table").inner_text()

    page.get_by_role("link", name="Audit").click()
    page.get_by_label("Patient ID").fill(PATIENT_ID)
    page.get_by_role("button", name="Search").click()
    page.wait_for_url("**patient_id=*")
    assert "received" in page.locator("table.audit").inner_text()
    assert page.locator("table.audit tbody tr").count() >= 2  # received + the worklist search
    page.screenshot(path=str(DOCS / "console-audit.png"), full_page=True)

    reference = world.audit.patient_ref(PATIENT_ID)
    searches = events(world, actor="auditor-token", patient_ref=reference)
    assert {e.event_id for e in searches} == {"110112", "110101"}
    with world.db.session() as session:
        for row in session.scalars(select(AuditEvent)):
            assert PATIENT_ID not in repr((row.details, row.study_uid, row.actor))
    assert PATIENT_ID not in caplog.text and PATIENT_NAME not in caplog.text
    context.close()
