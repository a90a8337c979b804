"""The console's pages and form actions under ``/ui``.

Pages are GETs that read; actions are form POSTs that change something and answer with a
redirect back to the page (post/redirect/get), carrying a fixed notice code, never text
from the request.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from triagenode.api.deps import AuditDep, CallAuditDep, DbDep, SettingsDep, rate_limit
from triagenode.api.middleware import CallAudit
from triagenode.api.problems import Problem
from triagenode.api.routes.exports import requeue_export
from triagenode.api.tokens import AuthFailure, Role, TokenStore
from triagenode.audit.events import AuditEventId, AuditLog, Outcome
from triagenode.console import queries
from triagenode.console.auth import ConsoleUser, checked_form, viewer
from triagenode.console.session import COOKIE, LOGIN_COOKIE, SessionCodec
from triagenode.domain import ExportState, Priority, StudyState
from triagenode.pipeline import actions
from triagenode.store.db import Database
from triagenode.store.models import ApiToken, Export, Study

__all__ = ["router", "templates"]

_HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(_HERE / "templates"))
router = APIRouter(prefix="/ui", include_in_schema=False)

Reader = Annotated[ConsoleUser, Depends(viewer(Role.auditor, AuditEventId.query))]
AuditReader = Annotated[
    ConsoleUser, Depends(viewer(Role.auditor, AuditEventId.audit_log_used, "R"))
]
Reprocessor = Annotated[
    ConsoleUser,
    Depends(checked_form(Role.operator, AuditEventId.instances_accessed, "U", "reprocess")),
]
Completer = Annotated[
    ConsoleUser,
    Depends(checked_form(Role.operator, AuditEventId.instances_accessed, "U", "complete")),
]
Retrier = Annotated[
    ConsoleUser, Depends(checked_form(Role.operator, AuditEventId.export, "U", "retry"))
]
Leaver = Annotated[
    ConsoleUser,
    Depends(checked_form(Role.auditor, AuditEventId.user_authentication, "E", "logout")),
]

NOTICES = {
    "reprocess": "The study will be classified again as a new run.",
    "complete": "The study's quiet period was ended; it will be queued for classification.",
    "retry": "The export is queued to be sent again.",
    "refused": "Nothing was changed: the study or export is not in a state that allows it.",
}
_PRIORITIES = [p.name for p in sorted(Priority, reverse=True)]
_STATES = [s.value for s in StudyState]
_LOGIN_CSRF_PATH = "/ui/login"
_ACTIVE = {
    "worklist.html": "worklist",
    "study.html": "worklist",
    "exports.html": "exports",
    "audit.html": "audit",
    "audit_verify.html": "audit",
}


def _page(
    request: Request, name: str, user: ConsoleUser | None, status: int = 200, **context: Any
) -> HTMLResponse:
    notice = request.query_params.get("notice")
    return templates.TemplateResponse(
        request,
        name,
        {
            "user": user,
            "notice": NOTICES.get(notice or ""),
            "active": _ACTIVE.get(name),
            **context,
        },
        status_code=status,
    )


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


# -- signing in and out -----------------------------------------------------------------


def _login_page(request: Request, failed: bool = False, status: int = 200) -> Response:
    value = secrets.token_urlsafe(24)
    response = _page(request, "login.html", None, status, login_csrf=value, failed=failed)
    response.set_cookie(
        LOGIN_COOKIE,
        value,
        path=_LOGIN_CSRF_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, call: CallAuditDep) -> Response:
    call.skip = True  # an empty form shows nothing of anyone
    return _login_page(request)


@router.post("/login")
def login(
    request: Request,
    db: DbDep,
    call: CallAuditDep,
    token: Annotated[str, Form(max_length=256)] = "",
    csrf: Annotated[str, Form(max_length=128)] = "",
) -> Response:
    call.describe(AuditEventId.user_authentication, "E", "login")
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not secrets.compare_digest(expected, csrf):
        call.raise_alert("csrf_failure")
        raise Problem(403, "the sign-in form's CSRF token is missing or wrong", "csrf")
    client = request.client.host if request.client else "unknown"
    store: TokenStore = request.app.state.tokens
    try:
        principal = store.authenticate(token)
    except AuthFailure as failure:
        rate_limit(request, call, f"address:{client}")
        call.raise_alert(f"{failure.reason}_token", failure.name)
        return _login_page(request, failed=True, status=401)
    with db.session() as session:
        token_id = session.scalar(select(ApiToken.id).where(ApiToken.name == principal.name))
    if token_id is None:  # revoked and deleted between the two reads
        raise Problem(401, "the token is no longer known", "unauthorized")
    call.actor = principal.name
    call.details["role"] = principal.role.value
    call.details["via"] = "console"
    codec: SessionCodec = request.app.state.console_sessions
    value, _ = codec.issue(token_id, principal.name)
    response = RedirectResponse("/ui", status_code=303)
    response.set_cookie(
        COOKIE,
        value,
        max_age=int(codec.lifetime_s),
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(LOGIN_COOKIE, path=_LOGIN_CSRF_PATH)
    return response


@router.post("/logout")
def logout(_: Leaver) -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


# -- worklist and study -----------------------------------------------------------------


def _choice(value: str | None, allowed: list[str]) -> str | None:
    return value if value in allowed else None


@router.get("", response_class=HTMLResponse)
def worklist(
    request: Request,
    db: DbDep,
    audit: AuditDep,
    user: Reader,
    call: CallAuditDep,
    state: Annotated[str | None, Query(max_length=16)] = None,
    priority: Annotated[str | None, Query(max_length=16)] = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    q: Annotated[str | None, Query(max_length=64)] = None,
    page: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 1,
) -> Response:
    search = (q or "").strip() or None
    chosen_priority = _choice(priority, _PRIORITIES)
    wanted = queries.WorklistFilter(
        state=_choice(state, _STATES),
        priority=int(Priority[chosen_priority]) if chosen_priority else None,
        modality=(modality or "").strip().upper() or None,
        search=search,
        page=page,
    )
    reference = audit.patient_ref(search) if search else None
    if reference:
        # A search may be for a patient: record it under the pseudonym, like the API.
        call.patient_ref = reference
    result = queries.worklist(db, wanted, reference)
    call.details.update(view="worklist", count=sum(len(rows) for _, rows in result.lanes))
    filters = {
        "state": wanted.state or "",
        "priority": chosen_priority or "",
        "modality": wanted.modality or "",
        "q": search or "",
    }
    return _page(
        request,
        "worklist.html",
        user,
        result=result,
        filters=filters,
        states=_STATES,
        priorities=_PRIORITIES,
        auto_refresh=page == 1 and not search,
    )


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study(
    request: Request, study_uid: str, db: DbDep, user: Reader, call: CallAuditDep
) -> Response:
    call.study_uid = study_uid[:64]
    view = queries.study_view(db, study_uid)
    if view is None:
        return _page(request, "missing.html", user, status=404, what="study")
    call.patient_ref = view.patient_ref
    call.details["view"] = "study"
    return _page(request, "study.html", user, study=view)


def _study_action(
    db: Database, audit: AuditLog, call: CallAudit, study_uid: str, actor: str, action: str
) -> Response:
    call.study_uid = study_uid[:64]
    with db.session() as session:
        call.patient_ref = session.scalar(
            select(Study.patient_ref).where(Study.study_uid == study_uid)
        )
    act = actions.reprocess_study if action == "reprocess" else actions.mark_study_complete
    done = act(db, audit, study_uid, actor)
    call.details["changed"] = done
    notice = action if done else "refused"
    return RedirectResponse(f"/ui/studies/{study_uid}?notice={notice}", status_code=303)


@router.post("/studies/{study_uid}/reprocess")
def reprocess(
    study_uid: str, db: DbDep, audit: AuditDep, who: Reprocessor, call: CallAuditDep
) -> Response:
    return _study_action(db, audit, call, study_uid, who.name, "reprocess")


@router.post("/studies/{study_uid}/complete")
def complete(
    study_uid: str, db: DbDep, audit: AuditDep, who: Completer, call: CallAuditDep
) -> Response:
    return _study_action(db, audit, call, study_uid, who.name, "complete")


# -- exports ----------------------------------------------------------------------------


@router.get("/exports", response_class=HTMLResponse)
def exports(
    request: Request,
    db: DbDep,
    user: Reader,
    call: CallAuditDep,
    state: Annotated[str, Query(max_length=16)] = ExportState.dead.value,
    page: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 1,
) -> Response:
    if state not in queries.EXPORT_STATES:
        state = ExportState.dead.value
    view = queries.exports_view(db, state, page)
    call.details.update(view="exports", state=state, count=len(view.exports))
    return _page(request, "exports.html", user, view=view, states=queries.EXPORT_STATES)


@router.post("/exports/{export_id}/retry")
def retry(
    request: Request,
    export_id: int,
    db: DbDep,
    audit: AuditDep,
    settings: SettingsDep,
    _: Retrier,
    call: CallAuditDep,
) -> Response:
    with db.session() as session:
        row = session.get(Export, export_id)
        if row is None:
            raise Problem(404, f"no export {export_id}", "not-found")
        call.study_uid = row.study_uid
    call.details["export_id"] = export_id
    done = requeue_export(db, audit, settings, export_id)
    call.details["changed"] = done
    back = (
        "/ui/exports"
        if request.query_params.get("back") != "study"
        else (f"/ui/studies/{call.study_uid}")
    )
    return RedirectResponse(f"{back}?notice={'retry' if done else 'refused'}", status_code=303)


# -- audit ------------------------------------------------------------------------------


def _moment(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


@router.get("/audit", response_class=HTMLResponse)
def audit_search(
    request: Request,
    db: DbDep,
    audit: AuditDep,
    user: AuditReader,
    call: CallAuditDep,
    start: Annotated[str | None, Query(alias="from", max_length=32)] = None,
    end: Annotated[str | None, Query(alias="to", max_length=32)] = None,
    event_id: Annotated[str | None, Query(max_length=16)] = None,
    actor: Annotated[str | None, Query(max_length=128)] = None,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    patient_id: Annotated[str | None, Query(max_length=64)] = None,
    outcome: Annotated[str | None, Query(max_length=2)] = None,
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> Response:
    wanted = queries.AuditFilter(
        start=_moment(start),
        end=_moment(end),
        event_id=event_id if event_id in queries.EVENT_NAMES else None,
        actor=(actor or "").strip() or None,
        study_uid=(study_uid or "").strip() or None,
        outcome=int(outcome) if outcome in ("0", "4", "8", "12") else None,
        before=before,
    )
    patient_text = (patient_id or "").strip()
    reference = audit.patient_ref(patient_text) if patient_text else None
    call.patient_ref = reference
    call.study_uid = wanted.study_uid
    view = queries.audit_page(db, wanted, reference)
    call.details.update(view="audit", count=len(view.events))
    filters = {
        "from": start or "",
        "to": end or "",
        "event_id": wanted.event_id or "",
        "actor": wanted.actor or "",
        "study_uid": wanted.study_uid or "",
        "outcome": "" if wanted.outcome is None else str(wanted.outcome),
        # the searcher's own text, back in the form: it is never stored or logged
        "patient_id": patient_text,
    }
    return _page(
        request,
        "audit.html",
        user,
        view=view,
        filters=filters,
        patient_searched=reference is not None,
        event_names=queries.EVENT_NAMES,
    )


@router.get("/audit/verify", response_class=HTMLResponse)
def audit_verify(
    request: Request, audit: AuditDep, user: AuditReader, call: CallAuditDep
) -> Response:
    """Walk the whole hash chain (on request: its cost grows with the trail)."""
    report = audit.verify()
    call.event_type = "verify"
    call.details.update(view="audit-verify", ok=report.ok, count=report.count)
    if not report.ok and report.problem is not None:
        audit.record(
            AuditEventId.security_alert,
            event_type="integrity_failure",
            outcome=Outcome.serious_failure,
            actor=user.name,
            details={
                "kind": report.problem.kind,
                "seq": report.problem.seq,
                "reason": report.problem.message,
            },
        )
    return _page(request, "audit_verify.html", user, report=report)
