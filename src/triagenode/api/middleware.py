"""ASGI middleware of the admin API: security headers, body size limit, call auditing.

Written as plain ASGI so they see every response, including the problem documents of
exception handlers, and never buffer bodies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from triagenode.api.problems import problem_response
from triagenode.audit.events import AuditEventId, AuditLog, Outcome

__all__ = [
    "BodyLimitMiddleware",
    "CallAudit",
    "CallAuditMiddleware",
    "NulRefusingMiddleware",
    "SecurityHeadersMiddleware",
]

log = logging.getLogger("triagenode.api.access")

_DOCS_PATHS = ("/docs",)
# Swagger UI's scripts and styles come from the node itself (api/static/swagger-ui) and the
# page has no inline script; Swagger UI sets inline style attributes, hence style-src.
# Everything else the API serves is data and may load nothing at all.
_DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
)
_API_CSP = "default-src 'none'; frame-ancestors 'none'"


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope["path"].startswith(_DOCS_PATHS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "no-referrer"
                headers["Content-Security-Policy"] = _DOCS_CSP if docs else _API_CSP
                if not docs:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, by header or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0
        overflow = started = False

        async def counting_receive() -> Message:
            nonlocal seen, overflow
            if overflow:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Look like a vanished client to the app, then answer 413 in its place:
                    # an exception here would be turned into a 400 by the body parser.
                    overflow = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflow and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not overflow:
                raise
        if overflow and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413,
            f"request body larger than {self.max_bytes} bytes",
            "body-too-large",
            instance=scope["path"],
        )
        await response(scope, receive, send)


class NulRefusingMiddleware:
    """Refuse with 400 a request whose path or query holds a NUL character.

    No database column can hold NUL (PostgreSQL's driver raises on it), so such a value can
    name nothing the node has; answering before any route runs keeps it from becoming a 500.
    The call is still audited (this sits inside the audit middleware).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = scope.get("query_string", b"").lower()
            if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
                response = problem_response(
                    400, "a NUL character is not allowed in a request", "bad-request"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class CallAudit:
    """What the audit event of one API call will say; routes and auth fill it in."""

    event_id: AuditEventId = AuditEventId.query
    action: str = "E"
    event_type: str | None = None
    actor: str = "anonymous"
    study_uid: str | None = None
    patient_ref: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    alert: bool = False  # a security alert: its fields are no longer overwritten
    skip: bool = False  # already recorded (repeated rate-limit rejections)

    def describe(self, event_id: AuditEventId, action: str, event_type: str | None) -> None:
        if not self.alert:
            self.event_id, self.action, self.event_type = event_id, action, event_type

    def raise_alert(self, event_type: str, actor: str | None = None, **details: Any) -> None:
        self.alert = True
        self.event_id, self.action, self.event_type = AuditEventId.security_alert, "E", event_type
        if actor:
            self.actor = actor
        self.details.update(details)


def _outcome(status: int) -> Outcome:
    if status < 400:
        return Outcome.success
    return Outcome.minor_failure if status < 500 else Outcome.serious_failure


class CallAuditMiddleware:
    """One audit event per ``/api/`` call, with the token name and client address, and one
    access log line per request without its query string (which may hold a patient ID)."""

    def __init__(self, app: ASGIApp, audit: AuditLog) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        audited = scope["path"].startswith("/api/")
        call = CallAudit()
        scope.setdefault("state", {})["call_audit"] = call
        client = scope.get("client")
        address = client[0] if client else None
        status = 500
        recorded = withheld = False
        started = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status, recorded, withheld
            if withheld:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                if audited and not call.skip:
                    # Recorded before the client sees a byte: an answer whose audit event
                    # cannot be written is withheld (fail closed), never sent unrecorded.
                    recorded = True
                    if not await run_in_threadpool(self._record, call, status, address, scope):
                        withheld = True
                        status = 503
                        response = problem_response(
                            503, "the audit trail cannot be written", "audit-unavailable"
                        )
                        await response(scope, receive, send)
                        return
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            log.info(
                "%s %s %d %.1fms actor=%s",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
                call.actor,
            )
            if audited and not call.skip and not recorded:
                await run_in_threadpool(self._record, call, status, address, scope)

    def _record(self, call: CallAudit, status: int, address: str | None, scope: Scope) -> bool:
        try:
            self.audit.record(
                call.event_id,
                event_type=call.event_type,
                action=call.action,
                outcome=_outcome(status),
                actor=call.actor,
                actor_address=address,
                study_uid=call.study_uid,
                patient_ref=call.patient_ref,
                details={
                    **call.details,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                },
            )
        except Exception:
            log.exception("could not record the audit event of an API call")
            return False
        return True
