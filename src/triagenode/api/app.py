"""The admin API's application factory: no global app, engine or settings at import time."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from triagenode import __version__
from triagenode.api.docs import install_docs
from triagenode.api.middleware import (
    BodyLimitMiddleware,
    CallAuditMiddleware,
    NulRefusingMiddleware,
    SecurityHeadersMiddleware,
)
from triagenode.api.problems import install_problem_handlers
from triagenode.api.ratelimit import RateLimiter
from triagenode.api.routes import audit as audit_routes
from triagenode.api.routes import exports, health, predict, queue, studies, tokens
from triagenode.api.services import ApiServices, Predictor
from triagenode.api.tokens import TokenStore
from triagenode.api.uploads import PredictSlots
from triagenode.audit.events import AuditLog
from triagenode.config.settings import Settings
from triagenode.store.db import Database

__all__ = ["ApiServices", "Predictor", "create_app"]

_DESCRIPTION = """Admin API of a triagenode DICOM AI node: studies, queue, exports, the
audit trail and research predictions. Every call under `/api/v1` needs a bearer token
(`triagenode token create`) and is recorded in the audit trail. Results of the demo model
say DEMO, NOT FOR CLINICAL USE; no result is for diagnostic use."""


def create_app(
    settings: Settings,
    db: Database,
    audit: AuditLog,
    services: ApiServices | None = None,
    *,
    extensions: Sequence[Callable[[FastAPI], None]] = (),
) -> FastAPI:
    """Build the admin API.

    Parameters
    ----------
    settings
        The node's settings (``api`` section: limits, CORS; ``node``/``scp`` for names).
    db
        The node's database, already migrated.
    audit
        The audit log every call is recorded in.
    services
        Optional model, readiness and reachability hooks; see :class:`ApiServices`.
    extensions
        Installers of more routes on the same app, behind the same middleware (the operator
        console's :func:`~triagenode.console.install_console`; see :mod:`triagenode.web`).

    Returns
    -------
    FastAPI
        Serve it with uvicorn (``triagenode api`` or ``serve``).
    """
    app = FastAPI(
        title="triagenode admin API",
        version=__version__,
        description=_DESCRIPTION,
        docs_url=None,  # installed below from the package's own assets, not a CDN
        redoc_url=None,
    )
    install_docs(app)
    app.state.settings = settings
    app.state.db = db
    app.state.audit = audit
    app.state.services = services or ApiServices()
    app.state.tokens = TokenStore(db)
    app.state.rate_limiter = RateLimiter(settings.api.rate_limit_per_minute)
    app.state.rate_limited = set()
    app.state.predict_slots = PredictSlots(settings.api.max_concurrent_predictions)
    install_problem_handlers(app)
    for module in (health, studies, queue, exports, audit_routes, predict, tokens):
        app.include_router(module.router)
    for extend in extensions:
        extend(app)
    # Added innermost first: CORS (when configured) sits inside the body limit, inside the
    # audit (so a 413 is recorded too), inside the security headers (which every answer gets).
    if settings.api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(NulRefusingMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.api.max_body_bytes)
    app.add_middleware(CallAuditMiddleware, audit=audit)
    app.add_middleware(SecurityHeadersMiddleware)
    return app
