"""Who is looking at the console: the session dependency, role checks and CSRF checks.

Mirrors :func:`triagenode.api.deps.require`: the same roles, the same rate limit, and the
same audit event per request (the API's call-audit middleware records console pages too).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Form, Request

from triagenode.api.deps import CallAuditDep, rate_limit
from triagenode.api.middleware import CallAudit
from triagenode.api.problems import Problem
from triagenode.api.tokens import Role
from triagenode.audit.events import AuditEventId
from triagenode.console.session import COOKIE, Session, SessionCodec
from triagenode.store.db import Database
from triagenode.store.models import ApiToken, utcnow

__all__ = ["ConsoleUser", "LoginRequired", "active_token", "checked_form", "viewer"]


class LoginRequired(Exception):
    """No usable session: pages send the browser to the sign-in form."""


@dataclass(frozen=True)
class ConsoleUser:
    name: str
    role: Role
    session: Session
    csrf: str

    @property
    def can_operate(self) -> bool:
        return self.role.allows(Role.operator)


def active_token(db: Database, token_id: int, name: str) -> tuple[Role | None, str | None]:
    """The role of a still valid token, or why it is not (``unknown``/``revoked``/``expired``)."""
    with db.session() as session:
        row = session.get(ApiToken, token_id)
        if row is None or not hmac.compare_digest(row.name, name):
            return None, "unknown"
        if row.revoked_at is not None:
            return None, "revoked"
        if row.expires_at is not None and row.expires_at <= utcnow():
            return None, "expired"
        return Role(row.role), None


def _codec(request: Request) -> SessionCodec:
    codec: SessionCodec = request.app.state.console_sessions
    return codec


def _user(request: Request, call: CallAudit, role: Role) -> ConsoleUser:
    codec = _codec(request)
    client = request.client.host if request.client else "unknown"
    raw = request.cookies.get(COOKIE)
    session = codec.read(raw)
    if session is None:
        if raw:  # a cookie that is forged, altered or past its time
            rate_limit(request, call, f"address:{client}")
            call.raise_alert("invalid_session")
        else:  # nobody signed in yet: nothing was shown, nothing to record
            call.skip = True
        raise LoginRequired
    found, reason = active_token(request.app.state.db, session.token_id, session.token_name)
    if found is None:
        rate_limit(request, call, f"address:{client}")
        call.raise_alert(f"{reason}_token", session.token_name)
        raise LoginRequired
    call.actor = session.token_name
    rate_limit(request, call, f"token:{session.token_name}")
    if not found.allows(role):
        call.raise_alert("use_of_restricted_function", needed=role.value)
        raise Problem(
            403, f"this needs the {role.value} role; the token has {found.value}", "forbidden"
        )
    return ConsoleUser(session.token_name, found, session, codec.csrf(session))


def viewer(
    role: Role, event_id: AuditEventId, action: str = "E", event_type: str | None = None
) -> Callable[..., ConsoleUser]:
    """A dependency for pages: a signed-in user of ``role`` or higher, audited as given."""

    def dependency(request: Request, call: CallAuditDep) -> ConsoleUser:
        call.describe(event_id, action, event_type)
        return _user(request, call, role)

    return dependency


def checked_form(
    role: Role, event_id: AuditEventId, action: str = "U", event_type: str | None = None
) -> Callable[..., ConsoleUser]:
    """A dependency for form posts: as :func:`viewer`, and the form's CSRF token must match.

    Raises
    ------
    Problem
        403 ``csrf`` when the token is missing or wrong, recorded as a security alert.
    """

    def dependency(
        request: Request,
        call: CallAuditDep,
        csrf: Annotated[str, Form(max_length=128)] = "",
    ) -> ConsoleUser:
        call.describe(event_id, action, event_type)
        user = _user(request, call, role)
        if not _codec(request).csrf_ok(user.session, csrf):
            call.raise_alert("csrf_failure")
            raise Problem(403, "the form's CSRF token is missing or wrong", "csrf")
        return user

    return dependency
