"""The uvicorn server that serves the admin app, used by ``triagenode api`` and the node."""

from __future__ import annotations

import ssl
from typing import Any

import uvicorn
from fastapi import FastAPI

__all__ = ["build_server"]


def build_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for ``app``: its own access log is off (ours drops query strings,
    which may hold a patient ID) and it leaves the node's logging configuration alone.

    With ``api.tls_cert`` and ``api.tls_key`` in the app's settings it serves HTTPS only;
    with ``api.tls_client_ca`` too, every client must present a certificate that CA signed.
    """
    tls: dict[str, Any] = {}
    api = getattr(getattr(app.state, "settings", None), "api", None)
    if api is not None and api.tls_cert is not None:
        tls = {"ssl_certfile": str(api.tls_cert), "ssl_keyfile": str(api.tls_key)}
        if api.tls_client_ca is not None:
            tls.update(ssl_ca_certs=str(api.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
        **tls,
    )
    return uvicorn.Server(config)
