"""The operator console: server-rendered pages under ``/ui`` on the admin API's port.

Signed in with an API token, which is exchanged for a session cookie; every page view and
action is audited and role-checked like the API call it mirrors. Its styles and script are
files of this package: nothing is loaded from elsewhere (hospitals are air-gapped).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from triagenode.api.problems import problem_response
from triagenode.console.auth import LoginRequired
from triagenode.console.routes import router, templates
from triagenode.console.session import SessionCodec

__all__ = ["install_console"]

STATIC_PATH = "/ui/static"


def duration(value: timedelta | None) -> str:
    """A short human duration: ``42 s``, ``7 min``, ``3 h 05 min``, ``2 d 4 h``."""
    if value is None:
        return "–"
    seconds = int(value.total_seconds())
    if seconds < 0:
        return "0 s"
    if seconds < 90:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def moment(value: datetime | None) -> str:
    """A UTC time as ``2026-11-28 21:04:05 UTC``."""
    if value is None:
        return "–"
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def install_console(app: FastAPI, session_lifetime_s: float = 8 * 3600) -> None:
    """Add the console's pages, its static files and its sign-in redirect to ``app``."""
    app.state.console_sessions = SessionCodec(session_lifetime_s)
    templates.env.filters["duration"] = duration
    templates.env.filters["moment"] = moment
    app.include_router(router)
    app.mount(
        STATIC_PATH,
        StaticFiles(directory=str(Path(__file__).parent / "static")),
        name="console-static",
    )

    async def _login_required(request: Request, exc: Exception) -> Response:
        if request.method == "GET":
            return RedirectResponse("/ui/login", status_code=303)
        return problem_response(401, "sign in to the console first", "unauthorized")

    app.add_exception_handler(LoginRequired, _login_required)
