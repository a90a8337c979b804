"""``/docs``: Swagger UI served from the package itself, never from a CDN.

Hospital networks are often air-gapped; a docs page that loads its scripts from the internet
is blank there. The assets are vendored under ``api/static/swagger-ui`` (Apache-2.0, see the
README and LICENSE there) and the page has no inline script, so its Content-Security-Policy
allows scripts from the node only.
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["DOCS_ASSETS", "DOCS_STATIC_URL", "install_docs"]

DOCS_ASSETS = Path(__file__).parent / "static" / "swagger-ui"
DOCS_STATIC_URL = "/docs/static"

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" type="text/css" href="{static}/swagger-ui.css">
<link rel="icon" type="image/png" href="{static}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi}"></div>
<script src="{static}/swagger-ui-bundle.js"></script>
<script src="{static}/triagenode-docs.js"></script>
</body>
</html>
"""


def install_docs(app: FastAPI, path: str = "/docs") -> None:
    """Serve Swagger UI for ``app`` at ``path`` from the vendored assets.

    Create the app with ``docs_url=None`` so FastAPI's CDN page is not installed too.
    """
    page = _PAGE.format(
        title=html.escape(f"{app.title} - API documentation"),
        static=DOCS_STATIC_URL,
        openapi=html.escape(app.openapi_url or "/openapi.json"),
    )
    app.mount(DOCS_STATIC_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-static")

    @app.get(path, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page)
