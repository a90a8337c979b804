"""The node's web application: the admin API with the operator console mounted under ``/ui``.

The console builds on the API's dependencies, middleware and tokens, so it sits above the
``api`` package; this module, above both, puts them together.
"""

from __future__ import annotations

from fastapi import FastAPI

from triagenode.api.app import create_app
from triagenode.api.services import ApiServices
from triagenode.audit.events import AuditLog
from triagenode.config.settings import Settings
from triagenode.console import install_console
from triagenode.store.db import Database

__all__ = ["create_web_app"]


def create_web_app(
    settings: Settings, db: Database, audit: AuditLog, services: ApiServices | None = None
) -> FastAPI:
    """The admin API (:func:`~triagenode.api.app.create_app`) with the operator console."""
    return create_app(settings, db, audit, services, extensions=(install_console,))
