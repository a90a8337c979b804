"""FastAPI dependencies as ``Annotated`` aliases: the node's parts, and who is calling.

Authentication, the role check and rate limiting happen in one dependency,
:func:`require`, which also tells the call's audit event what kind of access it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from triagenode.api.middleware import CallAudit
from triagenode.api.problems import Problem
from triagenode.api.ratelimit import RateLimiter
from triagenode.api.services import ApiServices
from triagenode.api.tokens import AuthFailure, Principal, Role, TokenStore
from triagenode.audit.events import AuditEventId, AuditLog
from triagenode.config.settings import Settings
from triagenode.store.db import Database

__all__ = [
    "AuditDep",
    "CallAuditDep",
    "DbDep",
    "ServicesDep",
    "SettingsDep",
    "rate_limit",
    "require",
]

_bearer = HTTPBearer(auto_error=False, description="A token from `triagenode token create`")


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def _audit(request: Request) -> AuditLog:
    audit: AuditLog = request.app.state.audit
    return audit


def _services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services
    return services


def _call_audit(request: Request) -> CallAudit:
    call: CallAudit | None = request.scope.setdefault("state", {}).get("call_audit")
    if call is None:  # outside the audit middleware (never in the app): record nothing
        call = CallAudit(skip=True)
    return call


SettingsDep = Annotated[Settings, Depends(_settings)]
DbDep = Annotated[Database, Depends(_db)]
AuditDep = Annotated[AuditLog, Depends(_audit)]
ServicesDep = Annotated[ApiServices, Depends(_services)]
CallAuditDep = Annotated[CallAudit, Depends(_call_audit)]

_UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="triagenode"'}


def rate_limit(request: Request, call: CallAudit, key: str) -> None:
    """Admit one more request of ``key`` or raise 429 (recorded once per burst)."""
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.check(key)
    noted: set[str] = request.app.state.rate_limited
    if not wait:
        noted.discard(key)
        return
    # Record the first rejection of a burst only: a flood must not flood the trail.
    if key in noted:
        call.skip = True
    noted.add(key)
    call.raise_alert("rate_limited")
    raise Problem(
        429,
        f"more than {limiter.per_minute} requests per minute",
        "rate-limited",
        {"Retry-After": RateLimiter.retry_after(wait)},
    )


def require(
    role: Role, event_id: AuditEventId, action: str = "E", event_type: str | None = None
) -> Callable[..., Principal]:
    """A dependency that admits tokens of ``role`` or higher.

    Parameters
    ----------
    role
        The least role the route needs.
    event_id, action, event_type
        How the call is recorded in the audit trail when it is admitted.

    Raises
    ------
    Problem
        401 without a valid token, 403 for a lesser role, 429 over the rate limit; each is
        recorded as a security alert.
    """

    def dependency(
        request: Request,
        call: CallAuditDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        call.describe(event_id, action, event_type)
        client = request.client.host if request.client else "unknown"
        tokens: TokenStore = request.app.state.tokens
        try:
            principal = tokens.authenticate(credentials.credentials if credentials else None)
        except AuthFailure as failure:
            rate_limit(request, call, f"address:{client}")
            call.raise_alert(f"{failure.reason}_token", failure.name)
            raise Problem(
                401, f"bearer token {failure.reason}", "unauthorized", _UNAUTHORIZED
            ) from None
        call.actor = principal.name
        rate_limit(request, call, f"token:{principal.name}")
        if not principal.role.allows(role):
            call.raise_alert("use_of_restricted_function", needed=role.value)
            raise Problem(
                403, f"this needs the {role.value} role; the token has {principal.role.value}",
                "forbidden",
            )  # fmt: skip
        if principal.first_use:
            request.app.state.audit.record(
                AuditEventId.user_authentication,
                event_type="login",
                actor=principal.name,
                actor_address=client,
                details={"role": principal.role.value},
            )
        return principal

    return dependency
